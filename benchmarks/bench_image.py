"""Image-mode benchmark: our trainer's step time against a bare loop, and the smoke command's wall time and RSS.

Prints, for the tiny and small mock models: per-step time of `lora-scripts train` (from loss.csv,
caching on), per-step time of a bare loop (UNet+LoRA forward, backward, AdamW step on the same
shapes, nothing else; the AdamW the trainer builds, fused), their ratio, and each one's peak RSS;
then the whole-process wall time and peak RSS of `lora-scripts smoke`. The bare loop also loads
the frozen models (VAE, text encoder) and encodes one image and caption with them, as caching does,
so its peak RSS is "the bare loop's plus the frozen models". Each run is a fresh process; ours and
bare alternate over --rounds rounds. The ratio is the median of the rounds' ratios (each round's
median step, ours over bare): a shared machine's speed drifts over minutes, and a ratio taken within
a round cancels that drift where pooling all steps would not. Targets: ratio <= 1.05 (small) /
1.10 (tiny); our peak RSS <= the bare loop's; smoke < 15 s. A last column, "bare+imports", runs the
bare loop once more after importing every module our run had loaded: how much of the RSS difference
is library code, not training memory.

    python benchmarks/bench_image.py [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from timing import run_step_times, step_times


def bare_loop(model_dir: str, steps: int, resolution: int, batch_size: int) -> None:
    """Runs in a child process: prints per-step seconds as JSON."""
    import torch

    from lora_scripts.config import Config
    from lora_scripts.export.diffusers_format import add_image_lora
    from lora_scripts.model.stable_diffusion import load_sd_components
    from lora_scripts.train.optim import build_optimizer

    torch.manual_seed(0)
    c = load_sd_components(model_dir)
    for module in (c.unet, c.vae, c.text_encoder):
        module.requires_grad_(False)
    config = Config(
        {"train_data_dir": ".", "base_model": model_dir, "output_dir": ".", "lora_rank": 4, "lora_alpha": 4},
        Path("bench.yaml"),
    )
    add_image_lora(c.unet, None, config)
    c.unet.train()  # as in the trainer
    params = [p for p in c.unet.parameters() if p.requires_grad]
    optimizer = build_optimizer(config, params, "cpu")
    # The frozen models do what caching does in the trainer: encode an image and a caption once.
    with torch.no_grad():
        pixels = torch.rand(batch_size, 3, resolution, resolution) * 2 - 1
        latents = c.vae.encode(pixels).latent_dist.mode() * c.vae.config.scaling_factor
        ids = c.tokenizer(
            ["a gray square"] * batch_size,
            padding="max_length",
            max_length=c.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        embeddings = c.text_encoder(ids)[0]

    def step() -> None:
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (batch_size,))
        noisy = c.noise_scheduler.add_noise(latents, noise, t)
        loss = torch.nn.functional.mse_loss(c.unet(noisy, t, embeddings).sample, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    print(json.dumps(step_times(step, steps)))


RSS_WRAPPER = (
    "import os, resource, runpy, sys; sys.argv = sys.argv[1:]\n"
    "try:\n    runpy.run_module(sys.argv[0], run_name='__main__') if sys.argv[0] != '-c' else exec(sys.argv[1])\n"
    "except SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
    "print('PEAK_RSS_MB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, file=sys.stderr)\n"
    "if os.environ.get('BENCH_MODULES_OUT'):\n"
    "    open(os.environ['BENCH_MODULES_OUT'], 'w').write('\\n'.join(sorted(sys.modules)))\n"
    "sys.exit(code)"
)


def import_all(listing: str) -> None:
    """Import every module named in the file ``listing`` (one per line) that imports on its own."""
    import contextlib
    import importlib

    for name in Path(listing).read_text().split():
        with contextlib.suppress(Exception):
            importlib.import_module(name)


def run(args: list[str], modules_out: Path | None = None) -> tuple[str, float, float]:
    """Run ``python -m MODULE ARGS`` (or ``-c CODE``); return stdout, wall seconds and the child's peak RSS.

    With ``modules_out``, the child lists the modules it had imported into that file as it ends.
    """
    env = {**os.environ, "BENCH_MODULES_OUT": str(modules_out)} if modules_out else None
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", RSS_WRAPPER, *args], capture_output=True, text=True, check=False, env=env
    )
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"failed: {' '.join(args)}\n{proc.stderr[-2000:]}")
    rss = float(proc.stderr.rsplit("PEAK_RSS_MB", 1)[1].split()[0])
    return proc.stdout, wall, rss


def ours(model_dir: Path, data_dir: Path, work: Path, steps: int, resolution: int) -> tuple[list[float], float]:
    """Per-step seconds (from loss.csv's elapsed column) of `lora-scripts train`, and its peak RSS."""
    config = work / f"bench-{model_dir.name}.yaml"
    out = work / f"out-{model_dir.name}"
    shutil.rmtree(out, ignore_errors=True)  # a fresh run each round
    config.write_text(
        yaml.safe_dump(
            {
                "train_data_dir": str(data_dir),
                "base_model": str(model_dir),
                "output_dir": str(out),
                "resolution": resolution,
                "lora_rank": 4,
                "lora_alpha": 4,
                "max_train_steps": steps,
                "batch_size": 1,
            }
        )
    )
    _, _, rss = run(["lora_scripts", "train", "--config", str(config)], modules_out=work / "modules.txt")
    return run_step_times(out), rss


def bare(model_dir: Path, steps: int, resolution: int, preload: Path | None = None) -> tuple[list[float], float]:
    """Per-step seconds of the bare loop in a fresh process, and its peak RSS.

    With ``preload`` (a module listing written by :func:`run`), the process first imports those modules.
    """
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_image; "
        + (f"bench_image.import_all({str(preload)!r}); " if preload else "")
        + f"bench_image.bare_loop({str(model_dir)!r}, {steps}, {resolution}, 1)"
    )
    stdout, _, rss = run(["-c", code])
    return json.loads(stdout.strip().splitlines()[-1]), rss


def verdict(met: bool) -> str:
    return "ok  " if met else "OVER"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    data = work / "data"
    run(["lora_scripts", "dummy-data", str(data), "--count", "8", "--resolution", str(args.resolution)])
    print(
        f"{'model':<6} {'ours ms/step':>13} {'bare ms/step':>13} {'ratio':>6} {'target':>7}      "
        f"{'ours RSS MiB':>13} {'bare RSS MiB':>13} RSS  {'bare+imports':>12}   ratio range"
    )
    for size, target in (("tiny", 1.10), ("small", 1.05)):
        model = work / f"mock-{size}"
        run(["lora_scripts", "mock-model", str(model), "--size", size])
        ours_ms: list[float] = []  # per round: the median step
        bare_ms: list[float] = []
        for _ in range(args.rounds):
            times, ours_rss = ours(model, data, work, args.steps, args.resolution)
            ours_ms.append(statistics.median(times) * 1000)
            times, bare_rss = bare(model, args.steps, args.resolution)
            bare_ms.append(statistics.median(times) * 1000)
        _, imports_rss = bare(model, args.steps, args.resolution, preload=work / "modules.txt")
        ratios = sorted(o / b for o, b in zip(ours_ms, bare_ms, strict=True))
        ratio = statistics.median(ratios)
        print(
            f"{size:<6} {statistics.median(ours_ms):>13.1f} {statistics.median(bare_ms):>13.1f} {ratio:>6.2f}"
            f" {'<=' + str(target):>7} {verdict(ratio <= target)} {ours_rss:>13.0f} {bare_rss:>13.0f}"
            f" {verdict(ours_rss <= bare_rss)} {imports_rss:>12.0f}   {ratios[0]:.2f}-{ratios[-1]:.2f}"
        )
    print(
        "ratio: the median over rounds of ours / bare within a round (ratio range: lowest and highest round).\n"
        "bare+imports: the bare loop's peak RSS after importing every module `lora-scripts train` had loaded\n"
        "(TensorBoard, jsonschema, Pillow plugins, ...): what ours would be if its only extra were library code."
    )
    _, wall, rss = run(["lora_scripts", "smoke", "--work-dir", str(work / "smoke")])
    print(
        f"lora-scripts smoke (first run, builds mock + data): {wall:.1f} s wall, peak RSS {rss:.0f} MiB"
        f" (target < 15 s: {verdict(wall < 15).strip()})"
    )
    _, wall, _ = run(["lora_scripts", "smoke", "--work-dir", str(work / "smoke")])
    print(f"lora-scripts smoke (mock + data reused): {wall:.1f} s wall")


if __name__ == "__main__":
    main()
