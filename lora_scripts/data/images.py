"""Image datasets: finding images and captions, checking them all before training, loading, bucketing.

Captions come from ``metadata.csv`` (``file_name,prompt``, header optional), ``metadata.jsonl``
(``{"file_name": ..., "prompt" | "text": ...}``) or one ``.txt`` file per image. Images inside kohya-style
``N_name`` subfolders are repeated N times per epoch. :func:`scan_dataset` is the one place where a
dataset is checked; training (:func:`load_image_examples`), ``lora-scripts data check`` and
``lora-scripts validate --check-paths`` all report what it finds.

Sizes. Without bucketing every image is resized (shorter side) and center-cropped to
``resolution x resolution``. With bucketing it gets the bucket of the closest aspect ratio; buckets
have sides that are multiples of :func:`bucket_step` (64 from resolution 256 up) and an area of at most
``resolution**2``. Images are never upscaled (``MAX_UPSCALE``): an image that would have to be enlarged
to fill its target size is reported as too small. Without bucketing that means a shorter side below
the resolution; with bucketing, an area below the bucket's (about ``resolution**2``) or an aspect ratio
so far from every bucket's that one side falls short.

Torch is imported only by :func:`load_image`, so the checks stay light.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import ExifTags, Image, ImageDraw, ImageOps

from lora_scripts.atomic import atomic_path, write_text
from lora_scripts.errors import UserError

if TYPE_CHECKING:
    import torch

    from lora_scripts.config import Config

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
METADATA_NAMES = ("metadata.csv", "metadata.jsonl")
CAPTION_COLUMNS = ("prompt", "text", "caption")
MAX_UPSCALE = 1.0  # images are never enlarged to fill their target size
MAX_BUCKET_ASPECT = 4.0  # the most elongated bucket is 4:1
_REPEAT_DIR = re.compile(r"^(\d+)_(.+)$")
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ROTATED_ORIENTATIONS = frozenset({5, 6, 7, 8})  # EXIF orientations that swap width and height


@dataclass(frozen=True)
class ImageExample:
    """One training image: its file, its caption (trigger word included), its repeats per epoch and its
    size (width, height) as displayed, i.e. after EXIF rotation."""

    path: Path
    caption: str
    repeats: int
    size: tuple[int, int]


@dataclass(frozen=True)
class DataProblem:
    """One thing wrong with a dataset: the file, the line for metadata files, and what is wrong."""

    file: Path
    message: str
    line: int | None = None

    def text(self, relative_to: Path | None = None) -> str:
        shown = self.file
        if relative_to is not None and shown.is_relative_to(relative_to) and shown != relative_to:
            shown = shown.relative_to(relative_to)
        where = f"{shown} line {self.line}" if self.line else str(shown)
        return f"{where}: {self.message}"


@dataclass
class Scan:
    """Everything found in a dataset folder: the usable examples, every problem, and what the lint reports."""

    data_dir: Path
    caption_source: str  # "metadata.csv", "metadata.jsonl" (the file's name) or ".txt files"
    examples: list[ImageExample] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)  # every image file under data_dir
    captions: dict[Path, str] = field(default_factory=dict)  # image -> caption as written (no trigger word)
    sizes: dict[Path, tuple[int, int]] = field(default_factory=dict)  # every image that decodes
    errors: list[DataProblem] = field(default_factory=list)
    warnings: list[DataProblem] = field(default_factory=list)


def find_examples(config: Config) -> tuple[list[ImageExample], list[str]]:
    """The usable examples of the config's dataset and every problem found, one string each."""
    scan = scan_config(config)
    return scan.examples, [problem.text() for problem in scan.errors]


def scan_config(config: Config) -> Scan:
    data_dir = config.path("train_data_dir")
    if data_dir is None:
        raise UserError(f"{config.source}: train_data_dir is not set")
    return scan_dataset(data_dir, config.path("metadata_path"), config.trigger_word, config.resolution, config.bucket)


def load_image_examples(config: Config) -> list[ImageExample]:
    """The config's examples; raises :class:`UserError` listing every problem when there is any."""
    scan = scan_config(config)
    if scan.errors:
        listed = "; ".join(problem.text(scan.data_dir) for problem in scan.errors)
        count = len(scan.errors)
        raise UserError(f"{count} problem{'s' if count > 1 else ''} in {scan.data_dir}: {listed}")
    return scan.examples


def scan_dataset(data_dir: Path, metadata: Path | None, trigger_word: str, resolution: int, bucket: bool) -> Scan:
    """Read captions, fully decode every image and check its size; never raises for bad data."""
    if not data_dir.is_dir():
        scan = Scan(data_dir, "")
        scan.errors.append(DataProblem(data_dir, "data folder not found"))
        return scan
    if metadata is None:
        metadata = next((data_dir / name for name in METADATA_NAMES if (data_dir / name).is_file()), None)
    scan = Scan(data_dir, metadata.name if metadata else ".txt files")
    scan.images = _files(data_dir, IMAGE_SUFFIXES)
    if metadata is None:
        listed = _txt_captions(scan)
    elif not metadata.is_file():
        scan.errors.append(DataProblem(metadata, "metadata file not found"))
        return scan
    elif metadata.suffix.lower() not in (".csv", ".jsonl"):
        scan.errors.append(DataProblem(metadata, "unsupported metadata file; use metadata.csv or metadata.jsonl"))
        return scan
    else:
        listed = _metadata_captions(scan, metadata)
    for image, caption in listed.items():
        repeats = _repeats(scan, image)
        size = _checked_size(scan, image, resolution, bucket)
        if not caption.strip():
            scan.errors.append(DataProblem(image, "empty caption"))
        elif size is not None and repeats:
            scan.examples.append(ImageExample(image, _with_trigger(caption, trigger_word), repeats, size))
    if not scan.examples and not scan.errors:
        scan.errors.append(DataProblem(data_dir, f"no images found ({', '.join(sorted(IMAGE_SUFFIXES))})"))
    return scan


def _files(data_dir: Path, suffixes: Iterable[str]) -> list[Path]:
    """Files under ``data_dir`` with one of ``suffixes`` (any case), skipping hidden files and folders."""
    wanted = set(suffixes)
    found = []
    for path in data_dir.rglob("*"):
        hidden = any(part.startswith(".") for part in path.relative_to(data_dir).parts)
        if not hidden and path.suffix.lower() in wanted and path.is_file():
            found.append(path)
    return sorted(found)


def _txt_captions(scan: Scan) -> dict[Path, str]:
    """Captions from ``name.txt`` next to each image."""
    captions: dict[Path, str] = {}
    for image in scan.images:
        caption_file = image.with_suffix(".txt")
        if not caption_file.is_file():
            scan.errors.append(DataProblem(image, f"no caption: {caption_file.name} not found (or add a metadata.csv)"))
            continue
        try:
            text = caption_file.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as err:
            scan.errors.append(DataProblem(caption_file, f"cannot read caption: {err}"))
            continue
        captions[image] = scan.captions[image] = " ".join(text.split())
    stems = {image.with_suffix("") for image in scan.images}
    for caption_file in _files(scan.data_dir, [".txt"]):
        if caption_file.with_suffix("") not in stems:
            scan.warnings.append(DataProblem(caption_file, "caption file without an image next to it"))
    return captions


def _metadata_captions(scan: Scan, metadata: Path) -> dict[Path, str]:
    """Captions from metadata.csv / metadata.jsonl; file names are relative to the data folder."""
    try:
        text = metadata.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        scan.errors.append(DataProblem(metadata, f"cannot read metadata: {err}"))
        return {}
    rows = _jsonl_rows(scan, metadata, text) if metadata.suffix.lower() == ".jsonl" else _csv_rows(scan, metadata, text)
    captions: dict[Path, str] = {}
    first_line: dict[Path, int] = {}
    for line, name, caption in rows:
        image = scan.data_dir / name
        if image in first_line:
            scan.errors.append(
                DataProblem(metadata, f"{name} is listed again (first on line {first_line[image]})", line)
            )
            continue
        first_line[image] = line
        if not image.is_file():
            scan.errors.append(DataProblem(metadata, f"{name}: image file not found ({image})", line))
            continue
        captions[image] = scan.captions[image] = caption.strip()
    for image in scan.images:
        if image not in first_line:
            scan.warnings.append(DataProblem(image, f"not listed in {metadata.name}; it will not be used"))
    return captions


def _csv_rows(scan: Scan, metadata: Path, text: str) -> list[tuple[int, str, str]]:
    """(line, file_name, caption) rows. A header is recognised by a ``file_name`` cell; without one the
    columns are file name, caption. Unquoted commas after the caption column stay in the caption."""
    rows: list[tuple[int, str, str]] = []
    reader = csv.reader(text.splitlines(keepends=True))
    name_col, caption_col, width = 0, 1, 2
    first = True
    line = 1
    try:
        for row in reader:
            start, line = line, reader.line_num + 1
            if not any(cell.strip() for cell in row):
                continue
            cells = [cell.strip().lower() for cell in row]
            if first and "file_name" in cells:
                first = False
                found = [c for c in CAPTION_COLUMNS if c in cells]
                if not found:
                    scan.errors.append(
                        DataProblem(metadata, "header has no prompt column (expected file_name,prompt)", start)
                    )
                    return []
                name_col, caption_col, width = cells.index("file_name"), cells.index(found[0]), len(cells)
                continue
            first = False
            if len(row) < width or (len(row) > width and caption_col != width - 1):
                expected = "file_name,prompt" if width == 2 else f"{width} columns like the header"
                scan.errors.append(DataProblem(metadata, f"expected {expected}, got {len(row)} field(s)", start))
                continue
            name = row[name_col].strip()
            if not name:
                scan.errors.append(DataProblem(metadata, "empty file name", start))
                continue
            rows.append((start, name, ",".join(row[caption_col:]) if caption_col == width - 1 else row[caption_col]))
    except csv.Error as err:
        scan.errors.append(DataProblem(metadata, f"malformed CSV: {err}", line))
    return rows


def _jsonl_rows(scan: Scan, metadata: Path, text: str) -> list[tuple[int, str, str]]:
    rows: list[tuple[int, str, str]] = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as err:
            scan.errors.append(DataProblem(metadata, f"not valid JSON: {err.msg} (column {err.colno})", line))
            continue
        caption_key = next((key for key in CAPTION_COLUMNS if isinstance(record, dict) and key in record), None)
        name = record.get("file_name") if isinstance(record, dict) else None
        if not isinstance(name, str) or not name.strip() or caption_key is None:
            wanted = '{"file_name": "...", "prompt": "..."}'
            scan.errors.append(DataProblem(metadata, f"expected an object like {wanted}", line))
            continue
        caption = record[caption_key]
        if not isinstance(caption, str):
            scan.errors.append(DataProblem(metadata, f'"{caption_key}" must be a string', line))
            continue
        rows.append((line, name.strip(), caption))
    return rows


def _repeats(scan: Scan, image: Path) -> int:
    """N for an image inside an ``N_name`` folder (the top-level folder under the data folder), else 1."""
    if not image.is_relative_to(scan.data_dir):
        return 1
    parts = image.relative_to(scan.data_dir).parts
    match = _REPEAT_DIR.match(parts[0]) if len(parts) > 1 else None
    if match is None:
        return 1
    repeats = int(match.group(1))
    if repeats < 1:
        scan.errors.append(DataProblem(image, f"folder {parts[0]} repeats its images 0 times; use 1 or more"))
    return repeats


def _checked_size(scan: Scan, image: Path, resolution: int, bucket: bool) -> tuple[int, int] | None:
    """Fully decode the image; record its displayed size, or a problem when it is unreadable or too small."""
    try:
        with Image.open(image) as img:
            img.load()
            size = _displayed_size(img)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
        scan.errors.append(DataProblem(image, f"unreadable or corrupt image ({err})"))
        return None
    scan.sizes[image] = size
    target = target_size(size, resolution, bucket)
    upscale = _cover_scale(size, target)
    if upscale > MAX_UPSCALE + 1e-9:
        scan.errors.append(DataProblem(image, _too_small(size, target, resolution, bucket, upscale)))
        return None
    return size


def _too_small(size: tuple[int, int], target: tuple[int, int], resolution: int, bucket: bool, upscale: float) -> str:
    shown = f"image is {size[0]}x{size[1]}"
    if not bucket:
        return f"{shown}, smaller than resolution {resolution} (the shorter side must be at least {resolution})"
    return (
        f"{shown}, too small for its aspect-ratio bucket {target[0]}x{target[1]} at resolution {resolution} "
        f"(it would be upscaled {upscale:.2f}x; images are never enlarged)"
    )


def _displayed_size(img: Image.Image) -> tuple[int, int]:
    width, height = img.size
    if img.getexif().get(ExifTags.Base.Orientation) in _ROTATED_ORIENTATIONS:
        return height, width
    return width, height


def _with_trigger(caption: str, trigger_word: str) -> str:
    caption = caption.strip()
    if not trigger_word or caption.split(",")[0].strip() == trigger_word.strip():
        return caption
    return f"{trigger_word.strip()}, {caption}"


def expand_repeats(examples: Iterable[ImageExample]) -> list[ImageExample]:
    """Each example as many times as its ``repeats`` (one epoch's worth)."""
    return [example for example in examples for _ in range(example.repeats)]


def bucket_step(resolution: int) -> int:
    """Bucket sides are multiples of this: 64 for resolution >= 256, a quarter of the resolution below
    (rounded down to a multiple of 8), so tiny test resolutions still get several buckets."""
    return max(8, min(64, resolution // 4 // 8 * 8))


@functools.cache
def buckets(resolution: int) -> tuple[tuple[int, int], ...]:
    """All (width, height) buckets: sides multiples of :func:`bucket_step`, area at most ``resolution**2``,
    each as large as the step allows for its width, aspect ratio at most ``MAX_BUCKET_ASPECT``."""
    step, area = bucket_step(resolution), resolution * resolution
    found: set[tuple[int, int]] = set()
    for width in range(step, int(resolution * math.sqrt(MAX_BUCKET_ASPECT)) + step, step):
        height = area // width // step * step
        if height >= step and max(width, height) / min(width, height) <= MAX_BUCKET_ASPECT:
            found |= {(width, height), (height, width)}
    return tuple(sorted(found))


def target_size(size: tuple[int, int], resolution: int, bucket: bool) -> tuple[int, int]:
    """The (width, height) an image of ``size`` is trained at: square, or the closest-aspect bucket."""
    if not bucket:
        return resolution, resolution
    aspect = math.log(size[0] / size[1])
    return min(buckets(resolution), key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def target_sizes(examples: Iterable[ImageExample], resolution: int, bucket: bool) -> list[tuple[int, int]]:
    """The (width, height) each example is trained at; equal sizes may share a batch."""
    return [target_size(example.size, resolution, bucket) for example in examples]


def _cover_scale(size: tuple[int, int], target: tuple[int, int]) -> float:
    """How much an image must be scaled so that it covers ``target`` (before the center crop)."""
    return max(target[0] / size[0], target[1] / size[1])


def open_rgb(path: Path) -> Image.Image:
    """The image upright (EXIF orientation applied) in RGB. Transparency is composited on white,
    16-bit and 32-bit integer images are scaled from 0..65535, CMYK and palettes converted."""
    import numpy as np

    with Image.open(path) as opened:
        img = ImageOps.exif_transpose(opened)
    if img.mode in _SIXTEEN_BIT_MODES:
        pixels = np.asarray(img, dtype=np.float64) * (255.0 / 65535.0)
        img = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("RGB")


def load_image(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """``path`` resized (shorter side first) and center-cropped to ``size`` (width, height), as a float32
    tensor of shape (3, height, width) with values in [-1, 1]."""
    import numpy as np
    import torch

    fitted = ImageOps.fit(open_rgb(path), size, method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
    pixels = torch.from_numpy(np.array(fitted, dtype=np.uint8)).permute(2, 0, 1)
    return pixels.to(torch.float32) / 127.5 - 1.0


_COLOURS = {
    "red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 200), "yellow": (230, 200, 40),
    "purple": (130, 50, 160), "orange": (240, 130, 30), "gray": (128, 128, 128), "white": (245, 245, 245),
}  # fmt: skip
_SHAPES = ("circle", "square", "triangle", "stripes")
_ASPECTS = ((1, 1), (5, 4), (4, 5), (4, 3), (1, 1), (3, 4))  # shorter side is always the resolution


def write_dummy_images(out: Path, count: int, resolution: int) -> list[Path]:
    """Write ``count`` generated PNG images (coloured shapes on coloured backgrounds, a few aspect
    ratios, shorter side ``resolution``) and a ``metadata.csv`` with a header; same output every run.
    Returns the image paths, then the metadata path."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1234)
    names = list(_COLOURS)
    rows = ["file_name,prompt"]
    written: list[Path] = []
    for index in range(count):
        background, colour = rng.sample(names, 2)
        shape = _SHAPES[index % len(_SHAPES)]
        aspect = _ASPECTS[index % len(_ASPECTS)]
        size = (resolution * aspect[0] // min(aspect), resolution * aspect[1] // min(aspect))
        image = _draw(size, _COLOURS[background], _COLOURS[colour], shape, rng)
        path = out / f"img_{index:03d}.png"
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")
        written.append(path)
        rows.append(f'{path.name},"{colour} {shape}, {background} background, simple shapes"')
    metadata = out / "metadata.csv"
    write_text(metadata, "\n".join(rows) + "\n")
    return [*written, metadata]


def _draw(size: tuple[int, int], background: tuple, colour: tuple, shape: str, rng: random.Random) -> Image.Image:
    width, height = size
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    side = min(size) * rng.uniform(0.4, 0.7)
    left, top = rng.uniform(0, width - side), rng.uniform(0, height - side)
    box = (left, top, left + side, top + side)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(left + side / 2, top), (left, top + side), (left + side, top + side)], fill=colour)
    else:
        stripe = max(1, width // 8)
        for x in range(0, width, 2 * stripe):
            draw.rectangle((x, 0, x + stripe - 1, height), fill=colour)
    return image
