"""Host names and broker addresses as people write them: ``check_host`` (an IP address
or a DNS host name) and ``parse_broker_address`` (``HOST``, ``HOST:PORT``, ``[IPv6]:PORT``,
``mqtt://`` / ``tcp://`` / ``mqtts://`` / ``ssl://`` URLs) into a ``BrokerAddress``.

``mqtt.host`` takes such an address (``anomalyd.config_mqtt`` takes it apart before
validation), ``metrics.host`` is checked with ``check_host``, and the command line's
``--broker`` takes the same address as ``mqtt.host``. Separate from the section models
because it is plain text parsing with its own rules (schemes, default ports, IPv6
brackets, zones) and needs no pydantic, so the command line uses it without loading them.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["BrokerAddress", "check_host", "parse_broker_address"]

#: URL schemes of a broker address, as MQTT clients and tools write them (Paho, Telegraf,
#: Node-RED, mosquitto_sub -L): whether the scheme means TLS, and its default port.
_BROKER_SCHEMES: dict[str, tuple[bool, int]] = {
    "mqtt": (False, 1883),
    "tcp": (False, 1883),
    "mqtts": (True, 8883),
    "ssl": (True, 8883),
}
_WEBSOCKET_SCHEMES = ("ws", "wss")
_HOST_LABEL = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_\-]{0,61}[A-Za-z0-9_])?$")
_BROKER_FORMS = "HOST, HOST:PORT, [IPv6]:PORT, mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (TLS)"


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    """A broker address taken apart: ``host`` (a name or an IP address, no brackets),
    ``port`` (None: not given) and ``tls`` (None: a bare host says nothing about TLS;
    True/False: the URL's scheme does)."""

    host: str
    port: int | None = None
    tls: bool | None = None
    scheme: str | None = None

    @property
    def default_port(self) -> int:
        """The port of the scheme (8883 for TLS, else 1883) when the address gives none."""
        return 8883 if self.tls else 1883


def check_host(host: str) -> str:
    """``host`` if it is an IP address or a DNS host name; ``ValueError`` saying why not.

    Names follow RFC 1123 (letters, digits, '-', dot-separated labels of at most 63
    characters), plus '_', which container and internal DNS names use. A name whose last
    label is all digits is taken for a mistyped IPv4 address, as resolvers would.
    """
    try:
        ipaddress.ip_address(host.split("%", 1)[0])  # an IPv6 zone ("fe80::1%eth0") is allowed
    except ValueError:
        pass
    else:
        return host
    name = host.removesuffix(".")
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_HOST_LABEL.match(label) for label in labels):
        raise ValueError(f"expected a host name or an IP address, got {host!r}")
    if labels[-1].isdigit():
        raise ValueError(f"expected a host name or an IP address, {host!r} is neither (not a valid IPv4)")
    return host


def _port(text: str, address: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"expected a port between 1 and 65535 in {address!r}, got {text!r}")
    return int(text)


def _host_and_port(text: str, address: str) -> tuple[str, int | None]:
    """``HOST``, ``HOST:PORT``, ``IPv6``, ``[IPv6]`` or ``[IPv6]:PORT`` → (host, port or None)."""
    if text.startswith("["):
        inside, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"expected [IPv6] or [IPv6]:PORT, got {address!r}")
        try:
            ipaddress.IPv6Address(inside.split("%", 1)[0])
        except ValueError:
            raise ValueError(f"expected an IPv6 address between '[' and ']', got {address!r}") from None
        return inside, _port(rest[1:], address) if rest else None
    if text.count(":") > 1:
        try:
            ipaddress.IPv6Address(text.split("%", 1)[0])
        except ValueError:
            raise ValueError(
                f"expected one of {_BROKER_FORMS}, got {address!r}: more than one ':' (an IPv6 "
                "address with a port is written [ADDRESS]:PORT)"
            ) from None
        return text, None
    host, colon, port = text.partition(":")
    return check_host(host), _port(port, address) if colon else None


def parse_broker_address(text: str) -> BrokerAddress:
    """A broker address as people write it: a host name or IP address, ``HOST:PORT``,
    ``[IPv6]:PORT``, or a URL ``mqtt://`` / ``tcp://`` (plain TCP) or ``mqtts://`` /
    ``ssl://`` (TLS) ``HOST[:PORT]``. ``ValueError`` says what is wrong and which form
    works: websockets (``ws://``, ``wss://``) are refused, anomalyd speaks MQTT over TCP.
    """
    text = text.strip()
    if "://" not in text:
        host, port = _host_and_port(text, text)
        return BrokerAddress(host, port)
    scheme = text.partition("://")[0].lower()
    if scheme in _WEBSOCKET_SCHEMES:
        tls = scheme == "wss"
        raise ValueError(
            f"MQTT over websockets ({scheme}://) is not supported: anomalyd connects to the "
            f"broker's MQTT TCP listener; write {'mqtts' if tls else 'mqtt'}://HOST:"
            f"{8883 if tls else 1883} (the broker's {'TLS ' if tls else ''}MQTT port), got {text!r}"
        )
    if scheme not in _BROKER_SCHEMES:
        raise ValueError(
            f"unknown scheme {scheme + '://'!r}: expected mqtt:// or tcp:// (plain TCP), "
            f"mqtts:// or ssl:// (TLS), or a bare host name, got {text!r}"
        )
    url = urlsplit(text)
    if "@" in url.netloc:
        raise ValueError(
            "a user name or password does not go in the broker address: set mqtt.username and "
            "mqtt.password_file or mqtt.password_credential"
        )
    if url.path not in ("", "/") or url.query or url.fragment:
        raise ValueError(f"expected {scheme}://HOST[:PORT] with nothing after it, got {text!r}")
    if not url.netloc:
        raise ValueError(f"expected a host after {scheme}://, got {text!r}")
    host, port = _host_and_port(url.netloc, text)
    return BrokerAddress(host, port, tls=_BROKER_SCHEMES[scheme][0], scheme=scheme)
