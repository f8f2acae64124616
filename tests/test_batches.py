"""What training iterates over: batches within aspect-ratio buckets, kohya repeats, and steps per epoch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PIL import Image

from lora_scripts.config import load_config
from lora_scripts.train.image_task import ImageTask
from lora_scripts.train.loop import GroupedBatchSampler, train


def test_batches_never_mix_buckets_and_cover_each_example_once_per_epoch() -> None:
    groups = [[0, 1, 2, 3, 4], [5, 6], [7]]
    sampler = GroupedBatchSampler(groups, batch_size=2, seed=3)
    assert len(sampler) == 3 + 1 + 1
    orders = []
    for epoch in range(3):
        sampler.epoch = epoch
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert sorted(i for batch in batches for i in batch) == list(range(8))
        for batch in batches:
            assert 1 <= len(batch) <= 2
            assert sum(set(batch) <= set(group) for group in groups) == 1, batch  # one bucket per batch
        orders.append(batches)
    assert orders[0] != orders[1]  # reshuffled every epoch ...
    sampler.epoch = 1
    assert list(sampler) == orders[1]  # ... by seed and epoch alone, so a resumed run sees the same batches
    assert list(GroupedBatchSampler(groups, 2, seed=4)) != orders[0]


def _images(folder: Path, sizes: dict[str, tuple[int, int]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index, (name, size) in enumerate(sizes.items()):
        Image.new("RGB", size, (40 * index, 90, 200 - 30 * index)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"picture {name}", encoding="utf-8")


def test_kohya_repeats_and_buckets_shape_the_epoch(
    tmp_path: Path, write_config: Callable[..., Path], mock_sd: Path
) -> None:
    """3_name repeats its images three times in an epoch; bucketed sizes are batched apart; epochs set the steps."""
    data = tmp_path / "data"
    _images(data / "3_subject", {"a": (64, 64)})
    _images(data / "1_style", {"b": (64, 64), "wide": (128, 64)})
    values = {"train_data_dir": str(data), "base_model": str(mock_sd), "output_dir": str(tmp_path / "out")}
    config = load_config(write_config(**values, resolution=64, bucket=True, batch_size=2, epochs=2, max_train_steps=0))
    task = ImageTask(config)
    task.check_data()
    by_name = {example.path.stem: index for index, example in enumerate(task.examples)}
    groups = task.groups()
    assert sorted(len(group) for group in groups) == [1, 4]  # the wide image alone; a x3 and b together
    square = next(group for group in groups if len(group) == 4)
    assert sorted(square) == sorted([by_name["a"]] * 3 + [by_name["b"]])
    steps_per_epoch = 2 + 1  # ceil(4 / 2) square batches + 1 wide batch
    result = train(config, progress=False)
    assert result.steps == 2 * steps_per_epoch
    assert result.summary["epochs"] == 2
