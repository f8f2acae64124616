"""`lora-scripts smoke`: the README's main command, the shipped configs, and a smoke that must fail."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO, run_cli


def test_builtin_smoke_passes(tmp_path: Path) -> None:
    result = run_cli("smoke", "--work-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "smoke passed" in result.stdout
    out = tmp_path / "output" / "builtin-example"
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "lora_weights.safetensors").is_file()
    assert list((out / "samples").glob("*.png"))


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_smokes(config: Path, tmp_path: Path) -> None:
    result = run_cli("smoke", "--config", str(config), "--work-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "smoke passed" in result.stdout and "Traceback" not in result.stderr


def test_smoke_fails_with_the_reason(tmp_path: Path, write_config) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "metadata.csv").write_text("file_name,prompt\nmissing.png,a cat\n")
    config = write_config("broken", train_data_dir=str(data), base_model="unused", output_dir=str(tmp_path / "out"))
    result = run_cli("smoke", "--config", str(config), "--work-dir", str(tmp_path / "work"))
    assert result.returncode == 1
    assert "missing.png" in result.stderr and "Traceback" not in result.stderr
