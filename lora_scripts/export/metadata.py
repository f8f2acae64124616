"""Header metadata of the kohya LoRA file: the ``ss_*`` keys of kohya sd-scripts, the ``modelspec.*`` keys of the
Stability AI model spec, and what makes a run traceable (config hash, dataset fingerprint, version, git commit).

Every value is a string, as the safetensors header requires.
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import json
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import lora_scripts

ARCHITECTURE = "stable-diffusion-v1/lora"
IMPLEMENTATION = "https://github.com/huggingface/diffusers"


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def config_hash(config: Any) -> str:
    """sha256 of the canonical JSON of the config values (defaults included)."""
    return hashlib.sha256(_canonical(config.values).encode("utf-8")).hexdigest()


def dataset_fingerprint(paths_and_captions: Iterable[tuple[str | Path, str]]) -> str:
    """sha256 over the training examples: each file's name, size, modification time and caption, in sorted order.

    Changes when an image is added, removed, replaced or recaptioned; does not read the image bytes.
    """
    digest = hashlib.sha256()
    for name, size, mtime, caption in sorted(
        (Path(path).name, *_stat(Path(path)), caption) for path, caption in paths_and_captions
    ):
        digest.update(_canonical([name, size, mtime, caption]).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def _stat(path: Path) -> tuple[int, int]:
    try:
        info = path.stat()
    except OSError:
        return -1, -1
    return info.st_size, info.st_mtime_ns


def tag_frequency(captions: Iterable[str]) -> dict[str, int]:
    """How many captions hold each comma-separated tag (stripped; counted once per caption), most frequent first."""
    counts: collections.Counter[str] = collections.Counter()
    for caption in captions:
        counts.update({tag.strip() for tag in caption.split(",") if tag.strip()})
    return dict(counts.most_common())


def git_commit(folder: Path | None = None) -> str:
    """The commit of the git checkout holding ``folder`` (this package by default); empty when there is none."""
    folder = folder or Path(lora_scripts.__file__).resolve().parent
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def kohya_metadata(
    config: Any,
    *,
    step: int,
    epoch: int,
    base_model: str,
    dataset_fingerprint: str,
    tag_frequency: Mapping[str, int],
    image_count: int = 0,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """The header of ``lora_weights.safetensors``: ``ss_*`` (what A1111 / ComfyUI extensions show) and
    ``modelspec.*`` keys, plus ``lora_scripts.*`` traceability keys. ``extra`` entries are added last and win
    (e.g. ``ss_base_model_version: sd_v2`` for an SD 2.x base); non-string values become JSON."""
    resolution = f"{config.resolution}x{config.resolution}"
    model_name = Path(base_model).name or base_model
    dir_name = Path(str(config.train_data_dir)).name
    title = Path(config.output_dir).name or "lora"
    sha = config_hash(config)
    values: dict[str, Any] = {
        "ss_base_model_version": "sd_v1",
        "ss_v2": False,
        "ss_sd_model_name": model_name,
        "ss_network_module": "networks.lora",
        "ss_network_dim": config.lora_rank,
        "ss_network_alpha": config.lora_alpha,
        "ss_network_dropout": config.lora_dropout,
        "ss_network_args": {"conv_dim": config.conv_lora_rank, "conv_alpha": config.conv_lora_rank}
        if config.conv_lora_rank
        else {},
        "ss_resolution": f"({config.resolution}, {config.resolution})",
        "ss_enable_bucket": config.bucket,
        "ss_steps": step,
        "ss_epoch": epoch,
        "ss_num_epochs": config.epochs,
        "ss_max_train_steps": config.max_train_steps,
        "ss_learning_rate": config.learning_rate,
        "ss_lr_scheduler": config.scheduler,
        "ss_lr_warmup_steps": config.warmup_steps,
        "ss_optimizer": config.optimizer,
        "ss_batch_size_per_device": config.batch_size,
        "ss_gradient_accumulation_steps": config.gradient_accumulation_steps,
        "ss_mixed_precision": config.mixed_precision,
        "ss_seed": config.seed,
        "ss_min_snr_gamma": config.min_snr_gamma,
        "ss_noise_offset": config.noise_offset,
        "ss_text_encoder_lr": config.learning_rate if config.train_text_encoder else 0,
        "ss_network_train_unet_only": not config.train_text_encoder,
        "ss_cache_latents": config.cache_latents,
        "ss_tag_frequency": {dir_name: dict(tag_frequency)},
        "ss_dataset_dirs": {dir_name: {"n_repeats": 1, "img_count": image_count}},
        "ss_training_comment": f"trigger word: {config.trigger_word}" if config.trigger_word else "",
        "ss_output_name": title,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ARCHITECTURE,
        "modelspec.implementation": IMPLEMENTATION,
        "modelspec.title": title,
        "modelspec.resolution": resolution,
        "modelspec.date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.trigger_phrase": config.trigger_word,
        "modelspec.license": config.license,
        "modelspec.prediction_type": "epsilon",
        "lora_scripts.version": lora_scripts.__version__,
        "lora_scripts.git_commit": git_commit(),
        "lora_scripts.config_hash": sha,
        "lora_scripts.dataset_fingerprint": dataset_fingerprint,
        "lora_scripts.base_model": base_model,
    }
    values.update(extra or {})
    return {key: _text(value) for key, value in values.items()}


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)  # kohya writes Python's True/False
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value, ensure_ascii=False, default=str)
