"""A tiny random-weight Llama-style causal LM with a locally trained tokenizer (no download).

Used by tests, the smoke run and the text benchmark. The tokenizer is a byte-level BPE trained on a
small built-in corpus, so any text can be encoded; it carries a ChatML chat template whose
``{% generation %}`` markers let transformers report which tokens belong to assistant turns.
The same call always writes the same files.
"""

from __future__ import annotations

from pathlib import Path

from lora_scripts.atomic import atomic_path

SIZES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
    "small": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 8},
}
VOCAB_SIZE = 512
BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SEED = 1234

# ChatML. Each assistant turn's content and closing marker are inside {% generation %} so that
# apply_chat_template(..., return_assistant_tokens_mask=True) marks exactly the tokens to learn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A LoRA adds a small low-rank update to a frozen layer.
Training a language model means predicting the next token from the tokens before it.
User: What is the capital of France? Assistant: The capital of France is Paris.
Question: How many legs does a spider have? Answer: A spider has eight legs.
Once upon a time there was a small robot who liked to paint pictures of the sea.
def add(a, b):
    return a + b
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Punctuation: , . ; : ! ? ( ) [ ] { } " ' - _ / \\ @ # % & *
The weather today is sunny with a light breeze; tomorrow it may rain in the afternoon.
system user assistant instruction response prompt completion message content role
"""


def build_tokenizer() -> object:
    """The byte-level BPE tokenizer, trained on the built-in corpus, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = [BOS, EOS, PAD, IM_START, IM_END]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    # Like Llama's tokenizer: encoding a text starts it with the BOS token.
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=2048
    )
    wrapped.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def build_mock_causal_lm(out: Path, size: str = "tiny") -> list[Path]:
    """Write a random-weight LlamaForCausalLM and its tokenizer into ``out`` (atomically); return the files."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = SIZES[size]
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        num_key_value_heads=dims["num_attention_heads"] // 2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **dims,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out = Path(out)
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return sorted(p for p in out.rglob("*") if p.is_file())
