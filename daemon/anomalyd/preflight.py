"""What ``anomalyd check-config`` checks beyond the configuration file itself: everything
``anomalyd run`` needs to start, checked with the daemon's own code, every problem
reported with its key path instead of stopping at the first.

- Secrets: the broker password and the TLS key passphrase are read where the service will
  read them (``MqttConfig.password``, ``MqttConfig.key_passphrase``).
- TLS: the CA, certificate and key files are loaded into the TLS context the MQTT link
  would use (``anomalyd.mqtt_transport.tls_context``).
- The model, or every ``[[models]]`` entry's: loaded with the configured session options
  (``anomalyd.model.load_model``: its contract against its graph, the execution provider),
  warmed up on every batch shape as the start does, and the pipeline's stages built from it
  and the configuration as that model sees it (``Config.for_model``;
  ``anomalyd.pipeline.Pipeline``: decoder, device windows, batcher, detector), which is
  where the model's contract meets the configuration. Problems are at ``model.path`` or
  ``models[<i>].path`` (``.providers``), as configuration errors name array entries.
- The state directory: writable, if snapshots are on.

With a systemd unit (``--as-service``), the checks see what the service will see:
``$CREDENTIALS_DIRECTORY`` as the unit's ``LoadCredential=`` fills it, ``$STATE_DIRECTORY``
from ``StateDirectory=``, files the service opens itself readable by a dynamic user
(``DynamicUser=``) and outside ``ProtectHome=``, and a configured state directory
writable under ``ProtectSystem=strict``.

Nothing here connects to the broker or binds the metrics port: the broker may be down
while a configuration is checked, and a running daemon holds the port.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from anomalyd.config import Config, model_entries
from anomalyd.errors import ConfigError, ModelContractError, ProviderError
from anomalyd.systemd_unit import ServiceCredentials, ServiceUnit

__all__ = ["StartCheck", "check_start"]


@dataclass
class StartCheck:
    """What ``check_start`` found: ``problems`` (each with its key path) and, for a
    configuration without problems, ``summary`` lines saying what the daemon would run."""

    problems: list[ConfigError] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)

    def problem(self, key_path: str, message: str) -> None:
        self.problems.append(ConfigError(message, key_path))


@contextlib.contextmanager
def _environment(name: str, value: str | None) -> Iterator[None]:
    """``os.environ[name]`` set to ``value`` (None: unset) for the duration."""
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


# --------------------------------------------------------------------------- secrets


def _credentials_in_use(cfg: Config) -> list[tuple[str, str]]:
    """(key path, credential name) of every systemd credential the configuration reads."""
    out = []
    if cfg.mqtt.password_credential:
        out.append(("mqtt.password_credential", cfg.mqtt.password_credential))
    if cfg.mqtt.tls is not None and cfg.mqtt.tls.key_passphrase_credential:
        out.append(("mqtt.tls.key_passphrase_credential", cfg.mqtt.tls.key_passphrase_credential))
    return out


def _read_secrets(cfg: Config, check: StartCheck, skip: set[str]) -> str | None:
    """Read the password and the key passphrase as the start does; returns the passphrase.
    Credential keys in ``skip`` were already reported (a credential nothing provides)."""
    passphrase = None
    for credential_key, read in (
        ("mqtt.password_credential", cfg.mqtt.password),
        ("mqtt.tls.key_passphrase_credential", cfg.mqtt.key_passphrase),
    ):
        if credential_key in skip:
            continue
        try:
            value = read()
        except ConfigError as exc:
            check.problems.append(exc)
            continue
        if credential_key.startswith("mqtt.tls."):
            passphrase = value
    return passphrase


def _check_service_credentials(
    cfg: Config, unit: ServiceUnit, credentials: ServiceCredentials, check: StartCheck
) -> set[str]:
    """Report credentials the unit cannot provide; returns the key paths reported."""
    for name, why in credentials.problems:
        spec = unit.load_credentials.get(name, name)
        check.problem(
            f"{unit.path}: LoadCredential={name}:{spec}",
            f"{why}; systemd refuses to start the unit without it",
        )
    reported = set()
    declared = sorted({*unit.load_credentials, *unit.set_credentials})
    for key, name in _credentials_in_use(cfg):
        if name in credentials.sources:
            continue
        reported.add(key)
        if any(name == failed for failed, _ in credentials.problems):
            continue  # the unit's line was reported above
        check.problem(
            key,
            f"credential {name!r} is not loaded by {unit.path} (it loads: "
            f"{', '.join(declared) or 'none'}): add LoadCredential={name}:/path/to/the/file to the unit",
        )
    return reported


# --------------------------------------------------------------------------- files the service reads


def _files_the_service_reads(cfg: Config) -> list[tuple[str, Path]]:
    entries = model_entries(cfg)
    if entries is None:
        files = [("model.path", cfg.model.path)]
    else:
        files = [(f"models[{i}].path", entry.path) for i, entry in enumerate(entries)]
    if cfg.mqtt.password_file is not None:
        files.append(("mqtt.password_file", cfg.mqtt.password_file))
    tls = cfg.mqtt.tls
    if tls is not None:
        for key in ("ca_file", "cert_file", "key_file", "key_passphrase_file"):
            path = getattr(tls, key)
            if path is not None:
                files.append((f"mqtt.tls.{key}", path))
    return files


def _unreadable_by_others(path: Path) -> str | None:
    """Why a user that neither owns ``path`` nor is in its group cannot read it (None: it can).
    Mode bits only: an ACL may still grant access, which this does not see."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        return f"cannot stat {str(path)!r}: {exc.strerror}"
    if not mode & stat.S_IROTH:
        return f"{str(path)!r} is mode {stat.S_IMODE(mode):04o} (not readable by others)"
    for parent in path.resolve().parents:
        try:
            pmode = parent.stat().st_mode
        except OSError:
            continue
        if not pmode & stat.S_IXOTH:
            return (
                f"its directory {str(parent)!r} is mode {stat.S_IMODE(pmode):04o} (not searchable by others)"
            )
    return None


def _check_service_files(cfg: Config, unit: ServiceUnit, check: StartCheck) -> None:
    hidden = unit.hidden_roots()
    for key, path in _files_the_service_reads(cfg):
        absolute = path.resolve()
        blocked = next((root for root in hidden if absolute.is_relative_to(root)), None)
        if blocked is not None:
            check.problem(
                key,
                f"{str(path)!r} is under {blocked}, which ProtectHome={unit.protect_home} in "
                f"{unit.path} hides from the service: move it (e.g. to /etc/anomalyd)",
            )
            continue
        if unit.dynamic_user:
            why = _unreadable_by_others(path)
            if why is not None:
                hint = (
                    ", or load it with LoadCredential= and use the *_credential key"
                    if key in ("mqtt.password_file", "mqtt.tls.key_passphrase_file")
                    else ""
                )
                check.problem(
                    key,
                    f"the service runs as a dynamic user (DynamicUser=yes in {unit.path}) and cannot "
                    f"read it: {why}; make it readable by others{hint}",
                )


# --------------------------------------------------------------------------- TLS


def _check_tls(cfg: Config, passphrase: str | None, check: StartCheck) -> None:
    tls = cfg.mqtt.tls
    if tls is None:
        return
    import ssl

    from anomalyd.mqtt_transport import tls_context

    for key in ("ca_file", "cert_file", "key_file"):
        path = getattr(tls, key)
        if path is None:
            continue
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            check.problem(f"mqtt.tls.{key}", f"cannot read {str(path)!r}: {exc.strerror}")
            return
    try:
        # An encrypted key without a passphrase: "" fails it here, as the service (no
        # terminal) fails; None would make OpenSSL prompt on this terminal.
        tls_context(tls, passphrase if passphrase is not None else "")
    except (ssl.SSLError, OSError, ValueError) as exc:
        check.problem("mqtt.tls", f"cannot set up TLS with these files: {exc}")


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class _ServedModel:
    """One model the daemon would serve: ``key`` is its table's key path (``model``,
    ``models[1]``), ``name`` its ``model`` metrics label, ``config`` the configuration as
    its pipeline sees it."""

    key: str
    name: str
    config: Config


def _served_models(cfg: Config) -> list[_ServedModel]:
    """The lone ``[model]``, or every ``[[models]]`` entry, in the file's order."""
    entries = model_entries(cfg)
    if entries is None:
        return [_ServedModel("model", "default", cfg)]
    return [_ServedModel(f"models[{i}]", e.name, cfg.for_model(e)) for i, e in enumerate(entries)]


def _check_model(served: _ServedModel, several: bool, check: StartCheck) -> None:
    from prometheus_client import CollectorRegistry

    from anomalyd.metrics import Metrics
    from anomalyd.model import load_model
    from anomalyd.pipeline import Pipeline
    from anomalyd.service import _session_options

    cfg, key = served.config, served.key
    try:
        model = load_model(cfg.model.path, _session_options(cfg.model))
    except ModelContractError as exc:
        check.problem(f"{key}.path", str(exc))
        return
    except ProviderError as exc:
        check.problem(f"{key}.providers", str(exc))
        return
    sizes = cfg.batching.warmup_sizes()
    try:
        model.warm_up(sizes)
    except Exception as exc:  # whatever ONNX Runtime raises: the start would fail on it too
        check.problem(
            f"{key}.path", f"the model fails on the warm-up batches ({sizes[0]}..{sizes[-1]}): {exc}"
        )
        return
    try:
        metrics = Metrics(CollectorRegistry(), cfg.batching.max_batch)
        pipeline = Pipeline(cfg, model, metrics, name=served.name)
    except ValueError as exc:
        check.problem(f"{key}.path", f"the model does not fit this configuration: {exc}")
        return
    pipeline.close()
    c = model.contract
    label = f"model {served.name!r}: " if several else "model "
    check.summary.append(
        f"{label}{c.model_version} ({c.kind}, window {c.window_length} x {c.n_features}: "
        f"{', '.join(c.feature_names)}) on {model.active_provider}, threshold {pipeline.threshold:g}"
    )


def _check_models(cfg: Config, check: StartCheck) -> None:
    """Every model the daemon would serve, each as ``_check_model``; one problem per model
    at most, so a broken file is named once and the others are still checked."""
    served = _served_models(cfg)
    several = model_entries(cfg) is not None
    for one in served:
        _check_model(one, several, check)


# --------------------------------------------------------------------------- state directory


def _check_state_directory(cfg: Config, unit: ServiceUnit | None, check: StartCheck) -> None:
    configured = cfg.state.directory
    if unit is not None:
        if configured is None:
            state = unit.state_directory()
            check.summary.append(
                f"snapshots in {state} (StateDirectory= in {unit.path}; systemd creates it)"
                if state is not None
                else "snapshots off (no state.directory, and the unit sets no StateDirectory=)"
            )
            return
        absolute = configured.resolve()
        state_roots = [Path("/var/lib") / d for d in unit.state_directories]
        if any(absolute.is_relative_to(root) for root in state_roots):
            check.summary.append(
                f"snapshots in {configured} (StateDirectory= in {unit.path}; systemd creates it)"
            )
            return
        writable = any(absolute.is_relative_to(root) for root in unit.writable_roots())
        if unit.protect_system == "strict" and not writable:
            check.problem(
                "state.directory",
                f"ProtectSystem=strict in {unit.path} makes {str(configured)!r} read-only for the "
                "service: leave state.directory unset (the unit's StateDirectory= is used) or add "
                f"ReadWritePaths={configured} to the unit",
            )
            return
    directory = configured if configured is not None else cfg.state.resolved_directory()
    key = "state.directory" if configured is not None else "$STATE_DIRECTORY"
    if directory is None:
        check.summary.append("snapshots off (no state.directory, no $STATE_DIRECTORY)")
        return
    # Snapshots create the directory (and its parents) when it is missing: the nearest
    # existing one must let us do that.
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        check.problem(key, f"{str(directory)!r} cannot be a directory: {str(existing)!r} is not one")
    elif not os.access(existing, os.W_OK | os.X_OK):
        check.problem(key, f"{str(existing)!r} is not writable: snapshots of {str(directory)!r} would fail")
    else:
        check.summary.append(f"snapshots in {directory}")


# --------------------------------------------------------------------------- all together


def _broker_summary(cfg: Config) -> str:
    m = cfg.mqtt
    scheme = "mqtts" if m.tls is not None else "mqtt"
    host = f"[{m.host}]" if ":" in m.host else m.host
    who = f", user {m.username!r}" if m.username else ""
    if m.password_credential:
        who += f", password from credential {m.password_credential!r}"
    elif m.password_file is not None:
        who += f", password from {str(m.password_file)!r}"
    return f"broker {scheme}://{host}:{m.port} (MQTT {m.protocol}{who}), not contacted"


def _cluster_summary(cfg: Config) -> str | None:
    """What share of a partitioned fleet this instance scores (None: a lone daemon)."""
    if cfg.cluster is None:
        return None
    from anomalyd.partitions import Partitioning
    from anomalyd.publisher import instance_status_topic

    part = Partitioning(cfg.cluster, cfg.mqtt.topic_in)
    owned = sorted(part.owned)
    shown = ", ".join(str(p) for p in owned[:32]) + (", ..." if len(owned) > 32 else "")
    status = instance_status_topic(cfg.output.status_topic, part.name)
    return (
        f"cluster instance {part.name!r}: {len(owned)} of {part.partitions} partitions ({shown}), "
        f"subscribed as {part.topic_filters()[0]}{' ...' if len(owned) > 1 else ''}; status on {status}"
    )


def _check_secrets_as_service(cfg: Config, unit: ServiceUnit, check: StartCheck) -> str | None:
    """Read the secrets with ``$CREDENTIALS_DIRECTORY`` as the unit would fill it."""
    with ServiceCredentials(unit) as credentials:
        skip = _check_service_credentials(cfg, unit, credentials, check)
        found = len(check.problems)
        stand_in = str(credentials.directory)
        with _environment("CREDENTIALS_DIRECTORY", stand_in):
            passphrase = _read_secrets(cfg, check, skip)
    # Messages name the stand-in directory: say what it stands for.
    check.problems[found:] = [
        ConfigError(
            str(p).removeprefix(f"{p.key_path}: ").replace(stand_in, "$CREDENTIALS_DIRECTORY"), p.key_path
        )
        for p in check.problems[found:]
    ]
    return passphrase


def _check_secrets(cfg: Config, check: StartCheck) -> str | None:
    """Read the secrets with this process's environment."""
    skip: set[str] = set()
    if not os.environ.get("CREDENTIALS_DIRECTORY"):
        for key, name in _credentials_in_use(cfg):
            skip.add(key)
            check.problem(
                key,
                f"credential {name!r} is read from $CREDENTIALS_DIRECTORY, which is not set: systemd "
                "sets it for a unit with LoadCredential=; check with --as-service to see the "
                "configuration as the service will, or use the *_file key outside systemd",
            )
    return _read_secrets(cfg, check, skip)


def check_start(cfg: Config, unit: ServiceUnit | None = None) -> StartCheck:
    """Check what ``anomalyd run`` needs beyond a valid configuration (see the module
    docstring); with ``unit``, as that systemd unit would run the daemon. ``summary`` is
    left empty when there are problems."""
    check = StartCheck()
    check.summary.append(_broker_summary(cfg))
    cluster = _cluster_summary(cfg)
    if cluster is not None:
        check.summary.append(cluster)
    if unit is not None:
        passphrase = _check_secrets_as_service(cfg, unit, check)
        _check_service_files(cfg, unit, check)
    else:
        passphrase = _check_secrets(cfg, check)
    _check_tls(cfg, passphrase, check)
    _check_models(cfg, check)
    _check_state_directory(cfg, unit, check)
    if check.problems:
        check.summary = []
    return check
