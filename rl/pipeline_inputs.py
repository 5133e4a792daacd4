"""What each stage of a pipeline (rl/pipeline.py) will read and write, found from the configs before any
stage runs: the kind of model a stage's output is (a language model, a reward model, a quantized export),
its architecture (TransformerConfig) and its tokenizer, followed from the first stage down. A stage's
inputs are checked against them: the kind its key takes, the architecture fields its config sets, a
distillation student's tokenizer and vocabulary against the teacher's, a pruning target against the model.
A path that is no stage's output must exist now and is read without loading weights (resolve_init)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import InputError
from rl.training import TRAINING_COMMANDS

if TYPE_CHECKING:
    from rl.pipeline import Pipeline, Stage

INPUT_KEY = {name: "model.init_from" for name in TRAINING_COMMANDS} | {"distill": "teacher.init_from"}
WRITES = {"rm": "value", "quantize": "quantized"}  # what a stage's output is; every other kind: "lm"
WHAT = {
    "lm": "a language model",
    "value": "a reward model (a value head, not a language model)",
    "quantized": "a quantized export (no stage trains from it)",
}
REF = re.compile(r"\$\{stages\.([^.}]+)\.([^}]*)\}")  # ${stages.NAME.output} / ${stages.NAME.dir}


@dataclass
class Lineage:
    """What a stage's output will be, as far as the configs say: its kind, architecture and tokenizer."""

    writes: str  # "lm" | "value" | "quantized"
    config: Any = None  # TransformerConfig, when known
    arch: str | None = None
    tokenizer: str | None = None  # a fingerprint (same ids, specials and chat template: same string)
    where: str = ""  # how a message names it


def stage_lineage(pipeline: Pipeline, stage: Stage) -> Lineage:
    """The stage's output as far as the configs say, after checking its inputs against it."""
    cfg, kind = stage.cfg, stage.kind
    if kind == "pretrain":
        return _pretrain_lineage(pipeline, stage)
    if kind == "distill":
        return _distill_lineage(pipeline, stage)
    src = _input(pipeline, stage, "model.init_from", ("lm", "value") if kind == "rm" else ("lm",))
    _check_source(cfg.model, src, "model")
    out = Lineage(WRITES.get(kind, "lm"), src.config, src.arch, src.tokenizer, f"stage '{stage.name}'")
    if cfg.model.tokenizer is not None:
        out.tokenizer = _tokenizer_fingerprint(cfg.model.tokenizer)
    if kind == "ppo" and cfg.critic.init_from is not None:
        _same_vocabulary(
            src, _input(pipeline, stage, "critic.init_from", ("lm", "value")), "critic.init_from"
        )
    if kind in ("grpo", "ppo"):
        for key in ("environment.path", "environment.reward_model.path"):
            if select(stage.raw, key) is not None:
                _input(pipeline, stage, key, ("value",))
    if kind == "prune" and src.config is not None:
        from algorithms.prune import target_config

        out.config = target_config(src.config, cfg.target, cfg.parallel)
    return out


def _pretrain_lineage(pipeline: Pipeline, stage: Stage) -> Lineage:
    cfg = stage.cfg
    if cfg.data.synthetic is not None:
        tokenizer, size = _synthetic_tokenizer()
    else:
        tokenizer, size = _tokenizer_fingerprint(cfg.data.tokenizer), None
    if cfg.model.init_from is not None:
        src = _input(pipeline, stage, "model.init_from", ("lm",))
        if None not in (tokenizer, src.tokenizer) and tokenizer != src.tokenizer:
            raise InputError(
                f"model.init_from ({src.where}) has another tokenizer than the one this pretraining reads "
                "(data.tokenizer / the synthetic task's): token ids would mean other things"
            )
        return Lineage("lm", src.config, src.arch, tokenizer or src.tokenizer, f"stage '{stage.name}'")
    config = cfg.model.transformer_config(size or 64)
    return Lineage("lm", config, cfg.model.arch, tokenizer, f"stage '{stage.name}'")


def _distill_lineage(pipeline: Pipeline, stage: Stage) -> Lineage:
    import dataclasses

    cfg = stage.cfg
    teacher = _input(pipeline, stage, "teacher.init_from", ("lm",))
    _check_source(cfg.teacher, teacher, "teacher")
    student = cfg.student
    config = None
    if student.init_from is not None:
        src = _input(pipeline, stage, "student.init_from", ("lm",))
        if None not in (src.tokenizer, teacher.tokenizer) and src.tokenizer != teacher.tokenizer:
            raise InputError(
                f"the student (student.init_from: {src.where}) has another tokenizer than the teacher "
                f"(teacher.init_from: {teacher.where}): distillation compares logits id by id, so both must "
                "share one"
            )
        _same_vocabulary(teacher, src, "student.init_from")
        config = src.config
    elif teacher.config is not None and student.layers_from_teacher is not None:
        layers = student.layers_from_teacher
        if any(not 0 <= i < teacher.config.num_layers for i in layers) or len(set(layers)) != len(layers):
            raise InputError(
                f"student.layers_from_teacher={layers}: distinct indices of the teacher's "
                f"{teacher.config.num_layers} layers ({teacher.where})"
            )
        config = dataclasses.replace(teacher.config, num_layers=len(layers))
    elif teacher.config is not None:
        config = dataclasses.replace(
            student.transformer_config(teacher.config.vocab_size), vocab_size=teacher.config.vocab_size
        )
    return Lineage("lm", config, teacher.arch, teacher.tokenizer, f"stage '{stage.name}'")


def _input(pipeline: Pipeline, stage: Stage, key: str, accepts: tuple[str, ...]) -> Lineage:
    """What the stage reads at `key`: an earlier stage's output (named in the unresolved value) or a path
    that exists now; InputError when it is not a kind of model the key takes."""
    value = select(stage.raw, key)
    refs = REF.findall(value) if isinstance(value, str) else []
    if refs:
        name = refs[0][0]
        src = pipeline.stage(name).lineage
        what = f"stage '{name}' (rl {pipeline.stage(name).kind})"
    else:
        src = _existing(select(stage.cfg.model_dump(), key), key)
        what = str(value)
    if src.writes not in accepts:
        hint = (
            "take it from another stage (`from: NAME`)"
            if key == INPUT_KEY[stage.kind]
            else "point it elsewhere"
        )
        raise InputError(
            f"{key} comes from {what}, which writes {WHAT[src.writes]}, but {key} needs "
            f"{' or '.join(WHAT[a].split(' (')[0] for a in accepts)}: {hint}"
        )
    return src


def _existing(path: str, key: str) -> Lineage:
    """A model on disk now (not a stage's output): its architecture and tokenizer, read without weights."""
    from algorithms.rl_inputs import init_arch_name, init_config, resolve_init

    try:
        source = resolve_init(path)
    except InputError as e:
        raise InputError(str(e).replace("model.init_from", key, 1)) from None
    config = init_config(source)
    tokenizer = _tokenizer_fingerprint(source.tokenizer) if source.tokenizer is not None else None
    writes = "value" if getattr(config, "head", "lm") == "value" else "lm"
    return Lineage(writes, config, init_arch_name(source), tokenizer, path)


def _check_source(section: Any, src: Lineage, name: str) -> None:
    """The section's architecture fields (model.hidden_size, ...) against its source's, when known."""
    if src.config is None:
        return
    try:
        section.check_source(src.config, src.arch)
    except InputError as e:
        message = str(e).replace(f"({section.init_from})", f"({src.where})")
        raise InputError(message.replace("model.", f"{name}.") if name != "model" else message) from None


def _same_vocabulary(a: Lineage, b: Lineage, key: str) -> None:
    if a.config is not None and b.config is not None and a.config.vocab_size != b.config.vocab_size:
        raise InputError(
            f"{key} ({b.where}) has vocab_size={b.config.vocab_size}, but {a.where} has "
            f"{a.config.vocab_size}: they must share one vocabulary"
        )


def select(tree: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


_FINGERPRINTS: dict[str, tuple[str | None, int | None]] = {}


def _tokenizer_fingerprint(path: str | Path | None) -> str | None:
    """Equal strings for tokenizers that map every string to the same ids (algorithms/distill.py's
    same_tokenizer: vocabulary, special token ids, chat template); None when there is none to read."""
    if path is None or not Path(path).exists():
        return None
    key = str(Path(path).resolve())
    if key not in _FINGERPRINTS:
        from core.data.tokenizer import load_tokenizer

        tok = load_tokenizer(path)
        specials = {k: getattr(tok, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        text = json.dumps([sorted(tok.get_vocab().items()), specials, tok.chat_template], default=str)
        _FINGERPRINTS[key] = (text, len(tok))
    return _FINGERPRINTS[key][0]


def _synthetic_tokenizer() -> tuple[str | None, int | None]:
    """The embedded arithmetic task's tokenizer (its fingerprint and size): the same for every seed."""
    if "synthetic" not in _FINGERPRINTS:
        import tempfile

        from core.data.synthetic import save_char_tokenizer

        with tempfile.TemporaryDirectory() as tmp:
            directory = save_char_tokenizer(Path(tmp) / "tokenizer")
            _tokenizer_fingerprint(directory)
            _FINGERPRINTS["synthetic"] = _FINGERPRINTS[str(directory.resolve())]
    return _FINGERPRINTS["synthetic"]
