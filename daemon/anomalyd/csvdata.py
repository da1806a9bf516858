"""Reading a CSV file of recorded readings for ``anomalyd score`` and ``anomalyd simulate --from-csv``.

The options are those of the training configuration's ``[data.csv]`` table (separator,
timestamp column and format, feature columns and their names, label column, first rows,
encoding) and mean the same, so a file a model was trained from is read here as training
read it: a feature column's name in telemetry is its ``feature_names`` entry, else the
column name sanitised the same way (``"Volume Flow RateRMS"`` → ``volume_flow_rate_rms``).
Both use ``anomalyd.feature_names.sanitise_feature_name``.

A row that cannot be used is skipped and counted under a reason, never fatal:
``short_row`` (fewer fields than the columns asked for), ``bad_timestamp``, ``nan`` (empty
or NaN feature), ``non_numeric``, ``non_finite`` (infinite, or beyond float32, the model's
input type), ``bad_label``. Rows whose timestamp does not increase are kept, in file
order, and counted (``CsvRecording.not_increasing``): the daemon's buffers reject them as
a device's out-of-order or duplicate readings, in ``anomalyd score`` as in a daemon fed by
``anomalyd simulate --from-csv``.

Errors: ``DataError`` (exit 65) for a file that cannot be read or used (missing,
undecodable, malformed, a named column not in its header, no usable row); ``ConfigError``
(exit 78) for options that cannot work (a bad separator, names that are not usable in
telemetry, a model feature no column maps to), naming the option.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydantic import ValidationError

from anomalyd.contract import Feature
from anomalyd.errors import ConfigError, DataError
from anomalyd.feature_names import sanitise_feature_name

__all__ = ["SKIP_REASONS", "CsvOptions", "CsvRecording", "read_csv", "sanitise_feature_name", "separator_of"]

#: Why a row was skipped, in the order reports list them.
SKIP_REASONS = ("short_row", "bad_timestamp", "nan", "non_numeric", "non_finite", "bad_label")

_FLOAT32_MAX = float(np.finfo(np.float32).max)
#: Separators given by name, for shells where a literal tab is awkward to type.
_SEPARATOR_NAMES = {"\\t": "\t", "tab": "\t", "comma": ",", "semicolon": ";", "space": " "}


def separator_of(text: str) -> str:
    """``--separator``'s value as the one character it means (``tab`` or ``\\t`` for a tab)."""
    sep = _SEPARATOR_NAMES.get(text, text)
    if len(sep) != 1 or sep in '\r\n"':
        raise ConfigError(
            f"expected one character (or tab, comma, semicolon, space), got {text!r}", "--separator"
        )
    return sep


@dataclass(frozen=True)
class CsvOptions:
    """How to read the file: the training configuration's ``[data.csv]`` options.

    ``feature_columns`` unset: the columns the caller asks for by feature name (the model's
    features, for ``score``), each found as a column of that name or whose sanitised name
    it is. ``feature_names`` unset: each column's sanitised name.
    """

    separator: str = ","
    timestamp_column: str = "ts"
    timestamp_format: str | None = None
    feature_columns: tuple[str, ...] | None = None
    feature_names: tuple[str, ...] | None = None
    label_column: str | None = None
    first_rows: int | None = None
    encoding: str = "utf-8"

    def __post_init__(self) -> None:
        if len(self.separator) != 1:
            raise ConfigError(f"expected one character, got {self.separator!r}", "--separator")
        if not self.timestamp_column.strip():
            raise ConfigError("expected a column name", "--timestamp-column")
        if self.first_rows is not None and self.first_rows < 1:
            raise ConfigError(f"expected an integer >= 1, got {self.first_rows}", "--first-rows")
        columns = self.feature_columns
        if columns is not None:
            if not columns or any(not c.strip() for c in columns):
                raise ConfigError(f"expected column names, got {list(columns)}", "--feature-columns")
            _no_repeats(columns, "--feature-columns")
        names = self.feature_names
        if names is not None:
            if columns is None:
                raise ConfigError("names the --feature-columns: give those too", "--feature-names")
            if len(names) != len(columns):
                raise ConfigError(
                    f"needs one name per feature column ({len(columns)}), got {len(names)}", "--feature-names"
                )
            for name in names:
                _check_feature_name(name, "--feature-names")
            _no_repeats(names, "--feature-names")
        elif columns is not None:
            _no_repeats([sanitise_feature_name(c) for c in columns], "--feature-columns (sanitised)")

    def resolved_names(self) -> list[str]:
        """The feature name of each of ``feature_columns`` (which must be given)."""
        if self.feature_columns is None:
            raise ValueError("no feature_columns to name")
        if self.feature_names is not None:
            return list(self.feature_names)
        return [sanitise_feature_name(c) for c in self.feature_columns]


def _no_repeats(items: Sequence[str], option: str) -> None:
    dupes = sorted({x for x in items if list(items).count(x) > 1})
    if dupes:
        raise ConfigError(f"each may appear once; repeated: {dupes}", option)


def _check_feature_name(name: str, option: str) -> None:
    """The contract's rule (``anomalyd.contract.Feature``): the name is a JSON key in telemetry."""
    try:
        Feature(name=name)
    except ValidationError as exc:
        reason = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"feature name {name!r} is not usable in telemetry: {reason}", option) from None


@dataclass
class CsvRecording:
    """The usable rows of a file, in file order.

    ``values[:, j]`` is column ``columns[j]``, whose feature name is ``names[j]``; ``labels``
    is None without a label column.
    """

    path: Path
    ts: npt.NDArray[np.float64]  # (n,) epoch seconds
    values: npt.NDArray[np.float32]  # (n, F)
    labels: npt.NDArray[np.bool_] | None  # (n,)
    columns: list[str]
    names: list[str]
    data_rows: int  # rows read (blank lines aside), kept or not
    timestamps_as: str  # how timestamps were read, for people
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows
    first_skipped: dict[str, str] = field(default_factory=dict)  # reason -> where it first happened
    not_increasing: int = 0  # kept rows stamped at or before the row before them
    first_not_increasing: str = ""
    truncated: bool = False  # first_rows stopped the reading before the end
    unused_columns: list[str] = field(default_factory=list)  # feature columns the caller did not need

    def __len__(self) -> int:
        return int(self.ts.shape[0])

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def mapping(self) -> str:
        """``name <- 'column'`` for each feature, for people."""
        return ", ".join(
            name if name == col else f"{name} <- {col!r}"
            for name, col in zip(self.names, self.columns, strict=True)
        )

    def notes(self) -> list[str]:
        """What a person should know about the reading: rows kept and skipped, and why."""
        lines = [
            f"read {self.data_rows} data rows from {self.path}, kept {len(self)}; "
            f"timestamps as {self.timestamps_as}"
        ]
        if self.truncated:
            lines.append("--first-rows: the rows after those were not read")
        if self.unused_columns:
            lines.append(f"not read (no feature of the model): columns {self.unused_columns}")
        if self.skipped:
            parts = [
                f"{r} {self.skipped[r]} (first: {self.first_skipped[r]})"
                for r in SKIP_REASONS
                if r in self.skipped
            ]
            lines.append(f"skipped {self.n_skipped} bad row(s): " + "; ".join(parts))
        if self.not_increasing:
            lines.append(
                f"{self.not_increasing} row(s) stamped at or before the row before them (first: "
                f"{self.first_not_increasing}): kept in file order; the daemon rejects them as "
                "out of order or duplicate"
            )
        if self.labels is not None:
            lines.append(f"labels: {int(self.labels.sum())} of {len(self)} rows labelled anomalous")
        return lines


def _find_column(header: list[str], name: str, role: str, path: Path) -> int:
    if name in header:
        return header.index(name)
    stripped = [h.strip() for h in header]
    if name.strip() in stripped:  # tolerate padding around names ("a; b" headers)
        return stripped.index(name.strip())
    raise DataError(f"{path}: {role} column {name!r} not found; the header has {header}")


def _columns_for(header: list[str], wanted: Sequence[str], path: Path) -> list[int]:
    """Header index of the column for each feature name in ``wanted`` (no ``feature_columns``)."""
    stripped = [h.strip() for h in header]
    sanitised = [sanitise_feature_name(h) for h in header]
    found: list[int] = []
    for name in wanted:
        if name in stripped:
            found.append(stripped.index(name))
            continue
        matches = [i for i, s in enumerate(sanitised) if s == name]
        if len(matches) != 1:
            why = "several columns whose names sanitise to it" if matches else "no column of that name"
            raise ConfigError(
                f"the model needs feature {name!r} and {path} has {why}; map a column to it: "
                f"--feature-columns COL,... --feature-names {name},... (header: {header})",
                "--feature-columns",
            )
        found.append(matches[0])
    return found


def _timestamp_parser(fmt: str | None, first: str) -> tuple[Callable[[str], float], str] | None:
    """The parser for the file's timestamps and how it reads them; None if ``first`` fits none."""

    def as_utc(d: datetime) -> float:
        # Naive times are read as UTC, as training reads them: a constant shift leaves the
        # steps between readings, all that scoring uses, intact.
        return (d if d.tzinfo is not None else d.replace(tzinfo=UTC)).timestamp()

    if fmt is not None:
        return (lambda s: as_utc(datetime.strptime(s.strip(), fmt))), f"format {fmt!r} (no zone: UTC)"
    text = first.strip()
    try:
        float(text)
    except ValueError:
        pass
    else:
        return float, "epoch seconds"
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return None
    return (lambda s: as_utc(datetime.fromisoformat(s.strip()))), "ISO 8601 (no zone: UTC)"


def _parse_value(text: str) -> tuple[float, str | None]:
    """The value and ``None``, or NaN and the reason to skip the row."""
    s = text.strip()
    if not s:
        return math.nan, "nan"
    try:
        v = float(s)
    except ValueError:
        return math.nan, "non_numeric"
    if math.isnan(v):
        return math.nan, "nan"
    if math.isinf(v) or abs(v) > _FLOAT32_MAX:
        return math.nan, "non_finite"
    return v, None


class _Reader:
    """One pass over the rows: the kept ones, and the skipped ones counted by reason."""

    def __init__(
        self, path: Path, options: CsvOptions, i_ts: int, i_feat: list[int], i_lab: int | None
    ) -> None:
        self.path = path
        self.options = options
        self.i_ts, self.i_feat, self.i_lab = i_ts, i_feat, i_lab
        self.needed = max([i_ts, *i_feat, *([] if i_lab is None else [i_lab])]) + 1
        self.parse_ts: Callable[[str], float] | None = None
        self.ts_how = "unknown (no row had a readable timestamp)"
        self.ts: list[float] = []
        self.rows: list[list[float]] = []
        self.labels: list[bool] = []
        self.skipped: dict[str, int] = {}
        self.first_skipped: dict[str, str] = {}
        self.not_increasing = 0
        self.first_not_increasing = ""
        self.last_ts = -math.inf

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.first_skipped.setdefault(reason, where)

    def timestamp(self, text: str) -> float | None:
        if self.parse_ts is None:
            # Picked from the first row whose timestamp fits a parser: a bad first value
            # is one bad row, not a verdict on the whole column.
            picked = _timestamp_parser(self.options.timestamp_format, text)
            if picked is None:
                return None
            self.parse_ts, self.ts_how = picked
        try:
            t = self.parse_ts(text)
        except (ValueError, OverflowError, OSError):
            return None
        return t if math.isfinite(t) else None

    def row(self, row: list[str], line: str, columns: Sequence[str]) -> None:
        if len(row) < self.needed:
            self.skip("short_row", f"{line}: {len(row)} fields, need {self.needed}")
            return
        t = self.timestamp(row[self.i_ts])
        if t is None:
            self.skip("bad_timestamp", f"{line}: {row[self.i_ts][:64]!r}")
            return
        values: list[float] = []
        for col, i in zip(columns, self.i_feat, strict=True):
            v, reason = _parse_value(row[i])
            if reason is not None:
                self.skip(reason, f"{line}, column {col!r}: {row[i][:64]!r}")
                return
            values.append(v)
        label = False
        if self.i_lab is not None:
            lv, reason = _parse_value(row[self.i_lab])
            if reason is not None:
                self.skip(
                    "bad_label", f"{line}, column {self.options.label_column!r}: {row[self.i_lab][:64]!r}"
                )
                return
            label = lv != 0.0
        if t <= self.last_ts:
            self.not_increasing += 1
            if not self.first_not_increasing:
                self.first_not_increasing = f"{line}: {row[self.i_ts][:64]!r}"
        self.last_ts = max(self.last_ts, t)
        self.ts.append(t)
        self.rows.append(values)
        self.labels.append(label)


def read_csv(path: Path, options: CsvOptions, features: Sequence[str] | None = None) -> CsvRecording:
    """Read the usable rows of ``path``.

    ``features``: the feature names the caller needs (a model's, in its order): the
    recording then holds exactly those, in that order, mapped through ``feature_columns``
    and ``feature_names`` (or found by name without them); a feature no column maps to is a
    ``ConfigError`` naming it. Without ``features``, the recording holds every
    ``feature_columns`` column (which must then be given).

    Uses the ``csv`` module with ``newline=""``, so CRLF, LF and mixed line endings read the
    same; a byte order mark before the header is dropped; blank lines are no data rows.
    """
    path = Path(path)
    try:
        with path.open(newline="", encoding=options.encoding) as fh:
            reader = csv.reader(fh, delimiter=options.separator)
            header = next(reader, None)
            if not header:
                raise DataError(f"{path}: empty file, no header row")
            header[0] = header[0].removeprefix("\ufeff")  # a BOM left by spreadsheet exports
            i_ts = _find_column(header, options.timestamp_column, "timestamp", path)
            columns, i_feat, names, unused = _resolve_features(header, options, features, path)
            label = options.label_column
            i_lab = None if label is None else _find_column(header, label, "label", path)
            scan = _Reader(path, options, i_ts, i_feat, i_lab)
            data_rows = 0
            truncated = False
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # a blank line carries no data
                if options.first_rows is not None and data_rows >= options.first_rows:
                    truncated = True
                    break
                data_rows += 1
                scan.row(row, f"line {reader.line_num}", columns)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid {options.encoding} text ({exc.reason}); set --encoding") from None
    except csv.Error as exc:
        raise DataError(f"{path}: malformed CSV ({exc})") from None
    except LookupError:
        raise ConfigError(f"unknown text encoding {options.encoding!r}", "--encoding") from None

    if not scan.ts:
        skipped = ", ".join(f"{r} {n}" for r, n in sorted(scan.skipped.items())) or "none"
        hint = ""
        if scan.skipped.get("bad_timestamp"):
            hint = (
                f"; timestamps (first: {scan.first_skipped['bad_timestamp']}) are neither epoch seconds "
                "nor ISO 8601: give --timestamp-format (strptime, e.g. '%Y-%m-%d %H:%M:%S')"
                if options.timestamp_format is None
                else f"; timestamps do not match --timestamp-format {options.timestamp_format!r}"
            )
        if scan.skipped.get("short_row") and len(header) == 1:
            hint += f"; the header is one column ({header[0][:80]!r}): is --separator right?"
        raise DataError(f"{path}: no usable data rows ({data_rows} read; skipped: {skipped}){hint}")
    n = len(scan.ts)
    return CsvRecording(
        path=path,
        ts=np.asarray(scan.ts, np.float64),
        values=np.asarray(scan.rows, np.float32).reshape(n, len(columns)),
        labels=None if i_lab is None else np.asarray(scan.labels, np.bool_),
        columns=columns,
        names=names,
        data_rows=data_rows,
        timestamps_as=scan.ts_how,
        skipped=scan.skipped,
        first_skipped=scan.first_skipped,
        not_increasing=scan.not_increasing,
        first_not_increasing=scan.first_not_increasing,
        truncated=truncated,
        unused_columns=unused,
    )


def _resolve_features(
    header: list[str], options: CsvOptions, features: Sequence[str] | None, path: Path
) -> tuple[list[str], list[int], list[str], list[str]]:
    """(columns, their header indices, their feature names) to read, in the order wanted,
    and the ``feature_columns`` left unread because no wanted feature is theirs."""
    given = options.feature_columns
    if given is None:
        if features is None:
            raise ConfigError("name the columns to read", "--feature-columns")
        i_feat = _columns_for(header, features, path)
        return [header[i] for i in i_feat], i_feat, list(features), []
    indices = [_find_column(header, c, "feature", path) for c in given]
    names = options.resolved_names()
    if features is None:
        return list(given), indices, names, []
    missing = [f for f in features if f not in names]
    if missing:
        option = "--feature-names" if options.feature_names is not None else "--feature-columns"
        mapped = ", ".join(f"{c!r} -> {n}" for c, n in zip(given, names, strict=True))
        raise ConfigError(
            f"the model needs feature(s) {missing} (its features: {list(features)}), and no column maps "
            f"to {missing[0]!r}: the columns give {mapped}; name the column for each with "
            "--feature-columns and its model name with --feature-names (same order)",
            option,
        )
    order = [names.index(f) for f in features]
    unused = [c for c, n in zip(given, names, strict=True) if n not in features]
    return [given[j] for j in order], [indices[j] for j in order], list(features), unused
