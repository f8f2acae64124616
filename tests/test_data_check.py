"""`lora-scripts data check` (report, exit codes, GitHub annotations) and `validate --check-paths` on datasets."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from lora_scripts.cli import main as cli
from lora_scripts.data.images import write_dummy_images
from tests.conftest import run_cli


def check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = cli(["data", "check", *args])
    return code, capsys.readouterr().out


@pytest.fixture
def broken(tmp_path: Path) -> Path:
    """Dummy images plus: a copy of one (duplicate), a corrupt file, a missing file, a too-small image, an
    empty caption, an image listed twice and an unlisted image."""
    data = tmp_path / "broken"
    write_dummy_images(data, count=3, resolution=32)
    (data / "copy.png").write_bytes((data / "img_000.png").read_bytes())
    (data / "bad.png").write_bytes(b"not a png")
    Image.new("RGB", (16, 16), "red").save(data / "tiny.png")
    Image.new("RGB", (32, 32), "blue").save(data / "unlisted.png")
    Image.new("RGB", (32, 32), "gray").save(data / "empty.png")
    with (data / "metadata.csv").open("a", encoding="utf-8") as metadata:
        metadata.write(
            'copy.png,"red, copy"\nbad.png,corrupt\ngone.png,missing\ntiny.png,small\nempty.png,\nimg_002.png,again\n'
        )
    return data


def test_clean_dataset_passes_with_a_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_dummy_images(tmp_path / "d", count=5, resolution=32)
    (tmp_path / "d" / "3_more").mkdir()
    Image.new("RGB", (48, 32), "green").save(tmp_path / "d" / "3_more" / "extra.png")
    with (tmp_path / "d" / "metadata.csv").open("a", encoding="utf-8") as metadata:
        metadata.write('3_more/extra.png,"green field, simple shapes"\n')
    code, out = check(capsys, str(tmp_path / "d"), "--resolution", "32")
    assert code == 0, out
    assert "images: 6 found, 6 usable, 1 repeated by N_name folders; 8 training examples per epoch" in out
    assert "captions: 6 of 6 images (100%)" in out
    assert "32x32 x" in out and "1:1 x" in out and "3:2 x1" in out
    assert "training size (resize + center crop) at resolution 32: 32x32 x6" in out
    assert "simple shapes x6" in out  # the tag every dummy caption shares
    assert out.rstrip().endswith("OK: 0 error(s), 0 warning(s)")


def test_bucket_histogram(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_dummy_images(tmp_path / "d", count=6, resolution=64)
    code, out = check(capsys, str(tmp_path / "d"), "--resolution", "64", "--bucket")
    assert code == 0, out
    line = next(line for line in out.splitlines() if line.startswith("aspect-ratio buckets at resolution 64:"))
    assert "64x64 x" in line and "80x48 x1" in line and "48x80 x1" in line


def test_errors_and_warnings_listed_with_exit_1(broken: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = check(capsys, str(broken), "--resolution", "32")
    assert code == 1
    errors = out.split("errors (5):\n")[1]
    for expected in (
        f"{broken / 'bad.png'}: unreadable or corrupt image",
        f"{broken / 'metadata.csv'} line 7: gone.png: image file not found",
        f"{broken / 'tiny.png'}: image is 16x16, smaller than resolution 32",
        f"{broken / 'empty.png'}: empty caption",
        f"{broken / 'metadata.csv'} line 10: img_002.png is listed again (first on line 4)",
    ):
        assert expected in errors
    warnings = out.split("warnings (2):\n")[1].split("\nerrors (")[0]
    assert f"{broken / 'unlisted.png'}: not listed in metadata.csv" in warnings
    assert f"{broken / 'img_000.png'}: exact duplicate of {broken / 'copy.png'}" in warnings
    assert "captions: 7 of 8 images (88%)" in out
    assert out.rstrip().endswith("FAILED: 5 error(s), 2 warning(s)")


def test_github_annotations(broken: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = check(capsys, str(broken), "--resolution", "32", "--format", "github")
    assert code == 1
    annotations = [line for line in out.splitlines() if line.startswith("::")]
    assert sum(line.startswith("::error ") for line in annotations) == 5
    assert sum(line.startswith("::warning ") for line in annotations) == 2
    metadata = str(broken / "metadata.csv").replace(":", "%3A").replace(",", "%2C")
    assert any(line.startswith(f"::error file={metadata},line=7,") and "gone.png" in line for line in annotations)


def test_explicit_metadata_and_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_dummy_images(tmp_path / "d", count=2, resolution=32)
    labels = tmp_path / "labels.jsonl"
    labels.write_text('{"file_name": "img_000.png", "text": "only one"}\n', encoding="utf-8")
    code, out = check(capsys, str(tmp_path / "d"), "--metadata", str(labels), "--resolution", "32")
    assert code == 0 and "captions from labels.jsonl" in out and "img_001.png: not listed in labels.jsonl" in out
    assert cli(["data", "check", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such folder" in capsys.readouterr().err


def test_default_resolution_is_512(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_dummy_images(tmp_path / "d", count=1, resolution=32)
    code, out = check(capsys, str(tmp_path / "d"))
    assert code == 1 and "smaller than resolution 512" in out


def test_validate_check_paths_reports_dataset_problems(broken: Path, write_config: Callable[..., Path]) -> None:
    model = broken.parent / "model"  # --check-paths also wants the base model, here a local folder
    model.mkdir()
    config = write_config(base_model=str(model), output_dir="out", train_data_dir=str(broken), resolution=64)
    result = run_cli("validate", "--check-paths", str(config))
    assert result.returncode == 1
    assert f"train_data_dir: {broken / 'bad.png'}: unreadable or corrupt image" in result.stdout
    assert "gone.png: image file not found" in result.stdout
    assert "0 of 1 config(s) valid" in result.stderr

    good = broken.parent / "good"
    write_dummy_images(good, count=2, resolution=64)
    config = write_config("good", base_model=str(model), output_dir="out", train_data_dir=str(good), resolution=64)
    assert run_cli("validate", "--check-paths", str(config)).returncode == 0


def test_data_check_does_not_import_torch(tmp_path: Path) -> None:
    write_dummy_images(tmp_path / "d", count=1, resolution=32)
    code = (
        "import sys; from lora_scripts.cli import main; "
        f"assert main(['data', 'check', {str(tmp_path / 'd')!r}, '--resolution', '32']) == 0; "
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
