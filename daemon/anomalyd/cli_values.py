"""Values of the ``anomalyd`` command's options: addresses and numbers, each checked with
an error that names the option (``ConfigError``, exit 78) or argparse's usage error (exit 64).

A broker ADDRESS is what ``mqtt.host`` takes: ``HOST``, ``HOST:PORT``, ``[IPv6]:PORT``,
``mqtt://HOST[:PORT]`` or ``tcp://`` (plain), ``mqtts://`` or ``ssl://`` (TLS); without a
port, the scheme's (1883, or 8883 for TLS).
"""

from __future__ import annotations

import argparse
import math

from anomalyd.config_addresses import BrokerAddress, parse_broker_address
from anomalyd.errors import ConfigError


def parse_address(text: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6addr]:PORT`` too) → (host, port); ``ConfigError`` naming ``what``."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"expected HOST:PORT, got {text!r}", what)
    host = host.removeprefix("[").removesuffix("]")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"expected a port number after ':', got {port_text!r}", what) from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"expected a port between 0 and 65535, got {port}", what)
    return host, port


def broker_address(text: str, what: str) -> BrokerAddress:
    """``text`` as a broker address (see the module docstring); ``ConfigError`` naming ``what``."""
    try:
        return parse_broker_address(text)
    except ValueError as exc:
        raise ConfigError(str(exc), what) from None


def plain_broker(text: str, what: str) -> tuple[str, int]:
    """(host, port) of a broker reached over plain TCP (the simulator's, the demo's and the
    benchmark's clients do not do TLS)."""
    address = broker_address(text, what)
    if address.tls:
        raise ConfigError(
            f"this command connects without TLS: give HOST:PORT or mqtt://HOST:PORT, got {text!r}", what
        )
    return address.host, address.port or address.default_port


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if math.isnan(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def positive_int(text: str) -> int:
    return _int_at_least(text, 1)
