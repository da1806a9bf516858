"""The PNG of ``anomalyd score``: each feature in its own panel above the score and its
threshold, alert periods shaded in every panel, labelled anomalies (with a label column)
shaded in another colour.

matplotlib is not a dependency of the daemon (``pip install 'anomalyd[plot]'`` brings it):
it is imported only when a plot is asked for (``matplotlib_available``, ``plot_scores``),
never by importing this module, and used through its object API only (no pyplot, no
global backend switch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from anomalyd.offline import OfflineScores, runs

__all__ = ["matplotlib_available", "plot_scores"]

_SERIES = "#1f4e79"
_SCORE = "black"
_THRESHOLD = "#d62728"
_ALERT = "#d62728"
_LABEL = "#f2b134"
#: Scores are drawn on a log axis; zero (a perfect forecast) sits at this floor.
_SCORE_FLOOR = 1e-3
#: A shaded run narrower than this fraction of the time span is widened to it, to stay visible.
_MIN_SPAN_FRACTION = 0.002


def matplotlib_available() -> bool:
    """Whether matplotlib can be imported: it is, when it can (called only on the way to a plot)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _as_datetime(ts: npt.NDArray[np.float64]) -> npt.NDArray[np.datetime64]:
    return np.round(ts * 1000.0).astype(np.int64).astype("datetime64[ms]")


def _shade(
    axes: list[Any], when: npt.NDArray[np.datetime64], mask: npt.NDArray[np.bool_], **style: Any
) -> int:
    """Shade each run of ``mask`` (from its first row to the row after its last) in every axes."""
    if not mask.any():
        return 0
    span = (when[-1] - when[0]) if len(when) > 1 else np.timedelta64(1000, "ms")
    min_width = max(span * _MIN_SPAN_FRACTION, np.timedelta64(1, "ms"))
    periods = runs(mask)
    for a, b in periods:
        lo, hi = when[a], when[min(b, len(when) - 1)]
        if hi - lo < min_width:
            mid = lo + (hi - lo) / 2
            lo, hi = mid - min_width / 2, mid + min_width / 2
        for ax in axes:
            ax.axvspan(lo, hi, lw=0, **style)
    return len(periods)


def plot_scores(path: Path, scores: OfflineScores) -> None:
    """Write the PNG of ``scores`` to ``path``. Needs matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    r = scores.result
    rec = scores.recording
    names = scores.features
    when = _as_datetime(r.ts)
    n_f = len(names)
    fig = Figure(figsize=(11, 1.3 * n_f + 3.2), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(
        n_f + 1, 1, sharex=True, squeeze=False, gridspec_kw={"height_ratios": [1.0] * n_f + [1.8]}
    )[:, 0].tolist()
    for j, (ax, name) in enumerate(zip(axes, names, strict=False)):
        ax.plot(when, rec.values[:, j], lw=0.7, color=_SERIES)
        column = rec.columns[j]
        ax.set_ylabel(name if name == column else f"{name}\n({column})", fontsize=8.5)
        ax.grid(True, alpha=0.3)

    score_ax = axes[-1]
    scored = ~np.isnan(r.score)
    score_ax.plot(when[scored], np.maximum(r.score[scored], _SCORE_FLOOR), lw=0.8, color=_SCORE)
    threshold = r.row_threshold[scored]
    if threshold.size and np.ptp(threshold) > 0:  # adaptive: each window's own
        score_ax.step(when[scored], threshold, where="post", color=_THRESHOLD, lw=1.2, ls="--")
    else:
        score_ax.axhline(r.threshold, color=_THRESHOLD, lw=1.2, ls="--")
    score_ax.set_yscale("log")
    score_ax.set_ylabel("score\n(log scale)", fontsize=8.5)
    score_ax.grid(True, which="major", alpha=0.3)
    score_ax.set_xlabel("time (UTC)")

    alert_runs = _shade(axes, when, r.alert, color=_ALERT, alpha=0.18)
    handles: list[Any] = [
        Line2D([], [], color=_SCORE, lw=0.8),
        Line2D([], [], color=_THRESHOLD, lw=1.2, ls="--"),
        Patch(color=_ALERT, alpha=0.18),
    ]
    legend = ["score", f"threshold {r.threshold:.3g}", f"alert periods: {alert_runs}"]
    if rec.labels is not None:
        # Hatched and in another colour, so that where both overlap each stays readable.
        label_runs = _shade(axes, when, rec.labels, facecolor=_LABEL, alpha=0.3, hatch="//", edgecolor=_LABEL)
        handles.append(Patch(facecolor=_LABEL, alpha=0.3, hatch="//", edgecolor=_LABEL))
        legend.append(f"labelled anomalies: {label_runs}")
    fig.legend(handles, legend, loc="lower center", ncol=len(legend), fontsize=8.5, frameon=False)
    fig.suptitle(
        f"{scores.device}: {rec.path.name} scored by {scores.model_version} "
        f"({int(scored.sum())} windows of {len(r)} rows)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.45 / fig.get_figheight(), 1, 1))
    fig.savefig(path, format="png")
