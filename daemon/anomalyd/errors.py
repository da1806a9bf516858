"""One root exception for everything anomalyd raises on purpose.

Start-up failures map to distinct process exit codes (see ``EXIT_CODES``) so that
systemd can tell a bad configuration (do not restart) from a crash (restart).
"""

from __future__ import annotations


class AnomalydError(Exception):
    """Root of every error anomalyd raises deliberately."""

    exit_code = 1


class ConfigError(AnomalydError):
    """A configuration file, option or value is wrong.

    ``key_path`` names the offending key (``"mqtt.port"``), when there is one.
    """

    exit_code = 78  # EX_CONFIG from sysexits.h; systemd unit: RestartPreventExitStatus=78

    def __init__(self, message: str, key_path: str | None = None) -> None:
        self.key_path = key_path
        super().__init__(f"{key_path}: {message}" if key_path else message)


class ModelContractError(AnomalydError):
    """A model file is unreadable, or its contract is missing, malformed or disagrees
    with its graph. ``field`` names the contract field (or graph property) at fault."""

    exit_code = 65  # EX_DATAERR

    def __init__(self, message: str, field: str | None = None, path: str | None = None) -> None:
        self.field = field
        self.path = path
        where = f" [{path}]" if path else ""
        super().__init__(
            f"model contract field {field!r}: {message}{where}" if field else f"{message}{where}"
        )


class ProviderError(AnomalydError):
    """The requested ONNX Runtime execution provider is not really available."""

    exit_code = 69  # EX_UNAVAILABLE


class BrokerError(AnomalydError):
    """The MQTT broker refused us, at start, for a reason retrying will not fix: our
    credentials, or the telemetry subscription (its ACL)."""

    exit_code = 76  # EX_PROTOCOL


class DataError(AnomalydError):
    """Training data cannot be used as given (no rows, NaN, constant column, ...)."""

    exit_code = 65
