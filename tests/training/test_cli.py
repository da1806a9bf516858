"""``anomalyd-train``: exit codes, one-line errors, and a real (tiny) training run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from anomalyd.model import read_contract
from anomalyd_train.cli import build_parser, main

TINY = """
name = "cli-tiny"
[data.synthetic]
n_devices = 2
duration_s = 1800.0
seed = 5
[window]
length = 16
[model]
layers = 1
units = 8
[training]
epochs = 2
batch_size = 64
max_train_windows = 1500
[calibration]
min_peaks = 10
"""


@pytest.mark.slow
def test_train_writes_model_report_and_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "tiny.toml"
    config.write_text(TINY, encoding="utf-8")
    out = tmp_path / "out"
    assert main(["train", "--config", str(config), "--out", str(out)]) == 0
    assert read_contract(out / "model.onnx").model_version.startswith("cli-tiny-")
    for name in ("report.md", "loss.png", "scores.png", "series.png"):
        assert (out / name).stat().st_size > 0, name
    stdout = capsys.readouterr().out
    assert "epoch   1/2" in stdout  # progress, one line per epoch
    assert "threshold" in stdout
    assert "parity ok" in stdout  # the summary names the checks
    assert str(out / "model.onnx") in stdout


def test_bad_config_exits_78_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[model]\nunits = 'many'\n", encoding="utf-8")
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "out")]) == 78
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("anomalyd-train: error: model.units:")
    assert captured.out == ""
    assert not (tmp_path / "out").exists()


def test_unknown_key_and_missing_file_are_config_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "typo.toml"
    config.write_text("[training]\nepochz = 3\n", encoding="utf-8")
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "o")]) == 78
    assert "training.epochz" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "nope.toml"), "--out", str(tmp_path / "o")]) == 78
    assert "nope.toml" in capsys.readouterr().err


def test_unusable_data_exits_65_naming_the_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data.csv"
    data.write_text(
        "time,a\n" + "".join(f"{1_700_000_000 + i},{i % 7}\n" for i in range(200)), encoding="utf-8"
    )
    config = tmp_path / "csv.toml"
    config.write_text(
        '[data]\nsource = "csv"\n[data.csv]\npath = "data.csv"\ntimestamp_column = "time"\n'
        'feature_columns = ["a", "b"]\n[window]\nlength = 10\n',
        encoding="utf-8",
    )
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "o")]) == 65
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "'b'" in err[0]


def test_check_config_prints_the_resolved_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[model]\nkind = 'autoencoder'\n", encoding="utf-8")
    assert main(["check-config", str(config)]) == 0
    out = capsys.readouterr().out
    assert '"kind": "autoencoder"' in out
    assert '"window"' in out  # defaults filled in


def test_subcommand_is_required() -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([])
    assert info.value.code == 64  # EX_USAGE, as for `anomalyd`


#: A Python start-up hook that makes the ``train`` extra's modules unimportable: a runtime-only
#: install, in this environment where the extra is installed.
WITHOUT_TRAIN_EXTRA = (
    "import sys\n"
    "for name in ('tensorflow', 'keras', 'tf2onnx', 'onnx', 'matplotlib'):\n"
    "    sys.modules[name] = None  # import raises ModuleNotFoundError, find_spec says None\n"
)


def test_without_the_train_extra_training_says_how_to_install_it(tmp_path: Path) -> None:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(WITHOUT_TRAIN_EXTRA)
    env = {**os.environ, "PYTHONPATH": str(hook)}
    script = str(Path(sys.executable).parent / "anomalyd-train")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [script, *args], capture_output=True, text=True, env=env, timeout=120, check=False
        )

    for args in (
        ["train", "--out", str(tmp_path / "out")],
        ["skab", str(tmp_path), "--out", str(tmp_path / "s")],
    ):
        out = run(*args)
        assert out.returncode == 69, out.stderr
        assert out.stderr.strip().splitlines() == [
            "anomalyd-train: error: this command needs the training extra, which is not installed "
            "(missing: tensorflow, keras, tf2onnx, onnx, matplotlib); install it with: "
            "pip install 'anomalyd[train]'"
        ]
        assert out.stdout == ""  # nothing done before saying so
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "s").exists()
    # Checking a training config needs none of it.
    out = run("check-config")
    assert out.returncode == 0, out.stderr
    assert '"window"' in out.stdout


@pytest.mark.parametrize("name", ["default.toml", "skab-example.toml"])
def test_committed_training_configs_are_valid(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    config = Path(__file__).resolve().parents[2] / "training" / "configs" / name
    assert main(["check-config", str(config)]) == 0, capsys.readouterr().err
