"""`rl pipeline CONFIG`: several training commands in a row from one config, each stage starting from the
model an earlier one wrote, with a report of them all (rl/report.py).

    run: {dir: runs/pipeline_tiny}
    stages:
      - name: pretrain                       # the stage's run.dir is <run.dir>/<name>
        kind: pretrain                       # any training command: pretrain sft dpo rm grpo ppo distill prune quantize
        config: configs/pretrain_tiny.yaml   # that command's config (optional) ...
        overrides: {train.max_steps: 300}    # ... and overrides: a mapping (dotted or nested keys) or a list of key=value
      - {name: sft, kind: sft, config: configs/sft_tiny.yaml}            # starts from pretrain's output
      - {name: rm, kind: rm, config: configs/rm_tiny.yaml, from: sft}    # `from: NAME`: another stage's output
      - name: ppo
        kind: ppo
        config: configs/ppo_tiny.yaml
        from: sft
        overrides:                           # any value may name a stage's output or directory
          critic.init_from: ${stages.rm.output}
          environment.reward_model.path: ${stages.rm.output}

Paths (config:, and every path inside the stage configs) are relative to the current directory, as in any
`rl` command. `rl pipeline CONFIG stages.NAME.key=value` overrides one stage's key from the command line.

Inputs. Each kind has one input key, which the pipeline fills: model.init_from (distill: teacher.init_from).
Without `from`, it is the output of the nearest earlier stage that writes a language model (an `rm` stage
writes a reward model and a `quantize` stage a quantized export: neither is a start for the next stage);
`from: NAME` picks a stage; `from: null` leaves the key to the stage's own config (a first stage, or a
pretrain from scratch). An override that sets the input key itself replaces `from`. `${stages.NAME.output}`
is what a stage writes (its run directory, which `model.init_from` reads as its hf/, reward_model/ or newest
checkpoint; a quantize stage's first format's FORMAT/hf), `${stages.NAME.dir}` its run directory.

Before stage 1 runs, every stage's config is resolved and validated (its schema, as `rl KIND` would), and
what can be checked without the models is: stage kinds, references (an earlier stage: a later one or the
stage itself is a cycle), run directories (two stages never share one), and what each input will be:
a reward model or a quantized export feeding a training stage, architecture fields that differ from the
source's, a distillation student whose tokenizer or vocabulary is not the teacher's, a pruning target the
model cannot be cut to. A problem is one line naming the stage, exit 2, with nothing written. Then
run.dir/pipeline.yaml and run.dir/stages/NAME.yaml (each stage's resolved config) are written.

Resume: a stage that finished has run.dir/stages/NAME.json with status "done" (written atomically after it
completed, with its output); rerunning the command skips it. A stage killed midway reruns and resumes from
its newest checkpoint (the loops resume from run.dir). A finished stage whose config changed reruns; a
finished stage downstream of one that reruns would then hold a model trained from the old output, so the
pipeline stops up front and names the directories to remove.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import ConfigDict, Field, ValidationError

from algorithms.trainer import LoggingConfig
from core.config import InputPath, RunConfig, Schema, dump_config
from core.errors import InputError, StorageError
from rl.config import apply_overrides, format_validation_error, load_yaml_tree
from rl.pipeline_inputs import INPUT_KEY, REF, WRITES, Lineage, select, stage_lineage
from rl.training import TRAINING_COMMANDS, TrainingCommand

PREVIOUS = "previous"  # `from` left out: the nearest earlier stage that writes a language model
# Keys whose change does not make a finished stage's output stale.
COSMETIC = ("run.name", "train.progress_bar", "logging")


class StageSpec(Schema):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$", description="also its run.dir under run.dir")
    kind: str = Field(description="a training command: " + ", ".join(TRAINING_COMMANDS))
    config: InputPath | None = Field(None, description="the command's YAML config")
    overrides: dict[str, Any] | list[str] = Field(
        default_factory=dict, description="{dotted.key: value} or [key=value, ...] on top of config"
    )
    from_: str | None = Field(
        PREVIOUS,
        alias="from",
        description="the stage whose output fills the input key; null: the stage's own config sets it",
    )


class PipelineConfig(Schema):
    run: RunConfig = Field(default_factory=lambda: RunConfig(dir="runs/pipeline"))
    logging: LoggingConfig | None = Field(
        None, description="every stage's `logging` unless it sets one (W&B: grouped by the pipeline's name)"
    )
    stages: list[StageSpec] = Field(min_length=1)


@dataclass
class Stage:
    index: int  # 1-based
    spec: StageSpec
    cfg: Any  # the command's validated config
    raw: dict[str, Any]  # the merged config before ${stages.*} references were resolved
    deps: list[str]  # the stages it reads
    source: str | None  # the stage whose output fills its input key
    lineage: Lineage | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def command(self) -> TrainingCommand:
        return TRAINING_COMMANDS[self.kind]

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run.dir)

    @property
    def output(self) -> Path:
        if self.kind == "quantize":
            return self.run_dir / self.cfg.quantize.formats[0] / "hf"
        return self.run_dir


@dataclass
class Pipeline:
    cfg: PipelineConfig
    path: str
    overrides: list[str]
    stages: list[Stage] = field(default_factory=list)
    stage_overrides: dict[str, list[str]] = field(default_factory=dict)  # stages.NAME.key=value

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run.dir)

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


# ---- loading and validation (nothing is written) -------------------------------------------------------


def load_pipeline_config(path: str, overrides: list[str] | None = None) -> PipelineConfig:
    """The pipeline file + overrides, validated; ${stages.*} references stay unresolved (each stage
    resolves its own). Overrides of one stage (stages.NAME.key=value) are left to resolve_pipeline."""
    overrides = [o for o in overrides or [] if _stage_override(o) is None]
    tree = apply_overrides(load_yaml_tree(path), overrides)
    try:
        raw = OmegaConf.to_container(tree, resolve=False)
        return PipelineConfig.model_validate(raw)
    except OmegaConfBaseException as e:
        raise InputError(f"{path}: {e}".splitlines()[0]) from None
    except ValidationError as e:
        raise InputError(format_validation_error(PipelineConfig, e, path)) from None


def resolve_pipeline(path: str, overrides: list[str] | None = None) -> Pipeline:
    """Every stage resolved and validated, and the static checks of the module docstring; InputError (one
    line naming the stage) on the first problem."""
    cfg = load_pipeline_config(path, overrides)
    pipeline = Pipeline(cfg, path, list(overrides or []))
    _check_names(pipeline)
    names = [spec.name for spec in cfg.stages]
    for item in overrides or []:
        if (parsed := _stage_override(item)) is not None:
            if parsed[0] not in names:
                raise InputError(f"override {item}: no stage is named '{parsed[0]}' ({', '.join(names)})")
            pipeline.stage_overrides.setdefault(parsed[0], []).append(parsed[1])
    for i, spec in enumerate(cfg.stages, start=1):
        where = f"{path}: stage {i} '{spec.name}'"
        try:
            pipeline.stages.append(_resolve_stage(pipeline, i, spec, where))
        except InputError as e:
            raise InputError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
    _check_directories(pipeline)
    for stage in pipeline.stages:
        try:
            stage.lineage = stage_lineage(pipeline, stage)
        except InputError as e:
            raise InputError(f"{path}: stage {stage.index} '{stage.name}' (rl {stage.kind}): {e}") from None
    return pipeline


def _stage_override(item: str) -> tuple[str, str] | None:
    """("NAME", "key=value") for a command-line override of one stage, `stages.NAME.key=value`."""
    key, sep, value = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 3 or parts[0] != "stages" or parts[1].isdigit():
        return None
    return parts[1], f"{'.'.join(parts[2:])}={value}"


def _check_names(pipeline: Pipeline) -> None:
    import difflib

    seen: dict[str, int] = {}
    for i, spec in enumerate(pipeline.cfg.stages, start=1):
        where = f"{pipeline.path}: stage {i} '{spec.name}'"
        if spec.name in seen:
            raise InputError(
                f"{where}: stage {seen[spec.name]} has the same name, and both would write "
                f"{pipeline.run_dir / spec.name}: give each stage its own name"
            )
        if spec.name == PREVIOUS:
            raise InputError(f"{where}: '{PREVIOUS}' is reserved (`from` left out means the previous stage)")
        seen[spec.name] = i
        if spec.kind not in TRAINING_COMMANDS:
            close = difflib.get_close_matches(spec.kind, list(TRAINING_COMMANDS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise InputError(
                f"{where}: unknown stage kind '{spec.kind}'{hint}; choose one of: {', '.join(TRAINING_COMMANDS)}"
            )


def _resolve_stage(pipeline: Pipeline, index: int, spec: StageSpec, where: str) -> Stage:
    command = TRAINING_COMMANDS[spec.kind]
    tree = load_yaml_tree(spec.config) if spec.config else OmegaConf.create({})
    given = OmegaConf.create({})  # what the stage's own overrides set (they win over `from`)
    if isinstance(spec.overrides, list):
        tree, given = apply_overrides(tree, spec.overrides), apply_overrides(given, spec.overrides)
    else:
        for key, value in spec.overrides.items():
            for target in (tree, given):
                try:
                    OmegaConf.update(target, key, value, merge=True)
                except OmegaConfBaseException as e:
                    raise InputError(f"overrides: {key}: {e}".splitlines()[0]) from None
    extra = pipeline.stage_overrides.get(spec.name, [])
    tree, given = apply_overrides(tree, extra), apply_overrides(given, extra)
    key = INPUT_KEY[spec.kind]
    if spec.from_ not in (PREVIOUS, None) and _set_in(given, key) is not None:
        raise InputError(f"sets both `from: {spec.from_}` and {key} in its overrides: keep one")
    source = _source(pipeline, index, spec, _set_in(given, key) is not None)
    if source is not None:
        OmegaConf.update(tree, key, f"${{stages.{source}.output}}", merge=True)
    if _set_in(given, "run.dir") is None:
        OmegaConf.update(tree, "run.dir", str(pipeline.run_dir / spec.name), merge=True)
    if _set_in(tree, "run.name") is None:
        OmegaConf.update(tree, "run.name", f"{index}/{len(pipeline.cfg.stages)} {spec.name}", merge=True)
    if pipeline.cfg.logging is not None and _set_in(tree, "logging") is None:
        logging = pipeline.cfg.logging.model_dump(mode="json")
        if logging.get("wandb") and not logging["wandb"].get("group"):
            logging["wandb"]["group"] = pipeline.cfg.run.name or pipeline.run_dir.name
        OmegaConf.update(tree, "logging", logging, merge=True)
    try:
        raw = OmegaConf.to_container(tree, resolve=False)
    except OmegaConfBaseException as e:
        raise InputError(f"{e}".splitlines()[0]) from None
    deps = _references(pipeline, index, spec, raw, source)
    return Stage(index, spec, _validate(pipeline, command, tree, deps, where), raw, deps, source)


def _set_in(tree: Any, key: str) -> Any:
    """The value at a dotted key as written (an interpolation stays a string), None when unset."""
    return select(OmegaConf.to_container(tree, resolve=False), key)


def _source(pipeline: Pipeline, index: int, spec: StageSpec, key_given: bool) -> str | None:
    """The stage whose output fills the input key, or None."""
    if key_given or spec.from_ is None:
        return None
    if spec.from_ == PREVIOUS:
        earlier = [s for s in pipeline.stages if WRITES.get(s.kind, "lm") == "lm"]
        return earlier[-1].name if earlier else None
    _check_reference(pipeline, index, spec, spec.from_, "`from`")
    return spec.from_


def _check_reference(pipeline: Pipeline, index: int, spec: StageSpec, name: str, what: str) -> None:
    names = [s.name for s in pipeline.cfg.stages]
    if name == spec.name:
        raise InputError(f"{what} names the stage itself: a stage cannot start from its own output (a cycle)")
    if name not in names:
        raise InputError(f"{what} names '{name}', which is no stage of this pipeline ({', '.join(names)})")
    if names.index(name) >= index - 1:
        raise InputError(
            f"{what} names '{name}', stage {names.index(name) + 1}, which runs after it (stages run in the "
            f"listed order: a later stage's output does not exist yet; move '{name}' earlier)"
        )


def _references(pipeline: Pipeline, index: int, spec: StageSpec, raw: Any, source: str | None) -> list[str]:
    """The stages a stage reads (`from` and ${stages.NAME.*}), each checked to be an earlier one."""
    deps = [source] if source else []
    for key, value in _strings(raw):
        for name, attr in REF.findall(value):
            _check_reference(pipeline, index, spec, name, key)
            if attr not in ("output", "dir"):
                raise InputError(f"{key}: ${{stages.{name}.{attr}}}: a stage has `output` and `dir`")
            deps += [name] if name not in deps else []
    return deps


def _strings(tree: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(tree, dict):
        return [kv for k, v in tree.items() for kv in _strings(v, f"{prefix}{k}.")]
    if isinstance(tree, list):
        return [kv for i, v in enumerate(tree) for kv in _strings(v, f"{prefix}{i}.")]
    return [(prefix.rstrip("."), tree)] if isinstance(tree, str) else []


def _validate(pipeline: Pipeline, command: TrainingCommand, tree: Any, deps: list[str], where: str) -> Any:
    """The command's config with ${stages.*} resolved, validated by its schema."""
    earlier = {d: pipeline.stage(d) for d in deps}
    root = OmegaConf.merge(
        tree,
        {
            "stages": {name: {"output": str(s.output), "dir": str(s.run_dir)} for name, s in earlier.items()},
            "pipeline": {"dir": str(pipeline.run_dir)},
        },
    )
    try:
        container = OmegaConf.to_container(root, resolve=True)
    except OmegaConfBaseException as e:
        raise InputError(f"cannot resolve its config: {e}".splitlines()[0]) from None
    container.pop("stages")
    container.pop("pipeline")
    schema = command.load_schema()
    try:
        return schema.model_validate(container)
    except ValidationError as e:
        raise InputError(format_validation_error(schema, e, f"{where} (rl {command.name})")) from None


def _check_directories(pipeline: Pipeline) -> None:
    """Two stages never write one directory (nor one inside another's), nor into the pipeline's own files."""
    reserved = {pipeline.run_dir.resolve(), (pipeline.run_dir / "stages").resolve()}
    dirs = [(s, s.run_dir.resolve()) for s in pipeline.stages]
    for i, (a, da) in enumerate(dirs):
        if da in reserved:
            raise InputError(
                f"{pipeline.path}: stage {a.index} '{a.name}': run.dir={a.run_dir} is the pipeline's own "
                "directory: leave run.dir to the pipeline (<run.dir>/<name>)"
            )
        for b, db in dirs[i + 1 :]:
            if da == db or da in db.parents or db in da.parents:
                both = str(a.run_dir) if da == db else f"{a.run_dir} and {b.run_dir} (one inside the other)"
                raise InputError(
                    f"{pipeline.path}: stages '{a.name}' and '{b.name}' both write {both}: give each stage "
                    "its own run.dir (the default: <run.dir>/<name>)"
                )


# ---- resume: which stages run ---------------------------------------------------------------------------


def state_path(run_dir: Path, name: str) -> Path:
    return run_dir / "stages" / f"{name}.json"


def read_state(run_dir: Path, name: str) -> dict[str, Any] | None:
    path = state_path(run_dir, name)
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None  # never written half (atomic), but a hand-edited file must not stop the pipeline


def write_state(run_dir: Path, name: str, state: dict[str, Any]) -> None:
    """stages/NAME.json, atomically (a temporary file renamed over it)."""
    path = state_path(run_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    tmp.replace(path)


@dataclass
class Plan:
    skip: set[str]  # finished, inputs and config unchanged
    resume: dict[str, Path]  # stage -> the checkpoint it resumes from


def plan(pipeline: Pipeline) -> Plan:
    """Which stages are done (skipped) and which run; InputError (one line) when a stage that must run
    again holds a run trained from an output that is about to change."""
    from algorithms.trainer import config_changes
    from core.checkpoint.checkpointer import latest_checkpoint

    done: dict[str, dict[str, Any]] = {}
    rerun, resume, stale = set(), {}, []
    for stage in pipeline.stages:
        state = read_state(pipeline.run_dir, stage.name)
        inputs_same = state is not None and all(
            d not in rerun and state.get("inputs", {}).get(d) == done[d]["finished"] for d in stage.deps
        )
        changed = (
            [
                key
                for key, _, _ in config_changes(state.get("config", {}), stage.cfg.model_dump(mode="json"))
                if not key.startswith(COSMETIC)
            ]
            if state is not None
            else []
        )
        finished = state is not None and state.get("status") == "done" and stage.output.exists()
        if finished and inputs_same and not changed:
            done[stage.name] = state
            continue
        rerun.add(stage.name)
        if state is not None and not inputs_same and _has_files(stage.run_dir):
            why = ", ".join(d for d in stage.deps if d in rerun) or "its inputs"
            stale.append(f"{stage.run_dir} (made from the earlier output of {why})")
        latest = latest_checkpoint(stage.run_dir / "checkpoints")
        if latest is not None:
            resume[stage.name] = latest
    if stale:
        raise InputError(
            f"{pipeline.path}: stages that run again change the inputs of stages that already ran: remove "
            f"{'; '.join(stale)} to train them again from the new outputs, or put the changed configs back"
        )
    return Plan(set(done), resume)


def _has_files(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


# ---- running ------------------------------------------------------------------------------------------


def write_resolved(pipeline: Pipeline) -> None:
    """run.dir/pipeline.yaml and run.dir/stages/NAME.yaml: what the pipeline and each stage run."""
    import yaml

    stages_dir = pipeline.run_dir / "stages"
    stages_dir.mkdir(parents=True, exist_ok=True)
    resolved = pipeline.cfg.model_dump(mode="json", by_alias=True)
    for spec, stage in zip(resolved["stages"], pipeline.stages, strict=True):
        spec["run_dir"] = str(stage.run_dir)
        spec["output"] = str(stage.output)
        spec["deps"] = stage.deps
    tmp = pipeline.run_dir / "pipeline.yaml.tmp"
    tmp.write_text(yaml.safe_dump(resolved, sort_keys=False))
    tmp.replace(pipeline.run_dir / "pipeline.yaml")
    for stage in pipeline.stages:
        dump_config(stage.cfg, stages_dir / f"{stage.name}.yaml")


def describe(pipeline: Pipeline, todo: Plan) -> list[str]:
    lines = []
    for stage in pipeline.stages:
        if stage.name in todo.skip:
            what = "done: skipped"
        elif stage.name in todo.resume:
            what = f"resumes from {todo.resume[stage.name]}"
        else:
            what = "runs"
        src = f" from stage '{stage.source}'" if stage.source else ""
        lines.append(f"  {stage.index}. {stage.name:<12} rl {stage.kind:<9} {stage.run_dir}{src}: {what}")
    return lines


def run_pipeline(pipeline: Pipeline) -> int:
    """Run the stages that are not done, in order (each as `rl KIND` runs it: in this process or on Ray as
    its config says), then the report. The exit code of `rl KIND` when a stage stops."""
    from algorithms.trainer import RunDiverged
    from rl.report import write_report
    from rl.training import run_command

    todo = plan(pipeline)
    write_resolved(pipeline)
    print(f"pipeline {pipeline.run_dir}: {len(pipeline.stages)} stages", flush=True)
    print("\n".join(describe(pipeline, todo)), flush=True)
    resume = " ".join(["rl", "pipeline", pipeline.path, *pipeline.overrides])
    total = len(pipeline.stages)
    for stage in pipeline.stages:
        if stage.name in todo.skip:
            continue
        print(f"== stage {stage.index}/{total} {stage.name} (rl {stage.kind}) -> {stage.run_dir}", flush=True)
        inputs = {d: read_state(pipeline.run_dir, d)["finished"] for d in stage.deps}
        previous = read_state(pipeline.run_dir, stage.name) or {}
        started = _now()
        state = {
            "name": stage.name,
            "kind": stage.kind,
            "status": "running",
            "started": started,
            "attempts": int(previous.get("attempts", 0)) + 1,
            "inputs": inputs,
            "config": stage.cfg.model_dump(mode="json"),
        }
        write_state(pipeline.run_dir, stage.name, state)
        t0 = time.perf_counter()
        try:
            metrics = run_command(stage.command, stage.cfg, resume)
        except InputError as e:
            raise InputError(f"stage {stage.index} '{stage.name}' (rl {stage.kind}): {e}") from None
        except RunDiverged as e:
            print(f"error: stage {stage.index} '{stage.name}' (rl {stage.kind}): {e}", file=sys.stderr)
            return 3
        except StorageError as e:
            print(f"error: stage {stage.index} '{stage.name}' (rl {stage.kind}): {e}", file=sys.stderr)
            return 1
        if metrics is None:  # run_command said why on stderr
            return 1
        wall = time.perf_counter() - t0
        state |= {
            "status": "done",
            "finished": _now(),
            "wall_time_s": wall,
            "output": str(stage.output),
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float)},
        }
        write_state(pipeline.run_dir, stage.name, state)
        shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith(stage.command.summary)}
        print(f"== stage {stage.index}/{total} {stage.name} done in {wall:.0f} s: {shown}", flush=True)
        _report(pipeline.run_dir, write_report)
    report = _report(pipeline.run_dir, write_report)
    print(f"pipeline finished: {pipeline.run_dir} (report: {report})", flush=True)
    return 0


def _report(run_dir: Path, write_report: Any) -> Path | None:
    """The report after each stage; a report that cannot be written never stops the training."""
    try:
        return write_report(run_dir)
    except Exception as e:  # noqa: BLE001 - the stages' results stay on disk; `rl report` can retry
        print(f"warning: report not written ({type(e).__name__}: {e}); retry with rl report {run_dir}")
        return None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
