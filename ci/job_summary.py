#!/usr/bin/env python3
"""Markdown job summary of training runs: final loss and timings, a loss table and a loss chart per run.

Usage: ci/job_summary.py OUTPUT_DIR... [--artifact-url URL] [--plot]
Appends to $GITHUB_STEP_SUMMARY when set (GitHub Actions), else prints (Jenkins, laptops).
The chart is a Mermaid xychart that GitHub renders inline; loss.png itself travels in the
artifact (linked when --artifact-url is given). --plot draws loss.png from logs/loss.csv where
it is missing (Jenkins' "plot the loss" stage).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lora_scripts.train.logs import plot_loss, read_loss_csv

TABLE_ROWS = 10
CHART_POINTS = 50


def _every(rows: list[dict[str, str]], count: int) -> list[dict[str, str]]:
    """At most ``count`` rows spread evenly over ``rows``, always keeping the last one."""
    if len(rows) <= count:
        return rows
    step = len(rows) / count
    return [rows[int(i * step)] for i in range(count - 1)] + [rows[-1]]


def run_section(output_dir: Path, artifact_url: str = "") -> str:
    """The Markdown for one run's output_dir."""
    summary_path = output_dir / "training_summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    rows = read_loss_csv(output_dir / "logs" / "loss.csv")
    lines = [f"### {output_dir.name}", ""]
    if not summary and not rows:
        return "\n".join([*lines, f"No training output in `{output_dir}` (the run failed before logging).", ""])
    figures = [
        ("final loss", summary.get("final_loss")),
        ("steps", summary.get("steps")),
        ("wall time (s)", summary.get("wall_time_s")),
        ("samples/s", summary.get("samples_per_s")),
        ("peak memory (MB)", summary.get("peak_memory_mb")),
    ]
    lines += ["| figure | value |", "| --- | --- |"]
    lines += [
        f"| {name} | {value:.4g} |" if isinstance(value, float) else f"| {name} | {value} |"
        for name, value in figures
        if value is not None
    ]
    if rows:
        lines += ["", "| step | epoch | loss | lr |", "| ---: | ---: | ---: | ---: |"]
        lines += [
            f"| {r['step']} | {r['epoch']} | {float(r['loss']):.4f} | {float(r['lr']):.2e} |"
            for r in _every(rows, TABLE_ROWS)
        ]
        points = _every(rows, CHART_POINTS)
        steps = ", ".join(r["step"] for r in points)
        losses = ", ".join(f"{float(r['loss']):.4f}" for r in points)
        lines += [
            "",
            "```mermaid",
            "xychart-beta",
            f'  title "{output_dir.name}: training loss"',
            f'  x-axis "step" [{steps}]',
            '  y-axis "loss"',
            f"  line [{losses}]",
            "```",
        ]
    where = f"[the artifact]({artifact_url})" if artifact_url else "the artifacts"
    if (output_dir / "loss.png").is_file():
        lines += ["", f"Loss plot: `loss.png` in {where}."]
    samples = sorted(p.name for p in (output_dir / "samples").glob("*") if p.suffix in (".png", ".txt"))
    if samples:
        shown = ", ".join(f"`{name}`" for name in samples[-4:])
        lines += ["", f"Samples ({len(samples)} in `samples/`, in {where}): {shown}."]
    return "\n".join([*lines, ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dirs", nargs="+", type=Path, metavar="OUTPUT_DIR")
    parser.add_argument("--artifact-url", default="", help="link to the uploaded artifact with loss.png")
    parser.add_argument("--plot", action="store_true", help="draw loss.png from logs/loss.csv where missing")
    parser.add_argument("--title", default="Training runs")
    args = parser.parse_args(argv)
    sections = [f"## {args.title}", ""]
    for output_dir in args.output_dirs:
        if args.plot and not (output_dir / "loss.png").is_file():
            plot_loss(output_dir / "logs" / "loss.csv", output_dir / "loss.png", title=output_dir.name)
        sections.append(run_section(output_dir, args.artifact_url))
    text = "\n".join(sections)
    target = os.environ.get("GITHUB_STEP_SUMMARY")
    if target:
        with open(target, "a", encoding="utf-8") as handle:
            handle.write(text + "\n")
    else:
        sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
