"""The contract between the shared training loop and a mode (image or text).

The loop (``train/loop.py``) owns accelerate, the optimizer, the schedule, checkpoints, resume,
signals, logging and progress. A task owns what differs between modes: its data, its base
model with the LoRA layers, the loss, the weight files users load, and samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from lora_scripts.config import Config


@dataclass
class RunInfo:
    """What the loop knows about the run, handed to the task when it writes weights."""

    step: int
    epoch: int
    total_epochs: int  # the epochs the whole run goes through (max_train_steps, when set, decides)
    loss: float | None = None
    final: bool = False  # the end-of-run save into output_dir (not a checkpoint)
    extra: dict[str, Any] = field(default_factory=dict)


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype frozen base weights are kept in: half precision under mixed precision, else fp32.
    LoRA weights always train in fp32."""
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def enable_gradient_checkpointing(module: torch.nn.Module) -> None:
    """Recompute activations in the backward pass, for a diffusers model or a transformers (or peft) one.

    Non-reentrant checkpointing, so that LoRA weights behind frozen inputs still get their gradients.
    """
    if hasattr(module, "enable_gradient_checkpointing"):  # diffusers
        module.enable_gradient_checkpointing()
    else:  # transformers >= 5.23 (the name before it is deprecated)
        module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


class TrainingTask(Protocol):
    config: Config

    def check_data(self) -> None:
        """Check the whole dataset before anything heavy loads; raise UserError listing every problem."""

    def build(self, accelerator: Accelerator) -> None:
        """Load the base model (frozen, at the mixed-precision dtype), add the LoRA layers, apply
        ``init_lora_weights`` if set, and prepare cached inputs (latents, embeddings, tokens)."""

    @property
    def model(self) -> torch.nn.Module:
        """The module the loop trains: ``model(batch)`` returns the scalar loss. It holds every LoRA
        parameter (requires_grad=True) and nothing else trainable."""

    def dataset(self) -> torch.utils.data.Dataset:
        """Training examples, indexable; items go through :meth:`collate`."""

    def groups(self) -> list[list[int]]:
        """Dataset indices that may share a batch (one group, or one per aspect-ratio bucket)."""

    def collate(self, items: list[Any]) -> Any:
        """Turn a list of dataset items into the batch that ``model`` takes."""

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable LoRA weights (for checkpoints), on CPU."""

    def load_lora_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore weights from :meth:`lora_state_dict` (resume)."""

    def save_weights(self, out_dir: Path, info: RunInfo) -> list[Path]:
        """Write the user-facing weight files into ``out_dir`` (each atomically); return their paths."""

    def sample(self, out_dir: Path, step: int) -> list[Path]:
        """Render ``validation_prompts`` into ``out_dir`` (images or text files); return their paths."""

    def eval_loss(self) -> float | None:
        """Loss on held-out data, or None when the task has none."""
