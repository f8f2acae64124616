"""LoRA weight files of image mode: the diffusers file, the kohya file, their metadata, and loading them back."""

from __future__ import annotations

import copy
import json
import os
import string
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_scripts
from lora_scripts.config import Config, load_config
from lora_scripts.errors import UserError
from lora_scripts.export.diffusers_format import DIFFUSERS_WEIGHT_NAME, add_image_lora, save_diffusers_lora
from lora_scripts.export.kohya import (
    KOHYA_WEIGHT_NAME,
    apply_lora_weights,
    check_keys_map,
    load_lora_file,
    save_kohya_lora,
)
from lora_scripts.export.metadata import (
    DatasetDir,
    config_hash,
    dataset_dirs,
    dataset_fingerprint,
    git_commit,
    kohya_metadata,
    tag_frequency,
)
from lora_scripts.train.logs import read_loss_csv

from conftest import REPO, kohya_metadata_of

LORA = SimpleNamespace(lora_rank=4, lora_alpha=6, lora_dropout=0.0, conv_lora_rank=2)


def tiny_pipeline(folder: Path):
    """A random-weight SD 1.x pipeline small enough for CPU tests; tokenizer from a locally written vocab."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    chars = string.ascii_lowercase + string.digits
    vocab = {token: i for i, token in enumerate([*chars, *(c + "</w>" for c in chars)])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=8,
    )
    n = len(vocab)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=n,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            bos_token_id=n - 2,
            eos_token_id=n - 1,
            pad_token_id=n - 1,
        )
    )
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, clip_sample=False
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    images = pipe("a cat", num_inference_steps=2, generator=generator, height=16, width=16, output_type="pt").images
    return images


def unet_and_te_output(unet, text_encoder) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    tokens = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        hidden = text_encoder(tokens)[0]
        return unet(sample, 10, encoder_hidden_states=hidden).sample, hidden


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    """The base pipeline with UNet (attention + LoCon) and text-encoder LoRA set to random non-zero weights,
    and both weight files written into one output folder."""
    pipe = copy.deepcopy(base)
    add_image_lora(pipe.unet, pipe.text_encoder, LORA)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in [*pipe.unet.named_parameters(), *pipe.text_encoder.named_parameters()]:
            if ".lora_" in name:
                param.normal_(0, 0.3)
    out = tmp_path_factory.mktemp("output")
    values = {"train_data_dir": "data", "base_model": "mock", "output_dir": "out", **vars(LORA)}
    config = Config(values, out / "c.yaml")
    metadata = kohya_metadata(
        config,
        step=5,
        epoch=1,
        num_epochs=3,
        base_model="mock-sd",
        dataset_fingerprint="f" * 64,
        dataset_dirs={"data": DatasetDir(1, ["cat, red", "cat"])},
        v2=False,
        v_prediction=False,
    )
    return SimpleNamespace(
        pipe=pipe,
        out=out,
        diffusers_file=save_diffusers_lora(out, pipe.unet, pipe.text_encoder),
        kohya_file=save_kohya_lora(out, pipe.unet, pipe.text_encoder, metadata),
        image=render(pipe),
        base_image=render(base),
        outputs=unet_and_te_output(pipe.unet, pipe.text_encoder),
    )


def fresh(base, **lora):
    """A copy of the base pipeline with freshly initialised LoRA layers (``lora`` overrides LORA)."""
    pipe = copy.deepcopy(base)
    add_image_lora(pipe.unet, pipe.text_encoder, SimpleNamespace(**{**vars(LORA), **lora}))
    return pipe


def test_both_files_written_into_output_dir(trained):
    assert trained.diffusers_file == trained.out / DIFFUSERS_WEIGHT_NAME
    assert trained.kohya_file == trained.out / KOHYA_WEIGHT_NAME
    assert sorted(p.name for p in trained.out.iterdir()) == sorted([DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME])


def test_diffusers_file_loads_into_pipeline(base, trained):
    assert (trained.image - trained.base_image).abs().max() > 1e-3  # the LoRA changes the output
    pipe = copy.deepcopy(base)
    pipe.load_lora_weights(trained.out)  # the folder, as users do; it also holds the kohya file
    torch.testing.assert_close(render(pipe), trained.image, atol=1e-5, rtol=1e-4)


def test_diffusers_kohya_loader_gives_same_output(base, trained):
    pipe = copy.deepcopy(base)
    pipe.load_lora_weights(str(trained.kohya_file))
    torch.testing.assert_close(render(pipe), trained.image, atol=1e-5, rtol=1e-4)


def test_kohya_keys_use_sd1_layout(base, trained):
    state = load_file(trained.kohya_file)
    q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    to_q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert state[f"{q}.lora_down.weight"].shape == (4, 32)
    assert state[f"{to_q}.lora_up.weight"].shape == (32, 4)
    assert state[f"{to_q}.alpha"].item() == 6
    assert state[f"{conv}.lora_down.weight"].shape == (2, 32, 3, 3)  # LoCon keeps the conv shape
    assert state[f"{conv}.lora_up.weight"].shape == (32, 2, 1, 1)
    assert state[f"{conv}.alpha"].item() == 2
    names = {key.split(".")[0] for key in state}
    for name in names:
        assert name.startswith(("lora_unet_", "lora_te_"))
        assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= state.keys()
    check_keys_map(state, base.unet, base.text_encoder)  # every key lands on the plain base model


def test_check_keys_map_rejects_forged_and_misshapen_keys(base, trained):
    state = load_file(trained.kohya_file)
    forged = "lora_unet_down_blocks_7_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
    state[forged] = torch.zeros(4, 32)
    misshapen = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k.lora_down.weight"
    state[misshapen] = torch.zeros(4, 31)
    with pytest.raises(UserError) as err:
        check_keys_map(state, base.unet, base.text_encoder, source="x.safetensors")
    message = str(err.value)
    assert message.startswith("x.safetensors: 2 key(s)")
    assert forged in message and misshapen in message and "\n" not in message
    te_key = next(key for key in state if key.startswith("lora_te_"))
    with pytest.raises(UserError, match=te_key):
        check_keys_map({te_key: state[te_key]}, base.unet, None)


@pytest.mark.parametrize("which", ["kohya_file", "diffusers_file", "out"])
def test_loaded_file_reproduces_trained_outputs(base, trained, which):
    pipe = fresh(base, lora_alpha=8)  # a different alpha: the loader rescales so the update is the same
    before = unet_and_te_output(pipe.unet, pipe.text_encoder)
    path = getattr(trained, which)
    weights = load_lora_file(path)
    assert weights.rank == 4
    apply_lora_weights(pipe.unet, pipe.text_encoder, weights, path)
    after = unet_and_te_output(pipe.unet, pipe.text_encoder)
    assert (before[0] - trained.outputs[0]).abs().max() > 1e-3
    for got, want in zip(after, trained.outputs, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_external_kohya_file_fp16_without_alpha(base, trained, tmp_path):
    """kohya files from elsewhere: fp16, alpha left out (meaning alpha = rank); a folder holding one file."""
    state = load_file(trained.kohya_file)
    external = {}
    for key, value in state.items():
        if key.endswith(".alpha"):
            continue
        if key.endswith("lora_up.weight"):
            name = key.split(".")[0]
            value = value * state[f"{name}.alpha"] / state[f"{name}.lora_down.weight"].shape[0]
        external[key] = value.half()
    save_file(external, str(tmp_path / "my_style_v2.safetensors"))
    pipe = fresh(base)
    apply_lora_weights(pipe.unet, pipe.text_encoder, load_lora_file(tmp_path), tmp_path)
    for got, want in zip(unet_and_te_output(pipe.unet, pipe.text_encoder), trained.outputs, strict=True):
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


def test_rank_mismatch_names_file_and_key(base, trained):
    pipe = fresh(base, lora_rank=8)
    weights = load_lora_file(trained.kohya_file)
    with pytest.raises(UserError) as err:
        apply_lora_weights(pipe.unet, pipe.text_encoder, weights, trained.kohya_file)
    message = str(err.value)
    assert str(trained.kohya_file) in message
    assert "lora_A.weight has shape (4, 32) in the file but (8, 32)" in message


def test_missing_locon_layers_are_an_error(base, trained):
    pipe = fresh(base, conv_lora_rank=0)
    with pytest.raises(
        UserError, match=r"unet\.\S+\.conv\w*\.lora_[AB]\.weight has no LoRA layer in the model being trained"
    ):
        apply_lora_weights(pipe.unet, pipe.text_encoder, load_lora_file(trained.kohya_file), trained.kohya_file)


def test_text_encoder_weights_need_train_text_encoder(base, trained):
    pipe = copy.deepcopy(base)
    add_image_lora(pipe.unet, None, LORA)
    with pytest.raises(UserError, match="train_text_encoder: true"):
        apply_lora_weights(pipe.unet, None, load_lora_file(trained.kohya_file), trained.kohya_file)


def test_not_a_lora_file(tmp_path):
    zeros = tmp_path / "zeros.safetensors"
    zeros.write_bytes(bytes(1 << 20))
    other = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, str(other))
    pickle = tmp_path / "old.ckpt"
    pickle.write_bytes(b"\x80\x04not unpickled")
    cases = [
        (zeros, "not a readable safetensors file"),
        (other, "not a LoRA file of a known layout"),
        (pickle, "not a .safetensors file"),
        (tmp_path / "missing.safetensors", "not found"),
        (tmp_path, "found 2 .safetensors files"),
    ]
    for path, reason in cases:
        with pytest.raises(UserError, match=reason) as err:
            load_lora_file(path)
        assert str(err.value).startswith(str(path))


def test_metadata_in_header_all_strings(trained):
    header = kohya_metadata_of(trained.out)
    assert all(isinstance(value, str) for value in header.values())
    assert header["ss_network_dim"] == "4"
    assert header["ss_network_alpha"] == "6"
    assert header["ss_steps"] == "5"
    assert (header["ss_epoch"], header["ss_num_epochs"]) == ("1", "3")
    assert header["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert json.loads(header["ss_tag_frequency"]) == {"data": {"cat": 2, "red": 1}}
    assert header["lora_scripts.dataset_fingerprint"] == "f" * 64
    assert len(header["lora_scripts.config_hash"]) == 64


def test_config_hash_follows_values(tmp_path):
    config = Config({"train_data_dir": "d", "base_model": "m", "output_dir": "o"}, tmp_path / "c.yaml")
    assert config_hash(config) == config_hash(config.replace())
    assert config_hash(config) != config_hash(config.replace(lora_rank=16))


def test_dataset_fingerprint_and_tag_frequency(tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(b"x")
    first = dataset_fingerprint([(image, "cat, red")])
    assert first == dataset_fingerprint([(image, "cat, red")])
    assert first != dataset_fingerprint([(image, "cat, blue")])
    image.write_bytes(b"xy")
    assert first != dataset_fingerprint([(image, "cat, red")])
    assert tag_frequency(["cat, red", " cat ,cat", "dog"]) == {"cat": 2, "red": 1, "dog": 1}


@pytest.mark.parametrize(
    ("v2", "v_prediction", "version", "architecture", "prediction"),
    [
        (False, False, "sd_v1", "stable-diffusion-v1/lora", "epsilon"),
        (True, False, "sd_v2", "stable-diffusion-v2-512/lora", "epsilon"),
        (True, True, "sd_v2_v", "stable-diffusion-v2-768-v/lora", "v"),
    ],
)
def test_metadata_names_the_base_model_family(
    tmp_path: Path, v2: bool, v_prediction: bool, version: str, architecture: str, prediction: str
) -> None:
    """The keys A1111 / kohya tools read to tell SD 1.x from SD 2.x LoRAs, and epsilon from v-prediction."""
    config = Config({"train_data_dir": "data", "base_model": "mock", "output_dir": "out"}, tmp_path / "c.yaml")
    header = kohya_metadata(
        config,
        step=1,
        epoch=1,
        num_epochs=1,
        base_model="m",
        dataset_fingerprint="",
        dataset_dirs={},
        v2=v2,
        v_prediction=v_prediction,
    )
    assert header["ss_base_model_version"] == version
    assert header["ss_v2"] == str(v2)
    assert header["ss_v_parameterization"] == str(v_prediction)
    assert header["modelspec.architecture"] == architecture
    assert header["modelspec.prediction_type"] == prediction


def test_save_refuses_a_key_that_maps_nowhere(base, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A key conversion gone wrong is caught at save time: a clear error naming the file and key, and no file."""
    from lora_scripts.export import kohya

    forged = "lora_unet_down_blocks_7_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
    convert = kohya.to_kohya

    def with_forged_key(*args: object) -> dict[str, torch.Tensor]:
        return {**convert(*args), forged: torch.zeros(4, 32)}

    monkeypatch.setattr(kohya, "to_kohya", with_forged_key)
    pipe = fresh(base)
    with pytest.raises(UserError) as err:
        save_kohya_lora(tmp_path, pipe.unet, pipe.text_encoder, {})
    message = str(err.value)
    assert message.startswith(f"{tmp_path / KOHYA_WEIGHT_NAME}: 1 key(s) do not map onto the base model")
    assert f"{forged} (no such module in the base model)" in message
    assert list(tmp_path.iterdir()) == []


# --- the metadata of a trained file: epochs and kohya repeat folders -------------------------------------------------

REPEAT_FOLDERS = {"3_cat": ["cat, red", "cat, blue"], "1_dog": ["dog, red"]}


@pytest.fixture(scope="module")
def kohya_run(mock_sd: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """10 steps on the SD 1.x mock over kohya repeat folders plus one image at the top: 3 x 2 + 1 + 1 = 8 samples an
    epoch, so the run ends in its 2nd epoch."""
    from PIL import Image

    from lora_scripts.train.loop import train

    root = tmp_path_factory.mktemp("kohya-run")
    data = root / "pictures"
    captions = {
        f"{folder}/{index}": caption for folder, texts in REPEAT_FOLDERS.items() for index, caption in enumerate(texts)
    }
    captions["top"] = "square"
    for index, (stem, caption) in enumerate(captions.items()):
        image = data / f"{stem}.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 64), (40 * index, 200, 90)).save(image)
        image.with_suffix(".txt").write_text(caption)
    values = {
        "train_data_dir": str(data),
        "base_model": str(mock_sd),
        "output_dir": str(root / "out"),
        "resolution": 64,
        "lora_rank": 4,
        "lora_alpha": 8,
        "batch_size": 1,
        "max_train_steps": 10,
        "seed": 7,
    }
    result = train(Config(values, root / "run.yaml"), progress=False)
    header = kohya_metadata_of(result.output_dir)
    epochs = [int(row["epoch"]) for row in read_loss_csv(result.output_dir / "logs" / "loss.csv")]
    return SimpleNamespace(header=header, summary=result.summary, logged_epochs=epochs, data=data, values=values)


def test_trained_file_counts_epochs_from_one(kohya_run: SimpleNamespace) -> None:
    assert kohya_run.summary["epochs"] == 2
    assert kohya_run.logged_epochs[-1] == 2
    assert kohya_run.header["ss_epoch"] == "2"
    assert kohya_run.header["ss_num_epochs"] == "2"  # what max_train_steps makes of the default epochs: 1
    assert kohya_run.header["ss_steps"] == "10"


def test_trained_file_lists_each_repeat_folder(kohya_run: SimpleNamespace) -> None:
    top = kohya_run.data.name
    assert json.loads(kohya_run.header["ss_dataset_dirs"]) == {
        "3_cat": {"n_repeats": 3, "img_count": 2},
        "1_dog": {"n_repeats": 1, "img_count": 1},
        top: {"n_repeats": 1, "img_count": 1},
    }
    assert json.loads(kohya_run.header["ss_tag_frequency"]) == {
        "3_cat": {"cat": 2, "red": 1, "blue": 1},
        "1_dog": {"dog": 1, "red": 1},
        top: {"square": 1},
    }


def test_trained_sd1_file_is_labelled_sd1_epsilon(kohya_run: SimpleNamespace) -> None:
    header = kohya_run.header
    assert (header["ss_base_model_version"], header["ss_v2"], header["ss_v_parameterization"]) == (
        "sd_v1",
        "False",
        "False",
    )
    assert header["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert header["modelspec.prediction_type"] == "epsilon"


def test_trained_file_names_its_inputs(kohya_run: SimpleNamespace) -> None:
    """Base model, resolution, LoRA shape and step budget as the config gave them; the version that trained it."""
    header, values = kohya_run.header, kohya_run.values
    assert header["ss_sd_model_name"] == Path(values["base_model"]).name == "mock-sd"
    assert header["lora_scripts.base_model"] == values["base_model"]
    assert header["ss_resolution"] == "(64, 64)"
    assert header["modelspec.resolution"] == "64x64"
    assert (header["ss_network_dim"], header["ss_network_alpha"]) == ("4", "8")
    assert header["ss_max_train_steps"] == "10"
    assert header["lora_scripts.version"] == lora_scripts.__version__
    assert header["lora_scripts.git_commit"] == git_commit()
    if (REPO / ".git").exists() and Path(lora_scripts.__file__).resolve().parent == REPO / "lora_scripts":
        assert header["lora_scripts.git_commit"] == _git(REPO, "rev-parse", "HEAD")  # run from this checkout


def test_trained_file_config_hash_identifies_the_config(
    kohya_run: SimpleNamespace, write_config: Callable[..., Path]
) -> None:
    """The same settings in another file (keys reordered, a default spelt out) give the header's hash; one
    changed setting does not."""
    reordered = dict(reversed(kohya_run.values.items()))
    same = load_config(write_config("same", **reordered, epochs=1, lora_dropout=0.0))
    assert config_hash(same) == kohya_run.header["lora_scripts.config_hash"]
    other = load_config(write_config("other", **{**reordered, "seed": 8}))
    assert config_hash(other) != kohya_run.header["lora_scripts.config_hash"]


def test_dataset_dirs_outside_any_subfolder(tmp_path: Path) -> None:
    from lora_scripts.data.images import ImageExample

    examples = [
        ImageExample(tmp_path / "data" / "a.png", "a", 1, (64, 64)),
        ImageExample(tmp_path / "data" / "5_x" / "deep" / "b.png", "b", 5, (64, 64)),
        ImageExample(tmp_path / "elsewhere" / "c.png", "c", 1, (64, 64)),
    ]
    dirs = dataset_dirs(examples, tmp_path / "data")
    assert dirs == {"data": DatasetDir(1, ["a", "c"]), "5_x": DatasetDir(5, ["b"])}


# --- the git commit in the header ------------------------------------------------------------------------------------


def _git(folder: Path, *args: str) -> str:
    import subprocess

    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    done = subprocess.run(
        ["git", *args], cwd=folder, capture_output=True, text=True, check=True, env={**os.environ, **env}
    )
    return done.stdout.strip()


def _repository(root: Path, project: str, package: str) -> Path:
    """A git repository at ``root`` whose pyproject.toml names ``project``, holding a package folder at ``package``;
    returns the package folder."""
    folder = root / package
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text("")
    (root / "pyproject.toml").write_text(f'[project]\nname = "{project}"\nversion = "1"\n')
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "init")
    return folder


def test_git_commit_of_a_lora_scripts_checkout(tmp_path: Path) -> None:
    package = _repository(tmp_path / "lora-scripts", "lora-scripts", "lora_scripts")
    assert git_commit(package) == _git(package.parent, "rev-parse", "HEAD")


@pytest.mark.parametrize(
    ("project", "package"),
    [
        ("someone-elses-app", ".venv/lib/python3.11/site-packages/lora_scripts"),  # installed in a venv in their repo
        ("someone-elses-app", "lora_scripts"),
        ("lora-scripts", ".venv/lib/python3.11/site-packages/lora_scripts"),  # installed, not the checkout's own code
    ],
)
def test_no_git_commit_for_an_installed_copy(tmp_path: Path, project: str, package: str) -> None:
    assert git_commit(_repository(tmp_path / "repo", project, package)) == ""
