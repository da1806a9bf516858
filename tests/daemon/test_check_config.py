"""``anomalyd check-config``: what ``anomalyd run`` needs to start, checked with the daemon's
own code (secrets, TLS files, the model against the configuration, the state directory),
as the installed console script, with ``--as-service`` reading a real unit file."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.broker import TlsFiles

ANOMALYD = str(Path(sys.executable).parent / "anomalyd")


def check_config(
    *args: str, env: dict[str, str] | None = None, unset: tuple[str, ...] = ("CREDENTIALS_DIRECTORY",)
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in unset}
    full_env.update(env or {})
    return subprocess.run(
        [ANOMALYD, "check-config", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=full_env,
    )


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def problems(out: subprocess.CompletedProcess[str]) -> list[str]:
    """The problem lines (``FILE: key.path: message``), without the count line."""
    return [line for line in out.stderr.splitlines() if not line.endswith(" error(s)")]


@pytest.fixture
def model(tiny_model: Callable[..., Path]) -> Path:
    return tiny_model("m.onnx", window_length=8, threshold=2.0)


def test_a_good_configuration_is_ok_with_a_summary(tmp_path: Path, model: Path) -> None:
    cfg = write(
        tmp_path / "a.toml",
        f'[mqtt]\nhost = "mqtt://broker.example:1884"\n[model]\npath = "{model}"\n'
        f'[state]\ndirectory = "{tmp_path / "state"}"\n',
    )
    out = check_config(str(cfg), unset=("CREDENTIALS_DIRECTORY", "STATE_DIRECTORY"))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"{cfg}: OK"
    assert "broker mqtt://broker.example:1884 (MQTT 5), not contacted" in lines[1]
    assert "window 8 x 3: temperature, pressure, vibration) on cpu, threshold 2" in out.stdout
    assert f"snapshots in {tmp_path / 'state'}" in out.stdout
    assert not (tmp_path / "state").exists()  # checked, not created


def test_a_missing_or_broken_model_is_a_problem_at_model_path(
    tmp_path: Path, tiny_model: Callable[..., Path]
) -> None:
    missing = write(tmp_path / "missing.toml", f'[model]\npath = "{tmp_path / "nope.onnx"}"\n')
    out = check_config(str(missing))
    assert out.returncode == 78
    assert problems(out) == [f"{missing}: model.path: no such model file [{tmp_path / 'nope.onnx'}]"]
    assert out.stderr.splitlines()[-1] == f"{missing}: 1 error(s)"
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    out = check_config(str(write(tmp_path / "junk.toml", f'[model]\npath = "{junk}"\n')))
    assert out.returncode == 78
    assert "model.path: ONNX Runtime cannot load the file" in out.stderr
    # The contract says 9 samples, the graph takes 8: the graph check of load_model.
    liar = tiny_model("liar.onnx", window_length=8, contract_overrides={"window_length": 9})
    out = check_config(str(write(tmp_path / "liar.toml", f'[model]\npath = "{liar}"\n')))
    assert out.returncode == 78
    assert (
        "model.path: model contract field 'window_length': contract says 9, graph input has 8" in out.stderr
    )


def test_cuda_requested_without_cuda_is_a_problem_at_model_providers(tmp_path: Path, model: Path) -> None:
    cfg = write(tmp_path / "c.toml", f'[model]\npath = "{model}"\nproviders = "cuda"\n')
    out = check_config(str(cfg), env={"CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 78
    assert "model.providers: providers = 'cuda' was requested" in out.stderr


def test_every_configuration_error_is_listed_with_its_key_path(tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "bad.toml",
        '[mqtt]\nhost = "not a host!!"\n[detector]\nthreshold = -1\n[shutdown]\ndrain_timeout_s = inf\n',
    )
    out = check_config(str(cfg))
    assert out.returncode == 78
    assert [line.split(": ")[1] for line in problems(out)] == [
        "mqtt.host",
        "detector.threshold",
        "shutdown.drain_timeout_s",
    ]
    assert "3 error(s)" in out.stderr


def test_a_broker_url_with_a_second_port_is_refused(tmp_path: Path) -> None:
    cfg = write(tmp_path / "u.toml", '[mqtt]\nhost = "mqtt://broker.example:1883:1883"\n')
    out = check_config(str(cfg))
    assert out.returncode == 78
    assert "mqtt.host: expected one of HOST, HOST:PORT" in out.stderr


# --------------------------------------------------------------------------- secrets


def test_a_credential_without_credentials_directory_is_a_problem(tmp_path: Path, model: Path) -> None:
    cfg = write(
        tmp_path / "c.toml",
        f'[mqtt]\nusername = "u"\npassword_credential = "mqtt_password"\n[model]\npath = "{model}"\n',
    )
    out = check_config(str(cfg))
    assert out.returncode == 78
    [line] = problems(out)
    assert "mqtt.password_credential: credential 'mqtt_password' is read from $CREDENTIALS_DIRECTORY" in line
    assert "--as-service" in line
    # Where systemd (or anyone) set it, the credential is read from there.
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt_password").write_text("s3cret\n")
    out = check_config(str(cfg), env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert out.returncode == 0, out.stderr
    assert "password from credential 'mqtt_password'" in out.stdout
    assert "s3cret" not in out.stdout + out.stderr


def test_an_empty_password_file_is_a_problem(tmp_path: Path, model: Path) -> None:
    pw = write(tmp_path / "pw", "")
    cfg = write(tmp_path / "c.toml", f'[mqtt]\npassword_file = "{pw}"\n[model]\npath = "{model}"\n')
    out = check_config(str(cfg))
    assert out.returncode == 78
    assert problems(out) == [f"{cfg}: mqtt.password_file: secret file '{pw}' is empty"]


# --------------------------------------------------------------------------- --as-service


def unit_file(tmp_path: Path, *service_lines: str) -> Path:
    text = "[Unit]\nDescription=test\n\n[Service]\nExecStart=/bin/true\n" + "".join(
        f"{line}\n" for line in service_lines
    )
    return write(tmp_path / "anomalyd.service", text)


def test_as_service_fills_credentials_directory_from_load_credential(tmp_path: Path, model: Path) -> None:
    secret = write(tmp_path / "mqtt_password", "s3cret\n")
    unit = unit_file(tmp_path, f"LoadCredential=mqtt_password:{secret}", "StateDirectory=anomalyd")
    cfg = write(
        tmp_path / "c.toml",
        f'[mqtt]\nusername = "u"\npassword_credential = "mqtt_password"\n[model]\npath = "{model}"\n',
    )
    out = check_config(str(cfg), "--unit", str(unit))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == f"{cfg}: OK, as {unit} would run it"
    assert "snapshots in /var/lib/anomalyd (StateDirectory=" in out.stdout

    secret.write_text("")  # systemd hands the service an empty credential
    out = check_config(str(cfg), "--unit", str(unit))
    assert out.returncode == 78
    assert problems(out) == [
        f"{cfg}: mqtt.password_credential: secret file '$CREDENTIALS_DIRECTORY/mqtt_password' is empty"
    ]

    secret.unlink()  # systemd would refuse to start the unit
    out = check_config(str(cfg), "--unit", str(unit))
    assert out.returncode == 78
    assert problems(out) == [
        f"{cfg}: {unit}: LoadCredential=mqtt_password:{secret}: cannot read '{secret}' (No such file "
        "or directory); systemd refuses to start the unit without it"
    ]


def test_as_service_names_a_credential_the_unit_does_not_load(tmp_path: Path, model: Path) -> None:
    other = write(tmp_path / "other", "x\n")
    unit = unit_file(tmp_path, f"LoadCredential=other:{other}")
    cfg = write(
        tmp_path / "c.toml",
        f'[mqtt]\nusername = "u"\npassword_credential = "mqtt_password"\n[model]\npath = "{model}"\n',
    )
    out = check_config(str(cfg), "--as-service", "--unit", str(unit))
    assert out.returncode == 78
    [line] = problems(out)
    assert f"mqtt.password_credential: credential 'mqtt_password' is not loaded by {unit}" in line
    assert "(it loads: other)" in line
    # A drop-in (`systemctl edit anomalyd`) that adds it fixes it.
    dropins = tmp_path / "anomalyd.service.d"
    dropins.mkdir()
    write(dropins / "override.conf", f"[Service]\nLoadCredential=mqtt_password:{other}\n")
    assert check_config(str(cfg), "--unit", str(unit)).returncode == 0


def test_as_service_a_dynamic_user_needs_files_readable_by_others(tmp_path: Path, model: Path) -> None:
    pw = write(tmp_path / "pw", "s3cret\n")
    pw.chmod(0o600)
    unit = unit_file(tmp_path, "DynamicUser=yes")
    cfg = write(tmp_path / "c.toml", f'[mqtt]\npassword_file = "{pw}"\n[model]\npath = "{model}"\n')
    out = check_config(str(cfg), "--unit", str(unit))
    assert out.returncode == 78
    line = next(line for line in problems(out) if ": mqtt.password_file: " in line)
    assert f"dynamic user (DynamicUser=yes in {unit}) and cannot read it: '{pw}' is mode 0600" in line
    assert "LoadCredential=" in line
    # Without DynamicUser= the service runs as whoever owns the files: no problem.
    out = check_config(str(cfg), "--unit", str(unit_file(tmp_path)))
    assert out.returncode == 0, out.stderr


def test_as_service_protect_home_hides_home_directories(tmp_path: Path) -> None:
    unit = unit_file(tmp_path, "ProtectHome=yes")
    cfg = write(tmp_path / "c.toml", '[model]\npath = "/home/someone/model.onnx"\n')
    out = check_config(str(cfg), "--unit", str(unit))
    assert out.returncode == 78
    assert f"model.path: '/home/someone/model.onnx' is under /home, which ProtectHome=yes in {unit}" in (
        out.stderr
    )


def test_the_shipped_unit_is_read(tmp_path: Path, model: Path) -> None:
    """The unit in the repository loads the password with LoadCredential=; a configuration
    that reads it elsewhere is not what that unit runs."""
    shipped = Path(__file__).resolve().parents[2] / "systemd" / "anomalyd.service"
    cfg = write(
        tmp_path / "c.toml",
        f'[mqtt]\nusername = "u"\npassword_credential = "broker_pw"\n[model]\npath = "{model}"\n',
    )
    out = check_config(str(cfg), "--unit", str(shipped))
    assert out.returncode == 78
    assert "credential 'broker_pw' is not loaded by" in out.stderr
    assert "(it loads: mqtt_password)" in out.stderr


# --------------------------------------------------------------------------- state directory, TLS


def test_an_unusable_state_directory_is_a_problem(tmp_path: Path, model: Path) -> None:
    blocker = write(tmp_path / "a-file", "")
    cfg = write(
        tmp_path / "s.toml", f'[model]\npath = "{model}"\n[state]\ndirectory = "{blocker / "snapshots"}"\n'
    )
    out = check_config(str(cfg))
    assert out.returncode == 78
    assert f"state.directory: '{blocker / 'snapshots'}' cannot be a directory: '{blocker}' is not one" in (
        out.stderr
    )


def test_as_service_protect_system_strict_confines_the_state_directory(tmp_path: Path, model: Path) -> None:
    unit = unit_file(tmp_path, "ProtectSystem=strict", "StateDirectory=anomalyd")
    elsewhere = write(
        tmp_path / "s.toml", f'[model]\npath = "{model}"\n[state]\ndirectory = "/var/lib/elsewhere"\n'
    )
    out = check_config(str(elsewhere), "--unit", str(unit))
    assert out.returncode == 78
    assert "state.directory: ProtectSystem=strict" in out.stderr
    assert "ReadWritePaths=/var/lib/elsewhere" in out.stderr
    # Its own StateDirectory= is writable for it.
    own = write(tmp_path / "o.toml", f'[model]\npath = "{model}"\n[state]\ndirectory = "/var/lib/anomalyd"\n')
    out = check_config(str(own), "--unit", str(unit))
    assert out.returncode == 0, out.stderr
    assert f"snapshots in /var/lib/anomalyd (StateDirectory= in {unit}; systemd creates it)" in out.stdout


def test_tls_files_are_loaded_as_the_link_loads_them(tmp_path: Path, model: Path) -> None:
    files = TlsFiles.create(tmp_path / "tls")
    good = write(
        tmp_path / "good.toml",
        f'[mqtt]\nhost = "mqtts://localhost"\n[mqtt.tls]\nca_file = "{files.ca_cert}"\n'
        f'[model]\npath = "{model}"\n',
    )
    out = check_config(str(good))
    assert out.returncode == 0, out.stderr
    assert "broker mqtts://localhost:8883" in out.stdout
    # A key that is not the certificate's: the TLS context refuses the pair.
    other = TlsFiles.create(tmp_path / "other")
    bad = write(
        tmp_path / "bad.toml",
        f'[mqtt]\nhost = "mqtts://localhost"\n[mqtt.tls]\ncert_file = "{files.server_cert}"\n'
        f'key_file = "{other.server_key}"\n[model]\npath = "{model}"\n',
    )
    out = check_config(str(bad))
    assert out.returncode == 78
    [line] = problems(out)
    assert ": mqtt.tls: cannot set up TLS with these files: " in line
    # Not a certificate at all, as the CA bundle.
    junk = write(
        tmp_path / "junk.toml",
        f'[mqtt.tls]\nca_file = "{good}"\n[model]\npath = "{model}"\n',
    )
    out = check_config(str(junk))
    assert out.returncode == 78
    assert ": mqtt.tls: cannot set up TLS with these files: " in out.stderr


def test_the_unit_is_read_with_its_drop_ins_as_systemd_reads_it(tmp_path: Path) -> None:
    from anomalyd.systemd_unit import read_unit

    unit = write(
        tmp_path / "anomalyd.service",
        "[Unit]\nLoadCredential=not:service-section\n[Service]\n# LoadCredential=commented:out\n"
        "LoadCredential=first:/etc/first\nStateDirectory=anomalyd \\\n  anomalyd-extra\n"
        "DynamicUser=yes\nProtectSystem=strict\n",
    )
    dropins = tmp_path / "anomalyd.service.d"
    dropins.mkdir()
    # An empty assignment clears the list; later files override single settings.
    write(dropins / "10-reset.conf", "[Service]\nLoadCredential=\nLoadCredential=second\nDynamicUser=no\n")
    write(dropins / "20-more.conf", "[Service]\nSetCredential=inline:value\nReadWritePaths=/srv/state\n")
    read = read_unit(unit)
    assert read.load_credentials == {"second": "second"}
    assert read.set_credentials == {"inline": "value"}
    assert read.state_directories == ("anomalyd", "anomalyd-extra")
    assert read.state_directory() == Path("/var/lib/anomalyd")
    assert (read.dynamic_user, read.protect_system) == (False, "strict")
    assert Path("/srv/state") in read.writable_roots()


# --------------------------------------------------------------------------- several models


def two_models(tmp_path: Path, pumps: Path, fans: Path) -> str:
    return (
        f'[[models]]\nname = "pumps"\npath = "{pumps}"\ndevices = ["pump-*"]\n'
        f'[[models]]\nname = "fans"\npath = "{fans}"\ndevices = ["fan-*"]\n'
        f"[models.detector]\nthreshold = 5.0\n"
        f'[state]\ndirectory = "{tmp_path / "state"}"\n'
    )


def test_every_model_of_several_is_checked_with_its_own_configuration(
    tmp_path: Path, tiny_model: Callable[..., Path]
) -> None:
    pumps = tiny_model("pumps.onnx", window_length=8, threshold=2.0)
    fans = tiny_model("fans.onnx", window_length=12, threshold=2.0)
    cfg = write(tmp_path / "two.toml", two_models(tmp_path, pumps, fans))
    out = check_config(str(cfg), unset=("CREDENTIALS_DIRECTORY", "STATE_DIRECTORY"))
    assert out.returncode == 0, out.stderr
    # Each model's own contract, and the fans' own [detector] threshold.
    assert "model 'pumps': " in out.stdout
    assert "window 8 x 3: temperature, pressure, vibration) on cpu, threshold 2\n" in out.stdout
    assert "model 'fans': " in out.stdout
    assert "window 12 x 3: temperature, pressure, vibration) on cpu, threshold 5\n" in out.stdout


def test_a_broken_model_of_several_is_one_problem_at_its_entry(
    tmp_path: Path, tiny_model: Callable[..., Path]
) -> None:
    pumps = tiny_model("pumps.onnx", window_length=8)
    junk = write(tmp_path / "fans.onnx", "not a model")
    cfg = write(tmp_path / "two.toml", two_models(tmp_path, pumps, junk))
    out = check_config(str(cfg))
    assert out.returncode == 78
    [line] = problems(out)
    assert line.startswith(f"{cfg}: models[1].path: ONNX Runtime cannot load the file"), line
    assert out.stdout == ""  # no summary while there are problems
    # The first entry is checked as well: both broken, both named.
    cfg = write(tmp_path / "both.toml", two_models(tmp_path, tmp_path / "nope.onnx", junk))
    out = check_config(str(cfg))
    assert out.returncode == 78
    assert [line.split(": ")[1] for line in problems(out)] == ["models[0].path", "models[1].path"]
    assert "2 error(s)" in out.stderr


def test_as_service_every_model_file_must_be_visible_to_the_service(
    tmp_path: Path, tiny_model: Callable[..., Path]
) -> None:
    pumps = tiny_model("pumps.onnx", window_length=8)
    cfg = write(tmp_path / "two.toml", two_models(tmp_path, pumps, Path("/home/someone/fans.onnx")))
    out = check_config(str(cfg), "--unit", str(unit_file(tmp_path, "ProtectHome=yes")))
    assert out.returncode == 78
    assert ": models[1].path: '/home/someone/fans.onnx' is under /home, which ProtectHome=yes" in out.stderr
    assert ": models[0].path: " not in out.stderr
