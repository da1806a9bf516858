"""The parts of anomalyd's systemd unit that decide what the service can read and write,
read from the unit file, so that ``anomalyd check-config --as-service`` can check a
configuration the way the service will run it.

``read_unit`` reads the ``[Service]`` section of a unit file and of its drop-ins
(``anomalyd.service.d/*.conf``, what ``systemctl edit`` writes), with systemd's rules for
list settings (an empty assignment clears the list). The template ``anomalyd@.service``
(one instance of a partitioned fleet) is read as one instance of it: ``%i`` replaced by the
instance, and the instance's own drop-ins (``anomalyd@0.service.d``) after the template's.

``ServiceCredentials`` stands in for what systemd does with ``LoadCredential=`` and
``SetCredential=`` before it starts the service: a directory that holds each credential
under its name, for ``$CREDENTIALS_DIRECTORY``. It links to the source files instead of copying them (so no
secret is duplicated on disk) and reports a source systemd could not load: systemd
refuses to start a unit whose credential is missing.

Only what anomalyd depends on is read; this is not a general unit file parser.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

__all__ = ["CREDSTORE_DIRS", "ServiceCredentials", "ServiceUnit", "default_unit_path", "read_unit"]

#: Where systemd looks for a credential that ``LoadCredential=`` names without an absolute
#: path (systemd.exec(5), "LoadCredential=").
CREDSTORE_DIRS = (
    Path("/etc/credstore"),
    Path("/run/credstore"),
    Path("/usr/local/lib/credstore"),
    Path("/usr/lib/credstore"),
)

#: Where an installed unit lives, in systemd's order; then the unit shipped in a checkout.
_UNIT_DIRS = (
    Path("/etc/systemd/system"),
    Path("/usr/local/lib/systemd/system"),
    Path("/usr/lib/systemd/system"),
    Path("/lib/systemd/system"),
)
_UNIT_NAME = "anomalyd.service"
_TEMPLATE_NAME = "anomalyd@.service"
_SHIPPED_UNITS = Path(__file__).resolve().parents[2] / "systemd"

#: Settings whose values accumulate over lines (an empty assignment clears them).
_LIST_SETTINGS = frozenset({"LoadCredential", "SetCredential", "StateDirectory", "ReadWritePaths"})
_TRUE = frozenset({"1", "yes", "true", "on"})


def default_unit_path(*, template: bool = False) -> Path | None:
    """The installed ``anomalyd.service`` (``/etc/systemd/system`` first), else the unit in
    the checkout anomalyd runs from; None when there is neither. ``template``: the same for
    ``anomalyd@.service``."""
    name = _TEMPLATE_NAME if template else _UNIT_NAME
    for directory in _UNIT_DIRS:
        if (directory / name).is_file():
            return directory / name
    shipped = _SHIPPED_UNITS / name
    return shipped if shipped.is_file() else None


@dataclass(frozen=True)
class ServiceUnit:
    """The ``[Service]`` settings anomalyd depends on, from a unit file and its drop-ins."""

    path: Path
    #: credential name → where systemd loads it from (``LoadCredential=NAME[:PATH]``)
    load_credentials: dict[str, str] = field(default_factory=dict)
    #: credential name → its value (``SetCredential=NAME:VALUE``)
    set_credentials: dict[str, str] = field(default_factory=dict)
    dynamic_user: bool = False
    protect_home: str = "no"  # "no", "yes", "read-only" or "tmpfs"
    protect_system: str = "no"  # "no", "yes", "full" or "strict"
    state_directories: tuple[str, ...] = ()
    read_write_paths: tuple[str, ...] = ()

    def state_directory(self) -> Path | None:
        """``$STATE_DIRECTORY`` of the service (its first ``StateDirectory=``), or None."""
        return Path("/var/lib") / self.state_directories[0] if self.state_directories else None

    def writable_roots(self) -> list[Path]:
        """Where the service may write under ``ProtectSystem=strict``: its state
        directories and ``ReadWritePaths=`` (``PrivateTmp=`` gives it a /tmp too)."""
        roots = [Path("/var/lib") / d for d in self.state_directories]
        roots += [Path(p.lstrip("-+")) for p in self.read_write_paths]
        return [*roots, Path("/tmp"), Path("/var/tmp")]

    def hidden_roots(self) -> list[Path]:
        """Directories the service cannot see at all (``ProtectHome=yes`` or ``tmpfs``)."""
        if self.protect_home in _TRUE or self.protect_home == "tmpfs":
            return [Path("/home"), Path("/root"), Path("/run/user")]
        return []


def _logical_lines(text: str) -> list[str]:
    """Lines with comments dropped and backslash continuations joined."""
    out: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    if pending:
        out.append(pending)
    return out


def _expand_instance(value: str, instance: str) -> str:
    """``value`` with the instance specifiers (``%i``, ``%I``) replaced, and ``%%`` as ``%``.
    An instance anomalyd takes is a number: escaped and unescaped forms are the same."""
    out: list[str] = []
    i = 0
    while i < len(value):
        if value[i] == "%" and i + 1 < len(value):
            spec = value[i + 1]
            out.append(instance if spec in "iI" else "%" if spec == "%" else value[i : i + 2])
            i += 2
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def _service_settings(paths: list[Path], instance: str | None = None) -> dict[str, list[str]]:
    """Every ``[Service]`` assignment of ``paths``, in order, with list semantics applied
    (and the instance specifiers expanded, for a template's ``instance``)."""
    settings: dict[str, list[str]] = {}
    for path in paths:
        section = ""
        for line in _logical_lines(path.read_text(encoding="utf-8")):
            if line.startswith("[") and line.endswith("]"):
                section = line[1:-1]
                continue
            key, eq, value = line.partition("=")
            if section != "Service" or not eq:
                continue
            key, value = key.strip(), value.strip()
            if instance is not None:
                value = _expand_instance(value, instance)
            if key in _LIST_SETTINGS:
                if not value:
                    settings[key] = []  # systemd: an empty assignment resets the list
                else:
                    settings.setdefault(key, []).append(value)
            else:
                settings[key] = [value]
    return settings


def read_unit(path: Path, instance: str | None = None) -> ServiceUnit:
    """Read ``path`` and its drop-ins (``<path>.d/*.conf``, in name order). OSError if the
    unit file cannot be read. ``instance``: read a template (``name@.service``) as that
    instance of it, whose own drop-ins (``name@<instance>.service.d``) come last."""
    dropins = sorted(path.with_name(path.name + ".d").glob("*.conf"))
    if instance is not None and path.name.endswith("@.service"):
        own = path.name.removesuffix("@.service") + f"@{instance}.service.d"
        dropins += sorted(path.with_name(own).glob("*.conf"))
    settings = _service_settings([path, *dropins], instance)

    def last(key: str, default: str) -> str:
        values = settings.get(key)
        return values[-1].lower() if values else default

    load: dict[str, str] = {}
    for value in settings.get("LoadCredential", []):
        name, _, source = value.partition(":")
        load[name] = source or name
    set_: dict[str, str] = {}
    for value in settings.get("SetCredential", []):
        name, _, secret = value.partition(":")
        set_[name] = secret
    return ServiceUnit(
        path=path,
        load_credentials=load,
        set_credentials=set_,
        dynamic_user=last("DynamicUser", "no") in _TRUE,
        protect_home=last("ProtectHome", "no"),
        protect_system=last("ProtectSystem", "no"),
        state_directories=tuple(d for v in settings.get("StateDirectory", []) for d in v.split()),
        read_write_paths=tuple(p for v in settings.get("ReadWritePaths", []) for p in v.split()),
    )


def _credential_source(source: str) -> Path | None:
    """The file systemd loads ``LoadCredential=NAME:SOURCE`` from (None: found nowhere)."""
    if source.startswith("/"):
        return Path(source)
    for directory in CREDSTORE_DIRS:
        if (directory / source).is_file():
            return directory / source
    return None


class ServiceCredentials:
    """A stand-in for the ``$CREDENTIALS_DIRECTORY`` systemd gives the service.

    Use as a context manager: on entry ``directory`` holds every credential the unit
    loads or sets, under its name, and ``problems`` lists (credential name, why) for each
    one systemd could not load; on exit the directory is removed.
    """

    def __init__(self, unit: ServiceUnit) -> None:
        self.unit = unit
        self.directory = Path()
        self.problems: list[tuple[str, str]] = []
        self.sources: dict[str, str] = {}

    def __enter__(self) -> ServiceCredentials:
        self.directory = Path(tempfile.mkdtemp(prefix="anomalyd-credentials-"))  # mode 0700
        try:
            self._fill()
        except BaseException:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise
        return self

    def _fill(self) -> None:
        for name, secret in self.unit.set_credentials.items():
            target = self.directory / name
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(secret)
            self.sources[name] = "SetCredential="
        # LoadCredential= wins over SetCredential= for the same name, as in systemd.
        for name, spec in self.unit.load_credentials.items():
            source = _credential_source(spec)
            if source is None:
                where = ", ".join(str(d) for d in CREDSTORE_DIRS)
                self.problems.append((name, f"no credential {spec!r} in {where}"))
                continue
            try:
                with source.open("rb"):
                    pass
            except OSError as exc:
                self.problems.append((name, f"cannot read {str(source)!r} ({exc.strerror})"))
                continue
            target = self.directory / name
            target.unlink(missing_ok=True)
            target.symlink_to(source)
            self.sources[name] = str(source)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
