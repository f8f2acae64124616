"""The one training loop for both modes: accelerate, optimizer and schedule, checkpoints and exact
resume, signals, the NaN guard, progress, logs and the final weights.

A mode plugs in as a :class:`~lora_scripts.train.task.TrainingTask`; everything here is shared.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import os
import random
import resource
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lora_scripts.config import Config
from lora_scripts.errors import UserError
from lora_scripts.train.checkpoint import (
    LoopPosition,
    check_lora_state,
    list_checkpoints,
    load_checkpoint,
    remove_stale_temporaries,
    resolve_resume,
    save_checkpoint,
    set_rng_states,
)
from lora_scripts.train.logs import RunLog, plot_loss, write_summary
from lora_scripts.train.optim import build_optimizer, build_scheduler
from lora_scripts.train.task import RunInfo, TrainingTask

SUMMARY_FILE = "training_summary.json"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingStopped(UserError):
    """The run stopped early (signal or NaN) after leaving a resumable state on disk."""


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    final_loss: float | None
    weights: list[Path]
    summary: dict[str, Any] = field(default_factory=dict)


class GroupedBatchSampler:
    """Batches drawn within groups (aspect-ratio buckets), shuffled by ``seed + epoch``.

    The order depends only on the seed and the epoch, never on global RNG state, so a resumed
    run sees the same batches as an uninterrupted one.
    """

    def __init__(self, groups: list[list[int]], batch_size: int, seed: int) -> None:
        self.groups = [g for g in groups if g]
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        batches = []
        for group in self.groups:
            order = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
            batches += [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        yield from (batches[i] for i in torch.randperm(len(batches), generator=generator).tolist())

    def __len__(self) -> int:
        return sum(math.ceil(len(g) / self.batch_size) for g in self.groups)


class StopSignals:
    """SIGINT/SIGTERM: the first asks the loop to stop after the current step; the second exits at once.

    Exiting at once is safe because everything is written to a temporary name and renamed.
    """

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for sig in STOP_SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.received:
            print(f"\n{signal.Signals(signum).name} again: exiting now", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.received = signal.Signals(signum)
        print(f"\n{self.received.name}: finishing this step and writing a checkpoint...", file=sys.stderr, flush=True)

    def __exit__(self, *_exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader worker start-up: leave SIGINT/SIGTERM to the main process (Ctrl+C reaches every process)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def checkpoints_on_disk(total_steps: int, save_steps: int, keep_checkpoints: int) -> int:
    """The most checkpoints a run has on disk at once (each is complete before the oldest goes, so keep + 1)."""
    written = total_steps // save_steps if save_steps else 0
    return min(written, keep_checkpoints + 1) if keep_checkpoints else written


def make_task(config: Config) -> TrainingTask:
    if config.mode == "text":
        from lora_scripts.train.text_task import TextTask

        return TextTask(config)
    from lora_scripts.train.image_task import ImageTask

    return ImageTask(config)


def make_accelerator(config: Config) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # train() may run more than once in a process (tests, preflight --measure): start from a clean state.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError(f"{config.source}: mixed_precision: fp16 needs a CUDA GPU; use 'no' (or 'bf16') on CPU")
    return Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        cpu=not torch.cuda.is_available(),  # several CPU processes (accelerate launch) then use gloo
    )


def check_output_dir(config: Config, output_dir: Path, expected_bytes: int) -> None:
    """Fail before training when output_dir cannot be written or the disk is too full for the run."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"{config.source}: output_dir: cannot write to {output_dir}: {err.strerror or err}") from None
    free = shutil.disk_usage(output_dir).free
    if free < expected_bytes:
        raise UserError(
            f"{config.source}: output_dir: {output_dir} has {free / 2**20:.0f} MiB free; "
            f"this run needs about {expected_bytes / 2**20:.0f} MiB (weights, checkpoints, logs)"
        )


def train(config: Config, *, stop_at_step: int | None = None, progress: bool = True) -> TrainResult:
    """Train ``config`` to the end, or until a signal (or ``stop_at_step``, for tests) asks to stop.

    Stopping early writes a checkpoint and raises :class:`TrainingStopped` saying how to resume.
    """
    from accelerate.utils import set_seed

    started = time.perf_counter()
    output_dir = config.path("output_dir")
    assert output_dir is not None
    resume = resolve_resume(config.resume_from, output_dir, config.source)
    accelerator = make_accelerator(config)
    main_process = accelerator.is_main_process
    set_seed(config.seed)

    task = make_task(config)
    task.check_data()
    task.build(accelerator)
    lora_params = [p for p in task.model.parameters() if p.requires_grad]
    sampler = GroupedBatchSampler(task.groups(), config.batch_size, config.seed)
    loader = torch.utils.data.DataLoader(
        task.dataset(),
        batch_sampler=sampler,
        collate_fn=task.collate,
        num_workers=config.num_workers,
        worker_init_fn=ignore_stop_signals,
    )
    optimizer = build_optimizer(config, lora_params, accelerator.device.type)
    model, optimizer, loader = accelerator.prepare(task.model, optimizer, loader)
    updates_per_epoch = max(1, math.ceil(len(loader) / config.gradient_accumulation_steps))
    total_steps = config.max_train_steps or config.epochs * updates_per_epoch
    total_epochs = math.ceil(total_steps / updates_per_epoch)
    # Without a grad scaler, accelerate's optimizer wrapper only re-checks what the loop knows (sync
    # steps) and looks up optional packages on every call: about 0.2 ms a step, 1.5% on the tiny mock.
    stepper = optimizer.optimizer if accelerator.scaler is None else optimizer
    scheduler = build_scheduler(config, stepper, total_steps)  # it counts the steps of the optimizer it is given
    if main_process:
        # Per checkpoint: LoRA state, optimizer moments (2x) and the two weight files; then the final weights.
        checkpoints = checkpoints_on_disk(total_steps, config.save_steps, config.keep_checkpoints)
        lora_bytes = sum(p.numel() * 4 for p in lora_params)
        check_output_dir(config, output_dir, expected_bytes=lora_bytes * 5 * (checkpoints + 1) + 16 * 2**20)
        remove_stale_temporaries(output_dir)

    position = LoopPosition()
    if resume is not None:
        position, lora_state, training_state = load_checkpoint(resume)
        check_lora_state(resume, lora_state, task.lora_state_dict())
        task.load_lora_state_dict(lora_state)
        optimizer.load_state_dict(training_state["optimizer"])
        scheduler.load_state_dict(training_state["scheduler"])
        if accelerator.scaler is not None and training_state.get("scaler"):
            accelerator.scaler.load_state_dict(training_state["scaler"])
        set_rng_states(training_state["rng"])
        accelerator.print(f"resuming from {resume} (step {position.step}, epoch {position.epoch + 1})")
    elif config.resume_from == "latest":
        accelerator.print(f"resume_from: latest: no checkpoint in {output_dir} yet; starting fresh")

    logging_dir = config.path("logging_dir")
    assert logging_dir is not None
    run_log = RunLog(output_dir, logging_dir, position.step) if main_process else None
    samples_dir = output_dir / "samples"
    sample_every = config.sample_every_n_steps or config.save_steps  # 0: only at the end

    def sample_and_eval() -> float | None:
        task.sample(samples_dir, position.step)
        return _log_eval(task, run_log, position.step)

    def training_state() -> dict[str, Any]:
        return {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else {},
        }

    def info(loss: float | None, final: bool = False) -> RunInfo:
        return RunInfo(step=position.step, epoch=position.epoch, total_epochs=total_epochs, loss=loss, final=final)

    def checkpoint(loss: float | None) -> Path | None:
        accelerator.wait_for_everyone()
        if not main_process:
            return None
        assert run_log is not None
        run_log.flush()  # TensorBoard holds back steps; a stop after this checkpoint keeps them all
        at = position
        if at.batches_in_epoch >= len(loader):  # an epoch boundary: resume at the next epoch's start
            at = LoopPosition(at.step, at.epoch + 1, 0)
        return _guard_disk(
            lambda: save_checkpoint(
                output_dir,
                at,
                task.lora_state_dict(),
                training_state(),
                lambda d: task.save_weights(d, info(loss)),
                config.keep_checkpoints,
            ),
            output_dir,
        )

    from tqdm.auto import tqdm

    bar = tqdm(
        total=total_steps, initial=position.step, unit="step", desc="train", disable=not (progress and main_process)
    )  # closed as the loop ends, also by an error: its last line then comes before the error, not after
    samples_seen = 0
    step_losses: list[float] = []
    last_loss: float | None = None
    eval_loss: float | None = None
    sampled_step: int | None = None
    loop_started = time.perf_counter()
    with StopSignals() as signals, bar:
        model.train()
        for epoch in range(position.epoch, total_epochs + 1):
            if position.step >= total_steps:
                break
            position.epoch = epoch
            sampler.epoch = epoch
            batches = (
                accelerator.skip_first_batches(loader, position.batches_in_epoch)
                if position.batches_in_epoch
                else loader
            )
            for batch in batches:
                seed_everything(step_seed(config.seed, accelerator.process_index, epoch, position.batches_in_epoch))
                with accelerator.accumulate(model):
                    loss = model(batch)
                    if not torch.isfinite(loss.detach()).all():
                        last = list_checkpoints(output_dir)
                        where = f"; the last good checkpoint is {last[-1]}" if last else ""
                        raise TrainingStopped(
                            f"{config.source}: loss became {loss.item()} at step {position.step + 1}; stopped{where}. "
                            "Lower learning_rate or check the data."
                        )
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        if config.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(lora_params, config.max_grad_norm)
                        stepper.step()
                        stepper.zero_grad(set_to_none=True)
                position.batches_in_epoch += 1
                samples_seen += config.batch_size * accelerator.num_processes
                step_losses.append(loss.detach().float().item())
                if not accelerator.sync_gradients:
                    continue
                lr = scheduler.get_last_lr()[0]  # the lr this optimizer step used
                scheduler.step()
                position.step += 1
                last_loss = sum(step_losses) / len(step_losses)
                if accelerator.num_processes > 1:  # log the mean over all processes
                    last_loss = accelerator.reduce(torch.tensor(last_loss, device=accelerator.device), "mean").item()
                step_losses.clear()
                if run_log is not None:
                    run_log.log(position.step, epoch + 1, last_loss, lr, time.perf_counter() - started)
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", epoch=epoch + 1, refresh=False)
                if main_process and sample_every and position.step % sample_every == 0:
                    eval_loss, sampled_step = sample_and_eval(), position.step
                stopping = signals.received or (stop_at_step is not None and position.step == stop_at_step)
                if stopping or (config.save_steps and position.step % config.save_steps == 0):
                    path = checkpoint(last_loss)
                    if stopping:
                        reason = signals.received.name if signals.received else f"stop_at_step {stop_at_step}"
                        raise TrainingStopped(
                            f"{reason}: stopped at step {position.step}; checkpoint written to {path}. "
                            f"Resume with: lora-scripts train --config {config.source} --resume",
                            exit_code=128 + signals.received if signals.received else 1,
                        )
                if position.step >= total_steps:
                    break
            position.batches_in_epoch = 0
    train_seconds = time.perf_counter() - loop_started

    accelerator.wait_for_everyone()
    weights: list[Path] = []
    summary: dict[str, Any] = {}
    if main_process:
        assert run_log is not None
        weights = _guard_disk(lambda: task.save_weights(output_dir, info(last_loss, final=True)), output_dir)
        if sampled_step != position.step:
            eval_loss = sample_and_eval()
        run_log.close()
        plot_loss(run_log.csv_path, output_dir / "loss.png", title=f"{config.source.stem}: training loss")
        summary = {
            "config": str(config.source),
            "mode": config.mode,
            "final_loss": last_loss,
            "eval_loss": eval_loss,
            "steps": position.step,
            "epochs": position.epoch + 1,
            "wall_time_s": round(time.perf_counter() - started, 3),
            "train_time_s": round(train_seconds, 3),
            "samples_per_s": round(samples_seen / train_seconds, 3) if train_seconds > 0 else None,
            "peak_memory_mb": round(peak_memory_mb(accelerator.device), 1),
            "device": str(accelerator.device),
            "num_processes": accelerator.num_processes,
            "weights": [str(p) for p in weights],
        }
        write_summary(output_dir / SUMMARY_FILE, summary)
    accelerator.end_training()
    return TrainResult(output_dir, position.step, last_loss, weights, summary)


def step_seed(seed: int, process: int, epoch: int, batch: int) -> int:
    """The seed for one micro-batch: noise, timesteps and dropout depend only on where the loop is,
    so a resumed run draws exactly what an uninterrupted one would (whatever else consumed RNG)."""
    digest = hashlib.blake2b(f"{seed}/{process}/{epoch}/{batch}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and, when there is one, every CUDA device).

    The same RNG states as ``torch.manual_seed``, which would also seed every other backend torch
    knows of: about 0.1 ms per call, close to 1% of a step on the tiny mock model.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _log_eval(task: TrainingTask, run_log: RunLog | None, step: int) -> float | None:
    eval_loss = task.eval_loss()
    if eval_loss is not None and run_log is not None:
        run_log.log_eval(step, eval_loss)
    return eval_loss


def _guard_disk(write: Any, output_dir: Path) -> Any:
    """Run a write; a full disk becomes a clear error (the atomic writes leave nothing half-written)."""
    try:
        return write()
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
            last = list_checkpoints(output_dir)
            kept = f"; the last complete checkpoint is {last[-1]}" if last else ""
            raise TrainingStopped(f"cannot write to {output_dir}: {err.strerror}{kept}") from None
        raise


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
