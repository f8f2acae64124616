"""Header metadata of the kohya LoRA file: the ``ss_*`` keys of kohya sd-scripts, the ``modelspec.*`` keys of the
Stability AI model spec, and what makes a run traceable (config hash, dataset fingerprint, version, git commit).

Every value is a string, as the safetensors header requires.
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import json
import re
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lora_scripts

if TYPE_CHECKING:
    from lora_scripts.data.images import ImageExample

IMPLEMENTATION = "https://github.com/huggingface/diffusers"
PROJECT_NAME = re.compile(r'^name\s*=\s*"lora-scripts"\s*$', re.MULTILINE)  # in this project's pyproject.toml


@dataclass
class DatasetDir:
    """The training images of one dataset folder: how often each repeats per epoch, and their captions."""

    repeats: int
    captions: list[str] = field(default_factory=list)


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


def dataset_dirs(examples: Iterable[ImageExample], data_dir: Path) -> dict[str, DatasetDir]:
    """The examples by dataset folder, as kohya names them: an image in a subfolder of ``data_dir`` (a kohya
    ``N_name`` folder, say) under that top-level subfolder's name, any other image under ``data_dir``'s name."""
    dirs: dict[str, DatasetDir] = {}
    for example in examples:
        parts = example.path.relative_to(data_dir).parts if example.path.is_relative_to(data_dir) else ()
        name = parts[0] if len(parts) > 1 else data_dir.name
        dirs.setdefault(name, DatasetDir(example.repeats)).captions.append(example.caption)
    return dirs


def git_commit(package: Path | None = None) -> str:
    """The commit of the lora-scripts checkout whose package folder is ``package`` (this package by default).

    Empty unless ``package`` sits at the root of a git checkout whose ``pyproject.toml`` names lora-scripts: an
    installed copy (say in a virtual environment inside some other repository) has no commit of its own.
    """
    package = (package or Path(lora_scripts.__file__).parent).resolve()
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--show-toplevel", "HEAD"],
            cwd=package,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = done.stdout.splitlines()
    if done.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != package.parent:
        return ""
    try:
        pyproject = (package.parent / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return ""
    return lines[1] if PROJECT_NAME.search(pyproject) else ""


def kohya_metadata(
    config: Any,
    *,
    step: int,
    epoch: int,
    num_epochs: int,
    base_model: str,
    dataset_fingerprint: str,
    dataset_dirs: Mapping[str, DatasetDir],
    v2: bool,
    v_prediction: bool,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """The header of ``lora_weights.safetensors``: ``ss_*`` (what A1111 / ComfyUI extensions show) and
    ``modelspec.*`` keys, plus ``lora_scripts.*`` traceability keys.

    ``epoch`` counts from 1, as ``loss.csv`` and ``training_summary.json`` do; ``num_epochs`` is how many the run
    goes through. ``v2``: the base model is SD 2.x (else SD 1.x); ``v_prediction``: it predicts velocity (else
    noise). ``dataset_dirs`` as from :func:`dataset_dirs`. ``extra`` entries are added last and win; non-string
    values become JSON.
    """
    resolution = f"{config.resolution}x{config.resolution}"
    model_name = Path(base_model).name or base_model
    title = Path(config.output_dir).name or "lora"
    sha = config_hash(config)
    if v2:
        architecture = "stable-diffusion-v2-768-v" if v_prediction else "stable-diffusion-v2-512"
    else:
        architecture = "stable-diffusion-v1"
    values: dict[str, Any] = {
        # kohya's names: sd_v1, sd_v2, with _v appended for v-prediction
        "ss_base_model_version": f"sd_v{2 if v2 else 1}{'_v' if v_prediction else ''}",
        "ss_v2": v2,
        "ss_v_parameterization": v_prediction,
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
        "ss_num_epochs": num_epochs,
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
        "ss_tag_frequency": {name: tag_frequency(folder.captions) for name, folder in dataset_dirs.items()},
        "ss_dataset_dirs": {
            name: {"n_repeats": folder.repeats, "img_count": len(folder.captions)}
            for name, folder in dataset_dirs.items()
        },
        "ss_training_comment": f"trigger word: {config.trigger_word}" if config.trigger_word else "",
        "ss_output_name": title,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": IMPLEMENTATION,
        "modelspec.title": title,
        "modelspec.resolution": resolution,
        "modelspec.date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.trigger_phrase": config.trigger_word,
        "modelspec.license": config.license,
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
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
