"""Batched generation with the user's sampling settings."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    repetition_penalty: float = 1.0

    def generate_kwargs(self) -> dict:
        # Temperature 0 means greedy, whatever do_sample says: sampling at T=0 is argmax anyway,
        # and transformers rejects a zero temperature.
        if not self.do_sample or self.temperature == 0:
            return {"do_sample": False, "repetition_penalty": self.repetition_penalty}
        return {
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "repetition_penalty": self.repetition_penalty,
        }


def prompt_messages(messages: list[dict]) -> tuple[list[dict], str]:
    """Split a conversation at its last assistant turn: (prompt turns, reference answer)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict]],
    settings: SamplingSettings,
    batch_size: int = 16,
    chat_template: str | None = None,
) -> list[str]:
    """Answer each conversation (a list of turns ending with a user turn)."""
    from tunewise.data.tokenize import resolve_chat_template

    chat_template = resolve_chat_template(tokenizer, chat_template)
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right, so pads must be on the left
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers: list[str] = []
    try:
        for start in range(0, len(conversations), batch_size):
            texts = [
                tokenizer.apply_chat_template(
                    c, chat_template=chat_template, tokenize=False, add_generation_prompt=True
                )
                for c in conversations[start : start + batch_size]
            ]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(
                model.device
            )
            out = model.generate(  # type: ignore[operator]
                **enc,
                max_new_tokens=settings.max_new_tokens,
                pad_token_id=pad_id,
                **settings.generate_kwargs(),
            )
            new = out[:, enc["input_ids"].shape[1] :]
            answers += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers
