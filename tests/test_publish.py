"""`lora-scripts publish` end to end: the real huggingface_hub client against the loopback Hub stand-in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from safetensors.numpy import save_file

from tests.hub_standin import HubStandIn

TOKEN = "hf_standinSECRETtoken0123456789"
REPO_ID = "tester/style-lora"


def _output_dir(root: Path) -> Path:
    out = root / "output"
    (out / "logs").mkdir(parents=True)
    (out / "samples").mkdir()
    (out / "checkpoint-5").mkdir()
    rng = np.random.default_rng(0)
    save_file(
        {"unet.a.lora_A.weight": rng.standard_normal((4, 8), dtype=np.float32)},
        out / "pytorch_lora_weights.safetensors",
    )
    save_file(
        {"lora_unet_a.lora_down.weight": rng.standard_normal((4, 8), dtype=np.float32)},
        out / "lora_weights.safetensors",
    )
    save_file({"state": np.zeros(3, dtype=np.float32)}, out / "checkpoint-5" / "lora_state.safetensors")
    Image.new("RGB", (16, 16), (200, 10, 10)).save(out / "loss.png")
    Image.new("RGB", (16, 16), (10, 200, 10)).save(out / "samples" / "step-000005-0.png")
    (out / "logs" / "loss.csv").write_text("step,epoch,loss,lr,elapsed\n1,0,0.5,0.0001,0.1\n")
    (out / "training_summary.json").write_text(json.dumps({"final_loss": 0.1234, "steps": 5, "wall_time_s": 1.5}))
    return out


@pytest.fixture
def config(tmp_path: Path) -> Path:
    _output_dir(tmp_path)
    path = tmp_path / "style.yaml"
    path.write_text(
        "train_data_dir: ./data\nbase_model: runwayml/stable-diffusion-v1-5\noutput_dir: ./output\n"
        f"hub_repo_id: {REPO_ID}\ntrigger_word: sks style\nlicense: mit\n"
        "validation_prompts: ['a cat in sks style']\n"
    )
    return path


def _publish(config: Path, endpoint: str, token: str | None, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HUB_DISABLE_XET="1",
        HF_HOME=str(config.parent / "hf-home"),
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    if token is not None:
        env["HF_TOKEN"] = token
    cmd = [sys.executable, "-m", "lora_scripts", "publish", "--config", str(config), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def _no_token_anywhere(result: subprocess.CompletedProcess[str], root: Path) -> None:
    assert TOKEN not in result.stdout + result.stderr
    for path in root.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), f"token written to {path}"


def test_publish_commits_once_tags_and_rerun_duplicates_nothing(config: Path) -> None:
    with HubStandIn(TOKEN) as hub:
        first = _publish(config, hub.url, TOKEN, "--version", "v1.0.0")
        assert first.returncode == 0, first.stderr
        repo = hub.repos[REPO_ID]
        assert repo.private  # hub_private defaults to true
        assert len(repo.commits) == 2  # the repo's initial commit + ours
        uploaded = set(repo.files) - {".gitattributes"}
        assert uploaded == {
            "pytorch_lora_weights.safetensors",
            "lora_weights.safetensors",
            "loss.png",
            "training_summary.json",
            "samples/step-000005-0.png",
            "README.md",
        }
        assert {"pytorch_lora_weights.safetensors", "lora_weights.safetensors", "loss.png"} <= set(repo.lfs)
        weights = (config.parent / "output" / "pytorch_lora_weights.safetensors").read_bytes()
        assert repo.files["pytorch_lora_weights.safetensors"] == weights
        assert sum(1 for method, path in hub.requests if method == "PUT" and path.startswith("/_lfs/")) == 4
        assert repo.tags == {"v1.0.0": repo.commits[-1]}

        card = repo.files["README.md"].decode()
        meta = yaml.safe_load(card.split("---")[1])
        assert meta["base_model"] == "runwayml/stable-diffusion-v1-5"
        assert meta["base_model_relation"] == "adapter"
        assert meta["license"] == "mit"
        assert {"lora", "diffusers", "text-to-image", "template:sd-lora"} <= set(meta["tags"])
        assert meta["instance_prompt"] == "sks style"
        assert meta["widget"] == [{"text": "a cat in sks style", "output": {"url": "samples/step-000005-0.png"}}]
        assert "0.1234" in card and "load_lora_weights" in card

        requests_before = len(hub.requests)
        second = _publish(config, hub.url, TOKEN, "--version", "v1.0.0")
        assert second.returncode == 0, second.stderr
        assert len(repo.commits) == 2 and repo.tags == {"v1.0.0": repo.commits[-1]}
        new_puts = [r for r in hub.requests[requests_before:] if r[0] == "PUT"]
        assert new_puts == [] and "no new commit" in second.stdout

        assert all(h == f"Bearer {TOKEN}" for h in hub.headers_seen if h)
        _no_token_anywhere(first, config.parent)
        _no_token_anywhere(second, config.parent)


def test_changed_weights_make_one_new_commit_and_existing_tag_elsewhere_is_refused(config: Path) -> None:
    with HubStandIn(TOKEN) as hub:
        assert _publish(config, hub.url, TOKEN, "--version", "v1").returncode == 0
        save_file(
            {"unet.a.lora_A.weight": np.ones((4, 8), dtype=np.float32)},
            config.parent / "output" / "pytorch_lora_weights.safetensors",
        )
        again = _publish(config, hub.url, TOKEN, "--version", "v1")
        assert again.returncode == 1
        assert "v1 already exists" in again.stderr and "Traceback" not in again.stderr
        assert _publish(config, hub.url, TOKEN, "--version", "v2").returncode == 0
        repo = hub.repos[REPO_ID]
        assert set(repo.tags) == {"v1", "v2"} and repo.tags["v1"] != repo.tags["v2"]


def test_rejected_token_is_a_clear_error(config: Path) -> None:
    with HubStandIn(TOKEN) as hub:
        result = _publish(config, hub.url, "hf_wrongtoken")
    assert result.returncode == 1
    assert "401" in result.stderr and "HF_TOKEN" in result.stderr and "Traceback" not in result.stderr
    assert "hf_wrongtoken" not in result.stdout + result.stderr
    assert hub.repos == {}


def test_missing_token_and_dry_run(config: Path) -> None:
    with HubStandIn(TOKEN) as hub:
        missing = _publish(config, hub.url, None)
        assert missing.returncode == 1 and "HF_TOKEN is not set" in missing.stderr
        dry = _publish(config, hub.url, None, "--dry-run", "--version", "v3")
        assert hub.requests == []
    assert dry.returncode == 0, dry.stderr
    assert "lora_weights.safetensors -> lora_weights.safetensors" in dry.stdout
    assert "-> README.md" in dry.stdout and "tag: v3" in dry.stdout
    assert "checkpoint" not in dry.stdout


def test_output_dir_without_weights_names_the_config(config: Path) -> None:
    for name in ("pytorch_lora_weights.safetensors", "lora_weights.safetensors"):
        (config.parent / "output" / name).unlink()
    result = _publish(config, "http://127.0.0.1:9", TOKEN, "--dry-run")
    assert result.returncode == 1
    assert "style.yaml: output_dir: no weight files" in result.stderr


def test_unreachable_hub_is_a_clear_error(config: Path) -> None:
    with HubStandIn(TOKEN) as hub:
        url = hub.url  # the stand-in is stopped when the block ends: nothing listens there any more
    result = _publish(config, url, TOKEN)
    assert result.returncode == 1
    assert "cannot reach the Hub" in result.stderr and "Traceback" not in result.stderr
    _no_token_anywhere(result, config.parent)


def _card_front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


def test_text_card_uses_peft_conventions_and_text_settings(tmp_path: Path) -> None:
    from lora_scripts.config import Config
    from lora_scripts.publish.model_card import render

    config = Config(
        {
            "mode": "text",
            "train_data_dir": "data",
            "base_model": "Qwen/Qwen2.5-0.5B",
            "output_dir": "out",
            "max_seq_length": 256,
            "packing": True,
        },
        tmp_path / "chat.yaml",
    )
    (tmp_path / "out").mkdir()
    card = render(config, tmp_path / "out", "tester/chat-lora", samples=[])
    meta = _card_front_matter(card)
    assert meta["base_model"] == "Qwen/Qwen2.5-0.5B" and meta["base_model_relation"] == "adapter"
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation"
    assert {"lora", "peft", "text-generation"} <= set(meta["tags"]) and "diffusers" not in meta["tags"]
    assert 'PeftModel.from_pretrained(base, "tester/chat-lora")' in card
    assert "| max_seq_length | 256 |" in card and "| packing | True |" in card
    assert "resolution" not in card and "ComfyUI" not in card  # image-only settings and loaders stay out
    assert "![loss]" not in card  # no loss.png in this output_dir


def test_image_card_from_a_local_checkpoint_names_it_and_explains_every_loader(tmp_path: Path) -> None:
    from lora_scripts.config import Config
    from lora_scripts.publish.model_card import render

    out = _output_dir(tmp_path)
    config = Config(
        {
            "train_data_dir": "data",
            "base_model": "./models/Stable-diffusion/v1-5-pruned.safetensors",
            "output_dir": "output",
            "resolution": 768,
            "lora_rank": 16,
            "trigger_word": "mystyle",
        },
        tmp_path / "style.yaml",
    )
    card = render(config, out, REPO_ID, samples=["samples/step-000005-0.png"])
    meta = _card_front_matter(card)
    assert "base_model" not in meta and "base_model_relation" not in meta  # the Hub links only Hub ids
    assert "Base model: `v1-5-pruned.safetensors` (a local file" in card
    assert meta["instance_prompt"] == "mystyle" and meta["widget"][0]["output"]["url"] == "samples/step-000005-0.png"
    assert "| resolution | 768 |" in card and "| lora_rank | 16 |" in card and "max_seq_length" not in card
    assert "load_lora_weights" in card and "ComfyUI/models/loras/" in card and "<lora:lora_weights:1>" in card
    assert "- final loss: 0.1234" in card and "![loss](loss.png)" in card
