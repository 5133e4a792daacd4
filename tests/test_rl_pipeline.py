"""`rl pipeline` (stages from one config, resume at stage granularity), `rl report`, W&B logging and
`rl submit pipeline`. (tests/test_pipeline.py is pipeline *parallelism*.)

The bad-input cases resolve real stage configs without training: each stops with one line and exit 2
before anything is written. The end-to-end test kills a tiny pipeline with SIGKILL during its third stage
and runs it again."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tiny_pretrain import fast

from core.utils.metrics import read_metrics
from rl.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# A few seconds per stage on 2 cores: the tiny pretrain shrunk (tests/tiny_pretrain.py), a handful of rows.
PRETRAIN = fast(**{"train.max_steps": 20, "train.save_every": 20, "train.log_every": 5})
SFT = [
    "train.max_steps=4",
    "train.global_batch_size=8",
    "train.micro_batch_size=8",
    "train.log_every=1",
    "train.progress_bar=false",
    "data.synthetic.n_train=200",
    "data.synthetic.n_eval=20",
    "data.seq_len=32",
    "eval.num_rows=10",
]
GRPO = [
    "train.global_batch_size=16",
    "train.micro_batch_size=8",
    "train.log_every=1",
    "train.eval_every=0",
    "train.save_every=1",
    "train.progress_bar=false",
    "data.synthetic.n_train=64",
    "data.synthetic.n_eval=8",
    "rollout.prompts_per_step=4",
    "rollout.n=4",
    "rollout.max_tokens=4",
    "eval.num_prompts=4",
    "eval.samples=2",
]
QUANTIZE = {
    "quantize.formats": ["fp8"],
    "calibration.path": "${stages.pretrain.dir}/data/train.jsonl",
    "calibration.num_samples": 32,
    "eval.path": "${stages.pretrain.dir}/data/eval.jsonl",
    "eval.num_rows": 10,
}


def stage(name: str, kind: str, overrides: dict | list | None = None, **extra) -> dict:
    return {"name": name, "kind": kind, "config": str(CONFIGS / f"{kind}_tiny.yaml"), **extra} | (
        {"overrides": overrides} if overrides is not None else {}
    )


def write_pipeline(tmp_path: Path, stages: list[dict], **top) -> tuple[Path, Path]:
    """(the pipeline file, its run.dir) in tmp_path."""
    run_dir = tmp_path / "run"
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"run": {"dir": str(run_dir)}, "stages": stages, **top}, sort_keys=False))
    return path, run_dir


FIVE = [  # the tiny recipes, unshortened: only resolved here
    stage("pretrain", "pretrain"),
    stage("sft", "sft"),
    stage("dpo", "dpo"),
    stage("grpo", "grpo"),
    stage("distill", "distill"),
]


PPO = [  # RLHF from one config: the reward model trains from the SFT model, PPO's critic and reward read it
    stage("pretrain", "pretrain"),
    stage("sft", "sft"),
    stage("rm", "rm", **{"from": "sft"}),
    stage(
        "ppo",
        "ppo",
        {"critic.init_from": "${stages.rm.output}", "environment.reward_model.path": "${stages.rm.output}"},
        **{"from": "sft"},
    ),
]


def other_tokenizer(tmp_path: Path) -> Path:
    """The char tokenizer with another chat template: same ids, but not the same tokenizer."""
    from core.data.synthetic import save_char_tokenizer

    directory = save_char_tokenizer(tmp_path / "other_tokenizer")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def bad_inputs(tmp_path: Path) -> dict[str, tuple[list[dict], dict, str]]:
    """case -> (stages, top-level keys, what the one line must say)."""
    return {
        "unknown kind": (
            [stage("pretrain", "pretrain"), {"name": "sft", "kind": "sfft"}],
            {},
            "stage 2 'sft': unknown stage kind 'sfft' (did you mean 'sft'?)",
        ),
        "bad key in stage 5": (
            [*FIVE[:4], stage("distill", "distill", {"train.max_stpes": 3})],
            {},
            "stage 5 'distill' (rl distill): unknown key 'train.max_stpes'; did you mean 'train.max_steps'?",
        ),
        "distill student/teacher tokenizers differ": (
            [
                stage("pretrain", "pretrain"),
                stage(
                    "other",
                    "pretrain",
                    [
                        "data.synthetic=null",
                        "data.datasets=[{path: corpus}]",
                        f"data.tokenizer={other_tokenizer(tmp_path)}",
                    ],
                    **{"from": None},
                ),  # fmt: skip
                stage(
                    "distill",
                    "distill",
                    {"student.layers_from_teacher": None, "student.init_from": "${stages.other.output}"},
                    **{"from": "pretrain"},
                ),  # fmt: skip
            ],
            {},
            "stage 3 'distill' (rl distill): the student (student.init_from: stage 'other') has another tokenizer "
            "than the teacher (teacher.init_from: stage 'pretrain')",
        ),
        "reward model into sft": (
            [stage("pretrain", "pretrain"), stage("rm", "rm"), stage("sft", "sft", **{"from": "rm"})],
            {},
            "model.init_from comes from stage 'rm' (rl rm), which writes a reward model",
        ),
        "quantized export into sft": (
            [stage("pretrain", "pretrain"), stage("q", "quantize"), stage("sft", "sft", **{"from": "q"})],
            {},
            "which writes a quantized export",
        ),
        "architecture differs from the source": (
            [stage("pretrain", "pretrain"), stage("sft", "sft", {"model.hidden_size": 256})],
            {},
            "model.hidden_size=256 but model.init_from (stage 'pretrain') has hidden_size=128",
        ),
        "prune target larger than the model": (
            [stage("pretrain", "pretrain"), stage("prune", "prune", {"target.hidden_size": 256})],
            {},
            "target.hidden_size=256 is larger than the model's hidden_size=128",
        ),
        "forward reference": (
            [stage("pretrain", "pretrain"), stage("sft", "sft", **{"from": "grpo"}), stage("grpo", "grpo")],
            {},
            "`from` names 'grpo', stage 3, which runs after it",
        ),
        "cycle": (
            [stage("pretrain", "pretrain"), stage("sft", "sft", **{"from": "sft"})],
            {},
            "names the stage itself",
        ),
        "reference to no stage": (
            [
                stage("pretrain", "pretrain"),
                stage("sft", "sft", {"model.init_from": "${stages.pretrian.output}"}),
            ],
            {},
            "model.init_from names 'pretrian', which is no stage of this pipeline",
        ),
        "two stages, one directory": (
            [
                stage("pretrain", "pretrain", {"run.dir": str(tmp_path / "shared")}),
                stage("sft", "sft", {"run.dir": str(tmp_path / "shared")}),
            ],
            {},
            "stages 'pretrain' and 'sft' both write",
        ),
        "two stages, one name": (
            [stage("pretrain", "pretrain"), stage("pretrain", "sft")],
            {},
            "stage 2 'pretrain': stage 1 has the same name",
        ),
        "from and the input key both set": (
            [
                stage("pretrain", "pretrain"),
                stage("sft", "sft", {"model.init_from": "x"}, **{"from": "pretrain"}),
            ],
            {},
            "sets both `from: pretrain` and model.init_from",
        ),
        "a language model as ppo's reward model": (
            [
                *PPO,
                stage(
                    "ppo2",
                    "ppo",
                    {
                        "critic.init_from": "${stages.rm.output}",
                        "environment.reward_model.path": "${stages.sft.output}",
                    },
                    **{"from": "sft"},
                ),
            ],
            {},
            "stage 5 'ppo2' (rl ppo): environment.reward_model.path comes from stage 'sft' (rl sft), which writes a "
            "language model, but environment.reward_model.path needs a reward model",
        ),
        "missing input model": (
            [stage("sft", "sft", {"model.init_from": str(tmp_path / "nothing")})],
            {},
            "model.init_from: " + str(tmp_path / "nothing") + " not found",
        ),
    }


CASES = [
    "unknown kind",
    "bad key in stage 5",
    "distill student/teacher tokenizers differ",
    "reward model into sft",
    "quantized export into sft",
    "architecture differs from the source",
    "prune target larger than the model",
    "forward reference",
    "cycle",
    "reference to no stage",
    "two stages, one directory",
    "two stages, one name",
    "from and the input key both set",
    "a language model as ppo's reward model",
    "missing input model",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_stops_before_stage_1(case, tmp_path, capsys):
    stages, top, expected = bad_inputs(tmp_path)[case]
    path, run_dir = write_pipeline(tmp_path, stages, **top)
    assert main(["pipeline", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}: "), err
    assert expected in err[0]
    assert not run_dir.exists() and not (tmp_path / "shared").exists()


def test_wandb_missing_is_one_line_naming_the_install(tmp_path, monkeypatch, capsys):
    """Where wandb is not installed (the `dev` extra brings it; a plain install does not)."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a)
    )
    path, run_dir = write_pipeline(
        tmp_path, [stage("pretrain", "pretrain")], logging={"wandb": {"project": "p", "mode": "offline"}}
    )
    assert main(["pipeline", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "wandb is not installed: `pip install wandb`" in err[0], err
    assert not run_dir.exists()
    # a single command too
    assert main(["pretrain", str(CONFIGS / "pretrain_tiny.yaml"), "logging.wandb.project=p"]) == 2
    assert "pip install wandb" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["pipeline_tiny", "pipeline_1b_gpu"])
def test_shipped_pipelines_validate(name, tmp_path, capsys):
    """--check resolves and checks every stage and writes nothing; --dry-run writes each stage's config,
    which its own command loads as is."""
    from rl.config import load_config
    from rl.training import TRAINING_COMMANDS

    run_dir = tmp_path / name
    config = str(CONFIGS / f"{name}.yaml")
    assert main(["pipeline", config, f"run.dir={run_dir}", "--check"]) == 0
    out = capsys.readouterr().out
    assert "6 stages, every config valid" in out and "6. quantize" in out
    assert not run_dir.exists()
    assert main(["pipeline", config, f"run.dir={run_dir}", "--dry-run"]) == 0
    manifest = yaml.safe_load((run_dir / "pipeline.yaml").read_text())
    kinds = [s["kind"] for s in manifest["stages"]]
    assert kinds == ["pretrain", "sft", "dpo", "grpo", "distill", "quantize"]
    for spec in manifest["stages"]:
        cfg = load_config(
            TRAINING_COMMANDS[spec["kind"]].load_schema(), run_dir / "stages" / f"{spec['name']}.yaml"
        )
        assert cfg.run.dir == str(run_dir / spec["name"])
    sft = yaml.safe_load((run_dir / "stages/sft.yaml").read_text())
    assert sft["model"]["init_from"] == str(run_dir / "pretrain")
    distill = yaml.safe_load((run_dir / "stages/distill.yaml").read_text())
    assert distill["teacher"]["init_from"] == str(run_dir / "grpo")
    quantize = yaml.safe_load((run_dir / "stages/quantize.yaml").read_text())
    assert quantize["model"]["init_from"] == str(run_dir / "distill")
    assert quantize["calibration"]["path"] == str(run_dir / "pretrain/data/train.jsonl")


def test_sources_references_and_stage_overrides(tmp_path, capsys):
    """`from`, ${stages.NAME.output} and a command-line override of one stage, as each stage's config has
    them (a reward model feeding PPO's critic and reward; rm skipped by the default chain)."""
    from rl.pipeline import resolve_pipeline

    path, run_dir = write_pipeline(tmp_path, [*PPO, stage("dpo", "dpo")])
    pipeline = resolve_pipeline(str(path), ["stages.ppo.train.max_steps=7"])
    ppo, dpo = pipeline.stage("ppo").cfg, pipeline.stage("dpo").cfg
    assert ppo.model.init_from == str(run_dir / "sft") and ppo.train.max_steps == 7
    assert ppo.critic.init_from == str(run_dir / "rm") == ppo.environment.reward_model.path
    assert pipeline.stage("ppo").deps == ["sft", "rm"]
    assert dpo.model.init_from == str(run_dir / "ppo")  # the nearest earlier language model
    assert pipeline.stage("rm").cfg.model.init_from == str(run_dir / "sft")
    assert main(["pipeline", str(path), "stages.nope.train.max_steps=1", "--check"]) == 2
    assert "no stage is named 'nope'" in capsys.readouterr().err


def test_plan_skips_finished_stages_and_refuses_stale_ones(tmp_path):
    """A done marker skips its stage; a finished stage whose config changed runs again, and a finished
    stage trained from its old output stops the pipeline up front, naming the directory to remove."""
    from rl.pipeline import plan, resolve_pipeline, write_state

    stages = [stage("pretrain", "pretrain"), stage("sft", "sft")]
    path, run_dir = write_pipeline(tmp_path, stages)
    pipeline = resolve_pipeline(str(path))
    for s, finished in zip(pipeline.stages, ["t1", "t2"]):
        s.run_dir.mkdir(parents=True)
        (s.run_dir / "config.yaml").write_text("{}")
        inputs = {d: "t1" for d in s.deps}
        state = {
            "status": "done",
            "finished": finished,
            "inputs": inputs,
            "config": s.cfg.model_dump(mode="json"),
        }
        write_state(run_dir, s.name, state)
    assert plan(pipeline).skip == {"pretrain", "sft"}
    # a cosmetic change keeps them done
    assert plan(resolve_pipeline(str(path), ["stages.pretrain.train.progress_bar=false"])).skip == {
        "pretrain",
        "sft",
    }
    with pytest.raises(Exception, match=r"remove .*/run/sft \(made from the earlier output of pretrain\)"):
        plan(resolve_pipeline(str(path), ["stages.pretrain.train.max_steps=700"]))


# ---- the report ------------------------------------------------------------------------------------------


def fake_run(run_dir: Path) -> None:
    """A pipeline run directory as the stages leave it: pretrain done, grpo running, quantize done."""
    import torch
    from safetensors.torch import save_file

    stages = [("pretrain", "pretrain", 10), ("grpo", "grpo", 4), ("quantize", "quantize", 1)]
    manifest = {"run": {"dir": str(run_dir)}, "stages": []}
    for name, kind, max_steps in stages:
        manifest["stages"].append(
            {"name": name, "kind": kind, "run_dir": str(run_dir / name), "output": str(run_dir / name)}
        )
        (run_dir / "stages").mkdir(parents=True, exist_ok=True)
        config = {"train": {"max_steps": max_steps}, "algorithm": {"loss": {"kl_coef": 0.1}}}
        config |= {"quantize": {"formats": ["fp8"]}} if kind == "quantize" else {}
        (run_dir / "stages" / f"{name}.yaml").write_text(yaml.safe_dump(config))
        (run_dir / name).mkdir(parents=True)
    (run_dir / "pipeline.yaml").write_text(yaml.safe_dump(manifest))
    started = "2026-01-01T00:00:00.000+00:00"
    for name, status, wall in (
        ("pretrain", "done", 90.0),
        ("grpo", "running", None),
        ("quantize", "done", 30.0),
    ):
        state = {"status": status, "started": started} | ({"wall_time_s": wall} if wall else {})
        (run_dir / "stages" / f"{name}.json").write_text(json.dumps(state))
    rows = [
        {"step": 0, "eval/loss": 2.0, "eval/accuracy": 0.1},
        *({"step": s, "train/loss": 3.0 - 0.1 * s} for s in range(1, 11)),
        {"step": 10, "eval/loss": 1.0, "eval/accuracy": 0.5},
    ]
    (run_dir / "pretrain/metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    save_file(
        {"w": torch.zeros(10, 20), "b": torch.zeros(5, dtype=torch.bfloat16)},
        run_dir / "pretrain/hf.safetensors",
    )
    (run_dir / "pretrain/hf").mkdir()
    (run_dir / "pretrain/hf.safetensors").rename(run_dir / "pretrain/hf/model.safetensors")
    grpo = [{"step": 0, "eval/accuracy": 0.5, "eval/sampled_accuracy": 0.3}]
    grpo += [{"step": s, "reward/mean": 0.1 * s, "train/kl": 0.01 * s, "train/loss": 0.0} for s in (1, 2)]
    text = "".join(json.dumps(r) + "\n" for r in grpo) + '{"step": 3, "rew'  # a row being written
    (run_dir / "grpo/metrics.jsonl").write_text(text)
    quantize = [
        {"format": "none", "accuracy": 0.6, "perplexity": 3.1, "export_accuracy": 0.6, "export_perplexity": 3.1,
         "weight_bytes": 1000, "export_bytes": 1100},
        {"format": "fp8", "accuracy": 0.55, "perplexity": 3.2, "export_accuracy": 0.5, "export_perplexity": 3.3,
         "weight_bytes": 300, "export_bytes": 400, "calibrate_s": 1.0},
    ]  # fmt: skip
    (run_dir / "quantize/metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in quantize))


def test_report_regenerates_from_the_stages_metrics(tmp_path, capsys):
    run_dir = tmp_path / "run"
    fake_run(run_dir)
    assert main(["report", str(run_dir)]) == 0
    md = (run_dir / "report.md").read_text()
    lines = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    cells = {k: [c.strip() for c in v.split("|")[1:-1]] for k, v in lines.items()}
    header = cells["stage"]

    def cell(stage_name: str, column: str) -> str:
        return cells[stage_name][header.index(column)]

    assert cell("pretrain", "greedy accuracy") == "0.100 → 0.500"
    assert cell("pretrain", "perplexity") == f"{2.718281828:.3f}"  # exp(eval/loss = 1)
    assert cell("pretrain", "params") == "205" and cell("pretrain", "weight bytes") == "810"
    assert cell("pretrain", "wall time") == "90 s" and cell("pretrain", "steps") == "10/10"
    assert cell("grpo", "status") == "running" and cell("grpo", "steps") == "2/4"
    assert cell("grpo", "reward").startswith("0.150 (mean of last 2 steps)")
    assert cell("grpo", "KL") == "0.0200 (to the reference)"
    assert cell("grpo", "sampled accuracy") == "0.300"
    assert cell("quantize", "greedy accuracy") == "0.600 → 0.500 (fp8)"
    assert cell("quantize", "weight bytes") == "1,000 → 300"
    assert "| none (source) | 0.600 | 3.1000 | 0.600 | 3.1000 | 1,000 | 1.00x |" in md
    assert "| fp8 | 0.550 | 3.2000 | 0.500 | 3.3000 | 300 | 0.30x |" in md
    html = (run_dir / "report.html").read_text()
    assert 'src="data:image/png;base64,' in html and '<td class="n">0.100&nbsp;→&nbsp;0.500</td>' in html
    assert (run_dir / "curves.png").stat().st_size > 10_000
    assert "report.md" in capsys.readouterr().out
    assert main(["report", str(tmp_path)]) == 2  # not a pipeline run directory


# ---- end to end --------------------------------------------------------------------------------------------


def files_of(directory: Path) -> dict[str, tuple[int, str]]:
    return {
        str(p.relative_to(directory)): (p.stat().st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest())
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_killed_during_stage_3_resumes_and_reports(tmp_path, capsys):
    """pretrain -> sft -> grpo -> quantize: SIGKILL while GRPO runs (after its first checkpoint), then the
    same command again: stages 1-2 are skipped (their files untouched), GRPO resumes from its newest
    checkpoint, the quantized export and the report follow."""
    stages = [
        stage("pretrain", "pretrain", PRETRAIN),
        stage("sft", "sft", SFT),
        stage("grpo", "grpo", [*GRPO, "train.max_steps=12"]),
        stage("quantize", "quantize", QUANTIZE),
    ]
    path, run_dir = write_pipeline(tmp_path, stages)
    log = tmp_path / "first.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rl.cli", "pipeline", str(path)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    try:
        deadline = time.monotonic() + 600
        while not list((run_dir / "grpo/checkpoints").glob("step_*/COMPLETE")):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert json.loads((run_dir / "stages/grpo.json").read_text())["status"] == "running"
    assert not (run_dir / "stages/quantize.json").exists()
    before = {name: files_of(run_dir / name) for name in ("pretrain", "sft")}
    markers = {name: (run_dir / f"stages/{name}.json").read_text() for name in ("pretrain", "sft")}

    assert main(["pipeline", str(path)]) == 0
    out = capsys.readouterr().out
    assert "1. pretrain" in out and "2. sft" in out
    assert out.count("done: skipped") == 2
    assert f"3. grpo         rl grpo      {run_dir / 'grpo'} from stage 'sft': resumes from" in out
    assert "== stage 1/4" not in out and "== stage 2/4" not in out and "== stage 3/4 grpo" in out
    assert {name: files_of(run_dir / name) for name in ("pretrain", "sft")} == before
    assert {name: (run_dir / f"stages/{name}.json").read_text() for name in markers} == markers
    grpo = read_metrics(run_dir / "grpo")
    assert [r["step"] for r in grpo if "reward/mean" in r] == list(range(1, 13))
    assert json.loads((run_dir / "stages/grpo.json").read_text())["attempts"] == 2
    state = json.loads((run_dir / "stages/quantize.json").read_text())
    assert state["status"] == "done" and Path(state["output"]) == run_dir / "quantize/fp8/hf"
    assert (run_dir / "quantize/fp8/hf/config.json").is_file()

    md = (run_dir / "report.md").read_text()
    assert "4 of 4 stages done" in md
    for name in ("pretrain", "sft", "grpo", "quantize"):
        assert f"| {name} | {name} | done |" in md
    assert "| none (source) |" in md and "| fp8 |" in md
    assert 'src="data:image/png;base64,' in (run_dir / "report.html").read_text()
    # a third run has nothing to do
    assert main(["pipeline", str(path)]) == 0
    assert capsys.readouterr().out.count("done: skipped") == 4


def wandb_records(path: Path) -> list:
    """The protobuf records of a run's .wandb file, which W&B writes in LevelDB's log format (32 KiB blocks of
    chunks, each with a 7-byte header: crc32, length, type FULL=1/FIRST=2/MIDDLE=3/LAST=4) after a 7-byte file
    header (":W&B", magic 0xBEE1, version); `wandb sync` reads the same. wandb ships no Python reader."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    records, payload, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding up to the block's end
            pos += block - pos % block
            continue
        payload += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            records.append(wandb_internal_pb2.Record.FromString(payload))
            payload = b""
    return records


@pytest.mark.slow
def test_wandb_offline_gets_every_logged_row(tmp_path, monkeypatch):
    """logging.wandb with the real wandb in `mode: offline` (no network, no account): the run's .wandb file
    under run.dir/wandb/offline-run-*/ holds the config and every metrics.jsonl row at its step."""
    for key in ("WANDB_MODE", "WANDB_DIR", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    for key in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):  # nothing written to $HOME
        monkeypatch.setenv(key, str(tmp_path / key.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "pretrain"
    argv = [*fast(**{"train.max_steps": 3}), f"run.dir={run_dir}", "logging.wandb.project=tiny"]
    assert main(["pretrain", str(CONFIGS / "pretrain_tiny.yaml"), *argv, "logging.wandb.mode=offline"]) == 0

    run_id = (run_dir / "wandb_id").read_text().strip()
    (offline,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}")
    records = wandb_records(offline / f"run-{run_id}.wandb")
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.project, run.run_id, run.job_type) == ("tiny", run_id, "pretrain")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["train"]["max_steps"] == 3
    history = [r.history for r in records if r.WhichOneof("record_type") == "history"]
    # wandb-core writes each key as a one-element nested_key (not split at "/")
    logged = [{i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in h.item} for h in history]
    rows = read_metrics(run_dir)
    assert [h.step.num for h in history] == [r["step"] for r in rows] == [1, 2, 3]
    for row, got in zip(rows, logged):
        assert {k: got[k] for k in row if k != "step"} == pytest.approx(
            {k: v for k, v in row.items() if k != "step"}
        )
    assert any(r.WhichOneof("record_type") == "exit" for r in records)  # run.finish() closed it


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_submit_pipeline_to_a_ray_head(tmp_path, monkeypatch, capsys):
    """`rl submit pipeline` on a `ray start --head` cluster (tests/test_jobs.py's Head): the stages come in as
    an override of configs/pipeline_tiny.yaml (a config must be inside the uploaded project), the job
    SUCCEEDS and the run directory holds both stages and the report."""
    from test_jobs import AUTH_ENV, START_TIMEOUT_S, Head

    for key in AUTH_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    head = Head(20000 + (os.getpid() % 80) * 100 + 50)
    stages = [stage("pretrain", "pretrain", PRETRAIN), stage("sft", "sft", SFT)]
    run_dir = tmp_path / "run"
    try:
        head.start(time.monotonic() + START_TIMEOUT_S)
        argv = ["submit", "--address", head.address, "pipeline", str(CONFIGS / "pipeline_tiny.yaml")]
        code = main([*argv, f"stages={json.dumps(stages)}", f"run.dir={run_dir}"])
        out, err = capsys.readouterr()
        assert code == 0, err + out[-3000:]
        assert "SUCCEEDED" in err
    finally:
        head.stop()
        shutil.rmtree(head.temp_dir, ignore_errors=True)
    assert json.loads((run_dir / "stages/sft.json").read_text())["status"] == "done"
    assert "2 of 2 stages done" in (run_dir / "report.md").read_text()
