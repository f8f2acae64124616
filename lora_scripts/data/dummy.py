"""`lora-scripts dummy-data`: writes a small generated dataset (images + metadata.csv, or JSONL text)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lora_scripts.errors import UserError


def main(args: argparse.Namespace) -> int:
    if args.count < 1:
        raise UserError(f"--count must be at least 1, got {args.count}", exit_code=2)
    out = Path(args.out)
    if args.kind == "text":
        from lora_scripts.data.text import write_dummy_text

        written = write_dummy_text(out, count=args.count)
    else:
        if args.resolution < 8:
            raise UserError(f"--resolution must be at least 8, got {args.resolution}", exit_code=2)
        from lora_scripts.data.images import write_dummy_images

        written = write_dummy_images(out, count=args.count, resolution=args.resolution)
    for path in written:
        print(path)
    return 0
