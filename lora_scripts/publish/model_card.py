"""The model card (the Hub repository's README.md) for a trained LoRA, following Hub conventions.

Front matter: ``base_model`` with ``base_model_relation: adapter``, ``license``, tags the Hub uses to
list LoRAs, the trigger word as ``instance_prompt`` and a ``widget`` showing the sample images. The
body gives the training settings, the final loss and how to load the weights. The text depends only
on the config and the files, so publishing the same run twice produces the same card.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lora_scripts.config import Config

IMAGE_TAGS = ["lora", "diffusers", "text-to-image", "template:sd-lora"]
TEXT_TAGS = ["lora", "peft", "text-generation"]
SETTINGS = (
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "learning_rate",
    "optimizer",
    "scheduler",
    "batch_size",
    "gradient_accumulation_steps",
    "epochs",
    "max_train_steps",
    "mixed_precision",
    "seed",
)
MODE_SETTINGS = {
    "image": ("conv_lora_rank", "resolution", "train_text_encoder", "min_snr_gamma", "noise_offset"),
    "text": ("target_modules", "max_seq_length", "packing"),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_PROMPT_INDEX = re.compile(r"(\d+)$")
WIDGET_IMAGES = 4


def hub_base_model(config: Config) -> str | None:
    """``base_model`` when it is a Hub id (what the card may link to); None for a local file or folder."""
    value = config.base_model
    return value if _HUB_ID.match(value) and not config.base_model_location().startswith("/") else None


def _summary(output_dir: Path) -> dict[str, Any]:
    path = output_dir / "training_summary.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _widget(config: Config, samples: list[str]) -> list[dict[str, Any]]:
    """The newest sample images, each with its prompt (``...-<index>.png`` names the validation prompt)."""
    prompts = config.validation_prompts
    widget = []
    for name in sorted(samples)[-WIDGET_IMAGES:]:
        match = _PROMPT_INDEX.search(Path(name).stem)
        index = int(match.group(1)) if match else -1
        text = prompts[index] if 0 <= index < len(prompts) else (config.trigger_word or "")
        widget.append({"text": text, "output": {"url": name}})
    return widget


def _how_to_load(config: Config, repo_id: str, base: str) -> str:
    trigger = f" Include the trigger word `{config.trigger_word}` in the prompt." if config.trigger_word else ""
    if config.mode == "text":
        return (
            "## How to use (transformers + peft)\n\n```python\n"
            "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'base = AutoModelForCausalLM.from_pretrained("{base}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{base}")\n'
            f'model = PeftModel.from_pretrained(base, "{repo_id}")\n```\n'
        )
    prompt = config.trigger_word or "a photo"
    return (
        "## How to use\n\n### diffusers\n\n```python\nimport torch\nfrom diffusers import AutoPipelineForText2Image\n\n"
        f'pipe = AutoPipelineForText2Image.from_pretrained("{base}", torch_dtype=torch.float16).to("cuda")\n'
        f'pipe.load_lora_weights("{repo_id}", weight_name="pytorch_lora_weights.safetensors")\n'
        f'image = pipe("{prompt}").images[0]\n```\n\n'
        "### ComfyUI / AUTOMATIC1111\n\n"
        "Download `lora_weights.safetensors` (kohya format) into `ComfyUI/models/loras/` or "
        "`stable-diffusion-webui/models/Lora/`, then use a *Load LoRA* node (ComfyUI) or "
        f"`<lora:lora_weights:1>` in the prompt (A1111).{trigger}\n"
    )


def render(config: Config, output_dir: Path, repo_id: str, samples: list[str], version: str = "") -> str:
    """The model card text for the run in ``output_dir`` published to ``repo_id``.

    ``samples`` are the sample files' paths inside the Hub repository (``samples/...``).
    """
    from huggingface_hub import ModelCardData

    base = hub_base_model(config)
    image = config.mode == "image"
    data = ModelCardData(
        base_model=base,
        base_model_relation="adapter" if base else None,
        license=config.license,
        library_name="diffusers" if image else "peft",
        pipeline_tag="text-to-image" if image else "text-generation",
        tags=IMAGE_TAGS if image else TEXT_TAGS,
        instance_prompt=config.trigger_word or None,
        widget=_widget(config, samples) if image and samples else None,
    )
    summary = _summary(output_dir)
    name = repo_id.split("/")[-1]
    lines = [f"# {name}", ""]
    lines.append(
        f"A LoRA {'for Stable Diffusion' if image else 'adapter for a causal language model'}, "
        f"trained with lora-scripts from `{config.source.name}`"
        f"{f' (release {version})' if version else ''}."
    )
    if not base:
        lines.append(f"Base model: `{Path(config.base_model).name}` (a local file, not a Hub repository).")
    if config.trigger_word:
        lines += ["", f"Trigger word: `{config.trigger_word}`"]
    lines += ["", "## Training settings", "", "| setting | value |", "| --- | --- |"]
    settings = (*SETTINGS, *MODE_SETTINGS[config.mode])
    lines += [f"| {key} | {config.values[key]} |" for key in settings if config.values.get(key) not in (None, "", 0)]
    lines += ["", "## Results", ""]
    if "final_loss" in summary:
        lines.append(f"- final loss: {float(summary['final_loss']):.4f}")
    for key, label in (("steps", "steps"), ("wall_time_s", "wall time (s)"), ("samples_per_s", "samples/s")):
        if key in summary:
            lines.append(f"- {label}: {summary[key]}")
    if (output_dir / "loss.png").is_file():
        lines += ["", "![loss](loss.png)"]
    lines += ["", _how_to_load(config, repo_id, base or "<base model>")]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)
