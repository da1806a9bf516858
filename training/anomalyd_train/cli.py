"""``anomalyd-train``: train, calibrate and export a model from a TOML config.

Subcommands (one function each, so a new one is a new ``_add_*`` / ``_cmd_*`` pair):

- ``train [--config FILE] --out DIR [--quiet]``: the whole pipeline; without a config,
  the embedded defaults (synthetic fleet);
- ``check-config [FILE]``: load and check a config, print it resolved, train nothing;
- ``skab DIR --out OUT [--config FILE]``: the SKAB benchmark through the daemon's scoring
  path (``anomalyd_train.skab``).

``train`` and ``skab`` need the ``train`` extra (TensorFlow, Keras, tf2onnx, onnx,
matplotlib); without it they stop before doing anything, saying how to install it
(``pip install 'anomalyd[train]'``), with exit code 69. ``check-config`` needs none of it.

Errors end the run with one line on stderr and the error's exit code: a usage error 64, a
bad config 78, unusable data 65, the ``train`` extra not installed 69, a failed export
check 70 (naming the check).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from anomalyd.cli import ArgumentParser
from anomalyd.errors import AnomalydError, MissingExtraError

PROG = "anomalyd-train"

#: What the ``train`` extra installs that training, export and the report import (by
#: module name: ``tensorflow-cpu`` installs ``tensorflow``).
TRAIN_EXTRA_MODULES = ("tensorflow", "keras", "tf2onnx", "onnx", "matplotlib")
INSTALL_TRAIN_EXTRA = "pip install 'anomalyd[train]'"


def require_train_extra() -> None:
    """``MissingExtraError`` (exit 69) naming what is missing and how to install it, unless
    every module of the ``train`` extra can be imported. Finds them without importing them."""
    missing = [name for name in TRAIN_EXTRA_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtraError(
            f"this command needs the training extra, which is not installed (missing: "
            f"{', '.join(missing)}); install it with: {INSTALL_TRAIN_EXTRA}"
        )


def _quiet_tensorflow() -> None:
    # TensorFlow's C++ start-up banner (CPU features, oneDNN) is noise on a terminal;
    # it must be set before TensorFlow is first imported. Users can still override it.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _add_train(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "train",
        help="train, calibrate and export a model",
        description="Train on the configured data, calibrate the threshold, export DIR/model.onnx "
        "with its checks and write the report beside it.",
    )
    p.add_argument("--config", type=Path, help="training config (TOML); default: the embedded defaults")
    p.add_argument("--out", type=Path, required=True, help="output directory (created if missing)")
    p.add_argument("--quiet", action="store_true", help="print only the final summary")
    p.set_defaults(run=_cmd_train)


def _add_check_config(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "check-config",
        help="check a training config and print it resolved",
        description="Load and check a training config (no data is read, nothing is trained).",
    )
    p.add_argument("config", nargs="?", type=Path, help="training config (TOML); default: the defaults")
    p.set_defaults(run=_cmd_check_config)


# --- skab: registration and dispatch only; the benchmark lives in skab.py ------------------
def _add_skab(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "skab",
        help="run the SKAB benchmark through the daemon's scoring path",
        description="For every experiment CSV under DIR: train on its first rows, export, replay the "
        "rest through the daemon's buffers, ONNX Runtime and detector; write per-file decisions, "
        "OUT/summary.json and a table beside the published leaderboard.",
    )
    p.add_argument("dir", type=Path, help="folder with the SKAB experiment CSVs (searched recursively)")
    p.add_argument("--out", type=Path, required=True, help="output directory (created if missing)")
    p.add_argument(
        "--config",
        type=Path,
        help="benchmark config (TOML); default: the committed training/configs/skab.toml, "
        "the configuration docs/skab.md reports",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="repeat with this many training seeds and report each figure's mean and range (default 1)",
    )
    p.set_defaults(run=_cmd_skab)


def _cmd_skab(args: argparse.Namespace) -> int:
    require_train_extra()
    from anomalyd_train.skab import default_config_path, load_skab_config

    path = args.config if args.config is not None else default_config_path()
    if path is None:
        print("skab: no --config and no committed skab.toml found: using the built-in defaults", flush=True)
    else:
        print(f"skab: config {path}", flush=True)
    cfg = load_skab_config(path)
    _quiet_tensorflow()
    from anomalyd_train.skab import format_seeds_table, format_table, run_skab_seeds

    results = run_skab_seeds(args.dir, args.out, cfg, args.seeds)
    for result in results:
        print(format_table(result), flush=True)
    if len(results) > 1:
        print(format_seeds_table(results), flush=True)
    return 0


# ----------------------------------------------------------------------------------------------


def _cmd_train(args: argparse.Namespace) -> int:
    require_train_extra()
    from anomalyd_train.config import load_train_config

    cfg = load_train_config(args.config)
    _quiet_tensorflow()
    from anomalyd_train.pipeline import format_summary, train

    result = train(cfg, args.out, progress=not args.quiet)
    print(format_summary(result), flush=True)
    return 0


def _cmd_check_config(args: argparse.Namespace) -> int:
    from anomalyd_train.config import config_to_dict, load_train_config

    cfg = load_train_config(args.config)
    print(json.dumps(config_to_dict(cfg), indent=2))
    print(f"{args.config or 'defaults'}: ok", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    # anomalyd's parser: a usage error exits 64 (EX_USAGE), as for ``anomalyd``.
    parser = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    adders: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
        _add_train,
        _add_check_config,
        _add_skab,
    ]
    for add in adders:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``anomalyd-train``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except AnomalydError as exc:
        # One clear line; the exception's class says which kind of problem it is.
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
