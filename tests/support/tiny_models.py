"""Small causal LMs of several architectures with random weights, built in the test (no
download): for exercising the engine's generic forward and fast path on more than the
one real model, and a whole local tier on an architecture that is not Llama.

``tiny_causal_lm(arch, dtype)`` gives a model in memory; ``save_tiny_chat_model(dir,
arch)`` writes a directory a local tier loads (config, safetensors weights, and a small
byte-level BPE tokenizer with a ChatML template).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Per architecture, what its config needs beyond the common small shape.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama": {},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "mistral": {"sliding_window": None},
    "gemma": {"head_dim": 16},
}

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% if not (loop.last and continue_final_message) %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Name three colours: red, green and blue.",
    "Count from 1 to 10: 1 2 3 4 5 6 7 8 9 10.",
    "Write a long story about a dragon who loves tea and hates the rain.",
]


def tiny_config(arch: str, vocab_size: int = 512) -> Any:
    from transformers import AutoConfig

    return AutoConfig.for_model(
        arch,
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        **ARCHITECTURES[arch],
    )


def tiny_causal_lm(arch: str, dtype: Any, vocab_size: int = 512, seed: int = 0) -> Any:
    """A random-weight model of ``arch`` in eval mode, its generation config greedy with
    no end-of-sequence token (so ``generate`` makes exactly the tokens asked for)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        tiny_config(arch, vocab_size), attn_implementation="sdpa", dtype=dtype
    ).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.generation_config.do_sample = False
    return model


def tiny_tokenizer() -> Any:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=400, min_frequency=1, special_tokens=SPECIAL)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        bos_token=None, unk_token=None,
    )
    tokenizer.chat_template = CHATML
    return tokenizer


def save_tiny_chat_model(directory: Path, arch: str = "qwen2") -> Path:
    """A local tier's model directory: random ``arch`` weights and a tokenizer whose
    end-of-turn token is the model's end of sequence."""
    import torch

    tokenizer = tiny_tokenizer()
    model = tiny_causal_lm(arch, torch.float32, vocab_size=len(tokenizer))
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.config.eos_token_id = eos
    model.generation_config.eos_token_id = eos
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
