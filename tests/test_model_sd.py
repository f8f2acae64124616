"""Stable Diffusion base-model loading (folder, single file, Hub cache) and the mock SD model."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from lora_scripts.errors import UserError
from lora_scripts.model.stable_diffusion import SDComponents, build_pipeline, load_sd_components

from conftest import assert_same_weights, fake_hub_cache, run_cli


def _unet_output(components: SDComponents) -> torch.Tensor:
    unet = components.unet
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, unet.config.in_channels, 8, 8, generator=generator)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(sample, torch.tensor([500]), context).sample


@pytest.fixture(scope="module")
def from_folder(mock_sd: Path) -> SDComponents:
    return load_sd_components(str(mock_sd))


def test_folder_loads_and_samples(from_folder: SDComponents, mock_sd: Path) -> None:
    assert from_folder.source == str(mock_sd)
    assert from_folder.noise_scheduler.config.prediction_type == "epsilon"
    assert not any(p.requires_grad for p in from_folder.unet.parameters())
    targets = {name.rsplit(".", 1)[-1] for name, _ in from_folder.unet.named_modules()}
    assert {"to_q", "to_k", "to_v"} <= targets  # LoRA targets exist
    pipe = build_pipeline(from_folder)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a gray square", num_inference_steps=2, height=32, width=32, output_type="pt").images
    assert image.shape == (1, 3, 32, 32)
    assert torch.isfinite(image).all()


def test_single_file_loads_the_same_weights(from_folder: SDComponents, mock_sd: Path) -> None:
    single = load_sd_components(str(mock_sd / "mock-sd.safetensors"))
    # Equal weights; the outputs agree to rounding only, since CPU kernels take other paths for
    # buffers at other alignments (memory-mapped folder files against converted single-file tensors).
    torch.testing.assert_close(_unet_output(single), _unet_output(from_folder), rtol=1e-5, atol=1e-5)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(single, name).state_dict(), getattr(from_folder, name).state_dict(), name)
    text = "a photo of a cat, studio lighting"
    assert single.tokenizer(text).input_ids == from_folder.tokenizer(text).input_ids
    assert single.noise_scheduler.config.prediction_type == "epsilon"


def test_single_file_uses_ldm_key_layout(mock_sd: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(mock_sd / "mock-sd.safetensors"), framework="pt") as handle:
        prefixes = {key.split(".")[0] for key in handle.keys()}  # noqa: SIM118
        keys = set(handle.keys())
    assert prefixes == {"model", "first_stage_model", "cond_stage_model"}
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in keys
    assert any(key.startswith("cond_stage_model.transformer.text_model.") for key in keys)


def test_mock_model_cli_is_deterministic(mock_sd: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli-mock"
    result = run_cli("mock-model", str(out))
    assert result.returncode == 0, result.stderr
    printed = {Path(line).name for line in result.stdout.splitlines()}
    assert {"model_index.json", "mock-sd.safetensors", "diffusion_pytorch_model.safetensors"} <= printed

    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    for rel in ("unet/diffusion_pytorch_model.safetensors", "mock-sd.safetensors"):
        assert digest(out / rel) == digest(mock_sd / rel), rel
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def _unet_size(components: SDComponents) -> int:
    return sum(param.numel() for param in components.unet.parameters())


def test_mock_model_cli_small_is_a_bigger_sd_shaped_model(from_folder: SDComponents, tmp_path: Path) -> None:
    out = tmp_path / "small"
    result = run_cli("mock-model", str(out), "--size", "small")
    assert result.returncode == 0, result.stderr
    folder = load_sd_components(str(out))
    assert len(folder.unet.config.block_out_channels) == 4  # SD's four UNet levels
    assert _unet_size(folder) > 2 * _unet_size(from_folder)
    single = load_sd_components(str(out / "mock-sd.safetensors"))
    assert_same_weights(single.unet.state_dict(), folder.unet.state_dict(), "unet")


def test_v_prediction_from_folder_scheduler_config(mock_sd: Path, tmp_path: Path) -> None:
    folder = tmp_path / "v-model"
    shutil.copytree(mock_sd, folder)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "prediction_type": "v_prediction"}))
    components = load_sd_components(str(folder))
    assert components.noise_scheduler.config.prediction_type == "v_prediction"
    assert build_pipeline(components).scheduler.config.prediction_type == "v_prediction"


class _CreatesFileWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def _write_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"state_dict": _CreatesFileWhenUnpickled(marker)}, protocol=4))


def _write_torch_zip(path: Path, marker: Path) -> None:
    """A pickle in torch.save's zip layout."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"state_dict": _CreatesFileWhenUnpickled(marker)}))


@pytest.mark.parametrize(
    ("name", "write"),
    [
        ("model.ckpt", _write_pickle),
        ("renamed-pickle.safetensors", _write_pickle),
        ("renamed-zip.safetensors", _write_torch_zip),
    ],
)
def test_pickle_files_are_refused_unread(tmp_path: Path, name: str, write: Callable[[Path, Path], None]) -> None:
    marker = tmp_path / "unpickled.marker"
    path = tmp_path / name
    write(path, marker)
    with pytest.raises(UserError, match="is a pickle checkpoint") as info:
        load_sd_components(str(path))
    assert str(path) in str(info.value)
    assert ".safetensors" in str(info.value)
    assert not marker.exists()


def test_folder_with_only_pickle_weights_is_refused_unread(
    mock_sd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file

    folder = tmp_path / "bin-model"
    shutil.copytree(mock_sd, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), folder / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    loaded: list[Any] = []
    real_load = torch.load

    def recording_load(*args: Any, **kwargs: Any) -> Any:
        loaded.append(args)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    with pytest.raises(UserError, match="unet weights only as pickle files") as info:
        load_sd_components(str(folder))
    message = str(info.value)
    assert str(folder) in message and "convert them to .safetensors" in message
    assert "\n" not in message
    assert not loaded  # torch.load (an unpickler, even with weights_only=True) never ran


def _save_with_first_byte_0x80(source: Path, path: Path) -> None:
    """Save the tensors and metadata of ``source`` to ``path``, padding the metadata until the header length
    (the file's first 8 bytes, little-endian) is 128 modulo 256: its first byte is then 0x80, as a pickle's is."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        metadata = handle.metadata() or {}
    save_file(tensors, path, metadata={**metadata, "padding": ""})
    data = path.read_bytes()
    unpadded = len(data[8 : 8 + struct.unpack("<Q", data[:8])[0]].rstrip(b" "))  # safetensors pads with spaces
    save_file(tensors, path, metadata={**metadata, "padding": "x" * ((128 - unpadded) % 256)})


def test_safetensors_starting_with_byte_0x80_is_no_pickle(
    from_folder: SDComponents, mock_sd: Path, tmp_path: Path
) -> None:
    path = tmp_path / "model.safetensors"
    _save_with_first_byte_0x80(mock_sd / "mock-sd.safetensors", path)
    assert path.read_bytes()[0] == 0x80
    single = load_sd_components(str(path))
    assert_same_weights(single.unet.state_dict(), from_folder.unet.state_dict(), "unet")


def _zeros(path: Path, mock_sd: Path) -> None:
    path.write_bytes(bytes(1024 * 1024))


def _truncated(path: Path, mock_sd: Path) -> None:
    data = (mock_sd / "mock-sd.safetensors").read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _not_stable_diffusion(path: Path, mock_sd: Path) -> None:
    from safetensors.torch import save_file

    save_file({"classifier.weight": torch.zeros(4, 4)}, path)


def _sdxl(path: Path, mock_sd: Path) -> None:
    from safetensors.torch import save_file

    unet_key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    save_file({unet_key: torch.zeros(2, 2048), "conditioner.embedders.0.transformer.x": torch.zeros(1)}, path)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (_zeros, "not a .safetensors model file"),
        (_truncated, "truncated"),
        (_not_stable_diffusion, "no Stable Diffusion UNet"),
        (_sdxl, "SDXL"),
    ],
)
def test_files_that_are_not_usable_models_name_the_file(tmp_path: Path, mock_sd: Path, make, expected: str) -> None:
    path = tmp_path / "model.safetensors"
    make(path, mock_sd)
    with pytest.raises(UserError, match=expected) as info:
        load_sd_components(str(path))
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message


def test_missing_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "model.safetensors"
    with pytest.raises(UserError, match="not found") as info:
        load_sd_components(str(missing))
    assert str(missing) in str(info.value)


def test_uncached_hub_id_says_what_to_download() -> None:
    repo = "lora-scripts-tests/not-a-cached-model"
    with pytest.raises(UserError, match="not in the local Hugging Face cache") as info:
        load_sd_components(repo)
    assert f"hf download {repo}" in str(info.value)


def test_cached_hub_id_loads_its_snapshot(
    mock_sd: Path, from_folder: SDComponents, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    cache = fake_hub_cache(tmp_path / "hub", {"tester/mock-sd": mock_sd})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    cached = load_sd_components("tester/mock-sd")
    assert cached.source == "tester/mock-sd"
    assert_same_weights(cached.unet.state_dict(), from_folder.unet.state_dict(), "unet")


def test_folder_without_model_index_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"model_index\.json") as info:
        load_sd_components(str(tmp_path))
    assert str(tmp_path) in str(info.value)
