"""Whether two device globs can match the same device id, decided exactly.

``[[models]]`` entries own devices by ``fnmatch`` globs (``*``, ``?``, ``[...]``, ``[!...]``;
case-sensitive, as the router matches them). A device matched by two models is a
configuration error, so ``overlap_witness`` looks for a device id both globs match and
returns one (``pump-1*`` and ``pump-*`` → ``"pump-1"``; ``*-a`` and ``b-*`` → ``"b-a"``), or
None when no id can match both.

The search walks both globs at once (a product of the two pattern automata): a state is
a position in each glob, ``*`` may match nothing or absorb the other glob's next
character, and two single-character tokens step together when some character satisfies
both. Character classes are evaluated over printable ASCII (space to ``~``), which is
what device ids may hold whatever ``stream.device_id_pattern`` says (the decoder refuses
non-printable characters); a witness is therefore always a possible device id.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from functools import cache

__all__ = ["overlap_witness"]

_PRINTABLE = tuple(chr(c) for c in range(0x20, 0x7F))
#: Witness characters are picked in this order, so that a witness reads like a device id.
_PREFERENCE = {ch: (not ch.isalnum(), ch) for ch in _PRINTABLE}


@dataclass(frozen=True, slots=True)
class _Star:
    pass


#: A single-character token: the characters (of ``_PRINTABLE``, or the one literal) it matches.
_Chars = frozenset[str]
_Token = _Star | _Chars


def _tokens(glob: str) -> tuple[_Token, ...]:
    """``glob`` as tokens, with ``fnmatch``'s rules for brackets (an unclosed ``[`` is a literal)."""
    out: list[_Token] = []
    i, n = 0, len(glob)
    while i < n:
        c = glob[i]
        if c == "*":
            if not out or not isinstance(out[-1], _Star):  # ** is *
                out.append(_Star())
            i += 1
        elif c == "?":
            out.append(frozenset(_PRINTABLE))
            i += 1
        elif c == "[":
            j = i + 1
            if j < n and glob[j] == "!":
                j += 1
            if j < n and glob[j] == "]":
                j += 1
            while j < n and glob[j] != "]":
                j += 1
            if j >= n:  # no closing bracket: fnmatch reads '[' literally
                out.append(frozenset("["))
                i += 1
            else:
                bracket = glob[i : j + 1]
                out.append(frozenset(ch for ch in _PRINTABLE if fnmatch.fnmatchcase(ch, bracket)))
                i = j + 1
        else:
            out.append(frozenset(c))
            i += 1
    return tuple(out)


def overlap_witness(a: str, b: str) -> str | None:
    """A device id that both globs match, or None when none exists."""
    ta, tb = _tokens(a), _tokens(b)

    @cache
    def search(i: int, j: int) -> str | None:
        # The shortest-first order of the branches keeps witnesses short and readable.
        if i == len(ta) and j == len(tb):
            return ""
        star_a = i < len(ta) and isinstance(ta[i], _Star)
        star_b = j < len(tb) and isinstance(tb[j], _Star)
        if star_a:
            found = search(i + 1, j)  # a's star matches nothing more
            if found is not None:
                return found
        if star_b:
            found = search(i, j + 1)
            if found is not None:
                return found
        if i == len(ta) or j == len(tb):
            return None  # one glob is used up and the other still needs a character
        if star_a and star_b:
            return None  # both stars absorbing a character adds nothing that skipping does not
        chars_a = frozenset(_PRINTABLE) if star_a else ta[i]
        chars_b = frozenset(_PRINTABLE) if star_b else tb[j]
        assert not isinstance(chars_a, _Star)
        assert not isinstance(chars_b, _Star)
        common = chars_a & chars_b
        if not common:
            return None
        # A star stays where it is after absorbing a character; a single token moves on.
        rest = search(i if star_a else i + 1, j if star_b else j + 1)
        return None if rest is None else min(common, key=_PREFERENCE.__getitem__) + rest

    return search(0, 0)
