"""loss.png: the chart shows the loss over the steps, and odd loss.csv files do not break it."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image

from lora_scripts.train.logs import LOSS_COLUMNS, plot_loss
from lora_scripts.train.loss_plot import MEAN_COLOR, nice_ticks


def write_csv(path: Path, losses: list[float]) -> Path:
    rows = [",".join(LOSS_COLUMNS)] + [f"{i + 1},1,{loss},0.0001,{i * 0.1:.4f}" for i, loss in enumerate(losses)]
    path.write_text("\n".join(rows) + "\n")
    return path


def curve_heights(png: Path) -> tuple[float, float]:
    """Mean pixel row of the running-mean curve in the left and the right quarter of the image."""
    image = Image.open(png).convert("RGB")
    width, height = image.size
    pixels = image.load()
    rows: dict[str, list[int]] = {"left": [], "right": []}
    for x in range(width):
        side = "left" if x < width // 4 else "right" if x > 3 * width // 4 else None
        if side:
            rows[side] += [y for y in range(height) if pixels[x, y] == MEAN_COLOR]
    assert rows["left"] and rows["right"], "the curve is drawn across the plot"
    return sum(rows["left"]) / len(rows["left"]), sum(rows["right"]) / len(rows["right"])


def test_a_falling_loss_is_drawn_falling(tmp_path: Path) -> None:
    losses = [1.0 * math.exp(-i / 30) + 0.05 * math.sin(i) for i in range(120)]
    png = plot_loss(write_csv(tmp_path / "loss.csv", losses), tmp_path / "loss.png", title="falling")
    assert png == tmp_path / "loss.png"
    left, right = curve_heights(png)
    assert left < right - 100  # image rows count downwards: high loss on the left, low on the right
    rising = plot_loss(write_csv(tmp_path / "up.csv", losses[::-1]), tmp_path / "up.png")
    left, right = curve_heights(rising)
    assert left > right + 100


def test_short_flat_and_non_finite_logs(tmp_path: Path) -> None:
    assert plot_loss(write_csv(tmp_path / "empty.csv", []), tmp_path / "empty.png") is None
    assert not (tmp_path / "empty.png").exists()
    assert plot_loss(tmp_path / "missing.csv", tmp_path / "missing.png") is None
    for name, losses in {"one": [0.3], "flat": [0.2] * 5, "nan": [0.4, float("nan"), 0.3, float("inf"), 0.2]}.items():
        png = plot_loss(write_csv(tmp_path / f"{name}.csv", losses), tmp_path / f"{name}.png")
        assert png is not None and Image.open(png).size == (800, 450), name
    assert not list(tmp_path.glob(".*.tmp"))  # written to a temporary name and renamed


def test_ticks_are_round_and_inside_the_range() -> None:
    assert nice_ticks(0.02, 0.58) == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert nice_ticks(0.1925, 0.3575) == [0.2, 0.225, 0.25, 0.275, 0.3, 0.325, 0.35]
    assert nice_ticks(1e-5, 4e-5) == [1e-5, 1.5e-5, 2e-5, 2.5e-5, 3e-5, 3.5e-5, 4e-5]
    assert nice_ticks(1, 200, integer=True) == [50, 100, 150, 200]
    assert nice_ticks(0, 2, integer=True) == [0, 1, 2]  # whole steps only, however short the run
