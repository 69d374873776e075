"""Batched generation with the user's sampling settings."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import BatchEncoding, PreTrainedModel, PreTrainedTokenizerBase


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


# End-of-turn markers of common chat templates (ChatML, Llama 3, Gemma, Phi-3). A model trained on such a template
# ends its answers with the marker, which need not be the EOS of its tokenizer or generation config (a base model
# trained with `data.chat_template: chatml` keeps <|endoftext|>): without it as a stop token, generation runs on
# into an invented next turn, hidden by skip_special_tokens but still in the answer text.
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, template: str) -> list[int]:
    """The model's EOS ids (generation config, tokenizer) and the template's end-of-turn marker, if any."""
    from tunewise.data.tokenize import end_of_turn_marker

    configured = model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(tokenizer.eos_token_id)
    # The known markers the template names, and the one it is measured to end a turn with (any template's).
    markers = [m for m in END_OF_TURN_MARKERS if m in template]
    markers.append(end_of_turn_marker(tokenizer, template))
    for marker in markers:
        if marker and len(pieces := tokenizer(marker, add_special_tokens=False)["input_ids"]) == 1:
            ids.add(pieces[0])
    return sorted(i for i in ids if i is not None)


def stop_at_end_of_turn(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Put the tokenizer's end-of-turn marker in the model's generation config before it is saved, so other
    tools (transformers' generate, vLLM) stop where `generate` here does."""
    if isinstance(tokenizer.chat_template, str):
        model.generation_config.eos_token_id = stop_token_ids(model, tokenizer, tokenizer.chat_template)


def prompt_messages(messages: list[dict]) -> tuple[list[dict], str]:
    """Split a conversation at its last assistant turn: (prompt turns, reference answer)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def render_prompt(tokenizer: PreTrainedTokenizerBase, conversation: list[dict], chat_template: str) -> str:
    """The conversation as the model reads it, up to the header of the answer; a template that cannot render it
    (a Jinja error, or its own `raise_exception`, e.g. for a role it does not support) is a TemplateError."""
    import jinja2

    from tunewise.data.tokenize import TemplateError

    try:
        return tokenizer.apply_chat_template(
            conversation, chat_template=chat_template, tokenize=False, add_generation_prompt=True
        )  # type: ignore[return-value]
    except jinja2.TemplateError as exc:
        roles = ", ".join(m["role"] for m in conversation)
        raise TemplateError(
            f"the chat template cannot render a conversation of {roles} ({exc}); fix the template, or set "
            "data.chat_template (`--set chat_template=NAME` for generate and chat) to one that can"
        ) from exc


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
    # Llama and Mistral tokenizers have no pad token: pads are masked, so EOS can serve (see pad_with_eos).
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop_ids = stop_token_ids(model, tokenizer, chat_template)
    answers: list[str] = []
    try:
        for start in range(0, len(conversations), batch_size):
            texts = [
                render_prompt(tokenizer, c, chat_template) for c in conversations[start : start + batch_size]
            ]
            ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
            enc = left_padded(ids, pad_id or 0).to(model.device)
            out = model.generate(  # type: ignore[operator]
                **enc,
                max_new_tokens=settings.max_new_tokens,
                pad_token_id=pad_id,
                eos_token_id=stop_ids,
                **settings.generate_kwargs(),
            )
            new = out[:, enc["input_ids"].shape[1] :]
            answers += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        model.train(was_training)
    return answers


def left_padded(ids: list[list[int]], pad_id: int) -> BatchEncoding:
    """Token ids padded on the left, where generation does not append, and masked there. Padded here, not by the
    tokenizer, which refuses to pad without a pad token and would need its padding side changed."""
    width = max(len(row) for row in ids)
    return BatchEncoding(
        {
            "input_ids": torch.tensor([[pad_id] * (width - len(row)) + row for row in ids]),
            "attention_mask": torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids]),
        }
    )
