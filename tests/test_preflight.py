"""`lora-scripts preflight`: the memory estimate against measured CPU memory, the verdict, --measure."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lora_scripts import preflight
from lora_scripts.cli import main as cli
from lora_scripts.config import Config

TOLERANCE = 0.25  # estimate vs measured activation memory, relative
UNET = {
    "sample_size": 32,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}

# Runs one forward+backward of the real model in a fresh process and prints the growth of its peak RSS.
# Large allocations are mmap'd (MALLOC_MMAP_THRESHOLD_) so that freed memory leaves RSS at once.
MEASURE = """
import json, sys, torch
from pathlib import Path
from lora_scripts.config import Config
mode, folder, batch, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
values = {"train_data_dir": "d", "base_model": folder, "output_dir": "o", "mode": mode}
config = Config(values, Path(folder) / "c.yaml")
torch.manual_seed(0)
if mode == "image":
    from diffusers import UNet2DConditionModel
    from lora_scripts.export.diffusers_format import add_image_lora
    model = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
    model.requires_grad_(False)
    add_image_lora(model, None, config)
    latents = torch.randn(batch, 4, size // 8, size // 8)
    inputs = (latents, torch.randint(0, 1000, (batch,)), torch.randn(batch, 77, 32))
    run = lambda: torch.nn.functional.mse_loss(model(*inputs).sample, latents)
else:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(folder), LoraConfig(r=8, target_modules="all-linear"))
    ids = torch.randint(0, 500, (batch, size))
    run = lambda: model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
run().backward()  # warm-up: one-time allocations
model.zero_grad(set_to_none=True)
def status(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field))
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
run().backward()
print(json.dumps(status("VmHWM") - before))
"""


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Stable Diffusion folder with configs only (the estimate needs no weights)."""
    folder = tmp_path_factory.mktemp("sd")
    vae = {
        "_class_name": "AutoencoderKL",
        "block_out_channels": [8, 8, 16, 16],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "latent_channels": 4,
        "norm_num_groups": 8,
    }
    text = {
        "model_type": "clip_text_model",
        "architectures": ["CLIPTextModel"],
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "vocab_size": 1000,
        "bos_token_id": 0,
        "eos_token_id": 2,
    }
    for name, values in {
        "unet": {"_class_name": "UNet2DConditionModel", **UNET},
        "vae": vae,
        "text_encoder": text,
    }.items():
        (folder / name).mkdir()
        (folder / name / "config.json").write_text(json.dumps(values))
    (folder / "model_index.json").write_text("{}")
    return folder


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lora_scripts.model.mock_lm import build_mock_causal_lm

    folder = tmp_path_factory.mktemp("lm") / "model"
    build_mock_causal_lm(folder)
    return folder


def config_for(folder: Path, **values: object) -> Config:
    return Config(
        {"train_data_dir": "data", "base_model": str(folder), "output_dir": "out", **values}, folder / "c.yaml"
    )


def measured_activations(mode: str, folder: Path, batch: int, size: int) -> int:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    command = [sys.executable, "-c", MEASURE, mode, str(folder), str(batch), str(size)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True, timeout=300)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS reset needs Linux /proc")
@pytest.mark.parametrize(
    ("mode", "batch", "size", "values"),
    [("image", 4, 512, {"resolution": 512}), ("text", 8, 1024, {"mode": "text", "target_modules": "all-linear"})],
)
def test_activation_estimate_matches_measured_cpu_peak(
    sd_folder: Path, lm_folder: Path, mode: str, batch: int, size: int, values: dict
) -> None:
    folder = sd_folder if mode == "image" else lm_folder
    config = config_for(folder, batch_size=batch, max_seq_length=size, **values)
    est = preflight.estimate(config, on_gpu=False)
    measured = measured_activations(mode, folder, batch, size)
    assert measured > 50 * 2**20, "the measured step must be large enough to rise above allocator noise"
    assert abs(est.activations(batch) - measured) <= TOLERANCE * measured, (est.activations(batch), measured)


def test_parts_follow_the_config(sd_folder: Path) -> None:
    base = preflight.estimate(config_for(sd_folder, resolution=256), on_gpu=False)
    half = preflight.estimate(config_for(sd_folder, resolution=256, mixed_precision="bf16"), on_gpu=False)
    assert half.weight_bytes * 2 == base.weight_bytes
    sgd = preflight.estimate(config_for(sd_folder, resolution=256, optimizer="SGD"), on_gpu=False)
    assert base.lora_bytes - sgd.lora_bytes == 4 * base.lora_params  # AdamW keeps one more fp32 state
    bigger = preflight.estimate(config_for(sd_folder, resolution=256, lora_rank=16), on_gpu=False)
    assert bigger.lora_params == 2 * base.lora_params
    checkpointed = preflight.estimate(config_for(sd_folder, resolution=256, gradient_checkpointing=True), False)
    assert checkpointed.activations(4) < base.activations(4)
    larger = preflight.estimate(config_for(sd_folder, resolution=512), on_gpu=False)
    assert 3 < larger.activation_per_sample / base.activation_per_sample < 5  # 4x the pixels


def test_verdict_and_largest_batch(sd_folder: Path, monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"train_data_dir: data\nbase_model: {sd_folder}\noutput_dir: out\nresolution: 256\nbatch_size: 8\n")
    est = preflight.estimate(config_for(sd_folder, resolution=256, batch_size=8), on_gpu=False)
    free = est.total(3) + est.activation_per_sample // 2
    monkeypatch.setattr(preflight, "find_device", lambda: preflight.Device("cpu", "test CPU", free))
    assert cli(["preflight", "--config", str(path), "--measure", "2"]) == 1
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "largest batch_size that fits: 3" in out and "CPU run" in out
    assert "--measure 2: skipped, the config does not fit" in out
    resolution = int(re.search(r"largest resolution that fits at batch_size 8: (\d+)", out).group(1))
    assert resolution < 256 and resolution % 64 == 0
    assert est.largest_batch(free, (resolution / 256) ** 2) >= 8  # it fits ...
    assert est.largest_batch(free, ((resolution + 64) / 256) ** 2) < 8  # ... and the next size up does not
    monkeypatch.setattr(preflight, "find_device", lambda: preflight.Device("cpu", "test CPU", est.total(8)))
    assert cli(["preflight", "--config", str(path)]) == 0
    assert "verdict: fits" in capsys.readouterr().out


def test_missing_base_model_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train_data_dir: data\nbase_model: someone/not-cached-sd\noutput_dir: out\n")
    assert cli(["preflight", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "base_model" in err and "hf download someone/not-cached-sd" in err


def test_measure_runs_real_steps_and_prints_an_eta(lm_folder: Path, tmp_path: Path, capsys) -> None:
    from lora_scripts.data.text import read_records, write_dummy_text

    write_dummy_text(tmp_path / "data", count=8)
    path = tmp_path / "c.yaml"
    path.write_text(f"mode: text\ntrain_data_dir: data\nbase_model: {lm_folder}\noutput_dir: out\nmax_seq_length: 64\n")
    assert cli(["preflight", "--config", str(path), "--measure", "2"]) == 0
    out = capsys.readouterr().out
    records = len(read_records(tmp_path / "data"))  # batch_size 1, one epoch: one step per record
    assert "measured over 2 step(s) on cpu" in out and f"for {records} steps" in out and "CPU run" in out
    assert not (tmp_path / "out").exists()  # the trial run writes into a scratch folder only


def test_single_file_estimate_equals_the_folder_estimate(mock_sd: Path) -> None:
    single = mock_sd / "mock-sd.safetensors"
    values = {"resolution": 64, "batch_size": 2, "train_text_encoder": True}
    from_file = preflight.estimate(config_for(single, **values), on_gpu=False)
    from_folder = preflight.estimate(config_for(mock_sd, **values), on_gpu=False)
    assert from_file == from_folder
    assert from_file.weight_params > 0 and from_file.lora_params > 0


def sd1_header_only(path: Path) -> Path:
    """A .safetensors file with only the tensor the loader tells SD 1.x by (cross-attention width 768)."""
    import torch
    from safetensors.torch import save_file

    from lora_scripts.model.stable_diffusion import CONTEXT_KEY

    save_file({CONTEXT_KEY: torch.zeros(320, 768, dtype=torch.float16)}, str(path))
    return path


def test_real_size_sd1_single_file_from_shipped_configs(tmp_path: Path) -> None:
    values = {"resolution": 512, "mixed_precision": "fp16", "validation_prompts": ["a cat"]}
    est = preflight.estimate(config_for(sd1_header_only(tmp_path / "sd15.safetensors"), **values), on_gpu=True)
    # SD 1.5: UNet 860M + VAE 84M + CLIP ViT-L text encoder 123M parameters, stored at 2 bytes each.
    assert 1.0e9 < est.weight_params < 1.1e9, est.weight_params
    assert est.weight_bytes == 2 * est.weight_params
    # Without samples to draw, training frees the VAE and the frozen text encoder after caching: the UNet alone.
    unet_only = preflight.estimate(
        config_for(tmp_path / "sd15.safetensors", resolution=512, mixed_precision="fp16"), True
    )
    assert 0.85e9 < unet_only.weight_params < 0.87e9, unet_only.weight_params
    assert unet_only.activations(1) == est.activations(1)
    # rank 8 (the default) on the UNet's attention projections (q, k, v, out of 32 attention layers): ~1.6M.
    assert 1.5e6 < est.lora_params < 1.7e6, est.lora_params
    # Batch 1 at 512 px in fp16 without checkpointing is known to fit in 8 GB GPUs with room to spare.
    assert 2 * 2**30 < est.total(1) < 8 * 2**30, est.total(1)


def test_missing_single_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train_data_dir: data\nbase_model: models/missing.safetensors\noutput_dir: out\n")
    assert cli(["preflight", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "not found" in err and "models/missing.safetensors" in err and "hf download" not in err


def test_text_eta_counts_packed_sequences_as_training_does(lm_folder: Path, tmp_path: Path) -> None:
    from lora_scripts.data.text import read_records, write_dummy_text
    from lora_scripts.train.loop import train

    write_dummy_text(tmp_path / "data", count=8)
    values = {"mode": "text", "max_seq_length": 64, "packing": True, "batch_size": 2, "output_dir": str(tmp_path / "o")}
    config = Config({**values, "train_data_dir": "data", "base_model": str(lm_folder)}, tmp_path / "c.yaml")
    steps = preflight.total_steps(config)
    assert steps < len(read_records(tmp_path / "data")) / 2  # packing joins the short records
    assert train(config).steps == steps


def test_require_gpu_fails_clearly_without_one(
    sd_folder: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The release job's preflight must stop rather than start a CPU run on a runner whose GPU is missing."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on CI, also where a GPU is there
    monkeypatch.setattr(preflight.shutil, "which", lambda _name: None)
    path = tmp_path / "c.yaml"
    path.write_text(f"train_data_dir: data\nbase_model: {sd_folder}\noutput_dir: out\nresolution: 64\n")
    assert cli(["preflight", "--config", str(path)]) == 0  # without the flag a CPU run is fine
    capsys.readouterr()
    assert cli(["preflight", "--config", str(path), "--require-gpu"]) == 1
    captured = capsys.readouterr()
    assert f"{path}: --require-gpu: no CUDA GPU found" in captured.err and "train on the CPU" in captured.err
    assert "verdict" not in captured.out  # it stops before estimating
