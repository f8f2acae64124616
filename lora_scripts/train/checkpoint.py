"""Resumable checkpoints: ``output_dir/checkpoint-<step>/`` folders that appear only when complete.

A checkpoint holds the LoRA weights, the optimizer, lr-scheduler and grad-scaler states, the RNG
states of python, numpy and torch, the loop position (step, epoch, batches done in the epoch),
and the weight files a user can already load. It is written into a temporary folder and renamed,
so an interrupted save leaves no folder that ``resume_from: latest`` would pick up.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lora_scripts.atomic import atomic_path
from lora_scripts.errors import UserError

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
LORA_FILE = "lora_state.safetensors"
TRAINING_FILE = "training_state.pt"


@dataclass
class LoopPosition:
    """Where the loop is: optimizer steps taken, current epoch, batches of it already consumed."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0


def rng_states() -> dict[str, Any]:
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "python": [version, list(state), gauss],
        "numpy": [name, torch.from_numpy(keys.copy()), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(
    output_dir: Path,
    position: LoopPosition,
    lora_state: dict[str, torch.Tensor],
    training_state: dict[str, Any],
    write_weights: Any,
    keep: int,
) -> Path:
    """Write ``checkpoint-<step>`` atomically; ``write_weights(folder)`` adds the user-facing weight files.

    With ``keep`` > 0 (0 keeps all), the oldest checkpoints are deleted once the new one is complete but
    before it appears: never more than ``keep`` exist, even when the process is killed in between.
    """
    target = output_dir / f"checkpoint-{position.step}"
    with atomic_path(target) as folder:
        folder.mkdir()
        save_file({k: v.contiguous() for k, v in lora_state.items()}, str(folder / LORA_FILE))
        torch.save({**training_state, "rng": rng_states()}, folder / TRAINING_FILE)
        write_weights(folder)
        (folder / STATE_FILE).write_text(json.dumps(asdict(position), indent=2), encoding="utf-8")
        if keep > 0:
            others = [path for path in list_checkpoints(output_dir) if path != target]
            for old in others[: max(0, len(others) - keep + 1)]:
                shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = CHECKPOINT_NAME.match(path.name)
        if match and path.is_dir() and (path / STATE_FILE).is_file() and (path / TRAINING_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def remove_stale_temporaries(output_dir: Path) -> None:
    """Drop temporary folders left by a save that was killed half-way."""
    if output_dir.is_dir():
        for path in output_dir.glob(".*.tmp"):
            shutil.rmtree(path, ignore_errors=True)


def resolve_resume(resume_from: str, output_dir: Path, config_source: Path) -> Path | None:
    """The checkpoint folder ``resume_from`` means: 'latest' (None if there is none yet) or a path."""
    if not resume_from:
        return None
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume_from).expanduser()
    path = path if path.is_absolute() else (config_source.parent / path).resolve()
    if not ((path / STATE_FILE).is_file() and (path / TRAINING_FILE).is_file()):
        raise UserError(f"{config_source}: resume_from: {path} is not a complete checkpoint folder")
    return path


def check_lora_state(path: Path, saved: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Fail clearly when a checkpoint's LoRA weights do not fit this run (the config changed since it was written)."""
    for key in sorted(saved.keys() | expected.keys()):
        have = f"shape {list(saved[key].shape)}" if key in saved else "absent"
        want = f"shape {list(expected[key].shape)}" if key in expected else "absent"
        if have != want:
            raise UserError(
                f"{path}: {key}: {have} in the checkpoint, {want} in this run (lora_rank, conv_lora_rank, "
                "target_modules or train_text_encoder changed?); to start from these weights use "
                "init_lora_weights, or train into a fresh output_dir"
            )


def load_checkpoint(path: Path) -> tuple[LoopPosition, dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint: loop position, LoRA weights, and the optimizer/scheduler/scaler/RNG states."""
    try:
        position = LoopPosition(**json.loads((path / STATE_FILE).read_text(encoding="utf-8")))
        lora_state = load_file(str(path / LORA_FILE))
        training_state = torch.load(path / TRAINING_FILE, map_location="cpu", weights_only=True)
    except (OSError, ValueError, TypeError, RuntimeError) as err:
        raise UserError(f"{path}: cannot read checkpoint: {err}") from None
    return position, lora_state, training_state
