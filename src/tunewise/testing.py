"""Tiny models and data built in-process, for tests, examples and benchmarks (no download), and a numeric check.

The tokenizer is byte-level BPE with no merges: every UTF-8 string encodes, so any test text works,
and the ChatML special tokens are single tokens as in SmolLM2. `build_tiny_sentencepiece_tokenizer` is the
other family: SentencePiece BPE as transformers builds Llama-2's, Mistral's and TinyLlama's.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer, PreTrainedTokenizerFast

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(SPECIAL + sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL,
    )
    tokenizer.chat_template = CHATML
    return tokenizer


def build_tiny_sentencepiece_tokenizer() -> LlamaTokenizer:
    """Llama-2's kind of tokenizer: spaces become `▁`, a word start `▁` opens the text (Metaspace, prepend
    scheme "first"), byte fallback for anything else; <s> and </s> are BOS and EOS. Printable ASCII
    characters are tokens and there are no merges; no chat template (zephyr is TinyLlama-Chat's)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3}
    vocab |= {f"<0x{byte:02X}>": 4 + byte for byte in range(256)}
    vocab |= {chr(code): 260 + i for i, code in enumerate(range(33, 127))}
    return LlamaTokenizer(vocab=vocab, merges=[])


def build_tiny_model(vocab_size: int, seed: int = 0, **overrides: object) -> LlamaForCausalLM:
    settings: dict = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    settings.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**settings))


def save_tiny_model(path: Path, seed: int = 0, **overrides: object) -> Path:
    """Write a tiny llama + tokenizer as a HF model directory; returns `path`."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(len(tokenizer), seed, **overrides)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


WORDS = [
    "red",
    "blue",
    "green",
    "cat",
    "dog",
    "bird",
    "one",
    "two",
    "three",
    "sun",
    "moon",
    "star",
    "tree",
    "rock",
    "river",
    "cloud",
]


def tiny_chat_rows(n: int, seed: int = 0, min_words: int = 2, max_words: int = 12) -> list[dict]:
    """Chat rows whose answer is the prompt's words reversed: learnable, variable length."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": "reverse: " + " ".join(words)},
                    {"role": "assistant", "content": " ".join(reversed(words))},
                ]
            }
        )
    return rows


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64. A reference that is zero up to fp64 rounding (dq of a one-token example:
    exactly 0 on some CPUs' fp64 attention, ~1e-17 on an AMX Xeon's) has no scale of its own: the absolute error."""
    error = (out.double() - ref.double()).norm().item()
    norm = ref.double().norm().item()
    return error / norm if norm > 1e-12 else error
