"""Image-mode LoRA layers and the diffusers/peft weight file.

Owns which modules of a Stable Diffusion UNet / CLIP text encoder get LoRA (:func:`add_image_lora`, used by
the trainer and the tests alike), how the trained layers are read back (:func:`lora_state_dicts`), and
``pytorch_lora_weights.safetensors``, the file ``pipe.load_lora_weights(folder)`` loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_scripts.atomic import atomic_path

if TYPE_CHECKING:
    import torch

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
ADAPTER_NAME = "default"
UNET_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# LoCon: the convolutions of the resnet blocks and of the down/up samplers (kohya's conv LoRA set for SD 1.x).
UNET_CONV_TARGETS = ("conv1", "conv2", "conv_shortcut", "conv")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def add_image_lora(unet: Any, text_encoder: Any | None, config: Any) -> None:
    """Add the LoRA layers of ``config`` to ``unet`` (and ``text_encoder`` when given), via peft.

    Attention projections get ``lora_rank`` / ``lora_alpha``; with ``conv_lora_rank`` > 0 the UNet's
    convolutions also get LoRA (LoCon) with that rank and alpha equal to it. ``lora_B`` starts at zero, so the
    model's output is unchanged until training moves it.
    """
    from peft import LoraConfig, inject_adapter_in_model

    targets = list(UNET_ATTENTION_TARGETS)
    conv_pattern: dict[str, int] = {}
    if config.conv_lora_rank > 0:
        targets += UNET_CONV_TARGETS
        conv_pattern = {name: config.conv_lora_rank for name in UNET_CONV_TARGETS}
    common = {"r": config.lora_rank, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout}
    unet.add_adapter(
        LoraConfig(
            **common,
            target_modules=targets,
            rank_pattern=conv_pattern,
            alpha_pattern=conv_pattern,
            init_lora_weights="gaussian",
        )
    )
    if text_encoder is not None:
        # peft directly: transformers' own add_adapter refuses the peft versions it has not been released with.
        te_config = LoraConfig(**common, target_modules=list(TEXT_ENCODER_TARGETS), init_lora_weights="gaussian")
        inject_adapter_in_model(te_config, text_encoder, adapter_name=ADAPTER_NAME)
        text_encoder.peft_config = {ADAPTER_NAME: te_config}


def lora_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The LoRA weights of a peft-wrapped model in peft naming (``<module>.lora_A.weight``), detached on CPU."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    return {key: value.detach().cpu().contiguous() for key, value in state.items()}


def adapter_metadata(model: Any) -> dict[str, Any]:
    """The parts of the model's peft LoraConfig that diffusers needs to rebuild the same layers and scaling.

    Only fields every peft release knows, so that older installs can still build a LoraConfig from the header.
    """
    config = model.peft_config[ADAPTER_NAME]
    return {
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        "target_modules": sorted(config.target_modules),
    }


def save_diffusers_lora(out_dir: Path, unet: Any, text_encoder: Any | None) -> Path:
    """Write ``out_dir/pytorch_lora_weights.safetensors`` atomically; ``pipe.load_lora_weights(out_dir)`` loads it.

    The peft configs (ranks, alphas, LoCon patterns) go into the header so diffusers rebuilds the same scaling.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    target = Path(out_dir) / DIFFUSERS_WEIGHT_NAME
    te_layers = te_metadata = None
    if text_encoder is not None:
        te_layers = convert_state_dict_to_diffusers(lora_state_dict(text_encoder))
        te_metadata = adapter_metadata(text_encoder)
    with atomic_path(target) as tmp:
        StableDiffusionPipeline.save_lora_weights(
            tmp.parent,
            unet_lora_layers=convert_state_dict_to_diffusers(lora_state_dict(unet)),
            text_encoder_lora_layers=te_layers,
            unet_lora_adapter_metadata=adapter_metadata(unet),
            text_encoder_lora_adapter_metadata=te_metadata,
            weight_name=DIFFUSERS_WEIGHT_NAME,
            safe_serialization=True,
        )  # writes exactly ``tmp``: same folder, same file name
    return target
