"""What a run records: loss.csv, TensorBoard events, loss.png and training_summary.json."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from lora_scripts.atomic import atomic_path, write_text

LOSS_COLUMNS = ("step", "epoch", "loss", "lr", "elapsed")
TENSORBOARD_EVERY = 50  # steps whose scalars are written to TensorBoard together (loss.csv gets each step at once)


class RunLog:
    """Appends one row per optimizer step to ``logs/loss.csv`` and to TensorBoard.

    TensorBoard gets the steps in batches (every ``TENSORBOARD_EVERY`` steps, at :meth:`flush` and
    at :meth:`close`): two ``add_scalar`` calls each step cost about 1% of a step on a tiny model.
    On resume, rows after the resumed step (written by the interrupted run after its last
    checkpoint) are dropped first, so the file reads as one uninterrupted run.
    """

    def __init__(self, output_dir: Path, logging_dir: Path, resume_step: int) -> None:
        self.csv_path = output_dir / "logs" / "loss.csv"
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        kept = [row for row in read_loss_csv(self.csv_path) if int(row["step"]) <= resume_step] if resume_step else []
        with atomic_path(self.csv_path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=LOSS_COLUMNS)
            writer.writeheader()
            writer.writerows(kept)
        self._file = open(self.csv_path, "a", newline="", encoding="utf-8")  # noqa: SIM115 - kept open for the run
        self._writer = csv.writer(self._file)
        from torch.utils.tensorboard import SummaryWriter

        self._tensorboard = SummaryWriter(str(logging_dir), purge_step=resume_step or None)
        self._pending: list[tuple[int, float, float]] = []

    def log(self, step: int, epoch: int, loss: float, lr: float, elapsed: float) -> None:
        self._writer.writerow([step, epoch, f"{loss:.6g}", f"{lr:.6g}", f"{elapsed:.4f}"])
        self._file.flush()
        self._pending.append((step, loss, lr))
        if len(self._pending) >= TENSORBOARD_EVERY:
            self.flush()

    def flush(self) -> None:
        """Write the steps still held back to TensorBoard's event file."""
        for step, loss, lr in self._pending:
            self._tensorboard.add_scalar("train/loss", loss, step)
            self._tensorboard.add_scalar("train/lr", lr, step)
        self._pending.clear()
        self._tensorboard.flush()

    def log_eval(self, step: int, loss: float) -> None:
        self._tensorboard.add_scalar("eval/loss", loss, step)

    def close(self) -> None:
        self.flush()
        self._file.close()
        self._tensorboard.close()


def read_loss_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def plot_loss(csv_path: Path, png_path: Path, title: str = "training loss") -> Path | None:
    """Draw loss against step (raw and smoothed) into ``png_path``; None when there is nothing to draw."""
    from lora_scripts.train.loss_plot import draw_loss_png

    rows = [(int(r["step"]), float(r["loss"])) for r in read_loss_csv(csv_path)]
    rows = [(step, loss) for step, loss in rows if math.isfinite(loss)]
    if not rows:
        return None
    return draw_loss_png([step for step, _ in rows], [loss for _, loss in rows], png_path, title)


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    write_text(path, json.dumps(summary, indent=2) + "\n")
