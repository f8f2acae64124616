"""`lora-scripts data check`: lint an image dataset folder, and the dataset check of `validate --check-paths`.

The checks themselves live in :func:`lora_scripts.data.images.scan_dataset` (the same code training runs
before its first step); this module adds what only a person reading a report needs: counts, caption
coverage, exact duplicates, size / aspect-ratio / bucket histograms and caption statistics. Errors make
the exit status 1; warnings are listed but do not. Torch is never imported here.
"""

from __future__ import annotations

import argparse
import hashlib
import math
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from lora_scripts.config import Problem
from lora_scripts.data.images import DataProblem, Scan, expand_repeats, find_examples, scan_dataset, target_sizes
from lora_scripts.errors import UserError
from lora_scripts.validate import github_annotation

if TYPE_CHECKING:
    from lora_scripts.config import Config

_RATIOS = ((1, 1), (5, 4), (4, 3), (3, 2), (16, 9), (2, 1), (3, 1))
_SHOWN = 8  # histogram rows before "... more"


def dataset_errors(config: Config) -> list[str]:
    """Every error of the image dataset ``config`` points to (the checks training runs before starting)."""
    return find_examples(config)[1]


def duplicates(images: list[Path]) -> list[DataProblem]:
    """A warning for each image whose bytes equal an earlier image's."""
    first: dict[str, Path] = {}
    found = []
    for image in images:
        digest = hashlib.sha256(image.read_bytes()).hexdigest()
        if digest in first:
            found.append(DataProblem(image, f"exact duplicate of {first[digest]}"))
        else:
            first[digest] = image
    return found


def aspect_name(size: tuple[int, int]) -> str:
    """The common aspect ratio closest to ``size``'s, e.g. "4:3" or "9:16"."""
    ratio = math.log(size[0] / size[1])
    named = [(a, b) for a, b in _RATIOS] + [(b, a) for a, b in _RATIOS if a != b]
    a, b = min(named, key=lambda r: abs(math.log(r[0] / r[1]) - ratio))
    return f"{a}:{b}"


def histogram(counts: Counter[str]) -> str:
    shown = ", ".join(f"{key} x{count}" for key, count in counts.most_common(_SHOWN))
    more = len(counts) - _SHOWN
    return f"{shown}, ... ({more} more)" if more > 0 else shown or "none"


def report(scan: Scan, resolution: int, bucket: bool) -> list[str]:
    """The summary lines of the report (everything but the problem list)."""
    examples = scan.examples
    captioned = sum(1 for image in scan.images if image in scan.captions)
    repeated = [example for example in examples if example.repeats > 1]
    lines = [
        f"dataset: {scan.data_dir} (captions from {scan.caption_source})",
        f"images: {len(scan.images)} found, {len(examples)} usable, {len(repeated)} repeated by N_name folders; "
        f"{len(expand_repeats(examples))} training examples per epoch",
    ]
    if scan.images:
        lines.append(f"captions: {captioned} of {len(scan.images)} images ({100 * captioned / len(scan.images):.0f}%)")
    sizes = list(scan.sizes.values())
    lines.append(f"sizes: {histogram(Counter(f'{w}x{h}' for w, h in sizes))}")
    lines.append(f"aspect ratios: {histogram(Counter(aspect_name(size) for size in sizes))}")
    targets = Counter(f"{w}x{h}" for w, h in target_sizes(examples, resolution, bucket))
    what = "aspect-ratio buckets" if bucket else "training size (resize + center crop)"
    lines.append(f"{what} at resolution {resolution}: {histogram(targets)}")
    captions = [example.caption for example in examples]
    if captions:
        words = [len(caption.split()) for caption in captions]
        lines.append(f"caption length: {min(words)} to {max(words)} words, mean {sum(words) / len(words):.1f}")
        tags = Counter(tag.strip().lower() for caption in captions for tag in caption.split(",") if tag.strip())
        lines.append(f"tags: {len(tags)} distinct; most frequent: {histogram(tags)}")
    return lines


def _annotation(problem: DataProblem, level: str) -> str:
    located = Problem(str(problem.file), problem.line or 1, 1, "dataset", problem.message)
    return github_annotation(located, level, "dataset")


def main(args: argparse.Namespace) -> int:
    data_dir = Path(args.dir)
    if not data_dir.is_dir():
        raise UserError(f"{data_dir}: no such folder", exit_code=2)
    metadata = Path(args.metadata) if args.metadata else None
    scan = scan_dataset(data_dir, metadata, "", args.resolution, args.bucket)
    warnings = scan.warnings + duplicates(scan.images)
    for line in report(scan, args.resolution, args.bucket):
        print(line)
    for title, level, problems in (("warnings", "warning", warnings), ("errors", "error", scan.errors)):
        if problems and args.format == "text":
            print(f"{title} ({len(problems)}):")
        for problem in problems:
            print(_annotation(problem, level) if args.format == "github" else f"  {problem.text()}")
    verdict = "FAILED" if scan.errors else "OK"
    print(f"{verdict}: {len(scan.errors)} error(s), {len(warnings)} warning(s)")
    return 1 if scan.errors else 0
