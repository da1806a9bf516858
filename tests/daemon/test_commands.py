"""Operator command parsing: topics, verbs, payloads, refusals."""

from __future__ import annotations

import re

import pytest

from anomalyd.commands import Command, CommandError, CommandTopic, parse_command

TOPIC = CommandTopic("anomalyd/cmd/{device}/{verb}")
PATTERN = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")


def parse(topic: str, payload: bytes, retain: bool = False) -> Command:
    return parse_command(
        TOPIC, topic, payload, retain, device_pattern=PATTERN, default_shelve_s=3600.0, max_shelve_s=86400.0
    )


def test_subscription_filter_and_split() -> None:
    assert TOPIC.subscription == "anomalyd/cmd/+/+"
    assert TOPIC.split("anomalyd/cmd/pump-7/shelve") == ("pump-7", "shelve")
    other = CommandTopic("plant/{verb}/x/{device}")
    assert other.split("plant/rebaseline/x/m1") == ("m1", "rebaseline")


def test_shelve_with_and_without_duration() -> None:
    c = parse("anomalyd/cmd/pump-7/shelve", b'{"by": "j.smith", "why": "valve swap", "duration_s": 600}')
    assert c == Command("pump-7", "shelve", "j.smith", "valve swap", 600.0)
    c = parse("anomalyd/cmd/pump-7/shelve", b'{"by": "j", "why": "w"}')
    assert c.duration_s == 3600.0


@pytest.mark.parametrize("verb", ["unshelve", "rebaseline", "out_of_service", "in_service"])
def test_other_verbs(verb: str) -> None:
    c = parse(f"anomalyd/cmd/m1/{verb}", b'{"by": "ops", "why": "after maintenance"}')
    assert (c.device, c.verb, c.duration_s) == ("m1", verb, None)


@pytest.mark.parametrize(
    ("topic", "payload", "retain", "reason"),
    [
        ("anomalyd/cmd/m1/explode", b'{"by": "a", "why": "b"}', False, "unknown_verb"),
        ("anomalyd/cmd/m1/x/shelve", b'{"by": "a", "why": "b"}', False, "bad_topic"),
        ("other/cmd/m1/shelve", b'{"by": "a", "why": "b"}', False, "bad_topic"),
        ("anomalyd/cmd/bad id!/shelve", b'{"by": "a", "why": "b"}', False, "bad_device"),
        ("anomalyd/cmd/m1/shelve", b'{"by": "a", "why": "b"}', True, "retained"),
        ("anomalyd/cmd/m1/shelve", b"not json", False, "malformed"),
        ("anomalyd/cmd/m1/shelve", b"[1, 2]", False, "malformed"),
        ("anomalyd/cmd/m1/shelve", b'{"why": "b"}', False, "malformed"),
        ("anomalyd/cmd/m1/shelve", b'{"by": "a"}', False, "malformed"),
        ("anomalyd/cmd/m1/shelve", b'{"by": " ", "why": "b"}', False, "malformed"),
        ("anomalyd/cmd/m1/shelve", b'{"by": "a", "why": "b", "duration_s": -5}', False, "malformed"),
        ("anomalyd/cmd/m1/shelve", b'{"by": "a", "why": "b", "duration_s": 1e9}', False, "malformed"),
        ("anomalyd/cmd/m1/shelve", b'{"by": "a", "why": "b", "duration_s": "1h"}', False, "malformed"),
        ("anomalyd/cmd/m1/shelve", b'{"by": "a", "why": "b", "duration_s": true}', False, "malformed"),
        ("anomalyd/cmd/m1/rebaseline", b'{"by": "a", "why": "b", "duration_s": 5}', False, "malformed"),
        ("anomalyd/cmd/m1/rebaseline", b'{"by": "a", "why": "b", "extra": 1}', False, "malformed"),
        ("anomalyd/cmd/m1/rebaseline", b'{"by": "a", "why": "' + b"x" * 5000 + b'"}', False, "malformed"),
    ],
)
def test_refusals_say_why(topic: str, payload: bytes, retain: bool, reason: str) -> None:
    with pytest.raises(CommandError) as info:
        parse(topic, payload, retain)
    assert info.value.reason == reason
    assert str(info.value)
