"""What the synthetic fleet generator (``anomalyd.synthetic``) is asked to generate: ``FleetSpec``.

The one declaration of the generator's settings, their defaults and their checks. Whoever
generates a fleet (the daemon's simulator, the training config's ``[data.synthetic]``,
benchmarks) starts from ``FleetSpec()`` and states only what it wants differently.

Standard library only, unlike the generator (numpy), so that a configuration that declares
a fleet can be validated without importing numpy.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

__all__ = ["ANOMALY_KINDS", "FleetSpec", "check_int", "check_number"]

ANOMALY_KINDS: tuple[str, ...] = ("spike", "level_shift", "drift", "stuck", "noise_burst", "decorrelation")

#: Per device; keeps a typo in duration_s/period_s from eating the machine's memory.
_MAX_SAMPLES = 20_000_000
#: Jitter beyond this would let neighbouring samples nearly collide (ts must strictly increase).
_MAX_JITTER_FRACTION = 0.45
_MAX_START_TS = 1e11  # year ~5138; keeps float64 resolution well below the smallest period


@dataclass(frozen=True)
class FleetSpec:
    """What to generate. Invalid settings raise ``ValueError`` naming the field."""

    n_devices: int = 4
    duration_s: float = 3600.0
    period_s: float = 1.0
    seed: int = 0
    anomalies_per_device_hour: float = 2.0  # 0 → normal data only
    anomaly_kinds: tuple[str, ...] = ANOMALY_KINDS
    jitter_fraction: float = 0.05  # timing jitter as a fraction of period_s
    gaps_per_device_hour: float = 0.5
    gap_s: tuple[float, float] = (120.0, 600.0)  # min/max gap length
    start_ts: float = 1_767_225_600.0  # 2026-01-01T00:00:00Z
    device_prefix: str = "machine-"
    # Device k starts at start_ts + k * start_stagger_s. Ambient temperature follows the
    # time of day, so a training fleet whose devices start at staggered hours covers the
    # whole daily cycle even when each history is short.
    start_stagger_s: float = 0.0

    def __post_init__(self) -> None:
        # Frozen: normalise sequences to tuples through object.__setattr__.
        object.__setattr__(self, "anomaly_kinds", tuple(self.anomaly_kinds))
        object.__setattr__(self, "gap_s", tuple(self.gap_s))
        check_int(self.n_devices, "n_devices", 1)
        check_int(self.seed, "seed", 0)
        check_number(self.period_s, "period_s", lo=1e-3)
        check_number(self.duration_s, "duration_s", lo=2 * self.period_s)
        if self.duration_s / self.period_s > _MAX_SAMPLES:
            raise ValueError(
                f"duration_s/period_s: {self.duration_s / self.period_s:.3g} samples per device "
                f"exceeds the limit of {_MAX_SAMPLES}"
            )
        check_number(self.anomalies_per_device_hour, "anomalies_per_device_hour", lo=0.0)
        check_number(self.gaps_per_device_hour, "gaps_per_device_hour", lo=0.0)
        check_number(self.jitter_fraction, "jitter_fraction", lo=0.0, hi=_MAX_JITTER_FRACTION)
        check_number(self.start_ts, "start_ts", lo=0.0, hi=_MAX_START_TS)
        check_number(self.start_stagger_s, "start_stagger_s", lo=0.0, hi=_MAX_START_TS)
        unknown = [k for k in self.anomaly_kinds if k not in ANOMALY_KINDS]
        if unknown:
            raise ValueError(f"anomaly_kinds: unknown {unknown}; known kinds are {list(ANOMALY_KINDS)}")
        if len(set(self.anomaly_kinds)) != len(self.anomaly_kinds):
            raise ValueError(f"anomaly_kinds: duplicates in {list(self.anomaly_kinds)}")
        if self.anomalies_per_device_hour > 0 and not self.anomaly_kinds:
            raise ValueError("anomaly_kinds: empty, but anomalies_per_device_hour > 0")
        if len(self.gap_s) != 2:
            raise ValueError(f"gap_s: need (min, max), got {self.gap_s!r}")
        lo, hi = self.gap_s
        check_number(lo, "gap_s[0]", lo=2 * self.period_s)
        check_number(hi, "gap_s[1]", lo=float(lo))
        if not isinstance(self.device_prefix, str) or any(c in self.device_prefix for c in "/+#\0 \t\n"):
            raise ValueError(
                f"device_prefix: must be a string without '/', '+', '#', NUL or whitespace "
                f"(it becomes part of MQTT topics), got {self.device_prefix!r}"
            )


def check_int(v: object, name: str, lo: int) -> None:
    """``ValueError`` naming ``name`` unless ``v`` is an integer >= ``lo`` (numpy's too; not bool)."""
    # numbers.Integral covers numpy's integers (numpy registers them) without importing numpy.
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
        raise ValueError(f"{name}: need an integer >= {lo}, got {v!r}")


def check_number(v: object, name: str, lo: float, hi: float = math.inf) -> None:
    """``ValueError`` naming ``name`` unless ``v`` is a finite real number in [``lo``, ``hi``]."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ValueError(f"{name}: need a number, got {v!r}")
    f = float(v)
    if not math.isfinite(f) or f < lo or f > hi:
        bounds = f">= {lo:g}" + (f" and <= {hi:g}" if math.isfinite(hi) else "")
        raise ValueError(f"{name}: need a finite number {bounds}, got {v!r}")
