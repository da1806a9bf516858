"""anomalyd.globs: whether two device globs can match one device id, and which."""

from __future__ import annotations

import fnmatch
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anomalyd.globs import overlap_witness


@pytest.mark.parametrize(
    ("a", "b", "witness"),
    [
        ("pump-1*", "pump-*", "pump-1"),
        ("*-a", "b-*", "b-a"),
        ("line-?", "line-[0-9]", "line-0"),
        ("*", "x", "x"),
        ("ab", "ab*", "ab"),
        ("[", "[", "["),  # an unclosed bracket is a literal, as in fnmatch
    ],
)
def test_overlapping_globs_give_an_id_both_match(a: str, b: str, witness: str) -> None:
    assert overlap_witness(a, b) == witness
    assert overlap_witness(b, a) is not None
    assert fnmatch.fnmatchcase(witness, a)
    assert fnmatch.fnmatchcase(witness, b)


@pytest.mark.parametrize(
    ("a", "b"),
    [("pump-*", "fan-*"), ("a[!b]c", "a[b]c"), ("x*y", "*z"), ("a?", "a"), ("Pump-*", "pump-*")],
)
def test_disjoint_globs_give_none(a: str, b: str) -> None:
    assert overlap_witness(a, b) is None
    assert overlap_witness(b, a) is None


_TOKENS = ["a", "b", "-", "*", "?", "[ab]", "[!a]", "[a-b]"]
#: Every id of up to 5 characters over the characters the tokens above can match (and one
#: they match only through '?' / '[!a]'), to decide overlaps by brute force.
_IDS = ["".join(p) for n in range(6) for p in itertools.product("ab-c", repeat=n)]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(_TOKENS), max_size=4), st.lists(st.sampled_from(_TOKENS), max_size=4))
def test_agrees_with_fnmatch_by_brute_force(ta: list[str], tb: list[str]) -> None:
    a, b = "".join(ta), "".join(tb)
    witness = overlap_witness(a, b)
    if witness is not None:
        assert fnmatch.fnmatchcase(witness, a)
        assert fnmatch.fnmatchcase(witness, b)
    else:
        assert not any(fnmatch.fnmatchcase(s, a) and fnmatch.fnmatchcase(s, b) for s in _IDS)
