"""Atomic writes: a file or folder is complete under its final name or absent; a failed write keeps the old one."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_scripts.atomic import atomic_path, write_text


def test_failed_write_leaves_the_old_file_and_no_temporaries(tmp_path: Path) -> None:
    target = tmp_path / "weights.safetensors"
    write_text(target, "old")
    with pytest.raises(OSError), atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        raise OSError(28, "No space left on device")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.safetensors"]


def test_folders_are_replaced_whole(tmp_path: Path) -> None:
    target = tmp_path / "checkpoint-2"
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "a.txt").write_text("first")
        (tmp / "b.txt").write_text("first")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "a.txt").write_text("second")
        assert (target / "b.txt").read_text() == "first"  # readers see the old folder until the rename
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]  # nothing of the old one is mixed in
    assert (target / "a.txt").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
