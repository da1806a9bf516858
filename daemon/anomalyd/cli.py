"""The ``anomalyd`` command (also ``python -m anomalyd``).

Subcommands:

- ``run [--config FILE] [--broker HOST:PORT] [--model PATH] [--metrics-addr HOST:PORT]``:
  the daemon (embedded defaults without a file);
- ``check-config FILE``: validate a configuration, print every error with its key path;
- ``inspect-model PATH``: print a model's contract, the graph check and the providers;
- ``simulate``: publish the synthetic fleet, with anomalies, over MQTT;
- ``demo``: daemon + simulator + a live view of scores and alerts, in one command;
- ``bench``: the daemon end to end (throughput, latency, memory, start-up) against limits
  measured in the same run.

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
    from dataclasses import replace

    from anomalyd.simulator import SIMULATED_FLEET, SimulationSettings

    base = SIMULATED_FLEET  # what --rate, --duration and --seed (None when not given) leave alone
    try:
        fleet = replace(
            base,
            n_devices=args.devices,
            anomalies_per_device_hour=args.anomalies,
            period_s=base.period_s if args.rate is None else 1.0 / args.rate,
            duration_s=base.duration_s if args.duration is None else args.duration,
            seed=base.seed if args.seed is None else args.seed,
        )
        return SimulationSettings(fleet=fleet, speed=args.speed, qos=args.qos)
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


#: ``anomalyd bench`` options copied onto ``BenchSettings`` when given (else the full or
#: the quick run's own value stands).
_BENCH_TUNABLES = (
    "publishers",
    "rate",
    "array",
    "seconds_per_step",
    "max_steps",
    "probe_devices",
    "probe_rate",
    "flood_seconds",
    "rss_devices",
)
_BENCH_SCENARIOS = ("arrays", "single", "every-window")


def _cmd_bench(args: argparse.Namespace) -> int:
    from anomalyd.bench import BenchSettings, run_bench
    from anomalyd.config import Config

    model = args.model or Config().model.path
    settings = BenchSettings.quick_variant(model) if args.quick else BenchSettings(model)
    if args.flood and args.quick:
        raise ConfigError("--flood runs for minutes; it is not part of --quick", "--flood")
    settings.flood = args.flood
    settings.broker = parse_address(args.broker, "--broker") if args.broker else None
    for name in _BENCH_TUNABLES:
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    if args.scenarios:
        names = tuple(n.strip() for n in args.scenarios.split(",") if n.strip())
        bad = [n for n in names if n not in _BENCH_SCENARIOS]
        if bad or not names:
            raise ConfigError(
                f"expected some of {', '.join(_BENCH_SCENARIOS)}, got {args.scenarios!r}", "--scenarios"
            )
        settings.scenarios = names
    return run_bench(settings, args.json)


def _add_simulation_args(p: argparse.ArgumentParser, speed: float, anomalies: float, devices: int) -> None:
    p.add_argument("--devices", type=_positive_int, default=devices, help=f"devices (default {devices})")
    p.add_argument(
        "--rate", type=_positive_float, help="readings per second per device (default: the simulated fleet's)"
    )
    p.add_argument(
        "--duration", type=_positive_float, help="seconds of data per device (default: the simulated fleet's)"
    )
    p.add_argument(
        "--seed", type=int, help="random seed (default: not the one the default model was trained on)"
    )
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

    p = sub.add_parser(
        "bench",
        help="benchmark the daemon end to end",
        description="Run the real daemon behind a private mosquitto (or --broker) with publisher "
        "processes and a probe device; print throughput, latency, memory and start-up as ratios of "
        "limits measured in the same run (raw ONNX Runtime, a bare subscriber, a naive daemon). "
        "About 10 minutes; --quick: under a minute, small loads, for correctness only.",
    )
    p.add_argument("--quick", action="store_true", help="small loads, under a minute (CI)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write every figure as JSON")
    p.add_argument("--broker", metavar="HOST:PORT", help="use this broker (default: a private mosquitto)")
    p.add_argument("--model", type=Path, metavar="PATH", help="model file (default: the shipped model)")
    p.add_argument("--publishers", type=_positive_int, help="publisher processes (2)")
    p.add_argument("--rate", type=_positive_float, help="readings/s per device in paced steps (10; quick 50)")
    p.add_argument("--array", type=_positive_int, help="readings per message in the array scenarios (20)")
    p.add_argument(
        "--scenarios", metavar="LIST", help=f"comma-separated, of {', '.join(_BENCH_SCENARIOS)} (all)"
    )
    p.add_argument(
        "--seconds-per-step", type=_positive_float, help="measured seconds per load step (10; quick 1.5)"
    )
    p.add_argument("--max-steps", type=_positive_int, help="load steps per sweep at most (6; quick 2)")
    p.add_argument("--probe-devices", type=_positive_int, help="probe devices (8; quick 4)")
    p.add_argument(
        "--probe-rate", type=_positive_float, help="readings per second per probe device (5; quick 10)"
    )
    p.add_argument("--flood", action="store_true", help="add a flood at 3x the sustainable rate")
    p.add_argument("--flood-seconds", type=_positive_float, help="length of the flood (60)")
    p.add_argument(
        "--rss-devices", type=_positive_int, help="devices in the memory phase (10000; quick 1000)"
    )
    p.set_defaults(run=_cmd_bench)
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
