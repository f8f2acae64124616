"""A random-weight Stable Diffusion model built locally (no download), in two layouts, SD 1.x or SD 2.x style.

``build_mock_sd(out)`` writes ``out/`` as a diffusers folder (loadable by ``StableDiffusionPipeline.from_pretrained``
and :func:`lora_scripts.model.stable_diffusion.load_sd_components`) and ``out/mock-sd.safetensors``, the same
weights in the original LDM / A1111 single-file key layout (``model.diffusion_model.*``, ``first_stage_model.*``,
and the text encoder as ``cond_stage_model.transformer.*`` (SD 1.x, transformers' CLIP) or ``cond_stage_model.model.*``
(SD 2.x, OpenCLIP: fused q/k/v ``in_proj`` weights)). ``family="sd2"`` gives the SD 2.x traits that loading depends
on: a 1024-wide text encoder (the UNet's cross-attention width, which tells the family apart), linear transformer
projections in the UNet and v-prediction; everything else stays tiny. The mock's shapes are not a real SD
family, so the single file carries its own diffusers configs and tokenizer files: a JSON object
``{relative path: file text}`` in the safetensors metadata key ``lora_scripts.diffusers_config``, which the loader
writes to a temporary config folder. The tokenizer is a CLIP tokenizer whose byte-level BPE merges are trained on
a small built-in corpus. The same call always writes the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_scripts.atomic import atomic_path
from lora_scripts.model.stable_diffusion import EMBEDDED_CONFIG_KEY, NO_SAFETY_CHECKER, write_clip_tokenizer

if TYPE_CHECKING:
    import torch

SINGLE_FILE = "mock-sd.safetensors"
SEED = 1234
TOKENIZER_MERGES = 300

_TINY_BLOCKS: dict[str, Any] = {
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
}
_SD_BLOCKS: dict[str, Any] = {
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "unet": {"block_out_channels": [32, 64], "layers_per_block": 1, "attention_head_dim": 2, **_TINY_BLOCKS},
        "vae": {"block_out_channels": [8, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 8},
        "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
    },
    "small": {
        "unet": {
            "block_out_channels": [32, 64, 128, 128],
            "layers_per_block": 2,
            "attention_head_dim": 4,
            **_SD_BLOCKS,
        },
        "vae": {"block_out_channels": [32, 64, 64, 64], "layers_per_block": 1, "norm_num_groups": 32},
        "text": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4},
    },
}

# What an SD 2.x model changes relative to SD 1.x (applied over SIZES).
FAMILIES: dict[str, dict[str, dict[str, Any]]] = {
    "sd1": {"text": {"hidden_act": "quick_gelu"}, "unet": {}, "scheduler": {}},
    "sd2": {
        "text": {"hidden_act": "gelu", "hidden_size": 1024, "num_attention_heads": 16},
        "unet": {"use_linear_projection": True, "upcast_attention": True},
        "scheduler": {"prediction_type": "v_prediction"},
    },
}

_CORPUS = """\
a photo of a cat sitting on a red chair, highly detailed, studio lighting
a painting of a mountain lake at sunset in the style of an old master
portrait of a woman with short hair, soft light, 35mm film photograph
a gray square on a white background; a blue circle; a green triangle
an astronaut riding a horse on the moon, digital art, trending, 4k
the quick brown fox jumps over the lazy dog near a small wooden house
close-up of a flower with water drops, macro photography, bokeh
"""


def build_mock_sd(out: Path, size: str = "tiny", family: str = "sd1") -> list[Path]:
    """Write the mock model into ``out`` (atomically) as a diffusers folder plus ``mock-sd.safetensors``;
    ``family`` is ``sd1`` or ``sd2`` (see the module docstring)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    dims, traits = SIZES[size], FAMILIES[family]
    out = Path(out)
    with atomic_path(out) as tmp:
        write_clip_tokenizer(tmp / "tokenizer", _train_merges())
        tokenizer = CLIPTokenizer.from_pretrained(tmp / "tokenizer")
        text = {**dims["text"], **traits["text"]}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            unet = UNet2DConditionModel(
                sample_size=8,
                cross_attention_dim=text["hidden_size"],
                norm_num_groups=32,
                **dims["unet"],
                **traits["unet"],
            )
            vae = AutoencoderKL(
                down_block_types=["DownEncoderBlock2D"] * len(dims["vae"]["block_out_channels"]),
                up_block_types=["UpDecoderBlock2D"] * len(dims["vae"]["block_out_channels"]),
                latent_channels=4,
                sample_size=64,
                **dims["vae"],
            )
            text_encoder = CLIPTextModel(
                CLIPTextConfig(
                    vocab_size=len(tokenizer),
                    max_position_embeddings=tokenizer.model_max_length,
                    projection_dim=text["hidden_size"],
                    bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                    **text,
                )
            )
        scheduler = PNDMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            skip_prk_steps=True,
            steps_offset=1,
            **traits["scheduler"],
        )
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            **NO_SAFETY_CHECKER,
        )
        pipe.save_pretrained(tmp)
        configs = {
            str(path.relative_to(tmp)): path.read_text(encoding="utf-8")
            for path in sorted(tmp.rglob("*"))
            if path.suffix in (".json", ".txt")
        }
        save_file(
            to_ldm_state_dict(unet, vae, text_encoder, family),
            tmp / SINGLE_FILE,
            metadata={EMBEDDED_CONFIG_KEY: json.dumps(configs, sort_keys=True)},
        )
    return sorted(p for p in out.rglob("*") if p.is_file())


def to_ldm_state_dict(
    unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module, family: str = "sd1"
) -> dict:
    """The three models' weights under the original LDM single-file key names of ``family`` (contiguous copies).

    Works on meta tensors too (shapes only), which is how tests check full-size layouts without the memory."""
    text_prefix, text_layout = _TEXT_LAYOUTS[family]
    converted = {}
    for prefix, table in (
        ("model.diffusion_model.", _unet_to_ldm(unet)),
        ("first_stage_model.", _vae_to_ldm(vae)),
        (text_prefix, text_layout(text_encoder)),
    ):
        converted.update({prefix + key: value.contiguous().clone() for key, value in table.items()})
    return converted


def _rename(state: dict, old: str, new: str, renames: dict[str, str] | None = None) -> dict:
    """The entries of ``state`` under ``old.`` moved under ``new.``, with leaf-path renames applied."""
    moved = {}
    for key, value in state.items():
        if not key.startswith(old + "."):
            continue
        rest = key[len(old) + 1 :]
        for before, after in (renames or {}).items():
            if rest == before or rest.startswith(before + "."):
                rest = after + rest[len(before) :]
                break
        moved[f"{new}.{rest}"] = value
    return moved


_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _unet_to_ldm(unet: torch.nn.Module) -> dict:
    state = unet.state_dict()
    per_block = unet.config.layers_per_block
    ldm = {}
    for old, new in _UNET_TOP.items():
        ldm.update(_rename(state, old, new))
    for i, block in enumerate(unet.down_blocks):
        for j in range(len(block.resnets)):
            slot = 1 + i * (per_block + 1) + j
            ldm.update(_rename(state, f"down_blocks.{i}.resnets.{j}", f"input_blocks.{slot}.0", _UNET_RESNET))
            ldm.update(_rename(state, f"down_blocks.{i}.attentions.{j}", f"input_blocks.{slot}.1"))
        slot = 1 + i * (per_block + 1) + per_block
        ldm.update(_rename(state, f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{slot}.0.op"))
    ldm.update(_rename(state, "mid_block.resnets.0", "middle_block.0", _UNET_RESNET))
    ldm.update(_rename(state, "mid_block.attentions.0", "middle_block.1"))
    ldm.update(_rename(state, "mid_block.resnets.1", "middle_block.2", _UNET_RESNET))
    for i, block in enumerate(unet.up_blocks):
        has_attention = bool(getattr(block, "attentions", None))
        for j in range(len(block.resnets)):
            slot = i * (per_block + 1) + j
            ldm.update(_rename(state, f"up_blocks.{i}.resnets.{j}", f"output_blocks.{slot}.0", _UNET_RESNET))
            ldm.update(_rename(state, f"up_blocks.{i}.attentions.{j}", f"output_blocks.{slot}.1"))
        slot = i * (per_block + 1) + per_block
        upsample = 2 if has_attention else 1
        ldm.update(_rename(state, f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{slot}.{upsample}.conv"))
    _check_complete(state, ldm, "UNet")
    return ldm


_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_to_ldm(vae: torch.nn.Module) -> dict:
    state = vae.state_dict()
    ldm = {}
    for name in ("quant_conv", "post_quant_conv"):
        ldm.update(_rename(state, name, name))
    blocks = len(vae.config.block_out_channels)
    for part in ("encoder", "decoder"):
        for name, new in (("conv_in", "conv_in"), ("conv_out", "conv_out"), ("conv_norm_out", "norm_out")):
            ldm.update(_rename(state, f"{part}.{name}", f"{part}.{new}"))
        for n in range(2):
            ldm.update(_rename(state, f"{part}.mid_block.resnets.{n}", f"{part}.mid.block_{n + 1}", _VAE_RESNET))
        attention = _rename(state, f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTENTION)
        # LDM's VAE attention uses 1x1 convolutions where diffusers uses linear layers.
        ldm.update({k: v[:, :, None, None] if v.dim() == 2 else v for k, v in attention.items()})
    for i in range(blocks):
        ldm.update(_rename(state, f"encoder.down_blocks.{i}.resnets", f"encoder.down.{i}.block", _VAE_RESNET))
        ldm.update(_rename(state, f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv"))
        # The decoder's up blocks are numbered from the bottom in LDM.
        up = blocks - 1 - i
        ldm.update(_rename(state, f"decoder.up_blocks.{i}.resnets", f"decoder.up.{up}.block", _VAE_RESNET))
        ldm.update(_rename(state, f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{up}.upsample.conv"))
    _check_complete(state, ldm, "VAE")
    return ldm


def _text_to_ldm(text_encoder: torch.nn.Module) -> dict:
    # LDM keeps the transformers CLIPTextModel layout under text_model. (newer transformers drop that level).
    return {
        key if key.startswith("text_model.") else f"text_model.{key}": v for key, v in text_encoder.state_dict().items()
    }


_OPEN_CLIP_BLOCK = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def _text_to_open_clip(text_encoder: torch.nn.Module) -> dict:
    """OpenCLIP's text-transformer layout (SD 2.x): q/k/v fused into one ``in_proj`` per residual block."""
    import torch

    state = {key.removeprefix("text_model."): value for key, value in text_encoder.state_dict().items()}
    fused = {key for key in state if any(f".self_attn.{p}_proj." in key for p in "qkv")}
    unfused = {key: value for key, value in state.items() if key not in fused}
    ldm = {
        "token_embedding.weight": state["embeddings.token_embedding.weight"],
        "positional_embedding": state["embeddings.position_embedding.weight"],
        **_rename(unfused, "final_layer_norm", "ln_final"),
    }
    for n in range(text_encoder.config.num_hidden_layers):
        layer, block = f"encoder.layers.{n}", f"transformer.resblocks.{n}"
        ldm.update(_rename(unfused, layer, block, _OPEN_CLIP_BLOCK))
        for kind in ("weight", "bias"):
            ldm[f"{block}.attn.in_proj_{kind}"] = torch.cat(
                [state[f"{layer}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
            )
    _check_complete(state, ldm, "text encoder", merged=len(fused) - len(fused) // 3)
    return ldm


_TEXT_LAYOUTS = {
    "sd1": ("cond_stage_model.transformer.", _text_to_ldm),
    "sd2": ("cond_stage_model.model.", _text_to_open_clip),
}


def _check_complete(state: dict, converted: dict, what: str, merged: int = 0) -> None:
    """``converted`` holds every tensor of ``state`` (``merged`` fewer where several were fused into one)."""
    if len(converted) != len(state) - merged:
        raise RuntimeError(f"{what} LDM conversion covered {len(converted)} of {len(state) - merged} tensors")


def _train_merges() -> list[tuple[str, str]]:
    """Byte-level BPE merges with CLIP's ``</w>`` end-of-word marker, learnt from the built-in corpus.

    A plain BPE learner (most frequent adjacent pair first, ties broken alphabetically) rather than the
    ``tokenizers`` trainer, whose tie-breaking is not reproducible from run to run.
    """
    import itertools
    import re
    from collections import Counter

    words = Counter(re.findall(r"[a-z0-9]+|[^a-z0-9\s]+", _CORPUS.lower()))
    spelled = {(*word[:-1], word[-1] + "</w>"): count for word, count in words.items()}
    merges: list[tuple[str, str]] = []
    while len(merges) < TOKENIZER_MERGES:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in spelled.items():
            for pair in itertools.pairwise(symbols):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        spelled = {_merge(symbols, best): count for symbols, count in spelled.items()}
    return merges


def _merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged: list[str] = []
    i = 0
    while i < len(symbols):
        if symbols[i : i + 2] == pair:
            merged.append(pair[0] + pair[1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return tuple(merged)
