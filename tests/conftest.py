"""Shared fixtures: mock base models, dummy datasets and config files built once per test session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run `lora-scripts ARGS` in a fresh process, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "lora_scripts", *args],
        cwd=cwd or REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def mock_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight SD 1.x model as a diffusers folder (with mock-sd.safetensors inside)."""
    from lora_scripts.model.mock_sd import build_mock_sd

    out = tmp_path_factory.mktemp("models") / "mock-sd"
    build_mock_sd(out, size="tiny")
    return out


@pytest.fixture(scope="session")
def image_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four 64 px images with metadata.csv."""
    from lora_scripts.data.images import write_dummy_images

    out = tmp_path_factory.mktemp("data") / "images"
    write_dummy_images(out, count=4, resolution=64)
    return out


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    """Write a config YAML into the test's folder: write_config(name="run", key=value, ...) -> path."""

    def write(name: str = "run", **values: Any) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
        return path

    return write


@pytest.fixture
def image_config(
    write_config: Callable[..., Path], mock_sd: Path, image_data: Path, tmp_path: Path
) -> Callable[..., Path]:
    """A small image-mode config on the mock model: image_config(name, **overrides) -> path."""

    def make(name: str = "run", **overrides: Any) -> Path:
        values = {
            "train_data_dir": str(image_data),
            "base_model": str(mock_sd),
            "output_dir": str(tmp_path / f"out-{name}"),
            "resolution": 64,
            "lora_rank": 4,
            "lora_alpha": 4,
            "learning_rate": 1e-3,
            "batch_size": 1,
            "max_train_steps": 4,
            "seed": 7,
            **overrides,
        }
        return write_config(name, **values)

    return make


def kohya_metadata_of(output_dir: Path) -> dict[str, str]:
    """The ss_* / modelspec.* header of the kohya file a run wrote into ``output_dir``."""
    from safetensors import safe_open

    from lora_scripts.export.kohya import KOHYA_WEIGHT_NAME

    with safe_open(str(output_dir / KOHYA_WEIGHT_NAME), framework="pt") as handle:
        return handle.metadata()


def fake_hub_cache(root: Path, snapshots: dict[str, Path | None]) -> Path:
    """An offline Hugging Face cache at ``root``: each repo id's snapshot holds a copy of its folder (or nothing)."""
    root.mkdir(parents=True, exist_ok=True)
    for repo_id, folder in snapshots.items():
        repo = root / f"models--{repo_id.replace('/', '--')}"
        snapshot = repo / "snapshots" / ("0" * 40)
        if folder is None:
            snapshot.mkdir(parents=True)
        else:
            shutil.copytree(folder, snapshot)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text("0" * 40, encoding="utf-8")
    return root


def assert_same_weights(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], what: str = "weights") -> None:
    """Two state dicts hold the same keys and bit-identical tensors."""
    import torch

    assert a.keys() == b.keys(), f"{what}: the keys differ"
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"
