"""Text mode end to end: the mock causal LM, TextTask training steps, the peft adapter round trip,
init_lora_weights, merge, samples, eval loss, and training (with resume) through the shared loop."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_scripts.cli import main as cli
from lora_scripts.config import Config
from lora_scripts.data.text import IGNORE_INDEX, Example, write_dummy_text
from lora_scripts.errors import UserError
from lora_scripts.model.mock_lm import build_mock_causal_lm
from lora_scripts.train.task import RunInfo
from lora_scripts.train.text_task import TextTask

from conftest import assert_same_weights, fake_hub_cache

PROBE = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def mock_lm(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("text") / "mock-lm"
    assert cli(["mock-model", "--kind", "causal-lm", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("text") / "data"
    write_dummy_text(out, count=6)
    return out


def make_config(root: Path, mock_lm: Path, data_dir: Path, **changes: object) -> Config:
    values = {
        "mode": "text",
        "base_model": str(mock_lm),
        "train_data_dir": str(data_dir),
        "output_dir": str(root / "out"),
        "max_seq_length": 64,
        "batch_size": 4,
        "learning_rate": 0.01,
        **changes,
    }
    return Config(values, root / "config.yaml")


def build_task(config: Config, accelerator: object | None = None) -> TextTask:
    from accelerate import Accelerator

    task = TextTask(config)
    task.check_data()
    task.build(accelerator or Accelerator(cpu=True))
    return task


def probe_logits(model: torch.nn.Module, tokenizer) -> torch.Tensor:
    ids = tokenizer(PROBE, return_tensors="pt")["input_ids"]
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def train_steps(task: TextTask, steps: int) -> list[float]:
    params = [p for p in task.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=task.config.learning_rate)
    batch = task.collate(task.dataset()[: task.config.batch_size])
    task.model.train()
    losses = []
    for _ in range(steps):
        loss = task.model(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mock_lm, data_dir):
    """A task after a few AdamW steps, its losses, and its adapter written with save_weights."""
    root = tmp_path_factory.mktemp("trained")
    config = make_config(root, mock_lm, data_dir, validation_split=0.25, validation_prompts=["Describe the cat."])
    task = build_task(config)
    losses = train_steps(task, 8)
    adapter = root / "adapter"
    written = task.save_weights(adapter, RunInfo(step=8, epoch=0, total_epochs=1))
    return types.SimpleNamespace(task=task, losses=losses, adapter=adapter, written=written, root=root)


def test_mock_model_cli_writes_a_loadable_deterministic_model(mock_lm, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(mock_lm)
    tokenizer = AutoTokenizer.from_pretrained(mock_lm)
    assert model.config.model_type == "llama" and model.config.vocab_size == len(tokenizer)
    assert tokenizer.chat_template and tokenizer.pad_token_id is not None
    assert tokenizer.decode(tokenizer(PROBE, add_special_tokens=False)["input_ids"]) == PROBE
    build_mock_causal_lm(tmp_path / "again")

    def digest(folder: Path) -> str:
        return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()

    assert digest(tmp_path / "again") == digest(mock_lm)
    assert (tmp_path / "again" / "tokenizer.json").read_text() == (mock_lm / "tokenizer.json").read_text()


def test_only_lora_trains_and_the_loss_falls(trained):
    trainable = [name for name, p in trained.task.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    # llama defaults: q, k, v, o, gate, up, down in each of the 2 layers, A and B each
    assert len(trainable) == 7 * 2 * 2
    assert trained.losses[-1] < trained.losses[0]


def test_adapter_loads_with_peft_and_changes_the_logits(trained, mock_lm):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert [p.name for p in trained.written] == ["adapter_model.safetensors", "adapter_config.json"]
    tokenizer = trained.task.tokenizer
    base_logits = probe_logits(AutoModelForCausalLM.from_pretrained(mock_lm), tokenizer)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(mock_lm), trained.adapter)
    loaded_logits = probe_logits(loaded, tokenizer)
    ours = probe_logits(trained.task.peft_model, tokenizer)
    trained.task.model.train()
    torch.testing.assert_close(loaded_logits, ours)
    assert not torch.allclose(loaded_logits, base_logits, atol=1e-4)
    config = json.loads((trained.adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(mock_lm) and config["r"] == 8


def test_lora_state_round_trip(trained, mock_lm, data_dir, tmp_path):
    fresh = build_task(make_config(tmp_path, mock_lm, data_dir))
    tokenizer = fresh.tokenizer
    assert not torch.allclose(
        probe_logits(fresh.peft_model, tokenizer), probe_logits(trained.task.peft_model, tokenizer)
    )
    fresh.load_lora_state_dict(trained.task.lora_state_dict())
    torch.testing.assert_close(
        probe_logits(fresh.peft_model, tokenizer), probe_logits(trained.task.peft_model, tokenizer)
    )


@pytest.mark.parametrize("point_at", ["folder", "file"])
def test_init_lora_weights_starts_from_the_adapter(trained, mock_lm, data_dir, tmp_path, point_at):
    init = trained.adapter if point_at == "folder" else trained.adapter / "adapter_model.safetensors"
    task = build_task(make_config(tmp_path, mock_lm, data_dir, init_lora_weights=str(init)))
    tokenizer = task.tokenizer
    torch.testing.assert_close(
        probe_logits(task.peft_model, tokenizer), probe_logits(trained.task.peft_model, tokenizer)
    )


def test_init_lora_weights_rank_mismatch_names_file_and_key(trained, mock_lm, data_dir, tmp_path):
    config = make_config(tmp_path, mock_lm, data_dir, lora_rank=4, init_lora_weights=str(trained.adapter))
    with pytest.raises(UserError) as err:
        build_task(config)
    message = str(err.value)
    assert str(trained.adapter / "adapter_model.safetensors") in message
    assert ".lora_A.weight" in message and "lora_rank is 4" in message and "rank is 8" in message


def test_init_lora_weights_unknown_key_names_it(trained, mock_lm, data_dir, tmp_path):
    state = load_file(trained.adapter / "adapter_model.safetensors")
    state["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(8, 64)
    save_file(state, tmp_path / "odd.safetensors")
    config = make_config(tmp_path, mock_lm, data_dir, init_lora_weights="odd.safetensors")
    with pytest.raises(
        UserError, match=r"odd\.safetensors: base_model\.model\.model\.layers\.9\..*no such LoRA weight"
    ):
        build_task(config)


def test_target_modules(mock_lm, data_dir, tmp_path):
    with pytest.raises(UserError, match=r"config\.yaml: target_modules: 'qkv_proj' matches no layer"):
        build_task(make_config(tmp_path, mock_lm, data_dir, target_modules=["q_proj", "qkv_proj"]))
    only_q = build_task(make_config(tmp_path, mock_lm, data_dir, target_modules=["q_proj"]))
    assert {n.split(".")[-3] for n in only_q.lora_state_dict()} == {"q_proj"}
    every = build_task(make_config(tmp_path, mock_lm, data_dir, target_modules="all-linear"))
    assert {n.split(".")[-3] for n in every.lora_state_dict()} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }


def test_eval_loss_and_samples(trained, mock_lm, data_dir, tmp_path):
    loss = trained.task.eval_loss()
    assert loss is not None and 0 < loss < 20
    assert trained.task.model.training  # eval restores training mode
    assert build_task(make_config(tmp_path, mock_lm, data_dir)).eval_loss() is None
    (path,) = trained.task.sample(tmp_path / "samples", 8)
    assert path.name == "step-000008.txt"
    text = path.read_text()
    assert "Describe the cat." in text and "### generation" in text


def test_merge_writes_a_full_model_equal_to_base_plus_adapter(trained, mock_lm):
    from transformers import AutoModelForCausalLM

    task = trained.task
    task.config = task.config.replace(merge=True)
    out = task.config.path("output_dir")
    written = task.save_weights(out, RunInfo(step=8, epoch=0, total_epochs=1, final=True))
    assert out / "merged" in written
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(
        probe_logits(merged, task.tokenizer), probe_logits(task.peft_model, task.tokenizer), rtol=1e-4, atol=1e-4
    )
    task.model.train()


@pytest.mark.parametrize("packing", [True, False])
def test_examples_in_a_batch_see_only_themselves(mock_lm, data_dir, tmp_path, packing):
    """Packed neighbours and padding change no example's logits or loss: each equals the example run alone."""
    task = build_task(make_config(tmp_path, mock_lm, data_dir, max_seq_length=128, packing=packing))
    rows = sorted((row for row in task.dataset() if len(row.starts) > 1 or not packing), key=lambda r: len(r.input_ids))
    rows = [rows[0], rows[-1]]
    assert len(rows[0].input_ids) < len(rows[1].input_ids)  # the shorter row is padded
    batch = task.collate(rows)
    task.model.eval()
    with torch.no_grad():
        logits = task.model.outputs(batch).logits
        together = task.model(batch)
        total, tokens = 0.0, 0
        for index, row in enumerate(rows):
            for start, end in itertools.pairwise((*row.starts, len(row.input_ids))):
                alone = task.collate([Example(row.input_ids[start:end], row.labels[start:end])])
                torch.testing.assert_close(logits[index, start:end], task.model.outputs(alone).logits[0])
                count = int((alone["labels"][:, 1:] != IGNORE_INDEX).sum())
                total += float(task.model(alone)) * count
                tokens += count
    torch.testing.assert_close(float(together), total / tokens)


def test_gradient_checkpointing_gives_the_same_gradients(mock_lm, data_dir, tmp_path):
    def grads(task: TextTask) -> list[torch.Tensor]:
        task.model.train()
        torch.manual_seed(0)
        task.model(task.collate(task.dataset()[:2])).backward()
        return [p.grad for p in task.model.parameters() if p.requires_grad]

    torch.manual_seed(0)
    plain = build_task(make_config(tmp_path, mock_lm, data_dir))
    torch.manual_seed(0)
    checkpointed = build_task(make_config(tmp_path, mock_lm, data_dir, gradient_checkpointing=True))
    assert checkpointed.peft_model.base_model.model.is_gradient_checkpointing
    for a, b in zip(grads(plain), grads(checkpointed), strict=True):
        torch.testing.assert_close(a, b)


def test_mixed_precision_freezes_the_base_in_half_and_trains_lora_in_fp32(mock_lm, data_dir, tmp_path):
    bf16 = types.SimpleNamespace(
        mixed_precision="bf16",
        device=torch.device("cpu"),
        autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16),
    )
    task = build_task(make_config(tmp_path, mock_lm, data_dir), accelerator=bf16)
    frozen = {p.dtype for p in task.model.parameters() if not p.requires_grad}
    trainable = {p.dtype for p in task.model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trainable == {torch.float32}
    with bf16.autocast():
        losses = train_steps(task, 3)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert task.eval_loss() is None


def write_yaml(path: Path, values: dict[str, object]) -> Path:
    path.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in values.items()))
    return path


def test_train_command_and_exact_resume_in_text_mode(mock_lm, data_dir, tmp_path):
    from lora_scripts.config import load_config
    from lora_scripts.train.loop import TrainingStopped, train

    values = {
        "mode": "text",
        "base_model": str(mock_lm),
        "train_data_dir": str(data_dir),
        "max_seq_length": 64,
        "batch_size": 2,
        "gradient_accumulation_steps": 2,
        "max_train_steps": 4,
        "learning_rate": 0.01,
        "validation_split": 0.2,
    }
    whole = write_yaml(tmp_path / "whole.yaml", {**values, "output_dir": "whole"})
    assert cli(["train", "--config", str(whole)]) == 0
    final = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    summary = json.loads((tmp_path / "whole" / "training_summary.json").read_text())
    assert summary["steps"] == 4 and summary["eval_loss"] is not None

    split = load_config(write_yaml(tmp_path / "split.yaml", {**values, "output_dir": "split"}))
    with pytest.raises(TrainingStopped):
        train(split, stop_at_step=2, progress=False)
    killed_save = tmp_path / "split" / ".adapter-k1ll3d.tmp"  # what a kill during the adapter save leaves
    killed_save.mkdir()
    train(split.replace(resume_from="latest"), progress=False)
    assert not killed_save.exists()  # swept away as a stale temporary when the run starts
    resumed = load_file(tmp_path / "split" / "adapter_model.safetensors")
    assert_same_weights(resumed, final)


def test_train_command_with_packing(mock_lm, data_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    values = {
        "mode": "text",
        "base_model": str(mock_lm),
        "train_data_dir": str(data_dir),
        "output_dir": "out",
        "max_seq_length": 96,
        "packing": True,
        "batch_size": 2,
        "max_train_steps": 2,
        "learning_rate": 0.01,
    }
    assert cli(["train", "--config", str(write_yaml(tmp_path / "packed.yaml", values))]) == 0
    summary = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    assert summary["steps"] == 2 and math.isfinite(summary["final_loss"])
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(mock_lm), tmp_path / "out")


@pytest.mark.parametrize(
    ("model_type", "expected"),
    [
        ("llama", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
        ("qwen2", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
        ("mistral", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
        ("gpt2", {"c_attn", "c_proj", "c_fc"}),
        ("gpt_neox", "all-linear"),  # a family without a known list: every linear layer
    ],
)
def test_default_target_modules_fit_each_family(model_type, expected):
    """`target_modules: auto` names layers that exist in that architecture, so peft finds what it was told."""
    from accelerate import init_empty_weights
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from lora_scripts.model.causal_lm import resolve_target_modules

    sizes = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}
    if model_type == "gpt2":
        sizes = {"n_embd": 32, "n_head": 4, "n_layer": 2}
    config = AutoConfig.for_model(model_type, vocab_size=128, **sizes)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    targets = resolve_target_modules(model, "auto", "c.yaml: target_modules")
    assert (set(targets) if isinstance(targets, list) else targets) == expected
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=targets))
    adapted = {name.rsplit(".", 1)[-1] for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    layers = expected if isinstance(expected, set) else {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}
    assert adapted == layers  # all-linear: every linear layer but the output head


def test_base_model_by_hub_id_from_the_cache(mock_lm, data_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = fake_hub_cache(tmp_path / "hub", {"someone/tiny-llama": mock_lm})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    by_id = build_task(make_config(tmp_path, mock_lm, data_dir, base_model="someone/tiny-llama"))
    by_folder = build_task(make_config(tmp_path, mock_lm, data_dir))
    batch = by_folder.collate(by_folder.dataset()[:2])
    by_id.model.eval()
    by_folder.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(by_id.model.outputs(batch).logits, by_folder.model.outputs(batch).logits)
    with pytest.raises(UserError, match=r"base_model: 'someone/not-cached' is not in the local Hugging Face cache"):
        build_task(make_config(tmp_path, mock_lm, data_dir, base_model="someone/not-cached"))
