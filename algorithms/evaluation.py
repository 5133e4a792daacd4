"""How prompts are encoded for generation and evaluation: BOS (when the tokenizer has one) + the text's
tokens, the same way the pretraining documents began. Held-out generation itself runs through the native
engine at every layout (EngineTrainer.greedy_generate, GRPOTrainer.evaluate)."""

from __future__ import annotations


def encode_prompt(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids
