"""How fast `lora-scripts validate` is on 100 configs: whole-process wall time and in-process time.

Usage: python benchmarks/bench_validate.py [--count N] [--repeat R]
The target is well under 1 s for the whole process (it runs as a pre-commit hook), with torch never imported.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CHECK_IMPORTS = """
import json, sys
from lora_scripts.cli import main
code = main(["validate", sys.argv[1]])
heavy = sorted(m for m in ("torch", "diffusers", "transformers", "peft", "accelerate") if m in sys.modules)
print(json.dumps({"exit": code, "heavy": heavy}))
"""


def write_configs(folder: Path, count: int) -> None:
    """``count`` valid configs, alternating image and text mode with varied values."""
    for index in range(count):
        text = index % 2 == 1
        lines = [
            "# yaml-language-server: $schema=../schemas/lora-config.schema.json",
            f"mode: {'text' if text else 'image'}",
            f"train_data_dir: ../data/set-{index}",
            f"base_model: {'org/small-lm' if text else '../models/sd15.safetensors'}",
            f"output_dir: ../output/run-{index}",
            f"lora_rank: {4 * (1 + index % 8)}",
            f"lora_alpha: {4 * (1 + index % 8)}",
            f"learning_rate: {index % 9 + 1}e-4",
            "mixed_precision: no",
            f"resolution: {512 + 64 * (index % 4)}",
            f"seed: {index}",
            "validation_prompts:",
            f"  - a photo number {index}",
        ]
        (folder / f"config-{index:03d}.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")


def command() -> list[str]:
    script = Path(sys.executable).with_name("lora-scripts")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "lora_scripts"]


def time_process(folder: Path, repeat: int) -> float:
    """Best wall time of the whole `lora-scripts validate FOLDER` process, start to exit."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        result = subprocess.run([*command(), "validate", str(folder)], capture_output=True, text=True)
        best = min(best, time.perf_counter() - start)
        if result.returncode != 0:
            raise SystemExit(f"validate failed (exit {result.returncode}):\n{result.stdout}{result.stderr}")
    return best


def time_in_process(folder: Path, repeat: int) -> tuple[float, float]:
    """Import time of the validate modules, then the best time to validate every file in this process."""
    start = time.perf_counter()
    from lora_scripts.config import validate_file
    from lora_scripts.validate import find_configs

    imported = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        problems = [p for path in find_configs([str(folder)]) for p in validate_file(path)]
        best = min(best, time.perf_counter() - start)
        if problems:
            raise SystemExit("\n".join(p.text() for p in problems))
    return imported, best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100, help="configs to write (default: 100)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per measurement; the best is shown (default: 5)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-validate-"))
    try:
        write_configs(folder, args.count)
        process_s = time_process(folder, args.repeat)
        imports = subprocess.run(
            [sys.executable, "-c", _CHECK_IMPORTS, str(folder)], capture_output=True, text=True, check=True
        )
        report = json.loads(imports.stdout.splitlines()[-1])
        import_s, in_process_s = time_in_process(folder, args.repeat)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"configs validated:          {args.count}")
    print(f"whole process (wall, best): {process_s * 1000:.0f} ms   ({' '.join(command())} validate DIR)")
    print(f"in process: imports         {import_s * 1000:.0f} ms")
    per_config_ms = in_process_s / args.count * 1000
    print(f"in process: validation      {in_process_s * 1000:.0f} ms ({per_config_ms:.2f} ms per config)")
    print(f"heavy libraries imported:   {', '.join(report['heavy']) or 'none (torch not imported)'}")
    ok = process_s < 1.0 and not report["heavy"]
    print("target (< 1 s, no torch):   " + ("met" if ok else "MISSED"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
