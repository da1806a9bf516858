"""SKAB (Skoltech Anomaly Benchmark) by its published protocol, scored through the daemon.

``anomalyd-train skab DIR --out OUT [--config FILE]``:

1. every ``*.csv`` under DIR (recursively) is an experiment, except those under a folder
   named in ``benchmark.exclude_dirs`` (``anomaly-free``: normal data, nothing to detect);
2. per experiment, the normal training path trains a model on the file's first
   ``benchmark.train_rows`` rows (400; the scaler is fitted on those rows only, and the
   time split train | validation | calibration of ``[train.split]`` happens inside them)
   and exports it with every export check (``OUT/models/<file>/model.onnx``);
3. every later row is streamed, in order, through ``anomalyd.replay``: the daemon's
   buffers, batcher, ONNX Runtime session and detector, configured by ``[daemon]``. The
   training rows go first as the buffer's history, so the first test row already ends a
   full window. The row's decision is the device's **alert state** after that row (what
   the daemon publishes, retained, on the alert topic). A row that ends no window — after
   a gap longer than ``stream.max_gap_s`` restarted the device's window, until it is full
   again — keeps the alert state the device had: the daemon publishes nothing new for it;
4. runs the no-network reference (``anomalyd_train.reference``: an EWMA of each channel's
   z-scored level) on the same rows, the bar the model must clear;
5. writes ``OUT/<file relative to DIR>`` (``datetime;score;anomaly``, one line per test row,
   input order; ``score`` is ``nan`` where no window ended), ``OUT/summary.json`` (pooled
   and per-file confusion counts, F1, FAR, MAR, NAB-style changepoint score, detection
   delays, the reference's counts) and prints the table beside the reference and the
   published leaderboard, pooled and per folder (``valve1``, ``valve2``, ...).

``--seeds N`` repeats the whole run with training seeds ``train.training.seed`` + 0 ..
N-1 (outputs under ``OUT/seed-<seed>/``) and reports each figure's mean and range over
the seeds: one seed's luck moves F1 by a few hundredths.

Nothing from a test row reaches training or the threshold: labels are read only to score
the decisions afterwards, and the detector sees the test rows one by one, in order.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from anomalyd.config import Config as DaemonConfig
from anomalyd.errors import ConfigError, DataError
from anomalyd_train.config import TrainConfig, error_from_validation, sanitise_feature_name
from anomalyd_train.evaluation import (
    Confusion,
    DelayResult,
    NabResult,
    confusion,
    detection_delays,
    nab_score,
)
from anomalyd_train.reference import ReferenceConfig, reference_detector

__all__ = [
    "LEADERBOARD",
    "BenchmarkConfig",
    "Experiment",
    "FileResult",
    "SkabConfig",
    "SkabResult",
    "discover",
    "format_seeds_table",
    "format_table",
    "load_skab_config",
    "read_experiment",
    "run_skab",
    "run_skab_seeds",
]

#: SKAB's published outlier-detection leaderboard (F1, FAR %, MAR %), from the benchmark's
#: README, for the table printed beside our result.
LEADERBOARD: tuple[tuple[str, float, float, float], ...] = (
    ("Conv-AE", 0.78, 13.55, 28.02),
    ("MSET", 0.78, 39.73, 14.13),
    ("LSTM-AE", 0.74, 29.96, 25.92),
    ("Vanilla LSTM", 0.54, 12.54, 59.53),
)

SKAB_COLUMNS = (
    "Accelerometer1RMS",
    "Accelerometer2RMS",
    "Current",
    "Pressure",
    "Temperature",
    "Thermocouple",
    "Voltage",
    "Volume Flow RateRMS",
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


class BenchmarkConfig(_Section):
    """The benchmark's protocol and file format (SKAB's, by default)."""

    train_rows: int = Field(default=400, ge=2, description="leading rows of each file that train its model")
    feature_columns: list[str] = Field(
        default_factory=lambda: list(SKAB_COLUMNS), min_length=1, description="model inputs, in order"
    )
    separator: str = Field(default=";", min_length=1, max_length=1, description="CSV field separator")
    timestamp_column: str = Field(default="datetime", description="timestamp column")
    timestamp_format: str = Field(default="%Y-%m-%d %H:%M:%S", description="strptime format (read as UTC)")
    label_column: str = Field(default="anomaly", description="0/1 anomaly labels (scoring only)")
    changepoint_column: str = Field(default="changepoint", description="0/1 changepoints (NAB score only)")
    nab_window_s: float = Field(default=60.0, gt=0, description="NAB window to the right of a changepoint")
    exclude_dirs: list[str] = Field(
        default_factory=lambda: ["anomaly-free"], description="folders under DIR that hold no experiment"
    )


class SkabConfig(_Section):
    """``--config FILE``: the protocol, the training template and the daemon configuration.

    ``train`` is a training config without ``[data]`` (each file supplies its own); ``daemon``
    holds daemon sections (``stream``, ``batching``, ``detector``, ...) as in anomalyd.toml.
    """

    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig)
    train: dict[str, Any] = Field(default_factory=dict)
    daemon: dict[str, Any] = Field(default_factory=dict)
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)

    def with_seed(self, seed: int) -> SkabConfig:
        """The same benchmark with training seed ``seed``."""
        train = dict(self.train)
        training = dict(train.get("training", {}))
        training["seed"] = seed
        train["training"] = training
        return self.model_copy(update={"train": train})

    def reference_columns(self) -> list[int]:
        """The feature columns the reference scores: those the model scores
        (``train.model.score_features``, by feature name), else every one."""
        names = [sanitise_feature_name(c) for c in self.benchmark.feature_columns]
        model = self.train.get("model", {})
        scored = model.get("score_features") if isinstance(model, dict) else None
        if not scored:
            return list(range(len(names)))
        return [i for i, n in enumerate(names) if n in scored]

    @property
    def seed(self) -> int:
        """The training seed this config trains with."""
        raw = self.train.get("training", {}).get("seed", 0)
        return int(raw) if isinstance(raw, int) else 0

    def daemon_config(self) -> DaemonConfig:
        try:
            return DaemonConfig.model_validate(self.daemon)
        except ValidationError as exc:
            # The daemon's schema, so that an unknown key lists the daemon's keys.
            raise error_from_validation(exc, DaemonConfig, None, prefix="daemon") from None

    def train_config(self, csv_path: Path, max_gap_s: float) -> TrainConfig:
        """The training config of one file: the template plus the file's first ``train_rows``."""
        b = self.benchmark
        raw = dict(self.train)
        if "data" in raw:
            raise ConfigError(
                "[train] must not have a [train.data] table: the benchmark sets it", "train.data"
            )
        raw["data"] = {
            "source": "csv",
            "csv": {
                "path": str(csv_path),
                "separator": b.separator,
                "timestamp_column": b.timestamp_column,
                "timestamp_format": b.timestamp_format,
                "feature_columns": list(b.feature_columns),
                "label_column": b.label_column,
                "first_rows": b.train_rows,
                # Training windows never span what the daemon would call a gap.
                "max_gap_s": max_gap_s,
            },
        }
        try:
            return TrainConfig.model_validate(raw)
        except ValidationError as exc:
            raise error_from_validation(exc, TrainConfig, None, prefix="train") from None


def default_config_path() -> Path | None:
    """The committed benchmark configuration (``training/configs/skab.toml``): the one the
    results in docs/skab.md come from. In a checkout it sits beside this package's source
    root; a regular install carries it to ``<prefix>/share/anomalyd/configs/``. None if
    neither exists."""
    checkout = Path(__file__).resolve().parents[1] / "configs" / "skab.toml"
    installed = Path(sys.prefix) / "share" / "anomalyd" / "configs" / "skab.toml"
    return next((p for p in (checkout, installed) if p.is_file()), None)


def load_skab_config(path: str | os.PathLike[str] | None) -> SkabConfig:
    """Read and check a benchmark config (``None``: the defaults); errors name the key path."""
    if path is None:
        cfg = SkabConfig()
    else:
        file = Path(path)
        try:
            raw = tomllib.loads(file.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read benchmark config {file}: {exc.strerror or exc}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"benchmark config {file} is not valid TOML: {exc}") from None
        try:
            cfg = SkabConfig.model_validate(raw)
        except ValidationError as exc:
            raise error_from_validation(exc, SkabConfig, str(file)) from None
    # Check both embedded configs now, not after the first file has trained.
    daemon = cfg.daemon_config()
    cfg.train_config(Path("check.csv"), daemon.stream.max_gap_s)
    return cfg


# ------------------------------------------------------------------------------ experiments


def discover(root: Path, exclude_dirs: list[str]) -> list[Path]:
    """Every ``*.csv`` under ``root`` (recursively, sorted naturally), except under ``exclude_dirs``."""

    def natural(p: Path) -> list[Any]:
        rel = p.relative_to(root)
        return [
            (0, int(part), "") if part.isdigit() else (1, 0, part) for part in (*rel.parent.parts, p.stem)
        ]

    files = [
        p
        for p in root.rglob("*.csv")
        if p.is_file() and not any(part in exclude_dirs for part in p.relative_to(root).parent.parts)
    ]
    return sorted(files, key=natural)


@dataclass
class Experiment:
    """One experiment file, every row in file order."""

    path: Path
    stamps: list[str]  # the timestamp text as written, for the output file
    ts: npt.NDArray[np.float64]
    values: npt.NDArray[np.float32]  # (n, F) feature columns
    labels: npt.NDArray[np.bool_]
    changepoints: npt.NDArray[np.bool_]


def read_experiment(path: Path, b: BenchmarkConfig) -> Experiment:
    """Read every row of an experiment. A row that does not parse is a ``DataError``:
    the protocol scores every row, so none may be dropped silently."""
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = [r for r in csv.reader(fh, delimiter=b.separator) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if len(rows) < 2:
        raise DataError(f"{path}: no data rows")
    header = [h.strip().removeprefix("\ufeff") for h in rows[0]]

    def col(name: str) -> int:
        if name not in header:
            raise DataError(f"{path}: column {name!r} not found; the header has {header}")
        return header.index(name)

    i_ts, i_lab, i_cp = col(b.timestamp_column), col(b.label_column), col(b.changepoint_column)
    i_feat = [col(c) for c in b.feature_columns]
    stamps: list[str] = []
    ts: list[float] = []
    values: list[list[float]] = []
    labels: list[bool] = []
    cps: list[bool] = []
    for line, row in enumerate(rows[1:], start=2):
        try:
            stamp = row[i_ts].strip()
            t = datetime.strptime(stamp, b.timestamp_format).replace(tzinfo=UTC).timestamp()
            vals = [float(row[i]) for i in i_feat]
            lab, cp = float(row[i_lab]), float(row[i_cp])
        except (IndexError, ValueError) as exc:
            raise DataError(f"{path}, row {line}: {exc}") from None
        if not all(math.isfinite(v) for v in vals):
            raise DataError(f"{path}, row {line}: a feature is not a finite number")
        stamps.append(stamp)
        ts.append(t)
        values.append(vals)
        labels.append(lab != 0.0)
        cps.append(cp != 0.0)
    return Experiment(
        path,
        stamps,
        np.asarray(ts, np.float64),
        np.asarray(values, np.float32),
        np.asarray(labels, bool),
        np.asarray(cps, bool),
    )


# ------------------------------------------------------------------------------------- run


@dataclass
class FileResult:
    """One experiment's outcome."""

    name: str  # path relative to DIR
    test_rows: int
    confusion: Confusion
    nab: NabResult
    delays: DelayResult
    threshold: float  # the model's contract threshold
    seconds: float
    rows_without_window: int
    reference: Confusion | None = None  # the no-network reference on the same rows

    @property
    def group(self) -> str:
        """The folder the file is in (``valve1``), or ``.`` for a file directly in DIR."""
        head, sep, _ = self.name.partition("/")
        return head if sep else "."

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.confusion.to_dict(),
            "reference": None if self.reference is None else self.reference.to_dict(),
            "test_rows": self.test_rows,
            "nab": self.nab.to_dict(),
            "delay": self.delays.to_dict(),
            "contract_threshold": self.threshold,
            "rows_without_window": self.rows_without_window,
            "seconds": round(self.seconds, 2),
        }


@dataclass
class SkabResult:
    """All experiments, pooled."""

    files: list[FileResult] = field(default_factory=list)
    baseline: Confusion = field(default_factory=Confusion)  # every test row flagged
    seconds: float = 0.0

    @property
    def pooled(self) -> Confusion:
        c = Confusion()
        for f in self.files:
            c = c + f.confusion
        return c

    @property
    def reference(self) -> Confusion | None:
        """The reference's pooled counts (None if it did not run on every file)."""
        if not self.files or any(f.reference is None for f in self.files):
            return None
        c = Confusion()
        for f in self.files:
            assert f.reference is not None
            c = c + f.reference
        return c

    def groups(self) -> dict[str, SkabResult]:
        """The files of each folder, as results of their own (in order of first appearance)."""
        out: dict[str, SkabResult] = {}
        for f in self.files:
            out.setdefault(f.group, SkabResult()).files.append(f)
        for g in out.values():
            for f in g.files:
                g.baseline = g.baseline + Confusion(
                    tp=f.confusion.tp + f.confusion.fn, fp=f.confusion.fp + f.confusion.tn
                )
        return out

    @property
    def nab(self) -> NabResult:
        n = NabResult()
        for f in self.files:
            n = n + f.nab
        return n

    @property
    def delays(self) -> DelayResult:
        d = DelayResult()
        for f in self.files:
            d = d + f.delays
        return d

    def to_dict(self, cfg: SkabConfig) -> dict[str, Any]:
        ref = self.reference
        return {
            "pooled": {**self.pooled.to_dict(), "nab": self.nab.to_dict(), "delay": self.delays.to_dict()},
            "reference": None if ref is None else ref.to_dict(),
            "groups": {
                name: {
                    "files": len(g.files),
                    "model": g.pooled.to_dict(),
                    "reference": _dict_or_none(g.reference),
                }
                for name, g in self.groups().items()
            },
            "all_anomaly_baseline": self.baseline.to_dict(),
            "leaderboard": [
                {"method": m, "F1": f1, "FAR": far, "MAR": mar} for m, f1, far, mar in LEADERBOARD
            ],
            "files": {f.name: f.to_dict() for f in self.files},
            "n_files": len(self.files),
            "seconds": round(self.seconds, 1),
            "config": cfg.model_dump(mode="json"),
        }


def _dict_or_none(c: Confusion | None) -> dict[str, Any] | None:
    return None if c is None else c.to_dict()


def _write_scores(
    path: Path, stamps: list[str], score: npt.NDArray[np.float64], alert: npt.NDArray[np.bool_]
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        fh.write("datetime;score;anomaly\n")
        for stamp, s, a in zip(stamps, score.tolist(), alert.tolist(), strict=True):
            fh.write(f"{stamp};{'nan' if math.isnan(s) else f'{s:.6g}'};{int(a)}\n")


def run_file(path: Path, name: str, cfg: SkabConfig, daemon: DaemonConfig, out: Path) -> FileResult:
    """Train on the file's first rows, export, replay the rest through the daemon's stages."""
    from anomalyd.model import SessionOptions, load_model
    from anomalyd.replay import replay
    from anomalyd_train.pipeline import train

    started = time.perf_counter()
    b = cfg.benchmark
    exp = read_experiment(path, b)
    if len(exp.ts) <= b.train_rows:
        raise DataError(f"{path}: {len(exp.ts)} rows, nothing left after the {b.train_rows} training rows")
    tcfg = cfg.train_config(path, daemon.stream.max_gap_s)
    tcfg.name = sanitise_feature_name(f"skab-{name.removesuffix('.csv')}").replace("_", "-")
    trained = train(tcfg, out / "models" / name.removesuffix(".csv"), progress=False)
    model = load_model(trained.model_path, SessionOptions(providers="cpu", intra_op_threads=1))
    result = replay(model, daemon, name, exp.ts, exp.values, history=b.train_rows)
    n = b.train_rows
    _write_scores(out / name, exp.stamps[n:], result.score, result.alert)
    ts, labels, cps = exp.ts[n:], exp.labels[n:], exp.changepoints[n:]
    reference = None
    if cfg.reference.enabled:
        ref = reference_detector(exp.values[:, cfg.reference_columns()], n, cfg.reference)
        reference = confusion(labels, ref.alert[n:])
    return FileResult(
        name=name,
        test_rows=len(ts),
        confusion=confusion(labels, result.alert),
        nab=nab_score(ts, cps, result.alert, b.nab_window_s),
        delays=detection_delays(ts, labels, result.alert),
        threshold=trained.threshold,
        seconds=time.perf_counter() - started,
        rows_without_window=int(np.count_nonzero(np.isnan(result.score))),
        reference=reference,
    )


def run_skab(root: Path, out: Path, cfg: SkabConfig, echo: Callable[[str], None] = print) -> SkabResult:
    """Run the benchmark on every experiment under ``root``; write the outputs under ``out``."""
    import logging

    import tensorflow as tf

    # One scoring function is traced per file; TensorFlow's "retracing" advice is noise here.
    tf.get_logger().setLevel(logging.ERROR)
    daemon = cfg.daemon_config()
    files = discover(root, cfg.benchmark.exclude_dirs)
    if not files:
        raise DataError(f"no experiment CSV under {root} (excluded folders: {cfg.benchmark.exclude_dirs})")
    echo(f"{len(files)} experiments under {root}")
    started = time.perf_counter()
    result = SkabResult()
    for i, path in enumerate(files, start=1):
        name = path.relative_to(root).as_posix()
        fr = run_file(path, name, cfg, daemon, out)
        result.files.append(fr)
        result.baseline = result.baseline + Confusion(
            tp=fr.confusion.tp + fr.confusion.fn, fp=fr.confusion.fp + fr.confusion.tn
        )
        c, r = fr.confusion, fr.reference
        ref = f"  | reference F1 {r.f1:.3f}  FAR {r.far:5.1f} %  MAR {r.mar:5.1f} %" if r is not None else ""
        echo(
            f"[{i:>2}/{len(files)}] {name:<24} F1 {c.f1:.3f}  FAR {c.far:5.1f} %  MAR {c.mar:5.1f} %  "
            f"NAB {fr.nab.normalised:6.1f}  ({fr.seconds:.1f} s){ref}"
        )
    result.seconds = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(result.to_dict(cfg), indent=2) + "\n", encoding="utf-8")
    return result


def _fmt(v: float, digits: int) -> str:
    return "—" if math.isnan(v) else f"{v:.{digits}f}"


def _row(label: str, c: Confusion, bold: bool = False) -> str:
    b = "**" if bold else ""
    return f"| {b}{label}{b} | {b}{c.f1:.2f}{b} | {b}{_fmt(c.far, 2)}{b} | {b}{_fmt(c.mar, 2)}{b} |"


def format_table(result: SkabResult) -> str:
    """Our pooled result beside the reference, per folder, the leaderboard and the
    all-anomaly baseline (Markdown)."""
    p = result.pooled
    nab, delays = result.nab, result.delays
    lines = [
        "| method | F1 | FAR % | MAR % |",
        "|---|---|---|---|",
        _row(f"anomalyd ({len(result.files)} files)", p, bold=True),
    ]
    ref = result.reference
    if ref is not None:
        lines.append(_row(f"reference, no network ({len(result.files)} files)", ref))
    groups = result.groups()
    if len(groups) > 1:
        for name, g in groups.items():
            lines.append(_row(f"anomalyd, {name} ({len(g.files)} files)", g.pooled))
            if g.reference is not None:
                lines.append(_row(f"reference, {name}", g.reference))
    lines += [
        f"| {m} (published, all 34) | {f1:.2f} | {far:.2f} | {mar:.2f} |" for m, f1, far, mar in LEADERBOARD
    ]
    base = result.baseline
    lines.append(f"| every row anomalous | {base.f1:.2f} | {_fmt(base.far, 2)} | {_fmt(base.mar, 2)} |")
    per_file = result.seconds / len(result.files) if result.files else math.nan
    lines += [
        "",
        f"pooled: TP {p.tp}  FP {p.fp}  FN {p.fn}  TN {p.tn}",
        f"NAB ({nab.profile.name}, changepoint windows): {_fmt(nab.normalised, 1)}  "
        f"({nab.detected}/{nab.windows} windows detected, {nab.false_positives} false onsets)",
        f"mean detection delay: {_fmt(delays.mean, 1)} s over {delays.episodes - delays.missed} of "
        f"{delays.episodes} anomalies ({delays.missed} missed)",
        f"time: {result.seconds:.0f} s, {per_file:.1f} s per file "
        f"(all 34 SKAB experiments at this rate: ~{34 * per_file / 60:.1f} min)",
    ]
    return "\n".join(lines)


def run_skab_seeds(
    root: Path, out: Path, cfg: SkabConfig, seeds: int, echo: Callable[[str], None] = print
) -> list[SkabResult]:
    """``run_skab`` once per training seed (``cfg.seed`` + 0 .. seeds-1), each into
    ``out/seed-<seed>/`` when there is more than one."""
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    if seeds == 1:
        return [run_skab(root, out, cfg, echo)]
    results = []
    for k in range(seeds):
        seeded = cfg.with_seed(cfg.seed + k)
        echo(f"--- training seed {seeded.seed} ({k + 1} of {seeds})")
        results.append(run_skab(root, out / f"seed-{seeded.seed}", seeded, echo))
    summary = {
        "seeds": [cfg.seed + k for k in range(seeds)],
        "per_seed": [r.to_dict(cfg.with_seed(cfg.seed + k)) for k, r in enumerate(results)],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return results


def _spread(values: list[float], digits: int) -> str:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return "—"
    mean = sum(finite) / len(finite)
    return f"{mean:.{digits}f} [{min(finite):.{digits}f}–{max(finite):.{digits}f}]"


def format_seeds_table(results: list[SkabResult]) -> str:
    """Several seeds: each group's mean [min–max] over the seeds, beside the reference."""
    lines = [
        f"over {len(results)} training seeds: mean [min–max]",
        "",
        "| method | F1 | FAR % | MAR % |",
        "|---|---|---|---|",
    ]
    per_seed_groups = [{"all": r, **(r.groups() if len(r.groups()) > 1 else {})} for r in results]
    for name in per_seed_groups[0]:
        runs = [g[name].pooled for g in per_seed_groups]
        n = len(per_seed_groups[0][name].files)
        lines.append(
            f"| anomalyd, {name} ({n} files) | {_spread([c.f1 for c in runs], 3)} "
            f"| {_spread([c.far for c in runs], 1)} | {_spread([c.mar for c in runs], 1)} |"
        )
        ref = per_seed_groups[0][name].reference
        if ref is not None:
            lines.append(_row(f"reference, {name}", ref))
    seconds = sum(r.seconds for r in results)
    lines += ["", f"time: {seconds:.0f} s for {len(results)} seeds"]
    return "\n".join(lines)
