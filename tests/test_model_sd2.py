"""SD 2.x single files: the OpenCLIP text-encoder layout end to end (tiny mock), the shipped SD 2.x configs against a
full-size SD 2.x header (shapes only), 768-v / 512-base selection, and the missing CLIP vocabulary error; the shipped
SD 1.x configs against diffusers' conversion of the original v1-inference.yaml."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lora_scripts.errors import UserError
from lora_scripts.model import stable_diffusion
from lora_scripts.model.mock_sd import SINGLE_FILE, build_mock_sd, to_ldm_state_dict
from lora_scripts.model.stable_diffusion import SDComponents, build_pipeline, load_sd_components, single_file_config

from conftest import assert_same_weights, fake_hub_cache

OPEN_CLIP = "cond_stage_model.model."
SD2_CONTEXT_SHAPE = [320, 1024]  # input_blocks.1.1 ... attn2.to_k of every SD 2.x checkpoint


@pytest.fixture(scope="module")
def mock_sd2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "mock-sd2"
    build_mock_sd(out, size="tiny", family="sd2")
    return out


@pytest.fixture
def clip_vocab_in_hub_cache(mock_sd2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No CLIP vocabulary package; ``openai/clip-vit-large-patch14``'s merges.txt in an otherwise empty Hub cache
    (the mock's merges, so the same on every machine)."""
    from huggingface_hub import constants

    vocab = tmp_path / "clip-vocab"
    vocab.mkdir()
    (vocab / "merges.txt").write_bytes((mock_sd2 / "tokenizer" / "merges.txt").read_bytes())
    cache = fake_hub_cache(tmp_path / "hub", {"openai/clip-vit-large-patch14": vocab})
    monkeypatch.setattr(stable_diffusion, "CLIP_VOCAB_FILES", (("lora-scripts-no-such-package", "none"),))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache / "models--openai--clip-vit-large-patch14" / "snapshots" / ("0" * 40) / "merges.txt"


def _write_header_only(path: Path, shapes: dict[str, list[int]]) -> None:
    """A .safetensors file whose header lists ``shapes`` (fp16) over a sparse, all-zero data area: a real-size
    checkpoint's header at almost no disk cost (its tensors are never read by these tests)."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = 2 * int(torch.Size(shape).numel())
        header[key] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        handle.truncate(8 + len(raw) + offset)


def _context_only(path: Path, width: int = 1024) -> Path:
    _write_header_only(path, {stable_diffusion.CONTEXT_KEY: [320, width]})
    return path


def _scheduler_config(folder: Path) -> dict:
    return json.loads((folder / "scheduler" / "scheduler_config.json").read_text())


# --- the tiny SD 2.x mock, end to end through diffusers' OpenCLIP conversion --------------------------------------


def test_sd2_mock_single_file_uses_open_clip_layout(mock_sd2: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(mock_sd2 / SINGLE_FILE), framework="pt") as handle:
        shapes = {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    assert shapes[stable_diffusion.CONTEXT_KEY][-1] == 1024
    assert shapes[OPEN_CLIP + "transformer.resblocks.1.attn.in_proj_weight"] == [3 * 1024, 1024]
    assert shapes[OPEN_CLIP + "token_embedding.weight"][-1] == 1024
    assert OPEN_CLIP + "positional_embedding" in shapes
    assert not any(key.startswith("cond_stage_model.transformer.") for key in shapes)
    assert shapes["model.diffusion_model.input_blocks.1.1.proj_in.weight"] == [32, 32]  # linear, as in SD 2.x


def test_sd2_single_file_loads_the_same_weights_with_v_prediction(mock_sd2: Path) -> None:
    folder = load_sd_components(str(mock_sd2))
    single = load_sd_components(str(mock_sd2 / SINGLE_FILE))
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(single, name).state_dict(), getattr(folder, name).state_dict(), name)
    tokens = single.tokenizer("a photo of a cat", return_tensors="pt").input_ids
    assert torch.equal(single.text_encoder(tokens)[0], folder.text_encoder(tokens)[0])
    # What the trainer's DenoisingLoss reads to pick the velocity target.
    assert single.noise_scheduler.config.prediction_type == "v_prediction"
    _assert_samples(single)


def test_training_loss_follows_the_loaded_v_prediction(mock_sd2: Path) -> None:
    """The trainer's loss, on the single file's components, is not the epsilon loss of the same draws."""
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    from lora_scripts.train.image_task import DenoisingLoss

    components = load_sd_components(str(mock_sd2 / SINGLE_FILE))
    generator = torch.Generator().manual_seed(0)
    batch = {"latents": torch.randn(2, 4, 8, 8, generator=generator), "embeddings": torch.randn(2, 77, 1024)}
    config = SimpleNamespace(noise_offset=0.0, min_snr_gamma=None)

    def loss(scheduler: DDPMScheduler) -> torch.Tensor:
        components.noise_scheduler = scheduler
        torch.manual_seed(1)
        with torch.no_grad():
            return DenoisingLoss(components, config)(batch)

    v_loss = loss(components.noise_scheduler)
    epsilon = DDPMScheduler.from_config(components.noise_scheduler.config, prediction_type="epsilon")
    assert not torch.isclose(v_loss, loss(epsilon), rtol=1e-3)


@pytest.mark.parametrize(
    ("prediction_type", "version", "architecture", "kohya_prediction"),
    [
        ("v_prediction", "sd_v2_v", "stable-diffusion-v2-768-v/lora", "v"),
        ("epsilon", "sd_v2", "stable-diffusion-v2-512/lora", "epsilon"),
    ],
)
def test_trained_sd2_lora_is_labelled_sd2(
    mock_sd2: Path,
    image_config: Callable[..., Path],
    tmp_path: Path,
    prediction_type: str,
    version: str,
    architecture: str,
    kohya_prediction: str,
) -> None:
    """The kohya file of a run on an SD 2.x base says SD 2.x, with the prediction type of the model's scheduler."""
    import shutil

    from lora_scripts.config import load_config
    from lora_scripts.train.loop import train

    from conftest import kohya_metadata_of

    base = shutil.copytree(mock_sd2, tmp_path / "base", ignore=shutil.ignore_patterns(SINGLE_FILE))
    scheduler = base / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "prediction_type": prediction_type}))
    result = train(load_config(image_config("sd2", base_model=str(base), max_train_steps=2)), progress=False)
    header = kohya_metadata_of(result.output_dir)
    assert header["ss_base_model_version"] == version
    assert header["ss_v2"] == "True"
    assert header["ss_v_parameterization"] == str(prediction_type == "v_prediction")
    assert header["modelspec.architecture"] == architecture
    assert header["modelspec.prediction_type"] == kohya_prediction


def _assert_samples(components: SDComponents) -> None:
    pipe = build_pipeline(components)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a gray square", num_inference_steps=2, height=32, width=32, output_type="pt").images
    assert image.shape == (1, 3, 32, 32)
    assert torch.isfinite(image).all()


# --- the shipped SD 2.x configs against a full-size SD 2.x header ---------------------------------------------------


@pytest.fixture(scope="module")
def full_size_sd2_shapes() -> dict[str, list[int]]:
    """The tensor shapes of a real SD 2.x 768-v single file: the shipped sd2-v models built on the meta device
    (no memory), written in the LDM / OpenCLIP layout, plus what real files carry and diffusers skips (OpenCLIP's
    24th block, the text projection and logit scale)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = stable_diffusion.CONFIGS / "sd2-v"
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(configs / "text_encoder"))
    shapes = {key: list(value.shape) for key, value in to_ldm_state_dict(unet, vae, text_encoder, "sd2").items()}
    last = OPEN_CLIP + "transformer.resblocks.22."
    shapes.update({key.replace(".22.", ".23."): shape for key, shape in shapes.items() if key.startswith(last)})
    shapes.update({OPEN_CLIP + "text_projection": [1024, 1024], OPEN_CLIP + "logit_scale": []})
    return shapes


def test_full_size_layout_matches_real_sd2_files(full_size_sd2_shapes: dict[str, list[int]]) -> None:
    # Shapes as in Stability AI's v2-1_768-ema-pruned.safetensors.
    known = {
        stable_diffusion.CONTEXT_KEY: SD2_CONTEXT_SHAPE,
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": [320, 320],
        "model.diffusion_model.middle_block.1.proj_out.weight": [1280, 1280],
        "model.diffusion_model.out.2.weight": [4, 320, 3, 3],
        "first_stage_model.encoder.mid.attn_1.q.weight": [512, 512, 1, 1],
        "first_stage_model.decoder.up.3.block.0.conv1.weight": [512, 512, 3, 3],
        OPEN_CLIP + "token_embedding.weight": [49408, 1024],
        OPEN_CLIP + "positional_embedding": [77, 1024],
        OPEN_CLIP + "transformer.resblocks.0.attn.in_proj_weight": [3072, 1024],
        OPEN_CLIP + "transformer.resblocks.0.mlp.c_fc.weight": [4096, 1024],
        OPEN_CLIP + "ln_final.weight": [1024],
    }
    assert {key: full_size_sd2_shapes.get(key) for key in known} == known
    assert sum(key.endswith(".attn.in_proj_weight") for key in full_size_sd2_shapes) == 24


def test_shipped_sd2_configs_take_a_full_size_sd2_file(
    full_size_sd2_shapes: dict[str, list[int]], clip_vocab_in_hub_cache: Path, tmp_path: Path
) -> None:
    """A real-size SD 2.x header (no embedded configs) gets the shipped sd2-v configs, and diffusers' own single-file
    converters turn its tensors into exactly the parameters (names and shapes) of the models those configs build.
    Shapes only: a full-size load needs gigabytes, which the tiny mock test above covers at small size."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint, is_clip_model, is_open_clip_model
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = tmp_path / "v2-1_768-ema-pruned.safetensors"
    _write_header_only(path, full_size_sd2_shapes)
    checkpoint = {key: torch.empty(shape, device="meta") for key, shape in full_size_sd2_shapes.items()}
    with single_file_config(path) as folder:
        assert _scheduler_config(folder)["prediction_type"] == "v_prediction"
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        with init_empty_weights():
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
            text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    assert tokenizer.pad_token == "!"  # SD 2.x pads with "!", SD 1.x with the end token
    assert tokenizer("a photo").input_ids[0] == tokenizer.bos_token_id
    assert is_open_clip_model(checkpoint) and not is_clip_model(checkpoint)  # diffusers' text-encoder dispatch
    for model in (unet, vae):
        convert = SINGLE_FILE_LOADABLE_CLASSES[type(model).__name__]["checkpoint_mapping_fn"]
        _assert_same_shapes(convert(checkpoint=checkpoint, config=model.config), model)
    converted = convert_open_clip_checkpoint(text_encoder, checkpoint)
    _assert_same_shapes({key.removeprefix("text_model."): value for key, value in converted.items()}, text_encoder)


def _assert_same_shapes(converted: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    expected = {key: list(value.shape) for key, value in model.state_dict().items()}
    assert {key: list(value.shape) for key, value in converted.items()} == expected, type(model).__name__


# --- 768-v or 512-base -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "sidecar", "prediction_type", "sample_size"),
    [
        ("v2-1_768-ema-pruned.safetensors", None, "v_prediction", 96),
        ("v2-1_512-ema-pruned.safetensors", None, "epsilon", 64),
        ("my-sd2-base-finetune.safetensors", None, "epsilon", 64),
        ("v2-1_512-ema-pruned.safetensors", 'model:\n  params:\n    parameterization: "v"\n', "v_prediction", 96),
        ("v2-1_768-ema-pruned.safetensors", "model:\n  params:\n    linear_start: 0.00085\n", "epsilon", 64),
    ],
)
def test_sd2_variant_from_sidecar_yaml_or_file_name(
    clip_vocab_in_hub_cache: Path,
    tmp_path: Path,
    name: str,
    sidecar: str | None,
    prediction_type: str,
    sample_size: int,
) -> None:
    path = _context_only(tmp_path / name)
    if sidecar is not None:
        path.with_suffix(".yaml").write_text(sidecar)
    with single_file_config(path) as folder:
        assert _scheduler_config(folder)["prediction_type"] == prediction_type
        unet = json.loads((folder / "unet" / "config.json").read_text())
    assert unet["sample_size"] == sample_size
    assert unet["cross_attention_dim"] == 1024


def test_sd1_width_gets_sd1_configs(clip_vocab_in_hub_cache: Path, tmp_path: Path) -> None:
    path = _context_only(tmp_path / "v2-looking-name.safetensors", width=768)
    with single_file_config(path) as folder:
        assert _scheduler_config(folder)["prediction_type"] == "epsilon"
        assert json.loads((folder / "unet" / "config.json").read_text())["cross_attention_dim"] == 768


@pytest.mark.parametrize("text", ["just a string\n", "model: [1, 2]\n", "model: {params: \n"])
def test_sidecar_that_is_not_an_ldm_config_is_named(tmp_path: Path, text: str) -> None:
    path = _context_only(tmp_path / "v2-1_768-ema-pruned.safetensors")
    path.with_suffix(".yaml").write_text(text)
    with pytest.raises(UserError, match=r"model\.params") as info, single_file_config(path):
        pass
    assert str(path.with_suffix(".yaml")) in str(info.value)


# --- the CLIP vocabulary -------------------------------------------------------------------------------------------


def _no_clip_vocab(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(stable_diffusion, "CLIP_VOCAB_FILES", (("lora-scripts-no-such-package", "none"),))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))


def test_missing_clip_vocab_names_both_ways_to_get_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _no_clip_vocab(monkeypatch, tmp_path)
    path = _context_only(tmp_path / "v2-1_768-ema-pruned.safetensors")
    with pytest.raises(UserError, match="CLIP tokenizer vocabulary") as info:
        load_sd_components(str(path))
    message = str(info.value)
    assert str(path) in message
    assert "pip install --no-deps open_clip_torch" in message
    assert "'hf download openai/clip-vit-large-patch14 merges.txt'" in message
    assert "\n" not in message


def test_vocab_from_hub_cache_is_used_without_the_package(clip_vocab_in_hub_cache: Path, tmp_path: Path) -> None:
    path = _context_only(tmp_path / "v2-1_768-ema-pruned.safetensors")
    with single_file_config(path) as folder:
        merges = (folder / "tokenizer" / "merges.txt").read_text().splitlines()[1:]
    assert merges == clip_vocab_in_hub_cache.read_text().splitlines()[1:]


def test_clip_vocab_from_the_installed_open_clip_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The real BPE file of open_clip_torch (no Hub cache to fall back on) gives CLIP's own token ids."""
    from importlib import metadata

    from huggingface_hub import constants
    from transformers import CLIPTokenizer

    try:
        metadata.distribution("open_clip_torch")
    except metadata.PackageNotFoundError:
        pytest.skip("open_clip_torch is not installed, so there is no real CLIP vocabulary file to read")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    path = _context_only(tmp_path / "v2-1_768-ema-pruned.safetensors")
    with single_file_config(path) as folder:
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


# The parts of CompVis' configs/stable-diffusion/v1-inference.yaml that decide the diffusers configs of an SD 1.x file.
V1_INFERENCE = {
    "model": {
        "params": {
            "linear_start": 0.00085,
            "linear_end": 0.0120,
            "timesteps": 1000,
            "scale_factor": 0.18215,
            "unet_config": {
                "params": {
                    "in_channels": 4,
                    "out_channels": 4,
                    "model_channels": 320,
                    "attention_resolutions": [4, 2, 1],
                    "num_res_blocks": 2,
                    "channel_mult": [1, 2, 4, 4],
                    "num_heads": 8,
                    "transformer_depth": 1,
                    "context_dim": 768,
                }
            },
            "first_stage_config": {
                "params": {
                    "ddconfig": {
                        "z_channels": 4,
                        "in_channels": 3,
                        "out_ch": 3,
                        "ch": 128,
                        "ch_mult": [1, 2, 4, 4],
                        "num_res_blocks": 2,
                    }
                }
            },
        }
    }
}


def test_shipped_sd1_configs_are_what_diffusers_derives_from_v1_inference_yaml(
    clip_vocab_in_hub_cache: Path, tmp_path: Path
) -> None:
    """What the shapes of a checkpoint cannot show (head count, noise schedule, VAE scaling, sample size) matches
    diffusers' own conversion of the original SD 1.x config, as from_single_file would do with that yaml."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )
    from transformers import CLIPTextConfig

    checkpoint = {stable_diffusion.CONTEXT_KEY: torch.empty(320, 768, device="meta")}
    with single_file_config(_context_only(tmp_path / "v1-5-pruned.safetensors", width=768)) as folder:
        with init_empty_weights():
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
        text = CLIPTextConfig.from_pretrained(folder / "text_encoder")
    for model, derived in (
        (unet, create_unet_diffusers_config_from_ldm(V1_INFERENCE, checkpoint)),
        (vae, create_vae_diffusers_config_from_ldm(V1_INFERENCE, checkpoint)),
    ):
        shipped = {key: model.config[key] for key in derived}
        assert shipped == derived
    params = V1_INFERENCE["model"]["params"]
    assert (scheduler.config.beta_start, scheduler.config.beta_end) == (params["linear_start"], params["linear_end"])
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.prediction_type == "epsilon"
    assert scheduler.config.num_train_timesteps == params["timesteps"]
    # FrozenCLIPEmbedder: the text model of openai/clip-vit-large-patch14.
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.hidden_act) == (
        768,
        12,
        12,
        "quick_gelu",
    )
