"""Text in and out: chat templates, prompt encoding and stop tokens, in one place."""

from __future__ import annotations

from collections.abc import Sequence

from models.config import ModelConfig


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_messages(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Token ids of a chat, ending with the assistant's turn opener."""
    out = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return [int(i) for i in ids]


def encode_prompt(tokenizer, text: str, chat: bool) -> list[int]:
    if chat:
        if not has_chat_template(tokenizer):
            raise ValueError("this model's tokenizer has no chat template; use --no-chat")
        return encode_messages(tokenizer, [{"role": "user", "content": text}])
    ids = tokenizer(text)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos) and getattr(tokenizer, "add_bos_token", False):
        ids = [bos, *ids]
    return [int(i) for i in ids]


def stop_ids(tokenizer, cfg: ModelConfig) -> list[int]:
    """End-of-sequence ids: the config's plus the tokenizer's (chat models end turns with their own)."""
    ids = set(cfg.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)
