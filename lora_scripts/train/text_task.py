"""Text mode: LoRA for a causal language model (transformers + peft) as a TrainingTask.

Owns the JSONL examples and their loss masks, the base model with its peft LoRA layers, the
next-token loss, the peft adapter folder users load (and the optional merged model), generated
samples for ``validation_prompts`` and the held-out eval loss.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lora_scripts.atomic import atomic_path, write_text
from lora_scripts.config import Config
from lora_scripts.data.text import IGNORE_INDEX, Example, Record, build_examples, collate, read_records, split_records
from lora_scripts.errors import UserError
from lora_scripts.train.task import RunInfo, enable_gradient_checkpointing, weight_dtype

if TYPE_CHECKING:
    from accelerate import Accelerator
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase
    from transformers.modeling_outputs import CausalLMOutputWithPast

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
MERGED_DIR = "merged"
SAMPLE_MAX_NEW_TOKENS = 64


class CausalLMLoss(torch.nn.Module):
    """``forward(batch)`` -> mean next-token loss over the tokens whose label is not -100."""

    def __init__(self, peft_model: PeftModel) -> None:
        super().__init__()
        self.peft_model = peft_model

    def outputs(self, batch: dict[str, torch.Tensor]) -> CausalLMOutputWithPast:
        """The model's logits and loss for a collated batch.

        No KV cache: training needs none, and transformers only turns the restarting ``position_ids`` of
        packed batches into a per-example attention mask when no cache is passed.
        """
        return self.peft_model(**batch, use_cache=False)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.outputs(batch).loss


class TextTask:
    """Causal-LM LoRA training, per the TrainingTask protocol."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.train_records: list[Record] = []
        self.eval_records: list[Record] = []
        self.train_examples: list[Example] = []
        self.eval_examples: list[Example] = []
        self.base_folder: Path | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.accelerator: Accelerator | None = None
        self._model: CausalLMLoss | None = None

    def _where(self, key: str) -> str:
        return f"{self.config.source}: {key}"

    # -- data -------------------------------------------------------------------------------------
    def check_data(self) -> None:
        root = self.config.path("train_data_dir")
        assert root is not None
        records = read_records(root)
        self.train_records, self.eval_records = split_records(records, self.config.validation_split, self.config.seed)

    def dataset(self) -> list[Example]:
        return self.train_examples

    def groups(self) -> list[list[int]]:
        return [list(range(len(self.train_examples)))]

    def collate(self, items: list[Example]) -> dict[str, torch.Tensor]:
        assert self.tokenizer is not None, "build() first"
        return collate(items, self.tokenizer.pad_token_id)

    # -- model ------------------------------------------------------------------------------------
    def build(self, accelerator: Accelerator) -> None:
        from peft import LoraConfig, get_peft_model

        from lora_scripts.model.causal_lm import (
            load_causal_lm,
            load_tokenizer,
            resolve_base_model,
            resolve_target_modules,
        )

        config = self.config
        self.accelerator = accelerator
        self.base_folder = resolve_base_model(config.base_model_location(), self._where("base_model"))
        self.tokenizer = load_tokenizer(self.base_folder, self._where("base_model"))
        # Tokenize before the (large) model loads, so data problems show up first.
        self.train_examples = build_examples(self.train_records, self.tokenizer, config.max_seq_length, config.packing)
        if self.eval_records:
            self.eval_examples = build_examples(self.eval_records, self.tokenizer, config.max_seq_length, False)

        base = load_causal_lm(self.base_folder, self._where("base_model"), weight_dtype(accelerator.mixed_precision))
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(base)
            base.config.use_cache = False
        targets = resolve_target_modules(base, config.target_modules, self._where("target_modules"))
        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=targets,
            task_type="CAUSAL_LM",
        )
        # autocast_adapter_dtype: LoRA weights stay fp32 when the frozen base is fp16/bf16.
        peft_model = get_peft_model(base, lora, autocast_adapter_dtype=True)
        # adapter_config.json names the base as the config does (a Hub id stays an id, not a cache path).
        peft_model.peft_config["default"].base_model_name_or_path = config.base_model_location()
        self._model = CausalLMLoss(peft_model).to(accelerator.device)
        if config.init_lora_weights:
            self._load_init_weights()

    @property
    def model(self) -> CausalLMLoss:
        assert self._model is not None, "build() first"
        return self._model

    @property
    def peft_model(self) -> PeftModel:
        return self.model.peft_model

    # -- weights ----------------------------------------------------------------------------------
    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return {key: value.detach().cpu().clone() for key, value in get_peft_model_state_dict(self.peft_model).items()}

    def load_lora_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._apply_lora_state(state, "checkpoint")

    def _apply_lora_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Copy ``state`` (peft adapter keys) into the LoRA weights; any key or shape mismatch is a UserError."""
        from peft import set_peft_model_state_dict

        expected = self.lora_state_dict()
        for key, tensor in state.items():
            if key not in expected:
                raise UserError(
                    f"{source}: {key}: this model has no such LoRA weight (check target_modules and base_model)"
                )
            if tuple(tensor.shape) != tuple(expected[key].shape):
                raise UserError(
                    f"{source}: {key}: shape {list(tensor.shape)} does not fit this run's {list(expected[key].shape)} "
                    f"(lora_rank is {self.config.lora_rank}; the file's rank is {_rank_of(key, tensor)})"
                )
        missing = sorted(set(expected) - set(state))
        if missing:
            raise UserError(f"{source}: {missing[0]}: missing ({len(missing)} LoRA weight(s) of this run are absent)")
        set_peft_model_state_dict(self.peft_model, state)

    def _load_init_weights(self) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self.config.path("init_lora_weights")
        assert path is not None
        file = path / ADAPTER_FILES[0] if path.is_dir() else path
        if not file.is_file():
            raise UserError(f"{self._where('init_lora_weights')}: {file} not found (a peft adapter folder or file)")
        try:
            state = load_file(file)
        except (SafetensorError, OSError) as err:
            raise UserError(f"{file}: not a readable safetensors file ({err})") from None
        self._apply_lora_state(state, str(file))

    def save_weights(self, out_dir: Path, info: RunInfo) -> list[Path]:
        """The peft adapter files in ``out_dir``; the final save with ``merge: true`` adds ``merged/``."""
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        with tempfile.TemporaryDirectory(prefix=".adapter-", suffix=".tmp", dir=out_dir) as staging:
            self.peft_model.save_pretrained(staging)
            for name in ADAPTER_FILES:
                with atomic_path(out_dir / name) as tmp:
                    os.replace(Path(staging) / name, tmp)
                written.append(out_dir / name)
        if self.config.merge and info.final:
            written.append(self._save_merged(out_dir))
        return written

    def _save_merged(self, adapter_dir: Path) -> Path:
        """Base model + adapter merged into plain weights (loaded afresh, so training state is untouched)."""
        from peft import PeftModel

        from lora_scripts.model.causal_lm import load_causal_lm

        assert self.base_folder is not None and self.tokenizer is not None
        base = load_causal_lm(self.base_folder, self._where("base_model"))
        merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
        target = adapter_dir / MERGED_DIR
        with atomic_path(target) as tmp:
            merged.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
        return target

    # -- samples and eval -------------------------------------------------------------------------
    def sample(self, out_dir: Path, step: int) -> list[Path]:
        """Greedy generations for ``validation_prompts`` in ``out_dir/step-<step>.txt``."""
        prompts = self.config.validation_prompts
        if not prompts:
            return []
        tokenizer = self.tokenizer
        assert tokenizer is not None
        parts = []
        with self._evaluating():
            for prompt in prompts:
                ids = self._prompt_ids(prompt).to(self.peft_model.device)
                output = self.peft_model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=SAMPLE_MAX_NEW_TOKENS,
                    do_sample=False,
                    use_cache=True,
                    pad_token_id=tokenizer.pad_token_id,
                )
                generation = tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)
                parts.append(f"### prompt\n{prompt}\n### generation\n{generation}\n")
        target = out_dir / f"step-{step:06d}.txt"
        write_text(target, "\n".join(parts))
        return [target]

    def _prompt_ids(self, prompt: str) -> torch.Tensor:
        """A validation prompt as the model saw its training data: a user turn when training on chats."""
        tokenizer = self.tokenizer
        assert tokenizer is not None
        chats = any(record.format == "messages" for record in self.train_records)
        if chats and tokenizer.chat_template:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return tokenizer(prompt, return_tensors="pt")["input_ids"]

    def eval_loss(self) -> float | None:
        """Mean next-token loss over every learned token of the validation split; None without one."""
        if not self.eval_examples:
            return None
        total, tokens = 0.0, 0
        size = self.config.batch_size
        with self._evaluating():
            for start in range(0, len(self.eval_examples), size):
                batch = self.collate(self.eval_examples[start : start + size])
                batch = {key: value.to(self.peft_model.device) for key, value in batch.items()}
                count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                total += float(self.model(batch)) * count
                tokens += count
        return total / tokens

    @contextlib.contextmanager
    def _evaluating(self) -> Iterator[None]:
        """Eval mode, no gradients, the run's autocast; the previous mode is restored after."""
        assert self.accelerator is not None
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.accelerator.autocast():
                yield
        finally:
            self.model.train(was_training)


def _rank_of(key: str, tensor: torch.Tensor) -> int:
    """LoRA rank from a weight's shape: lora_A is (rank, in), lora_B is (out, rank)."""
    return int(tensor.shape[0] if ".lora_A." in key else tensor.shape[-1])
