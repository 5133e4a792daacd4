"""Build a tiny random HF Llama checkpoint and a matching word-level tokenizer, locally.

No hub access here: tests that need an HF checkpoint (vLLM engine, bridge parity) build one with
these helpers. head_dim is 32 because vLLM-CPU attention only supports 32, 64, 80, ...
"""

from __future__ import annotations

import itertools
import json
import string
from pathlib import Path

import torch

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


def word_tokens(count: int) -> list[str]:
    """Two-letter words 'aa', 'ab', ...: none is a substring of another's decoded text, so a stop
    string equal to one word matches exactly that token."""
    pairs = ("".join(p) for p in itertools.product(string.ascii_lowercase, repeat=2))
    return list(itertools.islice(pairs, count))


def build_tokenizer(out_dir: str | Path, vocab_size: int = 64) -> list[str]:
    """Save tokenizer.json + tokenizer_config.json (WordLevel, whitespace split); returns the vocab."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = SPECIAL_TOKENS + word_tokens(vocab_size - len(SPECIAL_TOKENS))
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return vocab


def tiny_llama_config(vocab_size: int = 64, max_position_embeddings: int = 256):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,  # head_dim 32
        num_key_value_heads=2,  # GQA, so the fused qkv load in vLLM is exercised
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        # Wider than HF's 0.02 so logits are peaked: greedy argmax gaps stay far above fp32 noise.
        initializer_range=0.2,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        torch_dtype="float32",
    )


def build_tiny_llama(out_dir: str | Path, *, seed: int = 0, vocab_size: int = 64) -> Path:
    """Save a random fp32 LlamaForCausalLM (hidden 128, 4 heads of 32, 2 layers) with its tokenizer."""
    from transformers import LlamaForCausalLM

    out = Path(out_dir)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size)).to(torch.float32).eval()
    model.save_pretrained(out, safe_serialization=True)
    build_tokenizer(out, vocab_size)
    return out
