#!/usr/bin/env python3
"""Fuzz the daemon's input handling: the hostile-input properties, at 100,000 cases or more.

Runs the properties of ``tests/daemon/test_hostile_input.py`` (strategies and invariants
in ``tests/helpers/hostile.py``) with Hypothesis, many more cases than CI does: each case
goes through the decoder and a real pipeline (device windows, batcher, ONNX Runtime with a
tiny model, detector, metrics; no broker), and every log line on the way is formatted in
both formats and checked. Prints the seed, the cases run, the outcome counts (accepted, or
the rejection reason) and the time taken; exits 1 at the first invariant violation (after
Hypothesis has shrunk it to a small case, which is printed).

    .venv/bin/python scripts/fuzz_input.py --cases 100000 [--seed N]

Needs the development install (hypothesis, onnx): ``pip install -e '.[dev,train]'``.
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `tests` is not installed

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from tests.helpers.hostile import Case, Harness, cases, harness

_PROGRESS_EVERY = 10_000


def _table(title: str, counts: dict[str, int]) -> str:
    width = max((len(k) for k in counts), default=0)
    rows = [f"  {k:<{width}}  {v:>9,}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    return "\n".join([title, *rows])


def run(n_cases: int, seed: int, out: Harness) -> BaseException | None:
    """Run the properties for ``n_cases`` cases; the violation found, or None."""
    started = time.monotonic()

    @hypothesis_seed(seed)
    @settings(
        max_examples=n_cases,
        database=None,  # a fuzz run neither replays nor stores earlier failures
        deadline=None,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )
    @given(cases())
    def every_case(case: Case) -> None:
        out.run(case)
        if out.cases % _PROGRESS_EVERY == 0:
            rate = out.cases / (time.monotonic() - started)
            print(f"  {out.cases:>9,} cases, {rate:,.0f}/s", file=sys.stderr, flush=True)

    try:
        every_case()
    except BaseException as exc:  # report whatever Hypothesis raises, then fail
        if isinstance(exc, KeyboardInterrupt):
            raise
        return exc
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=100_000, help="cases to run (default 100000)")
    parser.add_argument("--seed", type=int, default=None, help="Hypothesis seed (default: random, printed)")
    args = parser.parse_args(argv)
    if args.cases < 1:
        parser.error("--cases must be at least 1")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    print(f"fuzz_input: {args.cases:,} cases, seed {seed}, python {platform.python_version()}", flush=True)
    started = time.monotonic()
    with harness() as h:
        failure = run(args.cases, seed, h)
        elapsed = time.monotonic() - started
        print(f"cases run: {h.cases:,} in {elapsed:.1f} s ({h.cases / elapsed:,.0f}/s), seed {seed}")
        print(_table("cases by input class:", dict(h.kinds)))
        print(_table("decoder outcomes (one per accepted reading or rejection):", dict(h.outcomes)))
        print(
            _table(
                "pipeline counts (metrics; out_of_order etc. come from the device windows):",
                h.pipeline_counts(),
            )
        )
        print(f"log lines checked: {h.logs.lines:,} (json and text), longest {h.logs.longest:,} bytes")
    if failure is not None:
        # Hypothesis attaches the shrunk falsifying case as notes on the exception.
        notes = "\n".join(getattr(failure, "__notes__", []))
        print(f"\nINVARIANT VIOLATED (seed {seed}):\n{failure!r}\n{notes}"[:20_000], file=sys.stderr)
        print("result: FAIL")
        return 1
    print("result: PASS (no invariant violated)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
