"""One root exception for everything anomalyd raises on purpose.

Each error carries the process exit code it ends a command with (sysexits.h numbers), so
that systemd can tell a bad configuration (do not restart) from a crash (restart):

==  =====================================================================================
64  EX_USAGE: the command line is wrong (unknown option, missing subcommand)
65  EX_DATAERR: a model file (or training data) is unusable
69  EX_UNAVAILABLE: something the command needs is not there (CUDA for
    ``model.providers = "cuda"``, the ``train`` extra for ``anomalyd-train train``)
70  EX_SOFTWARE: an internal failure (a bug; a failed export check)
76  EX_PROTOCOL: the broker refused our credentials or subscription at start
78  EX_CONFIG: a configuration file, option, secret or credential is wrong
==  =====================================================================================

Besides these, 0 is success and 130 a forced stop (a second signal) or Ctrl-C.
"""

from __future__ import annotations


class AnomalydError(Exception):
    """Root of every error anomalyd raises deliberately."""

    exit_code = 1


#: A failure nothing foresaw (a bug): the code ``anomalyd`` exits with after printing the
#: traceback, and the daemon's when its pipeline thread dies.
EX_SOFTWARE = 70


class UsageError(AnomalydError):
    """The command line is wrong: an unknown option, a missing subcommand, options that
    do not go together."""

    exit_code = 64  # EX_USAGE


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


class MissingExtraError(AnomalydError):
    """A command needs an optional part of anomalyd that is not installed (a pip extra,
    e.g. ``anomalyd[train]`` for TensorFlow); the message says how to install it."""

    exit_code = 69  # EX_UNAVAILABLE: installing the extra fixes it, not editing a config


class BrokerError(AnomalydError):
    """The MQTT broker refused us, at start, for a reason retrying will not fix: our
    credentials, or the telemetry subscription (its ACL)."""

    exit_code = 76  # EX_PROTOCOL


class DataError(AnomalydError):
    """Training data cannot be used as given (no rows, NaN, constant column, ...)."""

    exit_code = 65
