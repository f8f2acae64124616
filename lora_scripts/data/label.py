"""`lora-scripts label`: caption an image folder with CLIP zero-shot labels into its metadata.csv.

Each image gets the candidate label(s) CLIP scores highest for it, optionally after the trigger
word. Captions already in ``metadata.csv`` (or in per-image ``.txt`` files) are kept unless
``--overwrite``; the file is rewritten atomically.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lora_scripts.atomic import write_text
from lora_scripts.errors import UserError

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA = "metadata.csv"
FIELDS = ("file_name", "prompt")


def read_labels(values: Sequence[str]) -> list[str]:
    """The candidate labels: ``values`` itself, or the lines of the single file it names."""
    if len(values) == 1 and (Path(values[0]).is_file() or values[0].endswith(".txt")):
        return _read_label_file(Path(values[0]))
    labels = [v.strip() for v in values]
    for value in labels:
        if not value:
            raise UserError("--labels: a label is empty")
    _check_unique(labels, "--labels", lambda i: f"label {i + 1}")
    return labels


def _read_label_file(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"--labels: label file {path} not found")
    text = _read_text(path)
    numbered = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)]
    numbered = [(n, line) for n, line in numbered if line and not line.startswith("#")]
    if not numbered:
        raise UserError(f"{path}: no labels; write one label per line")
    labels = [line for _, line in numbered]
    _check_unique(labels, str(path), lambda i: f"line {numbered[i][0]}")
    return labels


def _check_unique(labels: list[str], where: str, name: Callable[[int], str]) -> None:
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):
        if label in seen:
            raise UserError(f"{where}: {name(i)}: label {label!r} repeats {name(seen[label])}")
        seen[label] = i


def find_images(folder: Path) -> list[Path]:
    """The images directly in ``folder``, sorted by name."""
    if not folder.is_dir():
        raise UserError(f"{folder}: image folder not found")
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise UserError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return images


def read_captions(folder: Path) -> dict[str, str]:
    """Existing captions by file name: per-image .txt files, overridden by rows of metadata.csv."""
    if (folder / "metadata.jsonl").is_file():
        raise UserError(
            f"{folder / 'metadata.jsonl'}: captions are kept in metadata.jsonl, but label writes metadata.csv "
            "(which would be read instead); move the captions into metadata.csv or remove metadata.jsonl"
        )
    captions = {
        image.name: _read_text(txt).strip()
        for image in find_images(folder)
        if (txt := image.with_suffix(".txt")).is_file()
    }
    path = folder / METADATA
    if not path.is_file():
        return captions
    try:
        rows = list(csv.reader(io.StringIO(_read_text(path))))
    except csv.Error as err:
        raise UserError(f"{path}: cannot read captions: {err}") from None
    if rows and [c.strip() for c in rows[0]] == list(FIELDS):
        rows = rows[1:]
        start = 2
    else:
        start = 1
    for line, row in enumerate(rows, start):
        if not row:
            continue
        if len(row) != 2:
            raise UserError(f"{path}: line {line}: expected 2 columns (file_name,prompt), got {len(row)}")
        captions[row[0].strip()] = row[1]
    return captions


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (bad byte at offset {err.start})") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read: {err.strerror or err}") from None


def write_captions(folder: Path, captions: dict[str, str]) -> Path:
    """Write ``captions`` as ``folder/metadata.csv`` (file_name,prompt with header), atomically."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(FIELDS)
    writer.writerows(sorted(captions.items()))
    path = folder / METADATA
    write_text(path, out.getvalue())
    return path


def load_clip(model: str) -> tuple[torch.nn.Module, object]:
    """CLIPModel and CLIPProcessor from a local folder or the local Hugging Face cache (no download)."""
    from transformers import CLIPModel, CLIPProcessor

    local = Path(model).expanduser()
    source = str(local) if local.is_dir() else model
    try:
        processor = CLIPProcessor.from_pretrained(source, local_files_only=True)
        clip = CLIPModel.from_pretrained(source, local_files_only=True)
    except OSError as err:
        if local.is_dir():
            raise UserError(f"--model {model}: not a CLIP model folder ({err})") from None
        raise UserError(
            f"--model {model}: not a local folder and not in the Hugging Face cache; download it first "
            f"(hf download {model}) or pass a local CLIP folder"
        ) from None
    return clip.eval(), processor


def similarities(
    clip: torch.nn.Module, processor: object, images: list[object], labels: list[str], device: str
) -> torch.Tensor:
    """CLIP's image-text logits (images x labels) for one batch."""
    import torch

    inputs = processor(text=labels, images=images, return_tensors="pt", padding=True)
    with torch.inference_mode():
        return clip(**{k: v.to(device) for k, v in inputs.items()}).logits_per_image.float().cpu()


def label_images(
    folder: Path,
    labels: list[str],
    model: str,
    top_k: int = 1,
    trigger_word: str = "",
    batch_size: int = 16,
    overwrite: bool = False,
) -> tuple[Path, int, int]:
    """Caption the images of ``folder``; return (metadata path, images labeled, captions kept)."""
    import torch
    from tqdm.auto import tqdm

    if top_k < 1 or top_k > len(labels):
        raise UserError(f"--top-k must be between 1 and the number of labels ({len(labels)}), got {top_k}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    images = find_images(folder)
    captions = read_captions(folder)
    todo = [p for p in images if overwrite or not captions.get(p.name, "").strip()]
    kept = len(images) - len(todo)
    for path in todo:
        _read_image(path, header_only=True)  # fail on a broken file before the model loads
    if todo:
        clip, processor = load_clip(model)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        clip.to(device)
        prefix = f"{trigger_word.strip()}, " if trigger_word.strip() else ""
        with tqdm(total=len(todo), unit="img", desc="labeling") as bar:
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                pixels = [_read_image(p) for p in batch]
                best = similarities(clip, processor, pixels, labels, device).topk(top_k, dim=1).indices
                for path, row in zip(batch, best.tolist(), strict=True):
                    captions[path.name] = prefix + ", ".join(labels[i] for i in row)
                bar.update(len(batch))
    return write_captions(folder, captions), len(todo), kept


def _read_image(path: Path, header_only: bool = False) -> object:
    """The image as RGB; with ``header_only``, only check that it opens (fast) and return None."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return None if header_only else image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"{path}: cannot read image: {err}") from None


def main(args: argparse.Namespace) -> int:
    folder = Path(args.dir)
    labels = read_labels(args.labels)
    path, labeled, kept = label_images(
        folder, labels, args.model, args.top_k, args.trigger_word, args.batch_size, args.overwrite
    )
    print(f"labeled {labeled} image(s), kept {kept} existing caption(s): {path}", file=sys.stdout)
    return 0
