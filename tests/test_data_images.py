"""Image datasets: every caption format, repeats, the whole-dataset check, odd image modes, buckets, dummy data."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lora_scripts.cli import main as cli
from lora_scripts.config import load_config
from lora_scripts.data.images import (
    MAX_UPSCALE,
    buckets,
    expand_repeats,
    find_examples,
    load_image,
    load_image_examples,
    scan_dataset,
    target_sizes,
    write_dummy_images,
)
from lora_scripts.errors import UserError


def image(path: Path, size: tuple[int, int] = (64, 64), colour: tuple[int, int, int] = (90, 90, 90)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


@pytest.fixture
def dataset(tmp_path: Path, write_config: Callable[..., Path]) -> Callable[..., list]:
    """dataset({file: size_or_bytes}, metadata_name=..., metadata_text=..., **config) -> examples."""

    def make(files: dict[str, object], metadata: tuple[str, str] | None = None, **config: object) -> list:
        data = tmp_path / "data"
        data.mkdir(exist_ok=True)
        for name, content in files.items():
            if isinstance(content, tuple):
                image(data / name, content)
            else:
                (data / name).parent.mkdir(parents=True, exist_ok=True)
                (data / name).write_text(str(content), encoding="utf-8")
        if metadata:
            (data / metadata[0]).write_text(metadata[1], encoding="utf-8")
        values = {"base_model": "some/model", "output_dir": "out", "train_data_dir": str(data), "resolution": 64}
        path = write_config(**values, **config)
        return load_image_examples(load_config(path))

    return make


def captions(examples: list) -> dict[str, str]:
    return {e.path.name: e.caption for e in examples}


def test_csv_without_header(dataset: Callable[..., list]) -> None:
    examples = dataset(
        {"img01.jpg": (64, 64), "img02.png": (64, 80)}, ("metadata.csv", "img01.jpg,gray square\nimg02.png,tall\n")
    )
    assert captions(examples) == {"img01.jpg": "gray square", "img02.png": "tall"}
    assert [e.size for e in examples] == [(64, 64), (64, 80)]


def test_csv_header_quoted_and_unquoted_commas(dataset: Callable[..., list]) -> None:
    text = 'file_name,prompt\n\na.png,"red, round, shiny"\nb.png,blue, square\n'
    examples = dataset({"a.png": (64, 64), "b.png": (64, 64)}, ("metadata.csv", text))
    assert captions(examples) == {"a.png": "red, round, shiny", "b.png": "blue, square"}


def test_csv_header_with_other_column_order(dataset: Callable[..., list]) -> None:
    text = 'text,file_name,score\n"a cat, sitting",a.png,5\n'
    assert captions(dataset({"a.png": (64, 64)}, ("metadata.csv", text))) == {"a.png": "a cat, sitting"}


def test_jsonl_prompt_and_text_keys(dataset: Callable[..., list]) -> None:
    text = '{"file_name": "a.png", "prompt": "one"}\n\n{"file_name": "b.png", "text": "two, three"}\n'
    examples = dataset({"a.png": (64, 64), "b.png": (64, 64)}, ("metadata.jsonl", text))
    assert captions(examples) == {"a.png": "one", "b.png": "two, three"}


def test_csv_is_preferred_over_jsonl_and_txt(dataset: Callable[..., list]) -> None:
    files = {"a.png": (64, 64), "a.txt": "from txt"}
    examples = dataset(files, ("metadata.csv", "a.png,from csv\n"))
    assert captions(examples) == {"a.png": "from csv"}


def test_txt_captions_and_repeat_folders(dataset: Callable[..., list]) -> None:
    files = {
        "a.png": (64, 64), "a.txt": "plain\n",
        "3_cat/b.png": (64, 64), "3_cat/b.txt": "a  cat\nsitting",
        "sub/c.jpg": (64, 64), "sub/c.txt": "nested",
    }  # fmt: skip
    examples = dataset(files)
    assert captions(examples) == {"a.png": "plain", "b.png": "a cat sitting", "c.jpg": "nested"}
    assert {e.path.name: e.repeats for e in examples} == {"a.png": 1, "b.png": 3, "c.jpg": 1}
    assert sorted(e.path.name for e in expand_repeats(examples)) == ["a.png", "b.png", "b.png", "b.png", "c.jpg"]


def test_metadata_paths_into_repeat_folders(dataset: Callable[..., list]) -> None:
    files = {"2_dog/x.png": (64, 64), "y.png": (64, 64)}
    examples = dataset(files, ("metadata.csv", "file_name,prompt\n2_dog/x.png,dog\ny.png,other\n"))
    assert {e.path.name: (e.caption, e.repeats) for e in examples} == {"x.png": ("dog", 2), "y.png": ("other", 1)}


def test_trigger_word_prepended_once(dataset: Callable[..., list]) -> None:
    text = 'a.png,red ball\nb.png,"sks, blue ball"\n'
    examples = dataset({"a.png": (64, 64), "b.png": (64, 64)}, ("metadata.csv", text), trigger_word="sks")
    assert captions(examples) == {"a.png": "sks, red ball", "b.png": "sks, blue ball"}


def test_explicit_metadata_path(tmp_path: Path, dataset: Callable[..., list]) -> None:
    (tmp_path / "labels.jsonl").write_text('{"file_name": "a.png", "prompt": "elsewhere"}\n', encoding="utf-8")
    examples = dataset({"a.png": (64, 64)}, metadata_path=str(tmp_path / "labels.jsonl"))
    assert captions(examples) == {"a.png": "elsewhere"}


def test_every_problem_is_reported_at_once(tmp_path: Path, dataset: Callable[..., list]) -> None:
    data = tmp_path / "data"
    image(data / "good.png")
    image(data / "small.png", (40, 100))
    (data / "notimage.png").write_bytes(b"this is not an image")
    full = io.BytesIO()
    Image.effect_noise((64, 64), 50).save(full, format="JPEG")
    (data / "cut.jpg").write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    image(data / "blank.png")
    metadata = (
        "file_name,prompt\n"
        "good.png,fine\n"
        "small.png,too small\n"
        "notimage.png,corrupt\n"
        "cut.jpg,truncated\n"
        "blank.png,\n"
        "gone.png,missing file\n"
        "lonely\n"
    )
    with pytest.raises(UserError) as err:
        dataset({}, ("metadata.csv", metadata))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"6 problems in {data}:")
    for expected in (
        "small.png: image is 40x100, smaller than resolution 64",
        "notimage.png: unreadable or corrupt image",
        "cut.jpg: unreadable or corrupt image (image file is truncated",
        "blank.png: empty caption",
        "metadata.csv line 7: gone.png: image file not found",
        "metadata.csv line 8: expected file_name,prompt",
    ):
        assert expected in message
    assert "good.png" not in message


def test_problems_with_txt_and_jsonl_name_file_and_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    image(data / "a.png")
    image(data / "b.png")
    (data / "b.txt").write_text("   \n", encoding="utf-8")
    (data / "orphan.txt").write_text("no image", encoding="utf-8")
    scan = scan_dataset(data, None, "", 64, False)
    assert [p.text(data) for p in scan.errors] == [
        "a.png: no caption: a.txt not found (or add a metadata.csv)",
        "b.png: empty caption",
    ]
    assert [p.text(data) for p in scan.warnings] == ["orphan.txt: caption file without an image next to it"]

    (data / "metadata.jsonl").write_text(
        '{"file_name": "a.png", "prompt": "x"}\n{"file_name": "b.png"\n["b.png"]\n', encoding="utf-8"
    )
    scan = scan_dataset(data, None, "", 64, False)
    assert [(p.file.name, p.line) for p in scan.errors] == [("metadata.jsonl", 2), ("metadata.jsonl", 3)]
    assert "b.png: not listed in metadata.jsonl" in scan.warnings[0].text(data)


def test_duplicate_listing_and_missing_folder(tmp_path: Path) -> None:
    data = tmp_path / "data"
    image(data / "a.png")
    (data / "metadata.csv").write_text("a.png,x\na.png,y\n", encoding="utf-8")
    scan = scan_dataset(data, None, "", 64, False)
    assert [p.text(data) for p in scan.errors] == ["metadata.csv line 2: a.png is listed again (first on line 1)"]
    assert [p.text() for p in scan_dataset(tmp_path / "nope", None, "", 64, False).errors] == [
        f"{tmp_path / 'nope'}: data folder not found"
    ]
    (tmp_path / "empty").mkdir()
    assert "no images found" in scan_dataset(tmp_path / "empty", None, "", 64, False).errors[0].message


def save(img: Image.Image, path: Path, **kwargs: object) -> Path:
    img.save(path, **kwargs)
    return path


@pytest.mark.parametrize(
    ("name", "make", "rgb"),
    [
        ("gray.png", lambda: Image.new("L", (8, 8), 255), (255, 255, 255)),
        ("rgba.png", lambda: Image.new("RGBA", (8, 8), (255, 0, 0, 0)), (255, 255, 255)),  # transparent -> white
        ("half.png", lambda: Image.new("RGBA", (8, 8), (0, 0, 0, 128)), (127, 127, 127)),
        ("la.png", lambda: Image.new("LA", (8, 8), (0, 255)), (0, 0, 0)),
        ("cmyk.jpg", lambda: Image.new("CMYK", (8, 8), (0, 255, 255, 0)), (255, 0, 0)),
        ("deep.png", lambda: Image.fromarray(np.full((8, 8), 65535, np.uint16)), (255, 255, 255)),
        ("mid16.png", lambda: Image.fromarray(np.full((8, 8), 32768, np.uint16)), (128, 128, 128)),
        ("int32.tif", lambda: Image.fromarray(np.full((8, 8), 16384, np.int32)), (64, 64, 64)),
        ("palette.gif", lambda: Image.new("P", (8, 8), 0), (0, 0, 0)),
    ],
)
def test_odd_modes_load_as_rgb_in_range(tmp_path: Path, name: str, make: Callable[[], Image.Image], rgb: tuple) -> None:
    path = save(make(), tmp_path / name)
    tensor = load_image(path, (6, 4))
    assert tensor.shape == (3, 4, 6) and tensor.dtype == torch.float32
    assert tensor.min() >= -1 and tensor.max() <= 1
    expected = torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1) / 127.5 - 1
    assert torch.allclose(tensor, expected.expand_as(tensor), atol=0.06), (name, tensor[:, 0, 0])


def test_palette_transparency_composited_on_white(tmp_path: Path) -> None:
    img = Image.new("P", (8, 8), 1)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    path = save(img, tmp_path / "t.png", transparency=1)
    assert torch.allclose(load_image(path, (8, 8)), torch.ones(3, 8, 8))


def test_exif_rotated_image_is_upright(tmp_path: Path) -> None:
    stored = Image.new("RGB", (64, 32), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 32, 32))  # left half red as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: the stored left side is the top
    save(stored, tmp_path / "rot.jpg", exif=exif, quality=95)
    (tmp_path / "rot.txt").write_text("rotated", encoding="utf-8")
    scan = scan_dataset(tmp_path, None, "", 32, False)
    assert scan.errors == [] and scan.examples[0].size == (32, 64)
    tensor = load_image(tmp_path / "rot.jpg", (32, 64))
    assert tensor.shape == (3, 64, 32)
    top, bottom = tensor[:, 4:28].mean(dim=(1, 2)), tensor[:, 36:60].mean(dim=(1, 2))
    assert top[0] > 0.8 and top[2] < -0.8, top  # red on top
    assert bottom[2] > 0.8 and bottom[0] < -0.8, bottom  # blue below


def test_resize_shorter_side_then_center_crop(tmp_path: Path) -> None:
    img = Image.new("RGB", (96, 32), (0, 255, 0))
    img.paste((255, 0, 0), (0, 0, 32, 32))  # a red third on the left is cropped away
    tensor = load_image(save(img, tmp_path / "wide.png"), (16, 16))
    assert tensor.shape == (3, 16, 16)
    assert torch.allclose(
        tensor[:, :, 2:-2], torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 16, 12), atol=0.02
    )


def test_buckets_group_by_aspect_ratio_without_upscaling(tmp_path: Path) -> None:
    for resolution in (256, 512, 768):
        assert all(w % 64 == 0 and h % 64 == 0 and w * h <= resolution**2 for w, h in buckets(resolution))
    assert (512, 512) in buckets(512)
    sizes = {"sq1": (600, 600), "sq2": (520, 530), "wide1": (900, 600), "wide2": (1200, 800), "tall": (600, 900),
             "pano": (2400, 600), "big": (3000, 3000)}  # fmt: skip
    for name, size in sizes.items():
        image(tmp_path / f"{name}.png", size)
        (tmp_path / f"{name}.txt").write_text(name, encoding="utf-8")
    scan = scan_dataset(tmp_path, None, "", 512, True)
    assert scan.errors == []
    targets = dict(zip([e.path.stem for e in scan.examples], target_sizes(scan.examples, 512, True), strict=True))
    assert targets["sq1"] == targets["sq2"] == targets["big"] == (512, 512)
    assert targets["wide1"] == targets["wide2"] and targets["wide1"][0] > targets["wide1"][1]
    assert targets["tall"] == targets["wide1"][::-1]
    assert targets["pano"][0] >= 3 * targets["pano"][1]
    for example in scan.examples:
        w, h = targets[example.path.stem]
        assert max(w / example.size[0], h / example.size[1]) <= MAX_UPSCALE
    assert load_image(tmp_path / "pano.png", targets["pano"]).shape == (3, targets["pano"][1], targets["pano"][0])
    assert target_sizes(scan.examples, 512, False) == [(512, 512)] * len(scan.examples)


def test_bucketing_rejects_images_it_would_enlarge(tmp_path: Path) -> None:
    image(tmp_path / "small.png", (500, 400))  # area below 512 * 512: every bucket needs upscaling
    image(tmp_path / "strip.png", (2000, 200))  # large, but even the 4:1 bucket is taller than 200
    for name in ("small", "strip"):
        (tmp_path / f"{name}.txt").write_text(name, encoding="utf-8")
    scan = scan_dataset(tmp_path, None, "", 512, True)
    assert sorted(p.file.name for p in scan.errors) == ["small.png", "strip.png"]
    assert all("too small for its aspect-ratio bucket" in p.message for p in scan.errors)


def test_dummy_images_are_varied_deterministic_and_pass_the_check(tmp_path: Path) -> None:
    first = write_dummy_images(tmp_path / "a", count=6, resolution=32)
    second = write_dummy_images(tmp_path / "b", count=6, resolution=32)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    assert first[-1].name == "metadata.csv" and first[-1].read_text().startswith("file_name,prompt\n")
    images = [Image.open(p) for p in first[:-1]]
    assert len({img.size for img in images}) > 1 and min(min(img.size) for img in images) == 32
    assert len({img.getpixel((0, 0)) for img in images}) > 1
    for bucket in (False, True):
        scan = scan_dataset(tmp_path / "a", None, "", 32, bucket)
        assert scan.errors == [] and len(scan.examples) == 6


def test_dummy_data_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["dummy-data", str(tmp_path / "out"), "--count", "4", "--resolution", "32"]) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 5 and all(Path(p).is_file() for p in printed)
    names = [f"img_00{i}.png" for i in range(4)]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [*names, "metadata.csv"]
    for name in names:  # the shorter side is the resolution asked for, whatever the aspect ratio
        with Image.open(tmp_path / "out" / name) as img:
            assert min(img.size) == 32, (name, img.size)
    rows = (tmp_path / "out" / "metadata.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0] == "file_name,prompt" and [row.split(",")[0] for row in rows[1:]] == names


def test_find_examples_returns_problems_instead_of_raising(tmp_path: Path, write_config: Callable[..., Path]) -> None:
    image(tmp_path / "data" / "a.png", (16, 16))
    (tmp_path / "data" / "a.txt").write_text("tiny", encoding="utf-8")
    config = load_config(write_config(base_model="x/y", output_dir="out", train_data_dir="data", resolution=64))
    examples, problems = find_examples(config)
    assert examples == [] and problems == [
        f"{tmp_path / 'data' / 'a.png'}: image is 16x16, smaller than resolution 64 "
        "(the shorter side must be at least 64)"
    ]
