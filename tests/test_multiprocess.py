"""Multi-GPU training through `accelerate launch`, exercised with two CPU processes (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from conftest import REPO


def test_two_processes_train_and_only_main_writes(image_config: Callable[..., Path]) -> None:
    from lora_scripts.config import load_config
    from lora_scripts.smoke import check_image_result

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

    assert check_image_result(load_config(path)) == []  # the weights load, change the output, keys map
