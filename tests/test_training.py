"""Training end to end on the mock models (image mode, and text mode where the loop treats it alike): outputs,
exact resume, checkpoints, signals, NaN guard, lr schedule, samples, init weights."""

from __future__ import annotations

import json
import math
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from safetensors.torch import load_file

from lora_scripts.config import Config, load_config
from lora_scripts.errors import UserError
from lora_scripts.train.checkpoint import list_checkpoints
from lora_scripts.train.logs import read_loss_csv
from lora_scripts.train.loop import TrainingStopped, train

from conftest import REPO, assert_same_weights, kohya_metadata_of, run_cli

if TYPE_CHECKING:
    from lora_scripts.train.image_task import ImageTask


def weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output_dir / "pytorch_lora_weights.safetensors"))


def kohya_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output_dir / "lora_weights.safetensors"))


def loss_rows(output_dir: Path) -> list[dict[str, str]]:
    return read_loss_csv(output_dir / "logs" / "loss.csv")


def losses(output_dir: Path) -> list[tuple[int, float]]:
    return [(int(row["step"]), float(row["loss"])) for row in loss_rows(output_dir)]


def lrs(output_dir: Path) -> list[float]:
    return [float(row["lr"]) for row in loss_rows(output_dir)]


def assert_text_encoder_trained(kohya: dict[str, torch.Tensor]) -> None:
    """Every text-encoder up weight of a kohya file moved off its zero start."""
    up = {key: t for key, t in kohya.items() if key.startswith("lora_te_") and key.endswith("lora_up.weight")}
    assert up, "no text-encoder LoRA in the kohya file"
    assert [key for key, t in up.items() if not t.any()] == [], "text-encoder LoRA layers that never trained"


@pytest.fixture
def built_image_tasks(monkeypatch: pytest.MonkeyPatch) -> list[ImageTask]:
    """The ImageTasks train() builds in this test, in order (their models stay inspectable after the run)."""
    from lora_scripts.train.image_task import ImageTask

    built: list[ImageTask] = []
    real_build = ImageTask.build

    def build(self: ImageTask, accelerator: Any) -> None:
        real_build(self, accelerator)
        built.append(self)

    monkeypatch.setattr(ImageTask, "build", build)
    return built


def test_train_writes_every_output(image_config: Callable[..., Path]) -> None:
    path = image_config(
        validation_prompts=["a red circle"], sample_inference_steps=2, save_steps=3, logging_dir="tensorboard"
    )
    result = run_cli("train", "--config", str(path))
    assert result.returncode == 0, result.stderr
    out = load_config(path).path("output_dir")
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "lora_weights.safetensors").is_file()
    assert [step for step, _ in losses(out)] == [1, 2, 3, 4]
    assert all(math.isfinite(loss) for _, loss in losses(out))
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "samples").glob("*.png"))
    # TensorBoard (logging_dir, relative to the config) has each step's loss and lr, as in loss.csv;
    # step 4, after the last checkpoint, is written as the run closes
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(path.parent / "tensorboard"))
    events.Reload()
    for tag, column in (("train/loss", [loss for _, loss in losses(out)]), ("train/lr", lrs(out))):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [1, 2, 3, 4], tag
        assert [s.value for s in scalars] == pytest.approx(column, rel=1e-5), tag
    rows = loss_rows(out)
    assert list(rows[0]) == ["step", "epoch", "loss", "lr", "elapsed"]
    assert [row["epoch"] for row in rows] == ["1"] * 4  # 4 images, batch 1: one epoch
    elapsed = [float(row["elapsed"]) for row in rows]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3"]
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 4 and summary["epochs"] == 1 and math.isfinite(summary["final_loss"])
    assert summary["samples_per_s"] > 0 and summary["wall_time_s"] >= elapsed[-1] and summary["peak_memory_mb"] > 100
    # the progress bar: steps done of all, time so far < ETA, speed, and the loss
    assert re.search(r"4/4 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+(step/s|s/step)", result.stderr), result.stderr[-500:]
    assert "loss=" in result.stderr


@pytest.mark.parametrize("stop_at", [1, 2], ids=["inside-epoch", "epoch-boundary"])
def test_resume_gives_bitwise_same_weights(
    image_config: Callable[..., Path], built_image_tasks: list[ImageTask], stop_at: int
) -> None:
    # 4 images, batch 1, accumulation 2: 2 optimizer steps per epoch; 6 steps = 3 epochs.
    common = {
        "gradient_accumulation_steps": 2,
        "max_train_steps": 6,
        "scheduler": "cosine",
        "warmup_steps": 1,
        "lora_dropout": 0.1,
        "cache_latents": False,
    }
    straight = load_config(image_config("straight", **common))
    train(straight, progress=False)
    # each optimizer step took 2 micro-batches: the 6 steps went through the 4 images 3 times
    assert [row["epoch"] for row in loss_rows(straight.path("output_dir"))] == ["1", "1", "2", "2", "3", "3"]
    # the dropout, whose random draws the resume must replay, is really on in every LoRA layer
    from peft.tuners.lora import LoraLayer

    lora_layers = [m for m in built_image_tasks[0].components.unet.modules() if isinstance(m, LoraLayer)]
    assert lora_layers and {getattr(m.lora_dropout["default"], "p", 0.0) for m in lora_layers} == {0.1}
    assert kohya_metadata_of(straight.path("output_dir"))["ss_network_dropout"] == "0.1"

    interrupted = load_config(image_config("interrupted", **common))
    with pytest.raises(TrainingStopped, match="--resume"):
        train(interrupted, stop_at_step=stop_at, progress=False)
    out = interrupted.path("output_dir")
    assert [p.name for p in list_checkpoints(out)] == [f"checkpoint-{stop_at}"]
    train(interrupted.replace(resume_from="latest"), progress=False)

    assert_same_weights(weights(straight.path("output_dir")), weights(out))
    assert losses(straight.path("output_dir")) == losses(out)


def test_sigkill_then_resume_matches_uninterrupted(image_config: Callable[..., Path]) -> None:
    common = {"max_train_steps": 8, "save_steps": 1, "keep_checkpoints": 2}
    straight = load_config(image_config("straight", **common))
    train(straight, progress=False)

    path = image_config("killed", **common)
    out = load_config(path).path("output_dir")
    proc = start_training(path, subprocess.DEVNULL)
    kill_at = 3 + int.from_bytes(os.urandom(1), "big") % 3  # a step from 3 to 5
    _wait_for_step(out, kill_at, proc)
    proc.kill()
    proc.wait()
    assert len(list_checkpoints(out)) <= 2

    result = run_cli("train", "--config", str(path), "--resume")
    assert result.returncode == 0, result.stderr
    assert "resuming from" in result.stdout + result.stderr
    assert_same_weights(weights(straight.path("output_dir")), weights(out))


def test_sigterm_writes_resumable_checkpoint(image_config: Callable[..., Path]) -> None:
    path = image_config("term", max_train_steps=200)
    out = load_config(path).path("output_dir")
    proc = start_training(path, subprocess.PIPE)
    _wait_for_step(out, 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "--resume" in stderr and "Traceback" not in stderr
    checkpoints = list_checkpoints(out)
    assert len(checkpoints) == 1
    stopped_at = int(checkpoints[0].name.split("-")[1])
    assert 2 <= stopped_at < 200
    assert (checkpoints[0] / "pytorch_lora_weights.safetensors").is_file()

    resumed = load_config(path).replace(resume_from="latest", max_train_steps=stopped_at + 2)
    result = train(resumed, progress=False)
    assert result.steps == stopped_at + 2


def test_ctrl_c_stops_once_with_exit_code_130_despite_dataloader_workers(image_config: Callable[..., Path]) -> None:
    path = image_config("ctrl-c", max_train_steps=200, num_workers=2)
    out = load_config(path).path("output_dir")
    proc = start_training(path, subprocess.PIPE)
    _wait_for_step(out, 2, proc)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl+C does: the whole process group, workers included
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert stderr.count("finishing this step") == 1, stderr  # the main process alone reacts
    assert "SIGINT: stopped at step" in stderr and "Traceback" not in stderr
    assert len(list_checkpoints(out)) == 1


# Run in the child process: each checkpoint save takes SAVE_DELAY seconds longer, so a second signal
# sent once the first one's message shows arrives while the run is still finishing.
SAVE_DELAY = 2.0
SLOW_SAVES = f"""
import sys, time
from lora_scripts.cli import main
from lora_scripts.train import checkpoint
save_file = checkpoint.save_file
checkpoint.save_file = lambda *args, **kwargs: (time.sleep({SAVE_DELAY}), save_file(*args, **kwargs))[1]
sys.exit(main(sys.argv[1:]))
"""


def start_training(path: Path, output: int, slow_saves: bool = False) -> subprocess.Popen:
    """`lora-scripts train --config PATH` in the background, in its own process group, to be interrupted."""
    entry = ["-c", SLOW_SAVES] if slow_saves else ["-m", "lora_scripts"]
    cmd = [sys.executable, *entry, "train", "--config", str(path)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=output, stderr=output, text=True, start_new_session=True)


def _read_stderr_until(proc: subprocess.Popen, text: str) -> str:
    """Read the running process's stderr pipe until ``text`` shows; return what was read."""
    seen = b""
    deadline = time.monotonic() + 240
    while text.encode() not in seen:
        assert time.monotonic() < deadline, f"{text!r} never appeared: {seen.decode()[-2000:]}"
        if select.select([proc.stderr], [], [], 1)[0]:
            chunk = os.read(proc.stderr.fileno(), 65536)
            assert chunk, f"the run ended before printing {text!r}: {seen.decode()[-2000:]}"
            seen += chunk
    return seen.decode()


def _wait_for_step(output_dir: Path, step: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert proc.poll() is None, "training ended before it could be interrupted"
        try:
            if losses(output_dir) and losses(output_dir)[-1][0] >= step:
                return
        except (OSError, KeyError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"step {step} never reached")


def test_nan_loss_stops_and_keeps_last_checkpoint(
    image_config: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from lora_scripts.train.image_task import DenoisingLoss

    real_forward = DenoisingLoss.forward
    calls = {"n": 0}

    def forward(self: DenoisingLoss, batch: dict) -> torch.Tensor:
        calls["n"] += 1
        loss = real_forward(self, batch)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(DenoisingLoss, "forward", forward)
    config = load_config(image_config("nan", save_steps=1, max_train_steps=6))
    with pytest.raises(TrainingStopped, match=r"at step 3.*checkpoint-2"):
        train(config, progress=False)
    assert [p.name for p in list_checkpoints(config.path("output_dir"))] == ["checkpoint-1", "checkpoint-2"]


def test_half_written_checkpoint_is_ignored(
    image_config: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config = load_config(image_config("partial", save_steps=2, max_train_steps=2))
    train(config, progress=False)
    out = config.path("output_dir")
    (out / "checkpoint-9").mkdir()  # cut off before its state was written
    (out / "checkpoint-9" / "lora_state.safetensors").write_bytes(b"\0" * 10)
    (out / ".checkpoint-7.abc.tmp").mkdir()  # a save killed mid-write
    result = train(config.replace(resume_from="latest", max_train_steps=3), progress=False)
    assert f"resuming from {out / 'checkpoint-2'} (step 2," in capsys.readouterr().out
    assert result.steps == 3
    assert not (out / ".checkpoint-7.abc.tmp").exists()
    assert [step for step, _ in losses(out)] == [1, 2, 3]


def test_init_lora_weights_changes_the_start(image_config: Callable[..., Path]) -> None:
    first = load_config(image_config("first", max_train_steps=3, learning_rate=5e-3))
    train(first, progress=False)
    kohya_file = first.path("output_dir") / "lora_weights.safetensors"

    fresh = load_config(image_config("fresh", max_train_steps=2))
    continued = load_config(image_config("continued", max_train_steps=2, init_lora_weights=str(kohya_file)))
    train(fresh, progress=False)
    train(continued, progress=False)
    assert losses(fresh.path("output_dir"))[0][1] != losses(continued.path("output_dir"))[0][1]
    assert weights(continued.path("output_dir")).keys() == weights(fresh.path("output_dir")).keys()

    mismatched = load_config(image_config("mismatch", lora_rank=8, init_lora_weights=str(kohya_file)))
    with pytest.raises(UserError, match=r"lora_weights\.safetensors"):
        train(mismatched, progress=False)


def test_unwritable_output_dir_fails_before_training(image_config: Callable[..., Path], tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = run_cli("train", "--config", str(image_config("blocked", output_dir=str(blocker / "out"))))
    assert result.returncode == 1
    assert "output_dir" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mixed_precision": "fp16"}, "mixed_precision: fp16 needs a CUDA GPU"),
        ({"optimizer": "AdamW8bit"}, "AdamW8bit needs a CUDA GPU"),
    ],
)
def test_gpu_only_settings_fail_clearly_on_cpu(
    image_config: Callable[..., Path], overrides: dict, message: str
) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = run_cli("train", "--config", str(image_config("gpu", **overrides)))
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr


def test_every_image_option_trains_and_loads(
    image_config: Callable[..., Path], built_image_tasks: list[ImageTask]
) -> None:
    """Text-encoder LoRA, LoCon, buckets, min-SNR, noise offset, no caching, checkpointing: trains, the result loads."""
    from lora_scripts.smoke import check_image_result

    config = load_config(
        image_config(
            "options",
            train_text_encoder=True,
            conv_lora_rank=2,
            bucket=True,
            min_snr_gamma=5.0,
            noise_offset=0.05,
            cache_latents=False,
            gradient_checkpointing=True,
            max_train_steps=2,
            learning_rate=1e-2,
        )
    )
    result = train(config, progress=False)
    assert math.isfinite(result.final_loss)
    assert check_image_result(config) == []
    kohya = kohya_weights(config.path("output_dir"))
    assert any(k.startswith("lora_te_") for k in kohya) and any("resnets" in k for k in kohya)
    assert_text_encoder_trained(kohya)
    # gradient checkpointing: a step runs the UNet's and text encoder's blocks twice (recomputed in backward)
    task = built_image_tasks[0]
    blocks = {
        "unet": task.components.unet.down_blocks[0].resnets[0].norm1,
        "text": task.components.text_encoder.encoder.layers[0].layer_norm1,
    }
    calls = dict.fromkeys(blocks, 0)
    for name, block in blocks.items():
        block.register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    task.model(task.collate(task.dataset()[:1])).backward()
    assert calls == {"unet": 2, "text": 2}


def test_bf16_image_training_keeps_lora_in_fp32_and_loads(
    image_config: Callable[..., Path], built_image_tasks: list[ImageTask]
) -> None:
    """bf16 (the one mixed precision a CPU runs): frozen weights in bf16, LoRA trained and saved in fp32."""
    from lora_scripts.smoke import check_image_result

    config = load_config(image_config("bf16", mixed_precision="bf16", max_train_steps=2, learning_rate=1e-2))
    result = train(config, progress=False)
    assert math.isfinite(result.final_loss)
    unet = built_image_tasks[0].components.unet
    lora = {p.dtype for name, p in unet.named_parameters() if ".lora_" in name}
    frozen = {p.dtype for name, p in unet.named_parameters() if ".lora_" not in name}
    assert lora == {torch.float32} and frozen == {torch.bfloat16}
    assert {tensor.dtype for tensor in weights(config.path("output_dir")).values()} == {torch.float32}
    assert check_image_result(config) == []


@pytest.mark.parametrize(
    ("optimizer", "mixed_precision", "device", "fused"),
    [
        ("AdamW", "no", "cpu", True),
        ("SGD", "bf16", "cuda", True),
        ("AdamW", "fp16", "cuda", False),  # the grad scaler's path stays on torch's default kernels
        ("AdamW", "no", "mps", False),
    ],
)
def test_fused_kernels_where_torch_has_them_and_not_under_fp16(
    optimizer: str, mixed_precision: str, device: str, fused: bool
) -> None:
    from lora_scripts.train.optim import build_optimizer

    values = {"train_data_dir": "d", "base_model": "m", "output_dir": "o", "optimizer": optimizer}
    config = Config({**values, "mixed_precision": mixed_precision}, Path("c.yaml"))
    built = build_optimizer(config, [torch.nn.Parameter(torch.zeros(2))], device)
    assert bool(built.defaults["fused"]) is fused


@pytest.mark.parametrize(
    ("optimizer", "module"),
    [("AdamW", "torch.optim"), ("SGD", "torch.optim"), ("Lion", "lion_pytorch"), ("Prodigy", "prodigyopt")],
)
def test_each_optimizer_changes_the_weights(image_config: Callable[..., Path], optimizer: str, module: str) -> None:
    import importlib

    from torch.optim.optimizer import register_optimizer_step_post_hook

    lr = 1.0 if optimizer == "Prodigy" else 1e-3
    config = load_config(image_config(f"opt-{optimizer}", optimizer=optimizer, learning_rate=lr, max_train_steps=2))
    stepped: list[type] = []
    hook = register_optimizer_step_post_hook(lambda opt, *_: stepped.append(type(opt)))
    try:
        result = train(config, progress=False)
    finally:
        hook.remove()
    assert math.isfinite(result.final_loss)
    assert stepped == [getattr(importlib.import_module(module), optimizer)] * 2  # the named optimizer took each step
    # lora_B starts at zero: a trained file has non-zero up weights
    assert any(
        t.abs().sum() > 0 for k, t in weights(config.path("output_dir")).items() if "lora.up" in k or "lora_B" in k
    )


def test_second_signal_exits_at_once_leaving_only_complete_checkpoints(image_config: Callable[..., Path]) -> None:
    path = image_config("twice", max_train_steps=500, save_steps=1, keep_checkpoints=3)
    out = load_config(path).path("output_dir")
    proc = start_training(path, subprocess.PIPE, slow_saves=True)
    _wait_for_step(out, 2, proc)  # checkpoint-1 is complete
    proc.send_signal(signal.SIGTERM)
    first = _read_stderr_until(proc, "finishing this step")
    proc.send_signal(signal.SIGTERM)  # while the run finishes its step and writes its (slow) checkpoint
    _, rest = proc.communicate(timeout=60)
    stderr = first + rest
    assert "SIGTERM again: exiting now" in stderr, stderr
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in stderr
    folders = sorted(p for p in out.iterdir() if p.name.startswith("checkpoint-"))
    assert folders == list_checkpoints(out)  # nothing half-written under a checkpoint name
    assert folders
    resumed = train(
        load_config(path).replace(resume_from="latest", max_train_steps=len(losses(out)) + 1), progress=False
    )
    assert resumed.steps == len(losses(out))


def test_cached_latents_and_captions_are_encoded_once(
    image_config: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    calls = {"vae": 0, "text": 0}
    vae_encode, text_forward = AutoencoderKL.encode, CLIPTextModel.forward

    def counting_encode(self, *args, **kwargs):
        calls["vae"] += 1
        return vae_encode(self, *args, **kwargs)

    def counting_forward(self, *args, **kwargs):
        calls["text"] += 1
        return text_forward(self, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counting_encode)
    monkeypatch.setattr(CLIPTextModel, "forward", counting_forward)
    train(load_config(image_config("cached", max_train_steps=8)), progress=False)
    assert calls == {"vae": 4, "text": 4}  # 4 images with 4 distinct captions, 8 steps

    calls.update(vae=0, text=0)
    train(load_config(image_config("uncached", max_train_steps=8, cache_latents=False)), progress=False)
    assert calls["vae"] == 8 and calls["text"] == 8


@pytest.mark.parametrize(
    ("overrides", "kept"),
    [
        ({}, set()),
        ({"train_text_encoder": True}, {"text_encoder"}),
        ({"validation_prompts": ["a red square"], "sample_inference_steps": 1}, {"vae", "text_encoder"}),
        ({"cache_latents": False}, {"vae", "text_encoder"}),
    ],
)
def test_frozen_models_are_freed_once_nothing_uses_them(
    image_config: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, overrides: dict[str, Any], kept: set[str]
) -> None:
    import gc
    import weakref

    from lora_scripts.model import stable_diffusion
    from lora_scripts.train.image_task import DenoisingLoss

    loaded: dict[str, weakref.ref] = {}
    alive_at_steps: list[set[str]] = []
    load, forward = stable_diffusion.load_sd_components, DenoisingLoss.forward

    def recording_load(*args: Any, **kwargs: Any) -> stable_diffusion.SDComponents:
        components = load(*args, **kwargs)
        loaded.update(vae=weakref.ref(components.vae), text_encoder=weakref.ref(components.text_encoder))
        return components

    def recording_forward(self: DenoisingLoss, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        gc.collect()
        alive_at_steps.append({name for name, ref in loaded.items() if ref() is not None})
        return forward(self, batch)

    monkeypatch.setattr(stable_diffusion, "load_sd_components", recording_load)
    monkeypatch.setattr(DenoisingLoss, "forward", recording_forward)
    result = train(load_config(image_config("freed", max_train_steps=2, **overrides)), progress=False)
    assert alive_at_steps == [kept, kept]
    assert all(path.is_file() for path in result.weights)
    if overrides.get("train_text_encoder"):  # kept because it trains: captions are not cached then
        assert_text_encoder_trained(kohya_weights(result.output_dir))


def test_bad_images_among_good_ones_stop_training_before_it_starts(
    image_config: Callable[..., Path], image_data: Path, tmp_path: Path
) -> None:
    import shutil

    data = tmp_path / "mixed"
    shutil.copytree(image_data, data)
    good = next(data.glob("*.png"))
    (data / "cut.png").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with open(data / "metadata.csv", "a", encoding="utf-8") as metadata:
        metadata.write("cut.png,a truncated download\ngone.png,a missing file\n")
    path = image_config("mixed", train_data_dir=str(data))
    result = run_cli("train", "--config", str(path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "2 problems" in result.stderr and "cut.png" in result.stderr and "gone.png" in result.stderr
    out = tmp_path / "out-mixed"
    assert not (out / "logs" / "loss.csv").exists() and not list(out.glob("*.safetensors"))  # no step ran


def test_too_little_disk_space_fails_before_training(
    image_config: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1024 * 1024))
    config = load_config(image_config("full"))
    with pytest.raises(UserError, match=r"output_dir: .* has 1 MiB free; this run needs about"):
        train(config, progress=False)
    assert not (config.path("output_dir") / "logs").exists()


def test_disk_full_during_a_save_is_a_clean_failure(
    image_config: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from lora_scripts.train import checkpoint

    config = load_config(image_config("enospc", save_steps=1, max_train_steps=4))
    real_save = checkpoint.save_file
    saves = {"n": 0}

    def failing_save(*args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", failing_save)
    with pytest.raises(
        TrainingStopped, match=r"No space left on device; the last complete checkpoint is .*checkpoint-1"
    ):
        train(config, progress=False)
    out = config.path("output_dir")
    assert [p.name for p in out.iterdir() if "checkpoint" in p.name] == ["checkpoint-1"]


def test_disk_full_while_logging_is_one_line_naming_the_file(
    image_config: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Writes outside the checkpoint save (loss.csv, TensorBoard, samples) fail as cleanly: no traceback."""
    import errno

    from lora_scripts.cli import main as cli
    from lora_scripts.train import logs

    path = image_config("enospc-log", max_train_steps=3)
    csv_path = load_config(path).path("output_dir") / "logs" / "loss.csv"
    real_log = logs.RunLog.log

    def full_disk_at_step_2(self: logs.RunLog, step: int, *args: Any) -> None:
        if step == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(csv_path))
        real_log(self, step, *args)

    monkeypatch.setattr(logs.RunLog, "log", full_disk_at_step_2)
    assert cli(["train", "--config", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {csv_path}: No space left on device"
    assert "Traceback" not in "\n".join(err)


def test_resume_from_a_checkpoint_folder_relative_to_the_config(
    image_config: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    first = load_config(image_config("first", save_steps=2, max_train_steps=4))
    train(first, progress=False)
    first_out = first.path("output_dir")
    second = load_config(image_config("second", resume_from="out-first/checkpoint-2", max_train_steps=4))
    result = train(second, progress=False)
    assert f"resuming from {(first_out / 'checkpoint-2').resolve()} (step 2," in capsys.readouterr().out
    assert result.steps == 4
    assert [step for step, _ in losses(second.path("output_dir"))] == [3, 4]
    assert_same_weights(weights(first_out), weights(second.path("output_dir")))


def test_resume_from_a_folder_that_is_no_checkpoint_fails_clearly(
    image_config: Callable[..., Path], tmp_path: Path
) -> None:
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "lora_state.safetensors").write_bytes(b"\0" * 10)
    config = load_config(image_config("bad", resume_from="half"))
    with pytest.raises(UserError, match=r"bad\.yaml: resume_from: .*half is not a complete checkpoint folder"):
        train(config, progress=False)


def test_keep_checkpoints_keeps_the_newest(image_config: Callable[..., Path]) -> None:
    config = load_config(image_config("keep", save_steps=1, max_train_steps=5, keep_checkpoints=2))
    train(config, progress=False)
    out = config.path("output_dir")
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-4", "checkpoint-5"]


def test_checkpoint_holds_the_full_training_state(image_config: Callable[..., Path]) -> None:
    config = load_config(image_config("contents", save_steps=3, max_train_steps=3))
    train(config, progress=False)
    out = config.path("output_dir")
    folder = out / "checkpoint-3"
    assert sorted(p.name for p in folder.iterdir()) == [
        "lora_state.safetensors",
        "lora_weights.safetensors",
        "pytorch_lora_weights.safetensors",
        "trainer_state.json",
        "training_state.pt",
    ]
    # 4 images, batch 1: step 3 is inside the first epoch, with 3 of its batches consumed
    assert json.loads((folder / "trainer_state.json").read_text()) == {"step": 3, "epoch": 0, "batches_in_epoch": 3}
    lora_state = load_file(str(folder / "lora_state.safetensors"))
    assert lora_state and all(".lora_" in key for key in lora_state)
    state = torch.load(folder / "training_state.pt", weights_only=True)
    assert set(state) == {"optimizer", "scheduler", "scaler", "rng"}
    moments = state["optimizer"]["state"]
    assert len(moments) == len(lora_state) and all(int(m["step"]) == 3 for m in moments.values())
    assert state["scheduler"]["last_epoch"] == 3
    assert state["scaler"] == {}  # no grad scaler without fp16
    assert {"python", "numpy", "torch"} <= set(state["rng"])
    # the usable weight files are those of the step: here the run's last, so equal to the final ones
    for name in ("pytorch_lora_weights.safetensors", "lora_weights.safetensors"):
        assert_same_weights(load_file(str(folder / name)), load_file(str(out / name)))


@pytest.mark.parametrize(
    ("change", "mismatch"),
    [
        ({"lora_rank": 8}, r"unet\.\S+lora_A\S*: shape \[4, \d+\] in the checkpoint, shape \[8, \d+\] in this run"),
        ({"train_text_encoder": True}, r"text_encoder\.\S+: absent in the checkpoint, shape \[\d+, \d+\] in this run"),
    ],
    ids=["rank", "text-encoder"],
)
def test_resume_with_a_changed_lora_config_fails_clearly(
    image_config: Callable[..., Path], change: dict, mismatch: str
) -> None:
    train(load_config(image_config("changed", save_steps=2, max_train_steps=2)), progress=False)
    changed = load_config(image_config("changed", resume_from="latest", max_train_steps=4, **change))
    with pytest.raises(UserError, match=rf"checkpoint-2: {mismatch} .*init_lora_weights.*fresh output_dir"):
        train(changed, progress=False)


def test_disk_precheck_counts_the_checkpoints_the_run_keeps(
    image_config: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from lora_scripts.train import loop

    needed: dict[str, int] = {}

    def record(config: Config, output_dir: Path, expected_bytes: int) -> None:
        needed[config.source.stem] = expected_bytes
        raise UserError("checked")

    monkeypatch.setattr(loop, "check_output_dir", record)
    runs = {
        "none": {},
        "one": {"save_steps": 4},
        "all": {"save_steps": 1, "keep_checkpoints": 0},
        "kept": {"save_steps": 1, "keep_checkpoints": 2},
    }
    for name, overrides in runs.items():
        with pytest.raises(UserError, match="checked"):
            train(load_config(image_config(name, max_train_steps=6, **overrides)), progress=False)
    per_checkpoint = needed["one"] - needed["none"]
    assert per_checkpoint > 0
    assert needed["all"] - needed["none"] == 6 * per_checkpoint  # keep_checkpoints 0 keeps all 6
    assert needed["kept"] - needed["none"] == 3 * per_checkpoint  # 2 kept, plus the newest before pruning


def test_lr_column_shows_the_lr_each_step_used(image_config: Callable[..., Path]) -> None:
    lr = 1e-3
    config = load_config(image_config("lr", scheduler="linear", warmup_steps=2, max_train_steps=5, learning_rate=lr))
    train(config, progress=False)
    # diffusers' linear schedule: step k (from 1) uses lr * (k - 1) / warmup, then decays to 0 at the end
    assert lrs(config.path("output_dir")) == pytest.approx([0, lr / 2, lr, lr * 2 / 3, lr / 3], rel=1e-5)


def test_warmup_applies_to_the_default_constant_schedule(image_config: Callable[..., Path]) -> None:
    lr = 1e-3
    config = load_config(image_config("warm", warmup_steps=3, max_train_steps=5, learning_rate=lr))
    assert config.scheduler == "constant"
    train(config, progress=False)
    rows = lrs(config.path("output_dir"))
    assert rows == pytest.approx([0, lr / 3, lr * 2 / 3, lr, lr], rel=1e-5)
    assert rows[:4] == sorted(rows[:4])


@pytest.mark.parametrize(
    ("overrides", "sampled"),
    [({"save_steps": 2}, [2, 4, 5]), ({"save_steps": 2, "sample_every_n_steps": 3}, [3, 5])],
    ids=["at-checkpoints", "every-n-steps"],
)
def test_image_samples_at_their_steps_and_the_end(
    image_config: Callable[..., Path], overrides: dict, sampled: list[int]
) -> None:
    config = load_config(
        image_config(
            "samples", validation_prompts=["a red circle"], sample_inference_steps=1, max_train_steps=5, **overrides
        )
    )
    train(config, progress=False)
    names = sorted(p.name for p in (config.path("output_dir") / "samples").iterdir())
    assert names == [f"step-{step:06d}-00.png" for step in sampled]


@pytest.fixture(scope="module")
def text_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A mock causal LM and a small JSONL dataset for text-mode runs."""
    from lora_scripts.data.text import write_dummy_text
    from lora_scripts.model.mock_lm import build_mock_causal_lm

    root = tmp_path_factory.mktemp("text")
    build_mock_causal_lm(root / "mock-lm")
    write_dummy_text(root / "data", count=6)
    return root / "mock-lm", root / "data"


@pytest.fixture
def text_config(
    write_config: Callable[..., Path], text_inputs: tuple[Path, Path], tmp_path: Path
) -> Callable[..., Path]:
    """A small text-mode config on the mock LM: text_config(name, **overrides) -> path."""

    def make(name: str = "text", **overrides: Any) -> Path:
        model, data = text_inputs
        values = {
            "mode": "text",
            "base_model": str(model),
            "train_data_dir": str(data),
            "output_dir": str(tmp_path / f"out-{name}"),
            "max_seq_length": 64,
            "batch_size": 2,
            "lora_rank": 4,
            "learning_rate": 0.01,
            "max_train_steps": 2,
            **overrides,
        }
        return write_config(name, **values)

    return make


def test_text_samples_and_eval_loss_at_checkpoints_and_the_end(
    text_config: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from lora_scripts.train.logs import RunLog

    evaluated: list[int] = []
    log_eval = RunLog.log_eval

    def record(self: RunLog, step: int, loss: float) -> None:
        evaluated.append(step)
        log_eval(self, step, loss)

    monkeypatch.setattr(RunLog, "log_eval", record)
    config = load_config(
        text_config(
            max_train_steps=5,
            save_steps=2,
            validation_split=0.2,
            validation_prompts=["Describe the cat."],
            lora_dropout=0.1,
        )
    )
    train(config, progress=False)
    names = sorted(p.name for p in (config.path("output_dir") / "samples").iterdir())
    assert names == ["step-000002.txt", "step-000004.txt", "step-000005.txt"]
    assert evaluated == [2, 4, 5]
    adapter = json.loads((config.path("output_dir") / "adapter_config.json").read_text())
    assert adapter["lora_dropout"] == 0.1


def test_text_resume_with_a_changed_rank_fails_clearly(text_config: Callable[..., Path]) -> None:
    train(load_config(text_config(save_steps=2)), progress=False)
    changed = load_config(text_config(resume_from="latest", lora_rank=8, max_train_steps=4))
    pattern = r"checkpoint-2: \S+lora_A\S*: shape \[4, \d+\] in the checkpoint, shape \[8, \d+\] in this run"
    with pytest.raises(UserError, match=pattern):
        train(changed, progress=False)
