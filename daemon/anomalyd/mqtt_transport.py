"""paho, set up for the MQTT link and adapted where the link needs more than paho gives.

``new_client`` builds the link's paho client from ``mqtt.*`` (protocol, session,
credentials, TLS, a bounded out-queue) with all socket writes left to the network thread.
Three small changes work around what paho 2.2 does or does not do, each reaching into
paho internals (so this module is the one to check against a new paho):

- ``Client`` hands the reason code of every PUBREC to ``on_pubrec``: paho drops it, so a
  QoS 2 publish the broker refused would look accepted (``anomalyd.mqtt_publish`` uses it).
- ``ReadAhead`` wraps paho's socket and reads the broker's stream in large chunks instead
  of a few bytes per system call (``MqttLink._serve_connection`` installs it).
- ``TrackingContext`` remembers the TLS socket it wrapped, so that the link can close the
  socket paho leaks when a TLS handshake fails; ``tls_context`` builds it from ``mqtt.tls``.

Nothing here knows about the link's other modules.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from anomalyd.config import MqttConfig, TlsConfig

#: Bytes read from the broker per system call (see ``ReadAhead``): a few hundred small
#: telemetry messages, and short enough that writes and keep-alives are not held back.
CHUNK = 64 * 1024
#: QoS>0 messages paho keeps while disconnected (alerts, status): bounded, like everything.
MAX_QUEUED_OUT = 10000


class Client(mqtt.Client):
    """paho's client, plus the reason code of every PUBREC.

    paho drops a PUBREC's reason code (it answers PUBREL either way, and ``on_publish``
    fires at the PUBCOMP, with the PUBCOMP's code, which Mosquitto sends as a success even
    for a message it refused): a refused QoS 2 publish would look accepted. ``on_pubrec``
    sees ``(packet id, reason code)`` first (0, success, where the packet has none:
    MQTT 3.1.1, or MQTT 5's short form).
    """

    on_pubrec: Callable[[int, int], None] | None = None

    def _handle_pubrec(self) -> MQTTErrorCode:
        hook = self.on_pubrec
        packet = self._in_packet["packet"]
        if hook is not None and len(packet) >= 2:
            # Variable header: packet id (2 bytes), then (MQTT 5) a reason code.
            hook(int.from_bytes(packet[:2], "big"), packet[2] if len(packet) > 2 else 0)
        rc: MQTTErrorCode = super()._handle_pubrec()
        return rc


class ReadAhead:
    """A socket for paho that reads the broker's byte stream ``CHUNK`` bytes at a time.

    paho asks for one byte (the packet type), then the length bytes one by one, then the
    rest of the packet, each a ``recv()`` system call; this serves those requests from a
    buffer filled by one large ``recv()``. paho's ``loop()`` consults ``pending()`` (meant
    for bytes an SSL socket has already decrypted) and reads without waiting in
    ``select()`` when it is non-zero. Everything else is the wrapped socket's.
    """

    __slots__ = ("_buf", "_pos", "_sock")

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._buf = b""
        self._pos = 0

    @property
    def buffered(self) -> int:
        """Bytes read from the socket and not yet handed to paho."""
        return len(self._buf) - self._pos

    def recv(self, size: int) -> bytes:
        left = len(self._buf) - self._pos
        if left <= 0:
            data: bytes = self._sock.recv(CHUNK)  # BlockingIOError when empty, as paho expects
            if not data:
                return data  # the broker closed the connection
            self._buf, self._pos, left = data, 0, len(data)
        take = min(size, left)
        start = self._pos
        self._pos = start + take
        return self._buf[start : start + take]

    def pending(self) -> int:
        inner = getattr(self._sock, "pending", None)
        return self.buffered + (inner() if inner is not None else 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class TrackingContext(ssl.SSLContext):
    """An SSLContext that remembers the last socket it wrapped.

    paho 2.2 does not close the TLS socket when the handshake fails (the ``SSLSocket``
    leaks until garbage collection, with a ResourceWarning): after a failed connect the
    link closes it through this reference.
    """

    last_socket: ssl.SSLSocket | None = None

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        sock = super().wrap_socket(*args, **kwargs)
        self.last_socket = sock
        return sock


def tls_context(tls: TlsConfig, key_passphrase: str | None) -> TrackingContext:
    """The client TLS context ``mqtt.tls`` describes (verification on unless ``insecure``)."""
    # PROTOCOL_TLS_CLIENT: certificate and host name verification on, as in
    # ssl.create_default_context().
    ctx = TrackingContext(ssl.PROTOCOL_TLS_CLIENT)
    if tls.ca_file is not None:
        ctx.load_verify_locations(cafile=str(tls.ca_file))
    else:
        ctx.load_default_certs()
    if tls.cert_file is not None and tls.key_file is not None:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file), password=key_passphrase)
    if tls.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def new_client(
    config: MqttConfig, *, client_id: str, password: str | None, key_passphrase: str | None
) -> tuple[Client, TrackingContext | None]:
    """A paho client for ``config``, not connected yet, and its TLS context (None without TLS).

    ``publish()`` on it only queues: the thread that runs ``loop()`` does every socket write.
    """
    v5 = config.protocol == "5"
    client = Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        # 3.1.1 takes the clean-session flag here; MQTT 5 takes clean_start in connect().
        clean_session=None if v5 else config.clean_start,
    )
    client.max_queued_messages_set(MAX_QUEUED_OUT)
    if config.username is not None:
        client.username_pw_set(config.username, password)
    tls = None
    if config.tls is not None:
        tls = tls_context(config.tls, key_passphrase)
        client.tls_set_context(tls)
        if config.tls.insecure:
            client.tls_insecure_set(True)
    # Our own thread runs client.loop(). Without an external-loop callback, paho's
    # publish() writes to the socket from the *calling* thread when it sees no
    # loop_start() thread, racing our network thread on the same deque of partial
    # writes. With this no-op callback set, publish() only queues the packet and wakes
    # select() through paho's socket pair; the network thread does all socket writes.
    client.on_socket_register_write = lambda _client, _userdata, _sock: None
    return client, tls
