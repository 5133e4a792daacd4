"""`rl data`: tokenize datasets into .bin/.idx, write the synthetic arithmetic corpus, inspect indexed data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data",
        help="prepare training data: tokenize, synthesize, inspect",
        description="Prepare training data. Everything is read from local files; nothing is downloaded.",
    )
    parser.set_defaults(func=run)
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    _register_tokenize(sub)
    _register_synth(sub)
    _register_inspect(sub)


def _register_tokenize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tokenize",
        help="tokenize JSONL / parquet / saved datasets into PREFIX.bin + PREFIX.idx",
        description="Tokenize records (one document each, inputs in order) into a Megatron-style indexed "
        "dataset PREFIX.bin + PREFIX.idx. Inputs: .jsonl/.json (JSON lines), .parquet, or a directory "
        "written by datasets' save_to_disk.",
    )
    p.add_argument("--input", nargs="+", required=True, type=Path, metavar="FILE", help="input file(s)")
    p.add_argument("--tokenizer", required=True, type=Path, metavar="DIR", help="local tokenizer directory")
    p.add_argument(
        "--output-prefix", required=True, type=Path, metavar="PREFIX", help="writes PREFIX.bin/.idx"
    )
    field = p.add_mutually_exclusive_group()
    field.add_argument("--text-field", default="text", help="field holding the text (default: text)")
    field.add_argument(
        "--messages-field", help="field holding chat messages, rendered with the tokenizer's chat template"
    )
    p.add_argument("--append-eos", action="store_true", help="end every document with the tokenizer's EOS")
    p.add_argument("--batch-size", type=int, default=1000, help="records per tokenizer call (default: 1000)")
    p.set_defaults(data_func=_tokenize)


def _register_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write the synthetic arithmetic corpus and its tokenizer",
        description="Write DIR/train.jsonl, DIR/eval.jsonl (problems like 12+34=46, no overlap between the "
        "two), the character tokenizer DIR/tokenizer, and DIR/train.bin/.idx (train tokenized, EOS appended).",
    )
    p.add_argument("--output", required=True, type=Path, metavar="DIR", help="output directory")
    p.add_argument("--n-train", type=int, default=5000, help="training problems (default: 5000)")
    p.add_argument("--n-eval", type=int, default=500, help="held-out problems (default: 500)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--digits", type=int, default=2, help="maximum digits per operand (default: 2)")
    p.add_argument("--ops", default="+", help="operators to draw from, any of '+-*' (default: +)")
    p.set_defaults(data_func=_synth)


def _register_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="print the size of an indexed dataset (and its first document, decoded)",
        description="Print document and token counts of PREFIX.bin/.idx; with --tokenizer, decode documents.",
    )
    p.add_argument("prefix", type=Path, metavar="PREFIX", help="indexed dataset prefix (without .bin/.idx)")
    p.add_argument("--tokenizer", type=Path, metavar="DIR", help="decode documents with this tokenizer")
    p.add_argument("--show", type=int, default=1, metavar="N", help="documents to decode (default: 1)")
    p.set_defaults(data_func=_inspect)


def run(args: argparse.Namespace) -> int:
    try:
        return args.data_func(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _tokenize(args: argparse.Namespace) -> int:
    from core.data.datasets import RecordFields
    from core.data.preprocess import tokenize_to_indexed
    from core.data.tokenizer import load_tokenizer

    if args.messages_field:
        fields = RecordFields(messages=args.messages_field)
    else:
        fields = RecordFields(text=args.text_field)
    tokenizer = load_tokenizer(args.tokenizer)
    stats = tokenize_to_indexed(
        args.input, tokenizer, args.output_prefix, fields, args.append_eos, batch_size=args.batch_size
    )
    print(f"wrote {args.output_prefix}.bin/.idx: {stats.documents} documents, {stats.tokens} tokens")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from core.data.preprocess import tokenize_to_indexed
    from core.data.synthetic import write_arithmetic_corpus
    from core.data.tokenizer import load_tokenizer

    corpus = write_arithmetic_corpus(args.output, args.n_train, args.n_eval, args.seed, args.digits, args.ops)
    prefix = args.output / "train"
    stats = tokenize_to_indexed([corpus.train], load_tokenizer(corpus.tokenizer), prefix, append_eos=True)
    print(f"wrote {corpus.train} ({args.n_train} problems), {corpus.eval} ({args.n_eval} problems)")
    print(f"wrote {corpus.tokenizer}/ and {prefix}.bin/.idx ({stats.tokens} tokens)")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from core.data.indexed import IndexedDataset

    dataset = IndexedDataset(args.prefix)
    print(f"prefix:    {args.prefix}")
    print(f"documents: {len(dataset)}")
    print(f"tokens:    {dataset.num_tokens}")
    print(f"dtype:     {dataset.dtype}")
    if len(dataset):
        sizes = dataset.sizes
        print(f"doc size:  min {sizes.min()}  mean {sizes.mean():.1f}  max {sizes.max()}")
    if args.tokenizer is not None:
        from core.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
        for i in range(min(args.show, len(dataset))):
            print(f"document {i}: {tokenizer.decode(dataset[i].tolist())!r}")
    return 0
