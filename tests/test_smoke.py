"""`lora-scripts smoke`: the README's main command, the shipped configs, and a smoke that must fail."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO, run_cli


def test_builtin_smoke_passes(tmp_path: Path) -> None:
    result = run_cli("smoke", "--work-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "smoke passed" in result.stdout
    out = tmp_path / "output" / "builtin-example"
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "lora_weights.safetensors").is_file()
    assert list((out / "samples").glob("*.png"))


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_smokes(config: Path, tmp_path: Path) -> None:
    result = run_cli("smoke", "--config", str(config), "--work-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "smoke passed" in result.stdout and "Traceback" not in result.stderr


def test_smoke_fails_with_the_reason(tmp_path: Path, write_config) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "metadata.csv").write_text("file_name,prompt\nmissing.png,a cat\n")
    config = write_config("broken", train_data_dir=str(data), base_model="unused", output_dir=str(tmp_path / "out"))
    result = run_cli("smoke", "--config", str(config), "--work-dir", str(tmp_path / "work"))
    assert result.returncode == 1
    assert "missing.png" in result.stderr and "Traceback" not in result.stderr


def test_smoke_fails_when_the_lora_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Training that ends in an all-zero LoRA writes both files, whose keys all map, yet the smoke must fail: the
    weights do not change the model's output."""
    import torch

    from lora_scripts import cli
    from lora_scripts.export import diffusers_format

    save = diffusers_format.save_diffusers_lora

    def save_zeros(out_dir: Path, unet: torch.nn.Module, text_encoder: torch.nn.Module | None) -> Path:
        with torch.no_grad():
            for model in (unet, text_encoder):
                for name, param in model.named_parameters() if model is not None else ():
                    if ".lora_" in name:
                        param.zero_()
        return save(out_dir, unet, text_encoder)

    monkeypatch.setattr(diffusers_format, "save_diffusers_lora", save_zeros)
    assert cli.main(["smoke", "--work-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "error: smoke failed for" in err
    assert "pytorch_lora_weights.safetensors does not change the mock pipeline's output" in err
    assert "lora_weights.safetensors:" not in err  # the keys themselves are fine
    out = tmp_path / "output" / "builtin-example"
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "lora_weights.safetensors").is_file()


def test_smoke_check_names_a_missing_file_and_a_key_that_maps_nowhere(image_config) -> None:
    """The checks after training: a good run passes; a lost file or a forged kohya key is named."""
    from safetensors.torch import load_file, save_file

    from lora_scripts.config import load_config
    from lora_scripts.smoke import check_image_result
    from lora_scripts.train.loop import train

    config = load_config(image_config("checked", max_train_steps=3))
    train(config, progress=False)
    assert check_image_result(config) == []
    kohya = config.path("output_dir") / "lora_weights.safetensors"
    weights = load_file(str(kohya))
    forged = next(key for key in weights if key.endswith(".lora_down.weight"))
    save_file({**weights, "lora_unet_no_such_block_to_q.lora_down.weight": weights[forged].clone()}, str(kohya))
    (problem,) = check_image_result(config)
    assert problem.startswith("lora_weights.safetensors: ") and "lora_unet_no_such_block_to_q" in problem
    kohya.unlink()
    assert check_image_result(config) == ["lora_weights.safetensors missing"]
