"""Optimizers and learning-rate schedules named in the config, with clear errors for unusable ones."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from lora_scripts.errors import UserError

if TYPE_CHECKING:
    import torch

    from lora_scripts.config import Config


FUSED_DEVICES = ("cpu", "cuda")  # where torch has fused AdamW and SGD kernels (others use its default loop)


def build_optimizer(config: Config, params: Iterable[torch.nn.Parameter], device_type: str) -> torch.optim.Optimizer:
    """The optimizer ``config.optimizer`` names, over ``params``.

    AdamW and SGD use torch's fused kernels on CPU and CUDA: one kernel for all LoRA tensors instead of
    a loop over hundreds of small ones (on the small mock's 256 tensors, CPU: AdamW 6.7 -> 1.2 ms a step).
    Left off under fp16's grad scaler: that path runs on no machine this project tests on (GPU only), and
    accelerate misreports fused steps the scaler skipped (huggingface/accelerate#4242).
    """
    import torch

    params = list(params)
    name, lr, decay = config.optimizer, config.learning_rate, config.weight_decay
    fused = device_type in FUSED_DEVICES and config.mixed_precision != "fp16"
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=lr, weight_decay=decay, fused=fused)
    if name == "SGD":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=decay, fused=fused)
    if name == "AdamW8bit":
        if device_type != "cuda":
            raise UserError(f"{config.source}: optimizer: AdamW8bit needs a CUDA GPU (bitsandbytes); on CPU use AdamW")
        bnb = _optional_import("bitsandbytes", "bitsandbytes", config)
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=decay)
    if name == "Lion":
        lion = _optional_import("lion_pytorch", "lion-pytorch", config)
        return lion.Lion(params, lr=lr, weight_decay=decay)
    if name == "Prodigy":
        prodigy = _optional_import("prodigyopt", "prodigyopt", config)
        return prodigy.Prodigy(params, lr=lr, weight_decay=decay)
    raise UserError(f"{config.source}: optimizer: unknown optimizer {name!r}")


def _optional_import(module: str, package: str, config: Config):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(
            f"{config.source}: optimizer: {config.optimizer} needs the '{package}' package: pip install {package}"
        ) from None


def build_scheduler(
    config: Config, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """diffusers' schedule ``config.scheduler`` with ``warmup_steps`` of linear warm-up.

    diffusers' ``constant`` takes no warm-up: with ``warmup_steps`` it becomes ``constant_with_warmup``.
    """
    from diffusers.optimization import get_scheduler

    name = config.scheduler
    if name == "constant" and config.warmup_steps > 0:
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=max(total_steps, 1))
