"""`lora-scripts label`: CLIP zero-shot captions, checked against a tiny random-weight CLIP built here."""

from __future__ import annotations

import csv
import json
import string
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from lora_scripts.cli import main as cli
from lora_scripts.data.images import open_rgb, scan_dataset

from conftest import fake_hub_cache

LABELS = ["a painting", "a photo", "cyberpunk style", "ancient ink drawing", "a sketch"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight CLIP (32 px images, letters-only BPE vocabulary) saved as a local folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    out = tmp_path_factory.mktemp("clip")
    letters = string.ascii_lowercase
    tokens = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters), "in</w>", "ph", "ot"]
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (out / "merges.txt").write_text("#version: 0.2\ni n</w>\np h\no t\n")
    tokenizer = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    tiny = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokens),
            "max_position_embeddings": 32,
            "bos_token_id": 0,
            "eos_token_id": 1,
            **tiny,
        },
        # Larger random weights than the default, so that the image matters more than the label text.
        vision_config={"image_size": 32, "patch_size": 8, "initializer_factor": 3.0, **tiny},
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(out)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


def make_images(folder: Path, count: int = 6) -> list[str]:
    """Images of different sizes, each a random colour gradient; returns their file names."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(count)
    names = []
    for i in range(count):
        side = 24 + 8 * i
        start, end = torch.rand(2, 1, 1, 3, generator=generator)
        ramp = torch.linspace(0, 1, side + 4).view(1, -1, 1)
        pixels = ((start + (end - start) * ramp).expand(side, -1, -1) * 255).to(torch.uint8)
        names.append(f"img{i}.png")
        Image.fromarray(pixels.numpy()).save(folder / names[-1])
    return names


def expected_top(
    clip_dir: Path,
    folder: Path,
    names: list[str],
    labels: list[str],
    k: int,
    read: Callable[[Path], Image.Image] = open_rgb,
) -> dict[str, list[str]]:
    """Top-k labels per image from the model's own image-text logits, one image at a time, the image read
    by ``read`` (by default as training reads it)."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(clip_dir).eval()
    processor = CLIPProcessor.from_pretrained(clip_dir)
    result = {}
    for name in names:
        image = read(folder / name)
        inputs = processor(text=labels, images=[image], return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = model(**inputs).logits_per_image[0]
        order = sorted(range(len(labels)), key=lambda i: -float(logits[i]))
        result[name] = [labels[i] for i in order[:k]]
    return result


def read_metadata(folder: Path) -> tuple[list[str], dict[str, str]]:
    with open(folder / "metadata.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    return rows[0], {name: prompt for name, prompt in rows[1:]}


def test_writes_the_label_clip_scores_highest(clip_dir: Path, tmp_path: Path) -> None:
    names = make_images(tmp_path / "data")
    code = cli(["label", str(tmp_path / "data"), "--labels", *LABELS, "--model", str(clip_dir), "--batch-size", "4"])
    assert code == 0
    header, captions = read_metadata(tmp_path / "data")
    assert header == ["file_name", "prompt"]
    expected = expected_top(clip_dir, tmp_path / "data", names, LABELS, 1)
    assert captions == {name: labels[0] for name, labels in expected.items()}
    # Random weights still have to tell the images apart, or the check above says little.
    assert len(set(captions.values())) > 1


def test_top_k_from_label_file_with_trigger_word(clip_dir: Path, tmp_path: Path) -> None:
    names = make_images(tmp_path / "data", count=5)
    label_file = tmp_path / "labels.txt"
    label_file.write_text("# styles\n" + "\n".join(LABELS) + "\n\n", encoding="utf-8")
    args = ["label", str(tmp_path / "data"), "--labels", str(label_file), "--model", str(clip_dir)]
    assert cli([*args, "--top-k", "2", "--trigger-word", "zxq", "--batch-size", "2"]) == 0
    _, captions = read_metadata(tmp_path / "data")
    expected = expected_top(clip_dir, tmp_path / "data", names, LABELS, 2)
    assert captions == {name: "zxq, " + ", ".join(labels) for name, labels in expected.items()}


def test_merge_keeps_existing_captions_and_overwrite_replaces(clip_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "data"
    names = make_images(folder, count=3)
    (folder / "metadata.csv").write_text(f"file_name,prompt\n{names[0]},my own caption\n", encoding="utf-8")
    (folder / f"{Path(names[1]).stem}.txt").write_text("caption from a txt file\n", encoding="utf-8")
    args = ["label", str(folder), "--labels", *LABELS, "--model", str(clip_dir)]
    assert cli(args) == 0
    _, captions = read_metadata(folder)
    assert captions[names[0]] == "my own caption"
    assert captions[names[1]] == "caption from a txt file"
    assert captions[names[2]] in LABELS

    assert cli([*args, "--overwrite"]) == 0
    _, captions = read_metadata(folder)
    assert captions == {name: top[0] for name, top in expected_top(clip_dir, folder, names, LABELS, 1).items()}


def test_other_metadata_columns_are_kept(clip_dir: Path, tmp_path: Path) -> None:
    """Labelling rewrites metadata.csv; the user's other columns and their caption column's name survive."""
    folder = tmp_path / "data"
    names = make_images(folder, count=2)
    (folder / "metadata.csv").write_text(
        f"source,file_name,text,licence\nshoot-1,{names[0]},my own caption,cc-by\n", encoding="utf-8"
    )
    assert cli(["label", str(folder), "--labels", *LABELS, "--model", str(clip_dir)]) == 0
    with open(folder / "metadata.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["source", "file_name", "text", "licence"]
    by_name = {row["file_name"]: row for row in rows}
    assert by_name[names[0]] == {
        "source": "shoot-1",
        "file_name": names[0],
        "text": "my own caption",
        "licence": "cc-by",
    }
    assert by_name[names[1]]["text"] in LABELS and by_name[names[1]]["source"] == ""
    from lora_scripts.data.images import scan_dataset

    scan = scan_dataset(folder, None, trigger_word="", resolution=1, bucket=False)  # training still reads it
    assert scan.errors == [] and scan.captions[folder / names[0]] == "my own caption"


@pytest.mark.parametrize(
    ("setup", "labels", "message"),
    [
        ("empty", LABELS, "no images"),
        ("images", ["missing-labels.txt"], "label file"),
        ("images", ["@bad_file"], "not UTF-8"),
        ("images", ["@blank_file"], "no labels"),
        ("images", ["@dup_file"], "line 3: label 'a photo' repeats line 1"),
        ("images", ["a", "b", "--top-k", "3"], "--top-k"),
        ("bad_csv", LABELS, "metadata.csv line 2: expected file_name,prompt, got 1 field"),
        ("missing_image", LABELS, "metadata.csv line 2: gone.png: image file not found"),
        ("corrupt", LABELS, "cannot read image"),
    ],
)
def test_bad_input_is_a_one_line_error(
    clip_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], setup: str, labels: list[str], message: str
) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    if setup != "empty":
        make_images(folder, count=2)
    if setup == "bad_csv":
        (folder / "metadata.csv").write_text("file_name,prompt\nimg0.png\n", encoding="utf-8")
    if setup == "missing_image":
        (folder / "metadata.csv").write_text("file_name,prompt\ngone.png,a cat\n", encoding="utf-8")
    if setup == "corrupt":
        (folder / "broken.png").write_bytes(b"not a png")
    files = {
        "@bad_file": b"a photo\n\xff\xfe\n",
        "@blank_file": b"\n# only a comment\n",
        "@dup_file": b"a photo\nx\na photo\n",
    }
    if labels[0] in files:
        (tmp_path / "labels.txt").write_bytes(files[labels[0]])
        labels = [str(tmp_path / "labels.txt")]
    assert cli(["label", str(folder), "--labels", *labels, "--model", str(clip_dir)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (folder / "metadata.csv").exists() or setup in ("bad_csv", "missing_image")


def test_model_missing_from_cache_says_what_to_download(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_images(tmp_path / "data", count=1)
    assert cli(["label", str(tmp_path / "data"), "--labels", *LABELS, "--model", "someone/not-cached-clip"]) == 1
    err = capsys.readouterr().err
    assert "someone/not-cached-clip" in err and "hf download someone/not-cached-clip" in err
    assert not (tmp_path / "data" / "metadata.csv").exists()


def test_model_by_hub_id_from_the_cache(clip_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    cache = fake_hub_cache(tmp_path / "hub", {"someone/tiny-clip": clip_dir})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    folder = tmp_path / "data"
    names = make_images(folder, count=3)
    assert cli(["label", str(folder), "--labels", *LABELS, "--model", "someone/tiny-clip"]) == 0
    _, captions = read_metadata(folder)
    assert captions == {name: top[0] for name, top in expected_top(clip_dir, folder, names, LABELS, 1).items()}


def test_kohya_subfolders_are_labelled_under_their_relative_path(clip_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "data"
    names = [f"10_cat/{n}" for n in make_images(folder / "10_cat", count=2)]
    names += [f"2_dog/{n}" for n in make_images(folder / "2_dog", count=3)]
    names += make_images(folder, count=1)
    (folder / "2_dog" / "img0.txt").write_text("my dog\n", encoding="utf-8")
    assert cli(["label", str(folder), "--labels", *LABELS, "--model", str(clip_dir)]) == 0
    _, captions = read_metadata(folder)
    expected = {name: top[0] for name, top in expected_top(clip_dir, folder, names, LABELS, 1).items()}
    assert captions == expected | {"2_dog/img0.png": "my dog"}
    # The trainer reads the written file: every image, with its caption and its folder's repeats.
    scan = scan_dataset(folder, None, "", 16, False)
    assert not scan.errors
    found = {
        example.path.relative_to(folder).as_posix(): (example.caption, example.repeats) for example in scan.examples
    }
    assert found == {name: (captions[name], int(name.split("_")[0]) if "/" in name else 1) for name in names}


def write_unusual_images(folder: Path) -> list[str]:
    """Grayscale, CMYK, 16-bit and EXIF-rotated images; returns their file names."""
    folder.mkdir(parents=True)
    ramp = torch.linspace(0, 1, 48).view(1, -1).expand(32, -1)
    gray = Image.fromarray((ramp * 255).to(torch.uint8).numpy())
    gray.save(folder / "gray.png")
    Image.merge(
        "CMYK", [gray, gray.transpose(Image.Transpose.FLIP_LEFT_RIGHT), gray, gray.point(lambda v: v // 4)]
    ).save(folder / "cmyk.jpg")
    Image.fromarray((ramp * 65535).to(torch.int32).numpy().astype("uint16")).save(folder / "deep.png")
    colour = Image.merge("RGB", [gray, gray.transpose(Image.Transpose.FLIP_LEFT_RIGHT), gray.point(lambda v: 255 - v)])
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: displayed rotated 90 degrees clockwise
    colour.save(folder / "rotated.jpg", exif=exif)
    return ["gray.png", "cmyk.jpg", "deep.png", "rotated.jpg"]


def test_images_are_labelled_as_the_trainer_sees_them(clip_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "data"
    names = write_unusual_images(folder)
    assert cli(["label", str(folder), "--labels", *LABELS, "--model", str(clip_dir), "--top-k", "5"]) == 0
    _, captions = read_metadata(folder)
    expected = expected_top(clip_dir, folder, names, LABELS, 5)
    assert captions == {name: ", ".join(ranking) for name, ranking in expected.items()}
    # Read naively (no EXIF rotation, 16-bit values clipped), the rotated and 16-bit images rank differently.
    naive = expected_top(clip_dir, folder, names, LABELS, 5, read=lambda path: Image.open(path).convert("RGB"))
    assert naive["rotated.jpg"] != expected["rotated.jpg"] and naive["deep.png"] != expected["deep.png"]
