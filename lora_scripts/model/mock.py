"""`lora-scripts mock-model`: writes a random-weight base model built locally (no download)."""

from __future__ import annotations

import argparse
from pathlib import Path


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.kind == "causal-lm":
        from lora_scripts.model.mock_lm import build_mock_causal_lm

        written = build_mock_causal_lm(out, size=args.size)
    else:
        from lora_scripts.model.mock_sd import build_mock_sd

        written = build_mock_sd(out, size=args.size, family=args.family)
    for path in written:
        print(path)
    return 0
