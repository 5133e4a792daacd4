"""`rl convert`: HF checkpoints <-> our native format (model_config.json + model.safetensors in our names)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.errors import InputError

DTYPES = ("float32", "bfloat16", "float16")  # torch dtype names; torch is imported only when converting


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert checkpoints between HF and our format",
        description="Convert model checkpoints between a local HF directory (config.json + safetensors) "
        "and our native format. Supported: llama, qwen2, qwen3, mistral, mixtral, gpt2.",
    )
    parser.set_defaults(func=run)
    sub = parser.add_subparsers(dest="convert_command", metavar="DIRECTION", required=True)
    for direction, help_text in (
        ("hf-to-ours", "HF directory -> native directory (tokenizer files are copied along)"),
        ("ours-to-hf", "native directory -> HF directory that transformers and vLLM load"),
    ):
        p = sub.add_parser(direction, help=help_text, description=help_text)
        p.add_argument("--src", required=True, type=Path, metavar="DIR", help="source directory")
        p.add_argument("--dst", required=True, type=Path, metavar="DIR", help="output directory")
        p.add_argument(
            "--dtype", choices=sorted(DTYPES), default="float32", help="weights dtype (default: float32)"
        )
        if direction == "ours-to-hf":
            p.add_argument(
                "--tokenizer",
                type=Path,
                metavar="DIR",
                help="copy tokenizer files (and token ids) from DIR (default: --src, if it has any)",
            )
        p.set_defaults(convert_func=_hf_to_ours if direction == "hf-to-ours" else _ours_to_hf)


def run(args: argparse.Namespace) -> int:
    try:
        return args.convert_func(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _hf_to_ours(args: argparse.Namespace) -> int:
    from core.bridge import copy_tokenizer_files, load_hf, read_hf_config, save_native

    arch, _ = read_hf_config(args.src)
    model = load_hf(args.src, dtype=_dtype(args.dtype))
    save_native(model, args.dst, arch)
    copied = copy_tokenizer_files(args.src, args.dst)
    print(f"wrote {args.dst} ({arch.name}, {_count(model)} parameters; tokenizer files: {copied or 'none'})")
    return 0


def _ours_to_hf(args: argparse.Namespace) -> int:
    from core.bridge import load_native, save_hf

    model, arch = load_native(args.src, dtype=_dtype(args.dtype))
    save_hf(model, args.dst, tokenizer_dir=args.tokenizer or args.src, arch=arch)
    print(f"wrote {args.dst} ({arch.hf_architecture}, {_count(model)} parameters)")
    return 0


def _dtype(name: str):
    import torch

    return getattr(torch, name)


def _count(model) -> str:  # torch.nn.Module
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M"
