"""Causal-LM base models for text mode: finding them locally, loading them, and choosing LoRA layers.

``base_model`` is a transformers folder or a Hugging Face Hub id that is already in the local cache;
nothing is downloaded. Errors name the config file and key (``where``), e.g. ``train.yaml: base_model``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_scripts.errors import UserError
from lora_scripts.model.hub_cache import cached_snapshot, names_a_path

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ALL_LINEAR = "all-linear"
_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FAMILY_TARGETS: dict[str, list[str]] = {
    "llama": _PROJECTIONS,
    "mistral": _PROJECTIONS,
    "qwen2": _PROJECTIONS,
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


def resolve_base_model(location: str, where: str) -> Path:
    """The local folder of ``location``: the folder itself, or the cached snapshot of a Hub id."""
    path = Path(location)
    if names_a_path(location):
        if not path.is_dir():
            raise UserError(f"{where}: folder not found: {location}")
    else:
        path = cached_snapshot(location, where)
    if not (path / "config.json").is_file():
        raise UserError(f"{where}: {path} has no config.json; expected a transformers model folder")
    return path


def load_causal_lm(folder: Path, where: str, dtype: torch.dtype | str | None = None) -> PreTrainedModel:
    """Load the model in ``folder`` (from :func:`resolve_base_model`) with frozen weights in ``dtype``."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or "auto", local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{where}: cannot load a causal LM from {folder}: {str(err).splitlines()[0]}") from None
    model.requires_grad_(False)
    return model


def load_tokenizer(folder: Path, where: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer; models without a pad token pad with their end-of-sequence token."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{where}: cannot load the tokenizer from {folder}: {str(err).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise UserError(f"{where}: the tokenizer in {folder} has neither a pad nor an end-of-sequence token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def default_target_modules(model: torch.nn.Module) -> list[str] | str:
    """The attention and MLP projections of known families; every linear layer otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    return list(FAMILY_TARGETS[model_type]) if model_type in FAMILY_TARGETS else ALL_LINEAR


def resolve_target_modules(model: torch.nn.Module, value: str | list[str], where: str) -> list[str] | str:
    """``target_modules`` from the config as peft takes it; a name that matches no layer is an error."""
    if value == "auto":
        return default_target_modules(model)
    if value == ALL_LINEAR:
        return ALL_LINEAR
    names = [value] if isinstance(value, str) else list(value)
    leaves = _lora_capable_names(model)
    for name in names:
        if not any(full == name or full.endswith(f".{name}") for full in leaves):
            known = ", ".join(sorted({full.rsplit(".", 1)[-1] for full in leaves}))
            raise UserError(f"{where}: '{name}' matches no layer of this model; layers that take LoRA: {known}")
    return names


def _lora_capable_names(model: torch.nn.Module) -> list[str]:
    import torch
    from transformers.pytorch_utils import Conv1D

    kinds: tuple[Any, ...] = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, Conv1D)
    return [name for name, module in model.named_modules() if isinstance(module, kinds)]
