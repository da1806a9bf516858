"""The ``anomalyd`` command (also ``python -m anomalyd``).

Subcommands:

- ``run [--config FILE] [--broker HOST:PORT] [--model PATH] [--metrics-addr HOST:PORT]``:
  the daemon (embedded defaults without a file);
- ``check-config FILE``: validate a configuration, print every error with its key path;
- ``inspect-model PATH``: print a model's contract, the graph check and the providers;
- ``simulate``: publish the synthetic fleet, with anomalies, over MQTT;
- ``demo``: daemon + simulator + a live view of scores and alerts, in one command.

Exit codes: 0 ok; 78 configuration error; 65 bad model; 69 requested execution provider
unavailable; 76 the broker refused our credentials at start; 70 internal failure;
130 interrupted / forced stop.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from anomalyd import __version__
from anomalyd.errors import AnomalydError, ConfigError, ModelContractError

if TYPE_CHECKING:
    from anomalyd.simulator import SimulationSettings

PROG = "anomalyd"
log = logging.getLogger("anomalyd")


def parse_address(text: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6addr]:PORT`` too) → (host, port); ``ConfigError`` naming ``what``."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"expected HOST:PORT, got {text!r}", what)
    host = host.removeprefix("[").removesuffix("]")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"expected a port number after ':', got {port_text!r}", what) from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"expected a port between 0 and 65535, got {port}", what)
    return host, port


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if math.isnan(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


# --------------------------------------------------------------------------- run


def _run_overrides(args: argparse.Namespace) -> dict[str, object]:
    overrides: dict[str, object] = {}
    if args.broker:
        host, port = parse_address(args.broker, "--broker")
        overrides["mqtt.host"], overrides["mqtt.port"] = host, port
    if args.model:
        overrides["model.path"] = str(args.model)
    if args.metrics_addr:
        host, port = parse_address(args.metrics_addr, "--metrics-addr")
        overrides["metrics.host"], overrides["metrics.port"] = host, port
    if args.log_level:
        overrides["logging.level"] = args.log_level
    return overrides


def _cmd_run(args: argparse.Namespace) -> int:
    from anomalyd.config import load_config
    from anomalyd.logsetup import configure
    from anomalyd.service import run_service

    config = load_config(args.config, _run_overrides(args))  # ConfigError → 78 before logging exists
    configure(config.logging.level, config.logging.format)
    log.info("anomalyd %s starting (config: %s)", __version__, args.config or "embedded defaults")
    try:
        return run_service(config)
    except AnomalydError as exc:
        # One clear line in the journal; main() turns it into the exit code.
        log.critical("start failed: %s", exc)
        raise _ReportedError(exc.exit_code) from None


class _ReportedError(Exception):
    """An error that was already logged; only its exit code is left to return."""

    def __init__(self, exit_code: int) -> None:
        super().__init__(exit_code)
        self.exit_code = exit_code


# --------------------------------------------------------------------------- check-config


def _cmd_check_config(args: argparse.Namespace) -> int:
    from anomalyd.config import config_errors

    errors = config_errors(args.config)
    if not errors:
        print(f"{args.config}: OK")
        return 0
    for err in errors:
        print(f"{args.config}: {err}", file=sys.stderr)
    print(f"{args.config}: {len(errors)} error(s)", file=sys.stderr)
    return ConfigError.exit_code


# --------------------------------------------------------------------------- inspect-model


def _cmd_inspect_model(args: argparse.Namespace) -> int:
    import onnxruntime

    from anomalyd.model import SessionOptions, load_model, read_contract

    contract = read_contract(args.path)  # ModelContractError → 65
    print(contract.describe())
    try:
        model = load_model(args.path, SessionOptions(providers="auto"))
    except ModelContractError as exc:
        print(f"graph check     FAILED: {exc}")
        return ModelContractError.exit_code
    length, n_feat = contract.window_length, contract.n_features
    print(
        f"graph check     OK: input window (batch, {length}, {n_feat}) float32; "
        f"outputs score (batch,), contributions (batch, {n_feat})"
    )
    print(f"providers       available {onnxruntime.get_available_providers()}; runs on {model.providers}")
    return 0


# --------------------------------------------------------------------------- simulate / demo


def _simulation_settings(args: argparse.Namespace) -> SimulationSettings:
    from anomalyd.simulator import SimulationSettings

    try:
        return SimulationSettings(
            devices=args.devices,
            rate_hz=args.rate,
            duration_s=args.duration,
            seed=args.seed,
            anomalies_per_device_hour=args.anomalies,
            speed=args.speed,
            qos=args.qos,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _cmd_simulate(args: argparse.Namespace) -> int:
    from anomalyd.logsetup import configure
    from anomalyd.simulator import simulate

    configure("INFO", "text")
    settings = _simulation_settings(args)
    host, port = parse_address(args.broker, "--broker")
    return simulate(settings, host, port, start_ts=args.start_ts)


def _cmd_demo(args: argparse.Namespace) -> int:
    from anomalyd.logsetup import configure
    from anomalyd.simulator import run_demo

    # The daemon's own log lines would drown the live view: warnings and errors only.
    configure("WARNING", "text")
    settings = _simulation_settings(args)
    broker = parse_address(args.broker, "--broker") if args.broker else None
    metrics = parse_address(args.metrics_addr, "--metrics-addr")
    return run_demo(settings, broker, args.model, metrics)


def _add_simulation_args(p: argparse.ArgumentParser, speed: float, anomalies: float, devices: int) -> None:
    p.add_argument("--devices", type=_positive_int, default=devices, help=f"devices (default {devices})")
    p.add_argument("--rate", type=_positive_float, default=1.0, help="readings per second per device (1)")
    p.add_argument(
        "--duration", type=_positive_float, default=3600.0, help="seconds of data per device (3600)"
    )
    p.add_argument("--seed", type=int, default=1, help="random seed (1; the default model trained on seed 0)")
    p.add_argument(
        "--anomalies",
        type=_non_negative_float,
        default=anomalies,
        help=f"injected anomalies per device-hour of data ({anomalies:g}; 0: none)",
    )
    p.add_argument(
        "--speed",
        type=_positive_float,
        default=speed,
        help=f"data seconds per real second ({speed:g}; 'inf': as fast as possible)",
    )
    p.add_argument("--qos", type=int, choices=(0, 1, 2), default=0, help="QoS of the telemetry (0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="anomalyd: anomaly detection for sensor fleets over MQTT with ONNX Runtime"
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the daemon", description="Run the daemon until SIGTERM/SIGINT.")
    p.add_argument("--config", type=Path, help="configuration file (TOML); default: embedded defaults")
    p.add_argument("--broker", metavar="HOST:PORT", help="MQTT broker (overrides mqtt.host/port)")
    p.add_argument("--model", type=Path, metavar="PATH", help="model file (overrides model.path)")
    p.add_argument(
        "--metrics-addr", metavar="HOST:PORT", help="metrics endpoint (overrides metrics.host/port)"
    )
    p.add_argument(
        "--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="overrides logging.level"
    )
    p.set_defaults(run=_cmd_run)

    p = sub.add_parser("check-config", help="validate a configuration file", description="Validate FILE.")
    p.add_argument("config", type=Path, metavar="FILE")
    p.set_defaults(run=_cmd_check_config)

    p = sub.add_parser("inspect-model", help="print a model's contract", description="Describe a model file.")
    p.add_argument("path", type=Path, metavar="PATH")
    p.set_defaults(run=_cmd_inspect_model)

    p = sub.add_parser(
        "simulate",
        help="publish simulated devices over MQTT",
        description="Publish the synthetic fleet (with labelled anomalies) as device telemetry.",
    )
    p.add_argument("--broker", default="127.0.0.1:1883", metavar="HOST:PORT", help="MQTT broker")
    p.add_argument("--start-ts", type=float, help="timestamp of the first reading (default: so it ends now)")
    _add_simulation_args(p, speed=1.0, anomalies=2.0, devices=4)
    p.set_defaults(run=_cmd_simulate)

    p = sub.add_parser(
        "demo",
        help="daemon + simulator + live view, in one command",
        description="Run the daemon and the simulator against a local broker and show scores and "
        "alerts as they arrive. Without --broker: 127.0.0.1:1883 if a broker listens there, else a "
        "private mosquitto on a free port (if mosquitto is installed). Ctrl-C stops.",
    )
    p.add_argument("--broker", metavar="HOST:PORT", help="MQTT broker (default: see above)")
    p.add_argument("--model", type=Path, metavar="PATH", help="model file (default: the shipped model)")
    p.add_argument(
        "--metrics-addr", default="127.0.0.1:0", metavar="HOST:PORT", help="metrics (any free port)"
    )
    _add_simulation_args(p, speed=30.0, anomalies=4.0, devices=4)
    p.set_defaults(run=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``anomalyd`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except _ReportedError as exc:
        return exc.exit_code
    except AnomalydError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `anomalyd inspect-model m.onnx | head`: the reader left; that is not an error.
        # Point stdout at /dev/null so the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    return code
