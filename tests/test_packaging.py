"""The wheel carries the config schema, so an installed package validates configs without the repository."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

PACKAGED = "lora_scripts/lora-config.schema.json"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), "."],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = out.glob("lora_scripts-*.whl")
    return built


def test_schema_ships_in_the_wheel_unchanged(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read(PACKAGED) == (REPO / "schemas" / "lora-config.schema.json").read_bytes()


def test_installed_copy_validates_without_the_repository(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    good = tmp_path / "good.yaml"
    good.write_text("train_data_dir: data\nbase_model: model\noutput_dir: out\nlearning_rate: 2e-4\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train_data_dir: data\nbase_model: model\noutput_dir: out\nlora_rnk: 4\n")
    script = (
        "import sys\n"
        "from lora_scripts import config\n"
        "from lora_scripts.cli import main\n"
        "print(config.schema_path())\n"
        "sys.exit(main(['validate', *sys.argv[1:]]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}

    def run(*paths: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", script, *map(str, paths)], cwd=tmp_path, env=env, capture_output=True, text=True
        )

    passed = run(good)
    assert passed.returncode == 0, passed.stderr
    assert passed.stdout.splitlines()[0] == str(site / PACKAGED), "the packaged schema must be preferred"
    failed = run(bad)
    assert failed.returncode == 1 and "lora_rnk: unknown key; did you mean 'lora_rank'?" in failed.stdout
