"""`lora-scripts smoke`: train a config for a few steps on a mock base model, then prove the result is usable.

The same overrides every time (mock model, the config's own data if present else dummy data,
5 steps, batch 1, tiny resolution), then checks: the weight files exist, they load where users
load them and change the model's output for a fixed seed, every kohya key maps onto the base
model, and the loss is finite. Any failure is a non-zero exit naming the check.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path
from typing import Any

from lora_scripts.config import Config, load_config
from lora_scripts.errors import UserError

SMOKE_RESOLUTION = 64
SMOKE_SEQ_LENGTH = 64
_IMAGE_FILES = ("pytorch_lora_weights.safetensors", "lora_weights.safetensors")
_TEXT_FILES = ("adapter_config.json", "adapter_model.safetensors")
BUILTIN_EXAMPLE = {
    "train_data_dir": "data",
    "base_model": "mock",
    "output_dir": "output",
    "lora_rank": 4,
    "lora_alpha": 4,
    "learning_rate": 1e-3,
    "trigger_word": "sks",
    "validation_prompts": ["sks, a red circle"],
}


def smoke_overrides(config: Config, work: Path, steps: int) -> Config:
    """``config`` pointed at the mock model and smoke-sized: few steps, batch 1, tiny inputs."""
    import torch

    text = config.mode == "text"
    base = _mock_model(work, text)
    data_dir, metadata = config.path("train_data_dir"), config.path("metadata_path")
    own_data = data_dir is not None and data_dir.exists() and any(data_dir.iterdir() if data_dir.is_dir() else [1])
    if not own_data:
        data_dir, metadata = _dummy_data(work, text), None
    on_gpu = torch.cuda.is_available()
    changes: dict[str, Any] = {
        "base_model": str(base),
        "train_data_dir": str(data_dir),
        "metadata_path": str(metadata or ""),
        "output_dir": str(work / "output" / config.source.stem),
        "logging_dir": "",
        "max_train_steps": steps,
        "batch_size": 1,
        "gradient_accumulation_steps": 1,
        "save_steps": 0,
        "resume_from": "",
        "init_lora_weights": "",
        "sample_every_n_steps": 0,
        "sample_inference_steps": 2,
        "num_workers": 0,
        "validation_prompts": config.validation_prompts[:1],
    }
    if text:
        changes["max_seq_length"] = min(config.max_seq_length, SMOKE_SEQ_LENGTH)
        changes["merge"] = False
    else:
        changes["resolution"] = SMOKE_RESOLUTION
    if not on_gpu:
        changes["mixed_precision"] = "no"
        if config.optimizer == "AdamW8bit":
            changes["optimizer"] = "AdamW"
    return config.replace(**changes)


def _mock_model(work: Path, text: bool) -> Path:
    if text:
        from lora_scripts.model.mock_lm import build_mock_causal_lm

        out = work / "mock-causal-lm"
        if not (out / "config.json").is_file():
            build_mock_causal_lm(out)
    else:
        from lora_scripts.model.mock_sd import build_mock_sd

        out = work / "mock-sd"
        if not (out / "model_index.json").is_file():
            build_mock_sd(out)
    return out


def _dummy_data(work: Path, text: bool) -> Path:
    if text:
        from lora_scripts.data.text import write_dummy_text

        out = work / "data-text"
        if not out.is_dir():
            write_dummy_text(out, count=8)
    else:
        from lora_scripts.data.images import write_dummy_images

        out = work / "data-image"
        if not out.is_dir():
            write_dummy_images(out, count=8, resolution=SMOKE_RESOLUTION)
    return out


def check_image_result(config: Config) -> list[str]:
    """Problems with an image run's output (empty when usable)."""
    import torch
    from safetensors.torch import load_file

    from lora_scripts.export.kohya import check_keys_map
    from lora_scripts.model.stable_diffusion import build_pipeline, load_sd_components

    output_dir = config.path("output_dir")
    assert output_dir is not None
    problems = [f"{name} missing" for name in _IMAGE_FILES if not (output_dir / name).is_file()]
    if problems:
        return problems
    components = load_sd_components(config.base_model_location())
    pipe = build_pipeline(components)
    pipe.set_progress_bar_config(disable=True)

    def render() -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        prompt = config.validation_prompts[0] if config.validation_prompts else "a photo"
        out = pipe(
            prompt,
            num_inference_steps=2,
            height=SMOKE_RESOLUTION,
            width=SMOKE_RESOLUTION,
            generator=generator,
            output_type="pt",
        )
        return out.images.float()

    before = render()
    pipe.load_lora_weights(str(output_dir))
    after = render()
    change = (after - before).abs().max().item()
    if not change > 1e-6:
        problems.append(
            f"pytorch_lora_weights.safetensors does not change the mock pipeline's output (max diff {change})"
        )
    try:
        text_encoder = components.text_encoder if config.train_text_encoder else None
        check_keys_map(load_file(str(output_dir / "lora_weights.safetensors")), components.unet, text_encoder)
    except (UserError, ValueError) as err:
        problems.append(f"lora_weights.safetensors: {err}")
    return problems


def check_text_result(config: Config) -> list[str]:
    """Problems with a text run's output (empty when usable)."""
    import torch
    from peft import PeftModel

    from lora_scripts.model.causal_lm import load_causal_lm, load_tokenizer, resolve_base_model

    output_dir = config.path("output_dir")
    assert output_dir is not None
    problems = [f"{name} missing" for name in _TEXT_FILES if not (output_dir / name).is_file()]
    if problems:
        return problems
    folder = resolve_base_model(config.base_model_location(), str(config.source))
    tokenizer = load_tokenizer(folder, str(config.source))
    inputs = tokenizer("The quick brown fox", return_tensors="pt")
    base = load_causal_lm(folder, str(config.source))
    with torch.no_grad():
        before = base(**inputs).logits
        adapted = PeftModel.from_pretrained(base, str(output_dir))
        after = adapted(**inputs).logits
    change = (after - before).abs().max().item()
    if not change > 0:
        problems.append(f"the adapter in {output_dir} does not change the mock model's logits")
    return problems


def run_smoke(config: Config, work: Path, steps: int = 5) -> dict[str, Any]:
    """Train ``config`` with smoke overrides under ``work`` and check the result; raises UserError on failure."""
    from lora_scripts.train.loop import train

    smoke = smoke_overrides(config, work, steps)
    result = train(smoke)
    problems = []
    if result.final_loss is None or not math.isfinite(result.final_loss):
        problems.append(f"final loss is {result.final_loss}")
    problems += check_text_result(smoke) if smoke.mode == "text" else check_image_result(smoke)
    if problems:
        raise UserError(f"smoke failed for {config.source}: " + "; ".join(problems))
    return {"config": str(config.source), "output_dir": str(smoke.path("output_dir")), **result.summary}


def main(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}", exit_code=2)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="lora-smoke-"))
    work.mkdir(parents=True, exist_ok=True)
    work = work.resolve()
    config = load_config(args.config) if args.config else Config(BUILTIN_EXAMPLE, work / "builtin-example.yaml")
    report = run_smoke(config, work, args.steps)
    print(
        f"smoke passed: {report['config']}: {report['steps']} steps, final loss {report['final_loss']:.4f}, "
        f"{report['wall_time_s']:.1f} s; outputs in {report['output_dir']}"
    )
    return 0
