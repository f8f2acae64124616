"""`lora-scripts label`: caption an image folder with CLIP zero-shot labels into its metadata.csv.

Images are found as training finds them (:mod:`lora_scripts.data.images`: kohya ``N_name`` subfolders
included) and decoded as training decodes them (EXIF rotation, grayscale, CMYK, 16-bit). Each image gets
the candidate label(s) CLIP scores highest for it, optionally after the trigger word, under its path
relative to the folder (``10_cat/img.png``). Captions already in ``metadata.csv`` (or in per-image
``.txt`` files) are kept unless ``--overwrite``; the file is rewritten atomically.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from lora_scripts.atomic import write_text
from lora_scripts.data.images import CAPTION_COLUMNS, open_rgb, scan_dataset
from lora_scripts.errors import UserError

if TYPE_CHECKING:
    import torch

METADATA = "metadata.csv"
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
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


def read_dataset(folder: Path) -> tuple[list[Path], dict[str, str]]:
    """Every image under ``folder`` as training finds it, and the existing captions by file name (the path
    relative to ``folder``): from metadata.csv, else the ``.txt`` files; a ``.txt`` file also captions an
    image that metadata.csv does not list yet. Problems with the caption files are errors; problems with
    single images are left to ``lora-scripts data check`` (label fails only on an image it has to open)."""
    if (folder / "metadata.jsonl").is_file():
        raise UserError(
            f"{folder / 'metadata.jsonl'}: captions are kept in metadata.jsonl, but label writes metadata.csv "
            "(which would be read instead); move the captions into metadata.csv or remove metadata.jsonl"
        )
    # Resolution 1: no image is too small to label.
    scan = scan_dataset(folder, None, trigger_word="", resolution=1, bucket=False)
    problems = [problem for problem in scan.errors if problem.file not in scan.images]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(problems[0].text() + more)
    captions = {file_name(folder, image): caption for image, caption in scan.captions.items()}
    for image in scan.images:
        if file_name(folder, image) not in captions and (txt := image.with_suffix(".txt")).is_file():
            captions[file_name(folder, image)] = _read_text(txt).strip()
    return scan.images, captions


def file_name(folder: Path, image: Path) -> str:
    """The ``file_name`` of ``image`` in ``folder``'s metadata: its path relative to the folder, with ``/``."""
    return image.relative_to(folder).as_posix()


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (bad byte at offset {err.start})") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read: {err.strerror or err}") from None


def write_captions(folder: Path, captions: dict[str, str]) -> Path:
    """Write ``captions`` as ``folder/metadata.csv`` (with a header), atomically.

    An existing metadata.csv with a header keeps its columns: their order, the caption column's name
    (``prompt``, ``text`` or ``caption``) and every other column's values, so labelling loses nothing.
    """
    path = folder / METADATA
    header, rows = _existing_table(path)
    caption_column = next(column for column in header if column in CAPTION_COLUMNS)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for name, caption in sorted(captions.items()):
        row = {**rows.get(name, {}), "file_name": name, caption_column: caption}
        writer.writerow([row.get(column, "") for column in header])
    write_text(path, out.getvalue())
    return path


def _existing_table(path: Path) -> tuple[list[str], dict[str, dict[str, str]]]:
    """The header and the rows by file_name of an existing metadata.csv with a header; else the default header."""
    if path.is_file():
        with open(path, newline="", encoding="utf-8-sig") as handle:
            table = list(csv.reader(handle))
        header = table[0] if table else []
        if "file_name" in header and any(column in CAPTION_COLUMNS for column in header):
            return header, {
                row[header.index("file_name")]: dict(zip(header, row, strict=False)) for row in table[1:] if row
            }
    return list(FIELDS), {}


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
    images, captions = read_dataset(folder)
    todo = [p for p in images if overwrite or not captions.get(file_name(folder, p), "").strip()]
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
                    captions[file_name(folder, path)] = prefix + ", ".join(labels[i] for i in row)
                bar.update(len(batch))
    return write_captions(folder, captions), len(todo), kept


def _read_image(path: Path, header_only: bool = False) -> Image.Image | None:
    """The image as training sees it (upright RGB); with ``header_only``, only check that it opens (fast)."""
    try:
        if header_only:
            Image.open(path).close()
            return None
        return open_rgb(path)
    except IMAGE_ERRORS as err:
        raise UserError(f"{path}: cannot read image: {err}") from None


def main(args: argparse.Namespace) -> int:
    folder = Path(args.dir)
    labels = read_labels(args.labels)
    path, labeled, kept = label_images(
        folder, labels, args.model, args.top_k, args.trigger_word, args.batch_size, args.overwrite
    )
    print(f"labeled {labeled} image(s), kept {kept} existing caption(s): {path}", file=sys.stdout)
    return 0
