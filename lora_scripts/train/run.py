"""`lora-scripts train --config X [--resume]`."""

from __future__ import annotations

import argparse

from lora_scripts.config import load_config


def main(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.resume:
        config = config.replace(resume_from="latest")
    from lora_scripts.train.loop import train

    result = train(config)
    if not result.summary:  # not the main process of a multi-process run: it writes and reports nothing
        return 0
    print(
        f"done: {result.steps} steps, final loss {result.final_loss:.4f}" if result.final_loss is not None else "done"
    )
    for path in result.weights:
        print(path)
    return 0
