"""Multi-GPU training through `accelerate launch`, exercised with two CPU processes (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import REPO


def test_two_processes_train_and_only_main_writes(image_config: Callable[..., Path], mock_sd: Path) -> None:
    from lora_scripts.config import load_config
    from lora_scripts.model.stable_diffusion import build_pipeline, load_sd_components

    path = image_config("ddp", max_train_steps=2, save_steps=1)
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "lora_scripts",
        "train",
        "--config",
        str(path),
    ]
    result = subprocess.run(
        launch, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = load_config(path).path("output_dir")
    summary = (out / "training_summary.json").read_text()
    assert '"num_processes": 2' in summary
    rows = (out / "logs" / "loss.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["1", "2"]  # one writer: no duplicated rows
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]

    pipe = build_pipeline(load_sd_components(str(mock_sd)))
    pipe.set_progress_bar_config(disable=True)
    before = pipe(
        "a red circle",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    pipe.load_lora_weights(str(out))
    after = pipe(
        "a red circle",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert (after - before).abs().max() > 1e-6
    assert load_file(str(out / "lora_weights.safetensors"))
