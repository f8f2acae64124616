"""The kohya / A1111 / ComfyUI LoRA file, and reading LoRA files back for ``init_lora_weights``.

Kohya layout for SD 1.x/2.x: ``lora_unet_<diffusers module path, dots as _>.lora_down.weight`` / ``.lora_up.weight``
/ ``.alpha`` (``lora_te_text_model_...`` for the CLIP text encoder); the update of a module is
``alpha / rank * up @ down``. This module writes that file (:func:`save_kohya_lora`), checks every key lands on a
module of the base model (:func:`check_keys_map`), and loads our diffusers file, our kohya file or a kohya file from
elsewhere into the peft layers of a run (:func:`load_lora_file`, :func:`apply_lora_weights`).
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_scripts.atomic import atomic_path
from lora_scripts.errors import UserError
from lora_scripts.export.diffusers_format import ADAPTER_NAME, DIFFUSERS_WEIGHT_NAME, lora_state_dict

if TYPE_CHECKING:
    import torch

KOHYA_WEIGHT_NAME = "lora_weights.safetensors"
UNET_PREFIX, TE_PREFIX = "unet", "text_encoder"
_KOHYA_PREFIX = {UNET_PREFIX: "lora_unet_", TE_PREFIX: "lora_te_"}
_KOHYA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")
# transformers 5 dropped CLIPTextModel's ``text_model`` level; kohya names (and older checkpoints) keep it.
_TE_ROOT = "text_model."


@dataclass
class LoraWeights:
    """LoRA weights read from a file, in peft naming (``<module>.lora_A.weight`` / ``.lora_B.weight``).

    Text-encoder module paths start with ``text_model.`` whatever the transformers version. ``alphas`` maps
    ``unet.<module>`` / ``text_encoder.<module>`` to the alpha the file declares (its rank when it declares none);
    ``rank`` is the most common rank.
    """

    unet: dict[str, torch.Tensor]
    text_encoder: dict[str, torch.Tensor]
    alphas: dict[str, float]
    rank: int


def lora_alphas(unet: Any, text_encoder: Any | None = None) -> dict[str, float]:
    """The alpha of every peft LoRA layer, keyed ``unet.<module>`` / ``text_encoder.<module>``."""
    from peft.tuners.lora import LoraLayer

    alphas = {}
    for prefix, model in ((UNET_PREFIX, unet), (TE_PREFIX, text_encoder)):
        for name, module in model.named_modules() if model is not None else ():
            if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_alpha:
                alphas[f"{prefix}.{name}"] = float(module.lora_alpha[ADAPTER_NAME])
    return alphas


def kohya_name(prefix: str, module_path: str) -> str:
    """The kohya LoRA name of a module: ``lora_unet_down_blocks_0_..._to_q``, ``lora_te_text_model_..._q_proj``."""
    if prefix == TE_PREFIX and not module_path.startswith(_TE_ROOT):
        module_path = _TE_ROOT + module_path
    return _KOHYA_PREFIX[prefix] + module_path.replace(".", "_")


def to_kohya(
    unet_lora_sd: Mapping[str, torch.Tensor],
    te_lora_sd: Mapping[str, torch.Tensor] | None,
    alphas: Mapping[str, float],
) -> dict[str, torch.Tensor]:
    """Peft-named LoRA state dicts (from :func:`lora_state_dict`) as a kohya state dict.

    ``alphas`` as from :func:`lora_alphas`; a module missing there gets alpha = its rank. Conv (LoCon) weights keep
    their 4-d shapes. (diffusers' ``convert_state_dict_to_kohya`` is not used: it writes SDXL's ``lora_te1_`` prefix
    and alpha = rank.)
    """
    import torch

    out: dict[str, torch.Tensor] = {}
    for prefix, state in ((UNET_PREFIX, unet_lora_sd), (TE_PREFIX, te_lora_sd or {})):
        for key, value in state.items():
            module, _, part = key.rpartition(".lora_")
            if part not in ("A.weight", "B.weight"):
                raise ValueError(f"not a peft LoRA weight name: {key}")
            name = kohya_name(prefix, module)
            out[f"{name}.{'lora_down' if part == 'A.weight' else 'lora_up'}.weight"] = value.contiguous()
            if part == "A.weight":
                alpha = alphas.get(f"{prefix}.{module}", value.shape[0])
                out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def _lora_targets(model: Any) -> Iterator[tuple[str, torch.nn.Module]]:
    """(path, layer) for every Linear / Conv2d layer of the base model, seen through any peft wrapping."""
    import torch

    for name, module in model.named_modules():
        if ".lora_" in name or isinstance(module, torch.nn.ModuleDict):
            continue
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            yield name.replace(".base_layer", ""), module


def _expected_shapes(layer: torch.nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    import torch

    if isinstance(layer, torch.nn.Conv2d):
        return (rank, layer.in_channels, *layer.kernel_size), (layer.out_channels, rank, 1, 1)
    return (rank, layer.in_features), (layer.out_features, rank)


def check_keys_map(
    kohya_sd: Mapping[str, torch.Tensor], unet: Any, text_encoder: Any | None, *, source: str = "kohya LoRA"
) -> None:
    """Check that every key of a kohya state dict lands on a Linear/Conv2d layer of the base model, with shapes
    that fit it. Raises UserError naming ``source`` and listing every key that does not."""
    layers: dict[str, torch.nn.Module] = {}
    for prefix, model in ((UNET_PREFIX, unet), (TE_PREFIX, text_encoder)):
        if model is not None:
            layers.update({kohya_name(prefix, path): layer for path, layer in _lora_targets(model)})
    problems = []
    for key, value in kohya_sd.items():
        name, _, suffix = key.partition(".")
        if suffix not in _KOHYA_SUFFIXES:
            problems.append(f"{key} (not a lora_down/lora_up/alpha key)")
        elif name not in layers:
            problems.append(f"{key} (no such module in the base model)")
        elif suffix != "alpha":
            is_down = suffix.startswith("lora_down")
            rank = value.shape[0] if is_down or value.ndim < 2 else value.shape[1]
            expected = _expected_shapes(layers[name], rank)[0 if is_down else 1]
            if tuple(value.shape) != expected:
                problems.append(f"{key} (shape {tuple(value.shape)}, the module needs {expected})")
    if problems:
        raise UserError(f"{source}: {len(problems)} key(s) do not map onto the base model: {'; '.join(problems)}")


def save_kohya_lora(out_dir: Path, unet: Any, text_encoder: Any | None, metadata: Mapping[str, str]) -> Path:
    """Write ``out_dir/lora_weights.safetensors`` (kohya layout, ``metadata`` in the header) atomically,
    after :func:`check_keys_map`."""
    from safetensors.torch import save_file

    target = Path(out_dir) / KOHYA_WEIGHT_NAME
    state = to_kohya(
        lora_state_dict(unet),
        lora_state_dict(text_encoder) if text_encoder is not None else None,
        lora_alphas(unet, text_encoder),
    )
    check_keys_map(state, unet, text_encoder, source=str(target))
    with atomic_path(target) as tmp:
        save_file(state, str(tmp), metadata=dict(metadata))
    return target


def _resolve(path: Path) -> Path:
    if not path.exists():
        raise UserError(f"{path}: LoRA weights not found (init_lora_weights)")
    if path.is_dir():
        for name in (DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME):
            if (path / name).is_file():
                return path / name
        found = sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise UserError(
                f"{path}: expected {DIFFUSERS_WEIGHT_NAME}, {KOHYA_WEIGHT_NAME} or a single .safetensors LoRA file "
                f"in this folder, found {len(found)} .safetensors files"
            )
        return found[0]
    if path.suffix != ".safetensors":
        raise UserError(f"{path}: not a .safetensors file; LoRA weights are only read from safetensors files")
    return path


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata() or {}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable safetensors file ({err})") from None


def _kohya_alphas(state: dict[str, torch.Tensor]) -> dict[str, float]:
    """Pop the ``.alpha`` entries of a kohya state dict, keyed by LoRA name."""
    return {key[: -len(".alpha")]: float(state.pop(key)) for key in [k for k in state if k.endswith(".alpha")]}


def _to_peft(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The ``prefix.`` part of a diffusers-named LoRA state dict (any diffusers generation), in peft naming."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    part = {key[len(prefix) + 1 :]: value for key, value in state.items() if key.startswith(f"{prefix}.")}
    # diffusers' own files mix namings (``lora.down`` for attention, ``lora_A`` for convs); these converters
    # leave names already in peft form as they are.
    if not part:
        converted = part
    elif prefix == UNET_PREFIX:
        converted = convert_unet_state_dict_to_peft(part)
    else:
        converted = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
    if prefix == TE_PREFIX:
        converted = {(k if k.startswith(_TE_ROOT) else _TE_ROOT + k): v for k, v in converted.items()}
    return {key: value.float() for key, value in converted.items()}


def _adapter_alpha(metadata: dict[str, Any], module: str, rank: int) -> float:
    """A module's alpha from diffusers' stored LoraConfig fields (alpha = rank when there are none)."""
    from peft.utils.other import get_pattern_key

    if "lora_alpha" not in metadata:
        return float(rank)
    pattern = metadata.get("alpha_pattern") or {}
    return float(pattern.get(get_pattern_key(list(pattern), module), metadata["lora_alpha"]))


def load_lora_file(path: Path) -> LoraWeights:
    """Read LoRA weights for ``init_lora_weights``: our diffusers file, our kohya file, a kohya file from elsewhere
    (with or without ``.alpha``, any float dtype), or a folder holding one of them. UserError naming the file when
    it is not a SD 1.x/2.x LoRA file."""
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    path = _resolve(Path(path))
    state, header = _read_safetensors(path)
    if not state:
        raise UserError(f"{path}: holds no tensors; not a LoRA file")
    first = next(iter(state))
    is_kohya = all(key.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for key in state)
    is_diffusers = all(key.startswith((f"{UNET_PREFIX}.", f"{TE_PREFIX}.")) and ".lora" in key for key in state)
    if is_kohya:
        if any(key.startswith("lora_te2_") or "_input_blocks_" in key for key in state):
            raise UserError(f"{path}: an SDXL LoRA ({first}); only Stable Diffusion 1.x/2.x LoRA files can be loaded")
        kohya_alphas = _kohya_alphas(state)
        try:
            state, _ = StableDiffusionPipeline.lora_state_dict(state)
        except (ValueError, KeyError) as err:
            raise UserError(f"{path}: unknown kohya key layout ({str(err).strip()[:200]})") from None
    elif not is_diffusers:
        raise UserError(f"{path}: not a LoRA file of a known layout (key {first!r})")
    try:
        parts = {prefix: _to_peft(state, prefix) for prefix in (UNET_PREFIX, TE_PREFIX)}
    except ValueError as err:
        raise UserError(f"{path}: unknown LoRA key layout ({err})") from None
    stored = json.loads(header.get(LORA_ADAPTER_METADATA_KEY, "{}"))
    alphas = {}
    for prefix, part in parts.items():
        for key, value in part.items():
            module, _, kind = key.rpartition(".lora_")
            if kind not in ("A.weight", "B.weight"):
                raise UserError(f"{path}: not a LoRA weight: {prefix}.{key}")
            if kind == "A.weight":
                rank = value.shape[0]
                if is_kohya:
                    alphas[f"{prefix}.{module}"] = kohya_alphas.get(kohya_name(prefix, module), float(rank))
                else:
                    fields = {k[len(prefix) + 1 :]: v for k, v in stored.items() if k.startswith(f"{prefix}.")}
                    alphas[f"{prefix}.{module}"] = _adapter_alpha(fields, module, rank)
    ranks = [value.shape[0] for part in parts.values() for key, value in part.items() if key.endswith("lora_A.weight")]
    return LoraWeights(parts[UNET_PREFIX], parts[TE_PREFIX], alphas, collections.Counter(ranks).most_common(1)[0][0])


def apply_lora_weights(unet: Any, text_encoder: Any | None, weights: LoraWeights, path: Path) -> None:
    """Load ``weights`` into the peft LoRA layers of ``unet`` / ``text_encoder`` so that the model computes the
    update the file describes (lora_B is rescaled when the run's alpha differs from the file's).

    Layers the file does not cover keep their initial values. A file layer the run has no LoRA on, or a shape
    (rank) that differs, is a UserError naming ``path`` and the key.
    """
    from peft import set_peft_model_state_dict

    model_alphas = lora_alphas(unet, text_encoder)
    for prefix, model, loaded in ((UNET_PREFIX, unet, weights.unet), (TE_PREFIX, text_encoder, weights.text_encoder)):
        if not loaded:
            continue
        if model is None:
            raise UserError(
                f"{path}: holds text-encoder LoRA weights ({next(iter(loaded))}); set train_text_encoder: true"
            )
        current = lora_state_dict(model)
        # File keys are canonical (text_model. prefix); model keys may lack it.
        names = {kohya_name(prefix, key): key for key in current}
        state = {}
        for key, value in loaded.items():
            ours = names.get(kohya_name(prefix, key))
            if ours is None:
                raise UserError(
                    f"{path}: {prefix}.{key} has no LoRA layer in the model being trained "
                    "(the file trains other layers than this config: check conv_lora_rank and the base model)"
                )
            if value.shape != current[ours].shape:
                raise UserError(
                    f"{path}: {prefix}.{key} has shape {tuple(value.shape)} in the file but "
                    f"{tuple(current[ours].shape)} in the model being trained (lora_rank / conv_lora_rank must match)"
                )
            module = ours.rpartition(".lora_")[0]
            if ".lora_B." in ours:
                file_alpha = weights.alphas[f"{prefix}.{key.rpartition('.lora_')[0]}"]
                value = value * (file_alpha / model_alphas[f"{prefix}.{module}"])
            state[ours] = value.to(current[ours].dtype)
        result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise UserError(f"{path}: {unexpected[0]} could not be loaded into the model being trained")
