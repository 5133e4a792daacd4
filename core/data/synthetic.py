"""The embedded default task: integer arithmetic ("23+58=81"), with its own character-level tokenizer.

Everything is generated locally from a seed, so pretraining, SFT and RL recipes run with no downloads.
The tokenizer directory is a plain `PreTrainedTokenizerFast` (tokenizer.json + tokenizer_config.json +
special_tokens_map.json): transformers' AutoTokenizer and vLLM both load it.
"""

from __future__ import annotations

import json
import operator
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from core.errors import InputError

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0..3, in this order
CHARACTERS = "0123456789+-*=, \n"
# Padded so the embedding splits evenly over any tensor-parallel size up to 64.
VOCAB_MULTIPLE = 64
# A chat renders as the pretraining text: each message's content, each assistant turn closed by EOS, so
# {"user": "12+34=", "assistant": "46"} is "12+34=46<eos>" and a generation prompt adds nothing.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
)

OPERATORS: dict[str, Callable[[int, int], int]] = {"+": operator.add, "-": operator.sub, "*": operator.mul}
_PROBLEM = re.compile(r"^\s*(\d+)\s*([+\-*])\s*(\d+)\s*=\s*$")
_ANSWER = re.compile(r"^\s*(-?\d+)")


@dataclass(frozen=True)
class ArithmeticProblem:
    prompt: str  # "12+34="
    answer: str  # "46"

    @property
    def text(self) -> str:
        return self.prompt + self.answer


@dataclass(frozen=True)
class ArithmeticCorpus:
    train: Path  # train.jsonl
    eval: Path  # eval.jsonl
    tokenizer: Path  # tokenizer directory


def _problem(index: int, digits: int, ops: Sequence[str]) -> ArithmeticProblem:
    """Problem `index` of the space ops x [0, 10^digits)^2, enumerated op-major."""
    n = 10**digits
    op_index, rest = divmod(index, n * n)
    a, b = divmod(rest, n)
    op = ops[op_index]
    return ArithmeticProblem(prompt=f"{a}{op}{b}=", answer=str(OPERATORS[op](a, b)))


def generate_arithmetic(
    n_train: int, n_eval: int, seed: int, digits: int = 2, ops: Sequence[str] = ("+",)
) -> tuple[list[ArithmeticProblem], list[ArithmeticProblem]]:
    """Distinct problems with operands of up to `digits` digits; train and held-out never share a problem.

    Both splits come from one seeded draw without replacement, so the same arguments give the same sets.
    """
    if digits < 1 or n_train < 0 or n_eval < 0:
        raise InputError(
            f"arithmetic: need digits >= 1 and non-negative sizes, got {digits=} {n_train=} {n_eval=}"
        )
    unknown = [op for op in ops if op not in OPERATORS]
    if unknown or not ops:
        raise InputError(f"arithmetic: ops must be a non-empty subset of {''.join(OPERATORS)}, got {ops!r}")
    space = len(ops) * 100**digits
    if n_train + n_eval > space:
        raise InputError(f"arithmetic: {n_train + n_eval} problems requested, only {space} distinct exist")
    indices = random.Random(seed).sample(range(space), n_train + n_eval)
    problems = [_problem(i, digits, ops) for i in indices]
    return problems[n_eval:], problems[:n_eval]


def score_arithmetic(prompt: str, completion: str) -> bool:
    """True when the completion starts with the correct result of the prompt's problem (e.g. "12+34=")."""
    problem = _PROBLEM.match(prompt)
    if problem is None:
        raise InputError(f"arithmetic: cannot parse problem from prompt {prompt!r}")
    a, op, b = int(problem.group(1)), problem.group(2), int(problem.group(3))
    answer = _ANSWER.match(completion)
    return answer is not None and int(answer.group(1)) == OPERATORS[op](a, b)


def build_char_tokenizer(vocab_multiple: int = VOCAB_MULTIPLE):  # -> tokenizers.Tokenizer
    """WordLevel over single characters; encoding prepends <bos>, decoding concatenates characters."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    tokens = [*SPECIAL_TOKENS, *CHARACTERS]
    tokens += [f"<extra_{i}>" for i in range(-len(tokens) % vocab_multiple)]
    tokenizer = Tokenizer(WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    bos_id = tokens.index(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    tokenizer.add_special_tokens([t for t in tokens if t.startswith("<")])
    return tokenizer


def save_char_tokenizer(directory: str | Path) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    build_char_tokenizer().save(str(directory / "tokenizer.json"))
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
    }
    _write_json(directory / "tokenizer_config.json", config)
    _write_json(directory / "special_tokens_map.json", special)
    return directory


def write_arithmetic_corpus(
    directory: str | Path,
    n_train: int,
    n_eval: int,
    seed: int,
    digits: int = 2,
    ops: Sequence[str] = ("+",),
) -> ArithmeticCorpus:
    """train.jsonl / eval.jsonl rows {"text", "prompt", "answer"} plus the tokenizer in `directory`/tokenizer."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    train, held_out = generate_arithmetic(n_train, n_eval, seed, digits, ops)
    corpus = ArithmeticCorpus(directory / "train.jsonl", directory / "eval.jsonl", directory / "tokenizer")
    _write_problems(corpus.train, train)
    _write_problems(corpus.eval, held_out)
    save_char_tokenizer(corpus.tokenizer)
    return corpus


def write_sft_chat_data(
    data_dir: str | Path,
    n_train: int,
    n_eval: int,
    seed: int,
    digits: int = 2,
    ops: Sequence[str] = ("+",),
    multi_turn_frac: float = 0.25,
) -> ArithmeticCorpus:
    """train.jsonl / eval.jsonl chat rows {"messages", "answer"} plus the tokenizer in `data_dir`/tokenizer.

    A row is one problem as a user turn and its result as the assistant turn; a `multi_turn_frac` share of
    rows chain 2 or 3 problems in one conversation ("answer" is the last turn's). No problem appears twice,
    so the splits are disjoint; the same arguments give the same files.
    """
    if not 0.0 <= multi_turn_frac <= 1.0:
        raise InputError(f"arithmetic chat: multi_turn_frac must be in [0, 1], got {multi_turn_frac}")
    rng = random.Random(seed)
    train_turns = [rng.randint(2, 3) if rng.random() < multi_turn_frac else 1 for _ in range(n_train)]
    eval_turns = [rng.randint(2, 3) if rng.random() < multi_turn_frac else 1 for _ in range(n_eval)]
    train, held_out = generate_arithmetic(sum(train_turns), sum(eval_turns), seed, digits, ops)
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    corpus = ArithmeticCorpus(data_dir / "train.jsonl", data_dir / "eval.jsonl", data_dir / "tokenizer")
    _write_rows(corpus.train, _chat_rows(train, train_turns))
    _write_rows(corpus.eval, _chat_rows(held_out, eval_turns))
    save_char_tokenizer(corpus.tokenizer)
    return corpus


def _chat_rows(problems: list[ArithmeticProblem], turns: list[int]) -> list[dict]:
    rows, start = [], 0
    for n in turns:
        chain = problems[start : start + n]
        start += n
        messages = []
        for p in chain:
            messages += [{"role": "user", "content": p.prompt}, {"role": "assistant", "content": p.answer}]
        rows.append({"messages": messages, "answer": chain[-1].answer})
    return rows


def _write_problems(path: Path, problems: list[ArithmeticProblem]) -> None:
    _write_rows(path, [{"text": p.text, "prompt": p.prompt, "answer": p.answer} for p in problems])


def _write_rows(path: Path, rows: list[dict]) -> None:
    # A temporary name of this process's own: every rank of a spawned world may write the same (identical)
    # file at once, and each swaps its complete copy in.
    tmp = path.with_suffix(f"{path.suffix}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
