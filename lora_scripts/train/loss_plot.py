"""loss.png: the training loss against the step (raw and a running mean), drawn with Pillow.

Pillow rather than matplotlib: the plot is drawn at the end of training, when the process is at
its memory peak, and matplotlib would add about 30 MiB of resident memory and 0.4 s of imports to
every run for one line chart. Pillow is already loaded to read the images.
"""

from __future__ import annotations

import math
from pathlib import Path

from lora_scripts.atomic import atomic_path

SIZE = (800, 450)
LEFT, RIGHT, TOP, BOTTOM = 80, 24, 44, 56  # plot area margins, pixels
RAW_COLOR = (155, 187, 224)
MEAN_COLOR = (31, 95, 168)
GRID_COLOR = (228, 228, 228)
INK = (40, 40, 40)


def nice_ticks(low: float, high: float, count: int = 5, integer: bool = False) -> list[float]:
    """About ``count`` round values (1, 2, 2.5 or 5 times a power of ten apart) within ``low`` to ``high``."""
    wanted = (high - low) / count if high > low else max(abs(high), 1.0) / count
    magnitude = 10 ** math.floor(math.log10(wanted))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= wanted * 0.7)
    if integer:
        step = max(1, round(step))
    first = math.ceil(low / step - 1e-9)
    last = math.floor(high / step + 1e-9)
    return [float(f"{k * step:.12g}") for k in range(first, last + 1)]  # 0.3, not 0.30000000000000004


def running_mean(values: list[float], window: int) -> list[float]:
    """Mean of each value and the ``window - 1`` before it (fewer at the start)."""
    means, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        means.append(total / min(i + 1, window))
    return means


def draw_loss_png(steps: list[int], losses: list[float], png_path: Path, title: str) -> Path:
    """Write the chart of ``losses`` over ``steps`` to ``png_path`` (atomically)."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = SIZE
    x_low, x_high = min(steps), max(steps)
    if x_high == x_low:
        x_low, x_high = x_low - 1, x_high + 1
    y_low, y_high = min(losses), max(losses)
    pad = (y_high - y_low) * 0.05 or max(abs(y_high) * 0.1, 1e-3)
    y_low, y_high = y_low - pad, y_high + pad

    def point(step: float, loss: float) -> tuple[float, float]:
        x = LEFT + (step - x_low) / (x_high - x_low) * (width - LEFT - RIGHT)
        y = height - BOTTOM - (loss - y_low) / (y_high - y_low) * (height - TOP - BOTTOM)
        return x, y

    image = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(image)
    font, title_font = ImageFont.load_default(size=13), ImageFont.load_default(size=16)
    for tick in nice_ticks(y_low, y_high):
        _, y = point(x_low, tick)
        draw.line([(LEFT, y), (width - RIGHT, y)], fill=GRID_COLOR)
        draw.text((LEFT - 8, y), f"{tick:.4g}", fill=INK, font=font, anchor="rm")
    for tick in nice_ticks(x_low, x_high, integer=True):
        x, _ = point(tick, y_low)
        draw.line([(x, TOP), (x, height - BOTTOM)], fill=GRID_COLOR)
        draw.text((x, height - BOTTOM + 8), f"{tick:g}", fill=INK, font=font, anchor="mt")
    draw.rectangle([(LEFT, TOP), (width - RIGHT, height - BOTTOM)], outline=INK)

    window = max(1, len(losses) // 20)  # a running mean once there are 40 steps or more
    if window > 1:
        curves = [("loss", RAW_COLOR, 1, losses), (f"mean of {window}", MEAN_COLOR, 2, running_mean(losses, window))]
    else:
        curves = [("loss", MEAN_COLOR, 2, losses)]
    for index, (label, color, line_width, values) in enumerate(curves):
        points = [point(step, value) for step, value in zip(steps, values, strict=True)]
        if len(points) == 1:
            (x, y) = points[0]
            draw.ellipse([(x - 3, y - 3), (x + 3, y + 3)], fill=color)
        else:
            draw.line(points, fill=color, width=line_width, joint="curve")
        legend_y = TOP + 14 + 18 * index
        draw.line([(width - RIGHT - 150, legend_y), (width - RIGHT - 126, legend_y)], fill=color, width=line_width + 1)
        draw.text((width - RIGHT - 118, legend_y), label, fill=INK, font=font, anchor="lm")

    draw.text((width / 2, TOP / 2), title, fill=INK, font=title_font, anchor="mm")
    draw.text(((LEFT + width - RIGHT) / 2, height - 12), "step", fill=INK, font=font, anchor="ms")
    draw.text((12, TOP / 2), "loss", fill=INK, font=font, anchor="lm")
    with atomic_path(png_path) as tmp:
        image.save(tmp, format="PNG")
    return png_path
