"""The ``anomalyd`` command (also ``python -m anomalyd``).

Subcommands:

- ``run [--config FILE] [--broker ADDRESS] [--model PATH] [--metrics-addr HOST:PORT]
  [--instance N]``: the daemon (embedded defaults without a file); ``--instance N`` runs it
  as instance N of the file's ``[cluster]`` (what ``anomalyd@N.service`` does);
- ``check-config FILE [--as-service [--unit UNIT]] [--instance N]``: check a configuration and everything
  ``run`` needs with it (secrets, TLS files, the model against the configuration, the
  state directory; ``anomalyd.preflight``), print every problem with its key path;
- ``inspect-model PATH`` (or ``--config FILE``: every model it serves): print a model's
  contract, the graph check and the providers;
- ``simulate``: publish the synthetic fleet, with anomalies, over MQTT; with
  ``--from-csv FILE --device NAME``, a recorded CSV file as one live device instead;
- ``score FILE``: score a recorded CSV file offline through the daemon's pipeline
  (``anomalyd.offline``): a CSV of per-row scores, alerts and contributions, and a plot;
- ``demo``: daemon + simulator + a live view of scores and alerts, in one command;
- ``bench``: the daemon end to end (throughput, latency, memory, start-up) against limits
  measured in the same run.

A broker ADDRESS (``--broker``) is what ``mqtt.host`` takes: ``HOST``, ``HOST:PORT``,
``[IPv6]:PORT``, ``mqtt://HOST[:PORT]`` or ``tcp://`` (plain), ``mqtts://`` or ``ssl://``
(TLS, ``run`` only); without a port, the scheme's (1883, or 8883 for TLS).

Exit codes (``anomalyd.errors``): 0 ok; 64 usage error (unknown option, no subcommand);
65 bad model or unusable CSV file; 69 requested execution provider unavailable (or, for
``score --plot``, matplotlib); 70 internal failure (a bug: the traceback is printed); 76 the
broker refused our credentials at start; 78 configuration error (``check-config``: any
problem); 130 interrupted / forced stop.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from anomalyd import __version__
from anomalyd.cli_bench import add_bench_parser
from anomalyd.cli_values import (
    broker_address,
    non_negative_float,
    non_negative_int,
    parse_address,
    plain_broker,
    positive_float,
    positive_int,
)
from anomalyd.errors import EX_SOFTWARE, AnomalydError, ConfigError, ModelContractError, UsageError

if TYPE_CHECKING:
    from anomalyd.csvdata import CsvOptions
    from anomalyd.simulator import SimulationSettings
    from anomalyd.systemd_unit import ServiceUnit

PROG = "anomalyd"
log = logging.getLogger("anomalyd")


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, except that a usage error exits 64 (EX_USAGE, sysexits.h) instead
    of argparse's 2, which sysexits does not define. Subcommand parsers inherit it."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(UsageError.exit_code, f"{self.prog}: error: {message}\n")


# --------------------------------------------------------------------------- run


def _run_overrides(args: argparse.Namespace) -> dict[str, object]:
    overrides: dict[str, object] = {}
    if args.broker:
        # The whole address as mqtt.host, so that the configuration takes it apart as it does
        # a file's (mqtts:// turns TLS on); its port, or the scheme's, beats the file's port.
        address = broker_address(args.broker, "--broker")
        overrides["mqtt.host"] = args.broker.strip()
        overrides["mqtt.port"] = address.port or address.default_port
    if args.model:
        overrides["model.path"] = str(args.model)
    if args.metrics_addr:
        host, port = parse_address(args.metrics_addr, "--metrics-addr")
        overrides["metrics.host"], overrides["metrics.port"] = host, port
    if args.log_level:
        overrides["logging.level"] = args.log_level
    return overrides


# ---- --instance N: one instance of the [cluster] a shared configuration file describes


def _instance_overrides(
    config_path: Path | None, instance: int | None, overrides: dict[str, object], *, keep_port: bool
) -> dict[str, object]:
    """``overrides`` plus what ``--instance N`` sets: ``cluster.instance = N`` and, unless
    ``keep_port`` (an explicit ``--metrics-addr``), ``metrics.port + N``, so that the
    instances of one host (``anomalyd@N.service``, all reading one file) each serve
    /metrics on a port of their own. ``ConfigError`` when the file has no ``[cluster]``."""
    if instance is None:
        return overrides
    from anomalyd.config import load_config

    try:
        alone = load_config(config_path, overrides)
    except ConfigError:
        alone = None  # the file's own problem: reported with the instance set, below
    if alone is not None and alone.cluster is None:
        raise ConfigError(
            "the configuration has no [cluster] table: --instance N picks instance N of its "
            "[cluster] (partitions and instances)",
            "--instance",
        )
    out = {**overrides, "cluster.instance": instance}
    if not keep_port:
        try:
            port = load_config(config_path, out).metrics.port
        except ConfigError:
            return out  # load_config with these overrides reports it
        if port:  # 0: any free port, for each instance already
            out["metrics.port"] = port + instance
    return out


def _cmd_run(args: argparse.Namespace) -> int:
    from anomalyd.config import load_config
    from anomalyd.logsetup import configure
    from anomalyd.service import run_service

    overrides = _instance_overrides(
        args.config, args.instance, _run_overrides(args), keep_port=bool(args.metrics_addr)
    )
    config = load_config(args.config, overrides)  # ConfigError → 78 before logging exists
    configure(config.logging.level, config.logging.format)
    log.info("anomalyd %s starting (config: %s)", __version__, args.config or "embedded defaults")
    try:
        return run_service(config, config_path=args.config, overrides=overrides)  # SIGHUP reads both again
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


def _service_unit(args: argparse.Namespace) -> ServiceUnit | None:
    """The unit ``--as-service`` / ``--unit`` asks to check as; None without them. With
    ``--instance N``, the template ``anomalyd@.service`` as instance N."""
    from anomalyd.systemd_unit import default_unit_path, read_unit

    if not args.as_service and args.unit is None:
        return None
    template = args.instance is not None
    path = args.unit if args.unit is not None else default_unit_path(template=template)
    if path is None:
        name = "anomalyd@.service" if template else "anomalyd.service"
        raise ConfigError(
            f"no {name} in /etc/systemd/system (nor the other unit directories): give --unit",
            "--as-service",
        )
    try:
        return read_unit(path, instance=str(args.instance) if template else None)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the unit file {str(path)!r}: {exc}", "--unit") from None


def _cmd_check_config(args: argparse.Namespace) -> int:
    from anomalyd.config import config_errors, load_config
    from anomalyd.preflight import check_start

    unit = _service_unit(args)
    label = str(args.config) + (f" (instance {args.instance})" if args.instance is not None else "")
    overrides = _instance_overrides(args.config, args.instance, {}, keep_port=False)
    errors = config_errors(args.config, overrides)
    summary: list[str] = []
    if not errors:
        check = check_start(load_config(args.config, overrides), unit)
        errors, summary = check.problems, check.summary
    if not errors:
        print(f"{label}: OK" + (f", as {unit.path} would run it" if unit is not None else ""))
        for line in summary:
            print(f"  {line}")
        return 0
    for err in errors:
        print(f"{label}: {err}", file=sys.stderr)
    print(f"{label}: {len(errors)} error(s)", file=sys.stderr)
    return ConfigError.exit_code


# --------------------------------------------------------------------------- inspect-model


def _cmd_inspect_model(args: argparse.Namespace) -> int:
    if (args.path is None) == (args.config is None):
        raise UsageError("inspect-model takes a model file PATH or --config FILE (one of them)")
    if args.path is not None:
        return _inspect_model(args.path)
    from anomalyd.config import load_config, model_entries

    config = load_config(args.config)  # ConfigError → 78
    entries = model_entries(config)
    if entries is None:
        return _inspect_model(config.model.path)
    # Every model of the configuration, each under a heading; the exit code is the worst.
    code = 0
    for i, entry in enumerate(entries):
        if i:
            print()
        print(f"model {entry.name!r}: {entry.path} (devices {', '.join(entry.devices)})")
        try:
            code = max(code, _inspect_model(entry.path))
        except ModelContractError as exc:
            print(f"contract        FAILED: {exc}")
            code = ModelContractError.exit_code
    return code


def _inspect_model(path: Path) -> int:
    import onnxruntime

    from anomalyd.model import SessionOptions, load_model, read_contract

    contract = read_contract(path)  # ModelContractError → 65
    print(contract.describe())
    try:
        model = load_model(path, SessionOptions(providers="auto"))
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
    if args.from_csv is not None:
        return _simulate_csv(args)
    csv_only = [
        f"--{name.replace('_', '-')}" for name in ("device", *_CSV_OPTIONS) if getattr(args, name) is not None
    ]
    if csv_only:
        raise UsageError(f"{', '.join(csv_only)}: only with --from-csv")
    settings = _simulation_settings(args)
    host, port = plain_broker(args.broker, "--broker")
    return simulate(settings, host, port, start_ts=args.start_ts)


def _simulate_csv(args: argparse.Namespace) -> int:
    """``simulate --from-csv FILE --device NAME``: the recording as one live device."""
    from anomalyd.csvdata import read_csv
    from anomalyd.simulator import SimulationSettings, simulate_recording

    synthetic = {
        "--devices": args.devices != _SIMULATE_DEVICES,
        "--anomalies": args.anomalies != _SIMULATE_ANOMALIES,
        "--rate": args.rate is not None,
        "--duration": args.duration is not None,
        "--seed": args.seed is not None,
    }
    given = [option for option, present in synthetic.items() if present]
    if given:
        raise UsageError(f"{', '.join(given)}: the synthetic fleet's options do not go with --from-csv")
    if args.device is None:
        raise UsageError("--from-csv needs --device NAME: the device id to publish the file as")
    device = _device_id(args.device)
    options = _csv_options(args)
    if options.feature_columns is None:
        raise UsageError("--from-csv needs --feature-columns COL,...: the columns to publish")
    host, port = plain_broker(args.broker, "--broker")
    recording = read_csv(args.from_csv, options)  # DataError: 65, before any connection
    for line in recording.notes():
        log.info("%s", line)
    settings = SimulationSettings(speed=args.speed, qos=args.qos)
    return simulate_recording(recording, device, settings, host=host, port=port, start_ts=args.start_ts)


def _device_id(text: str) -> str:
    """``--device``: a name that can be one level of an MQTT topic and a daemon's device id."""
    if not text or text in (".", "..") or any(c in text for c in "+#/\0") or not text.isprintable():
        raise ConfigError(
            f"expected a device id without '+', '#', '/' or non-printable characters, not '.' or '..', "
            f"got {text!r}",
            "--device",
        )
    return text


def _cmd_demo(args: argparse.Namespace) -> int:
    from anomalyd.logsetup import configure
    from anomalyd.simulator import run_demo

    # The daemon's own log lines would drown the live view: warnings and errors only.
    configure("WARNING", "text")
    settings = _simulation_settings(args)
    broker = plain_broker(args.broker, "--broker") if args.broker else None
    metrics = parse_address(args.metrics_addr, "--metrics-addr")
    return run_demo(settings, broker, args.model, metrics)


# --------------------------------------------------------------------------- score / CSV files

#: The CSV options (``anomalyd.csvdata.CsvOptions``) as argparse destinations; None when not given.
_CSV_OPTIONS = (
    "separator",
    "timestamp_column",
    "timestamp_format",
    "feature_columns",
    "feature_names",
    "label_column",
    "first_rows",
    "encoding",
)

#: ``anomalyd simulate``'s defaults for the synthetic fleet's size and anomaly rate (with
#: --from-csv, a value other than these means the option was given, which is an error).
_SIMULATE_DEVICES = 4
_SIMULATE_ANOMALIES = 2.0


def _column_list(text: str | None, option: str) -> tuple[str, ...] | None:
    """``A,B,C`` → ("A", "B", "C"), each stripped; a column name may hold spaces, not commas."""
    if text is None:
        return None
    items = tuple(part.strip() for part in text.split(","))
    if not all(items):
        raise ConfigError(f"expected comma-separated column names, got {text!r}", option)
    return items


def _csv_options(args: argparse.Namespace) -> CsvOptions:
    from anomalyd.csvdata import CsvOptions, separator_of

    return CsvOptions(
        separator=separator_of(args.separator) if args.separator is not None else ",",
        timestamp_column=args.timestamp_column if args.timestamp_column is not None else "ts",
        timestamp_format=args.timestamp_format,
        feature_columns=_column_list(args.feature_columns, "--feature-columns"),
        feature_names=_column_list(args.feature_names, "--feature-names"),
        label_column=args.label_column,
        first_rows=args.first_rows,
        encoding=args.encoding if args.encoding is not None else "utf-8",
    )


def _cmd_score(args: argparse.Namespace) -> int:
    from anomalyd.config import load_config
    from anomalyd.logsetup import configure
    from anomalyd.offline import score_file

    # The pipeline's own warnings (a cadence the model was not trained for, ...) on stderr.
    configure("WARNING", "text")
    options = _csv_options(args)
    config = load_config(args.config, {"model.path": str(args.model)} if args.model else None)
    out = args.out if args.out is not None else Path(f"{args.file.stem}.scores.csv")
    plot = None if args.no_plot else (args.plot if args.plot is not None else out.with_suffix(".png"))
    return score_file(
        args.file,
        options,
        config,
        device=args.device,
        out=out,
        plot=plot,
        plot_required=args.plot is not None,
    )


def _add_csv_args(p: argparse.ArgumentParser, title: str, columns_help: str) -> None:
    g = p.add_argument_group(title, "the options of the training configuration's [data.csv] table")
    g.add_argument("--separator", metavar="CHAR", help="field separator (','; 'tab' for a tab)")
    g.add_argument("--timestamp-column", metavar="NAME", help="timestamp column ('ts')")
    g.add_argument(
        "--timestamp-format",
        metavar="FORMAT",
        help="strptime format of the timestamps, e.g. '%%Y-%%m-%%d %%H:%%M:%%S' (default: epoch seconds "
        "or ISO 8601, from the first row); times without a zone are UTC",
    )
    g.add_argument("--feature-columns", metavar="COL,...", help=columns_help)
    g.add_argument(
        "--feature-names",
        metavar="NAME,...",
        help="the feature name of each of --feature-columns, same order (default: the column name "
        "sanitised as training does, 'Volume Flow RateRMS' -> volume_flow_rate_rms)",
    )
    g.add_argument("--label-column", metavar="NAME", help="0/1 anomaly label column (default: none)")
    g.add_argument("--first-rows", type=positive_int, metavar="N", help="read only the first N data rows")
    g.add_argument("--encoding", metavar="NAME", help="text encoding of the file (utf-8)")


def _add_simulation_args(p: argparse.ArgumentParser, speed: float, anomalies: float, devices: int) -> None:
    p.add_argument("--devices", type=positive_int, default=devices, help=f"devices (default {devices})")
    p.add_argument(
        "--rate", type=positive_float, help="readings per second per device (default: the simulated fleet's)"
    )
    p.add_argument(
        "--duration", type=positive_float, help="seconds of data per device (default: the simulated fleet's)"
    )
    p.add_argument(
        "--seed", type=int, help="random seed (default: not the one the default model was trained on)"
    )
    p.add_argument(
        "--anomalies",
        type=non_negative_float,
        default=anomalies,
        help=f"injected anomalies per device-hour of data ({anomalies:g}; 0: none)",
    )
    p.add_argument(
        "--speed",
        type=positive_float,
        default=speed,
        help=f"data seconds per real second ({speed:g}; 'inf': as fast as possible)",
    )
    p.add_argument("--qos", type=int, choices=(0, 1, 2), default=0, help="QoS of the telemetry (0)")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=PROG, description="anomalyd: anomaly detection for sensor fleets over MQTT with ONNX Runtime"
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the daemon", description="Run the daemon until SIGTERM/SIGINT.")
    p.add_argument("--config", type=Path, help="configuration file (TOML); default: embedded defaults")
    p.add_argument(
        "--broker",
        metavar="ADDRESS",
        help="MQTT broker: HOST[:PORT] or mqtt[s]://HOST[:PORT] (overrides mqtt.host/port; mqtts: TLS)",
    )
    p.add_argument("--model", type=Path, metavar="PATH", help="model file (overrides model.path)")
    p.add_argument(
        "--metrics-addr", metavar="HOST:PORT", help="metrics endpoint (overrides metrics.host/port)"
    )
    p.add_argument(
        "--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="overrides logging.level"
    )
    p.add_argument(
        "--instance",
        type=non_negative_int,
        metavar="N",
        help="run as instance N of the file's [cluster] (overrides cluster.instance) and serve metrics "
        "on metrics.port + N (unless --metrics-addr): what anomalyd@N.service runs",
    )
    p.set_defaults(run=_cmd_run)

    p = sub.add_parser(
        "check-config",
        help="check a configuration file and what `run` needs with it",
        description="Check FILE, then what `anomalyd run --config FILE` needs to start: the secrets "
        "where the service reads them, the TLS files, the model (loaded, warmed up and checked against "
        "the configuration), the state directory. Prints every problem with its key path and exits 78 "
        "if there is any; the broker is not contacted.",
    )
    p.add_argument("config", type=Path, metavar="FILE")
    p.add_argument(
        "--as-service",
        action="store_true",
        help="check as the systemd unit runs the daemon: $CREDENTIALS_DIRECTORY as its LoadCredential= "
        "fills it, its StateDirectory=, DynamicUser= and ProtectHome=/ProtectSystem= "
        "(unit: /etc/systemd/system/anomalyd.service, else the one in the anomalyd checkout)",
    )
    p.add_argument("--unit", type=Path, metavar="UNIT", help="the unit file for --as-service (implies it)")
    p.add_argument(
        "--instance",
        type=non_negative_int,
        metavar="N",
        help="check as instance N of the file's [cluster], as `run --instance N` (anomalyd@N.service: "
        "with --as-service, the template unit anomalyd@.service) runs it",
    )
    p.set_defaults(run=_cmd_check_config)

    p = sub.add_parser(
        "inspect-model",
        help="print a model's contract",
        description="Describe a model file, or every model of a configuration file ([model] or [[models]]).",
    )
    p.add_argument("path", type=Path, metavar="PATH", nargs="?")
    p.add_argument(
        "--config", type=Path, metavar="FILE", help="describe the models this configuration serves"
    )
    p.set_defaults(run=_cmd_inspect_model)

    p = sub.add_parser(
        "simulate",
        help="publish simulated devices over MQTT",
        description="Publish the synthetic fleet (with labelled anomalies) as device telemetry.",
    )
    p.add_argument(
        "--broker",
        default="127.0.0.1:1883",
        metavar="ADDRESS",
        help="MQTT broker: HOST[:PORT] or mqtt://HOST[:PORT]",
    )
    p.add_argument("--start-ts", type=float, help="timestamp of the first reading (default: so it ends now)")
    _add_simulation_args(p, speed=1.0, anomalies=_SIMULATE_ANOMALIES, devices=_SIMULATE_DEVICES)
    p.add_argument(
        "--from-csv",
        type=Path,
        metavar="FILE",
        help="publish this recorded CSV file as one device (--device) instead of the synthetic fleet: "
        "paced by its timestamps over --speed, stamped with its steps so that none is ahead of when it "
        "is sent",
    )
    p.add_argument("--device", metavar="NAME", help="with --from-csv: the device id to publish as")
    _add_csv_args(
        p,
        "CSV file (with --from-csv)",
        columns_help="the columns to publish, each as its feature name (required)",
    )
    p.set_defaults(run=_cmd_simulate)

    p = sub.add_parser(
        "score",
        help="score a recorded CSV file offline through the daemon's pipeline",
        description="Run one device's recorded readings through the daemon's pipeline (buffers, "
        "batcher, ONNX Runtime, detector) without MQTT, and write per row the score, threshold, "
        "window verdict, alert state and each feature's contribution (CSV), and a plot (PNG, "
        "needs matplotlib: pip install 'anomalyd[plot]'). Bad rows are skipped and counted.",
    )
    p.add_argument("file", type=Path, metavar="FILE.csv")
    p.add_argument("--model", type=Path, metavar="PATH", help="model file (default: model.path)")
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="daemon configuration (detector, stream); default: embedded",
    )
    p.add_argument("--device", metavar="NAME", help="device name in the output (default: the file's stem)")
    p.add_argument("--out", type=Path, metavar="OUT.csv", help="output CSV (default: ./<stem>.scores.csv)")
    plot = p.add_mutually_exclusive_group()
    plot.add_argument(
        "--plot", type=Path, metavar="PATH.png", help="write the plot here (default: the output with .png)"
    )
    plot.add_argument("--no-plot", action="store_true", help="no plot")
    _add_csv_args(
        p,
        "CSV file",
        columns_help="the columns holding the model's features (default: the columns named as the "
        "model's features, or whose sanitised names are)",
    )
    p.set_defaults(run=_cmd_score)

    p = sub.add_parser(
        "demo",
        help="daemon + simulator + live view, in one command",
        description="Run the daemon and the simulator against a local broker and show scores and "
        "alerts as they arrive. Without --broker: 127.0.0.1:1883 if a broker listens there, else a "
        "private mosquitto on a free port (if mosquitto is installed). Ctrl-C stops.",
    )
    p.add_argument("--broker", metavar="ADDRESS", help="MQTT broker, HOST[:PORT] (default: see above)")
    p.add_argument("--model", type=Path, metavar="PATH", help="model file (default: the shipped model)")
    p.add_argument(
        "--metrics-addr", default="127.0.0.1:0", metavar="HOST:PORT", help="metrics (any free port)"
    )
    _add_simulation_args(p, speed=30.0, anomalies=4.0, devices=4)
    p.set_defaults(run=_cmd_demo)

    add_bench_parser(sub)
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
    except Exception:
        # Nothing anomalyd raises on purpose: a bug. The traceback is what a report needs, and
        # 70 (EX_SOFTWARE) tells systemd to restart, as for the pipeline thread's failure.
        log.critical("internal error (exit %d)", EX_SOFTWARE, exc_info=True)
        return EX_SOFTWARE
    return code
