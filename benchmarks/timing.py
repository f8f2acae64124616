"""Shared by the benchmarks: timing steps in this process, and reading a `lora-scripts train` run's steps back."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from pathlib import Path

from lora_scripts.train.logs import read_loss_csv

WARMUP = 3  # steps left out at the start of every run (first calls, allocator warm-up)


def step_times(step: Callable[[], None], steps: int) -> list[float]:
    """Seconds of each of ``steps`` calls of ``step``, after the first WARMUP."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times[WARMUP:]


def run_step_times(output_dir: Path) -> list[float]:
    """Seconds of each step of the run that wrote ``output_dir``, from its loss.csv, after the first WARMUP."""
    elapsed = [float(row["elapsed"]) for row in read_loss_csv(output_dir / "logs" / "loss.csv")]
    # elapsed[i] is logged at the end of step i + 1, so the differences are the times of steps 2, 3, ...
    return [b - a for a, b in itertools.pairwise(elapsed)][WARMUP - 1 :]
