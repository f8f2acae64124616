"""Text-mode benchmark: tokens/s and per-step time of our trainer against a bare peft loop.

For the tiny and small mock causal LMs, on batches of the same shape (every example truncated to
exactly --seq-len tokens):

- task: TextTask's model(batch), backward, AdamW step (what the loop runs per step);
- bare: a plain peft model (same LoRA targets), model(**batch).loss, backward, AdamW step
  (both with the AdamW the trainer builds: fused);
- loop: `lora-scripts train` end to end, per-step time from its loss.csv (includes the DataLoader,
  accelerate, gradient clipping, the scheduler and logging).

The three alternate in rounds (task and bare in this process, the loop in a child) so that all
see the same machine state; each figure is the median over the rounds' steps after WARMUP per run.
Target: task/bare and loop/bare within 1.10x.

    python benchmarks/bench_text.py [--steps 30] [--batch-size 4] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from timing import WARMUP, run_step_times, step_times

from lora_scripts.config import Config
from lora_scripts.model.mock_lm import build_mock_causal_lm
from lora_scripts.train.optim import build_optimizer
from lora_scripts.train.text_task import TextTask

TARGET = 1.10
ROUNDS = 3


def write_data(folder: Path, count: int) -> Path:
    """Lines long enough that truncation makes every example exactly max_seq_length tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    line = "The weather today is sunny with a light breeze; tomorrow it may rain in the afternoon. " * 40
    (folder / "long.jsonl").write_text("".join(json.dumps({"text": f"{i} {line}"}) + "\n" for i in range(count)))
    return folder


def training_step(
    forward: Callable[[], torch.Tensor], params: list[torch.nn.Parameter], config: Config
) -> Callable[[], None]:
    optimizer = build_optimizer(config, params, "cpu")

    def step() -> None:
        forward().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def in_process(config: Config) -> tuple[Callable[[], None], Callable[[], None], tuple[int, ...]]:
    """One training step of TextTask and one of a bare peft loop, on the same batch."""
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    task = TextTask(config)
    task.check_data()
    task.build(Accelerator(cpu=True))
    batch = task.collate(task.dataset()[: config.batch_size])
    task.model.train()
    task_step = training_step(
        lambda: task.model(batch), [p for p in task.model.parameters() if p.requires_grad], config
    )

    base = AutoModelForCausalLM.from_pretrained(config.base_model)
    targets = task.peft_model.peft_config["default"].target_modules
    bare = get_peft_model(base, LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, target_modules=targets))
    bare.train()
    bare_step = training_step(lambda: bare(**batch).loss, [p for p in bare.parameters() if p.requires_grad], config)
    return task_step, bare_step, tuple(batch["input_ids"].shape)


def through_loop(config: Config, work: Path, steps: int) -> list[float]:
    """Per-step seconds of `lora-scripts train`, from the elapsed column of its loss.csv."""
    shutil.rmtree(work / "out", ignore_errors=True)  # a fresh run each round
    values = {**config.values, "max_train_steps": steps, "output_dir": str(work / "out")}
    path = work / "bench.yaml"
    path.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in values.items()))
    proc = subprocess.run(
        [sys.executable, "-m", "lora_scripts", "train", "--config", str(path)], capture_output=True, text=True
    )
    if proc.returncode:
        sys.exit(f"lora-scripts train failed:\n{proc.stderr[-2000:]}")
    return run_step_times(work / "out")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=["tiny", "small"])
    args = parser.parse_args()
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="lora-bench-text-"))
    data = write_data(work / "data", count=max(args.batch_size, 1) * 4)
    print(f"device: cpu, {torch.get_num_threads()} threads")
    print(f"{'model':<6} {'run':<5} {'ms/step':>9} {'tokens/s':>10} {'vs bare':>8}")
    for size in args.sizes:
        model = work / f"mock-{size}"
        build_mock_causal_lm(model, size=size)
        folder = work / size
        folder.mkdir()
        config = Config(
            {
                "mode": "text",
                "base_model": str(model),
                "train_data_dir": str(data),
                "output_dir": str(folder / "out"),
                "max_seq_length": args.seq_len,
                "batch_size": args.batch_size,
                "max_grad_norm": 0,
            },
            folder / "bench.yaml",
        )
        task_step, bare_step, shape = in_process(config)
        ours: list[float] = []
        bare: list[float] = []
        loop: list[float] = []
        for _ in range(ROUNDS):  # alternate, so that a busy spell on a shared machine weighs on all three alike
            ours += step_times(task_step, args.steps)
            bare += step_times(bare_step, args.steps)
            loop += through_loop(config, folder, args.steps)
        tokens = shape[0] * shape[1]
        bare_s = statistics.median(bare)
        for name, times in (("bare", bare), ("task", ours), ("loop", loop)):
            seconds = statistics.median(times)
            ratio = seconds / bare_s
            verdict = "" if name == "bare" else (" ok" if ratio <= TARGET else " OVER")
            print(f"{size:<6} {name:<5} {seconds * 1000:>9.1f} {tokens / seconds:>10.0f} {ratio:>7.2f}x{verdict}")
    print(f"(batch {shape[0]} x {shape[1]} tokens; target <= {TARGET}x; medians after {WARMUP} warm-up steps)")


if __name__ == "__main__":
    main()
