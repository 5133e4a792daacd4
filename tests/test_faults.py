"""Bad input stops before touching disk: one line saying what is wrong and where (exit code 2), and the run
directory it was pointed at stays byte for byte what it was.

Every case runs against a copy of one real run directory (a two-step `rl pretrain`, and an `rl sft` from
it, made once per module): bad JSONL bytes, checkpoints whose tensors have the wrong shape or are missing,
a tokenizer larger than the model, Ray layouts that cannot be placed, a resume that changes what may not
change, and checkpoint files carrying a pickle payload (refused, the payload never runs).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from rl.cli import main

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = [
    "pretrain",
    str(ROOT / "configs/pretrain_tiny.yaml"),
    "model.hidden_size=64",
    "model.num_attention_heads=2",
    "model.num_kv_heads=1",
    "model.ffn_hidden_size=128",
    "data.seq_len=32",
    "data.synthetic.n_train=500",
    "data.synthetic.n_eval=10",
    "eval.num_problems=4",
    "train.global_batch_size=8",
    "train.micro_batch_size=8",
    "train.max_steps=2",
    "train.save_every=2",
    "train.eval_every=0",
    "train.progress_bar=false",
]
SFT = [
    "sft",
    str(ROOT / "configs/sft_tiny.yaml"),
    "data.synthetic.n_train=32",
    "data.synthetic.n_eval=4",
    "eval.num_rows=4",
    "data.seq_len=32",
    "train.global_batch_size=8",
    "train.micro_batch_size=8",
    "train.max_steps=1",
    "train.save_every=1",
    "train.eval_every=0",
    "train.progress_bar=false",
]
GRPO = [
    "grpo",
    str(ROOT / "configs/grpo_tiny.yaml"),
    "train.max_steps=1",
    "train.eval_every=0",
    "rollout.prompts_per_step=4",
    "train.global_batch_size=32",
    "train.micro_batch_size=32",
    "train.progress_bar=false",
]


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("faults") / "pretrain"
    assert main([*PRETRAIN, f"run.dir={run_dir}"]) == 0
    return run_dir


@pytest.fixture(scope="module")
def sft_run(pretrain_run) -> Path:
    run_dir = pretrain_run.parent / "sft"
    assert main([*SFT, f"run.dir={run_dir}", f"model.init_from={pretrain_run}"]) == 0
    return run_dir


def snapshot(root: Path) -> dict[str, str]:
    """{relative path: sha256 of a file, or "dir"} of everything under root."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture
def copy_of(tmp_path):
    def copy(run_dir: Path) -> Path:
        dst = tmp_path / run_dir.name
        shutil.copytree(run_dir, dst)
        return dst

    return copy


def refused(capsys, argv: list[str], *, touches: Path | None = None) -> str:
    """Runs `rl argv`: exit code 2 and one line on stderr, returned; `touches` (a run directory) is left
    byte-identical (or, when it did not exist, still does not)."""
    before = snapshot(touches) if touches is not None and touches.exists() else None
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    if touches is not None:
        assert (snapshot(touches) if touches.exists() else None) == before
    return err[0]


# ---- 1. bytes that are not UTF-8, empty files, missing and empty fields ---------------------------------


def test_jsonl_that_is_not_utf8_is_one_line_naming_file_and_line(capsys, tmp_path, copy_of, pretrain_run):
    run = copy_of(pretrain_run)
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(
        b'{"text": "1+2=3", "prompt": "1+2=", "answer": "3"}\n{"text": "caf\xe9", "prompt": "x"}\n'
    )
    err = refused(
        capsys,
        [
            "data",
            "tokenize",
            "--input",
            str(bad),
            "--tokenizer",
            str(run / "hf"),
            "--output-prefix",
            str(run / "t"),
        ],
        touches=run,
    )
    assert f"{bad}:2: not valid UTF-8" in err, err
    err = refused(
        capsys,
        [
            *GRPO,
            f"run.dir={tmp_path / 'g'}",
            f"model.init_from={run}",
            "data.synthetic=null",
            f"data.path={bad}",
        ],
        touches=tmp_path / "g",
    )
    assert f"{bad}:2: not valid UTF-8" in err, err
    out = run / "samples.jsonl"
    err = refused(
        capsys, ["generate", "--model", str(run), "--prompts", str(bad), "--output", str(out)], touches=run
    )
    assert f"{bad}:2: not valid UTF-8" in err, err


def test_empty_jsonl_to_tokenize_is_one_line(capsys, tmp_path, copy_of, pretrain_run):
    run = copy_of(pretrain_run)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    argv = ["data", "tokenize", "--input", str(empty), "--tokenizer", str(run / "hf"), "--output-prefix"]
    err = refused(capsys, [*argv, str(run / "t")], touches=run)
    assert err == f"error: {empty}: no records (the file is empty)"


@pytest.mark.parametrize(
    "command, row, message",
    [
        ("sft", {"prompt": "1+2=", "completion": ""}, "field 'completion' is empty"),
        ("sft", {"prompt": "1+2="}, "expected field 'messages', or 'prompt' with 'completion'"),
        ("dpo", {"prompt": "1+2=", "chosen": None, "rejected": "4"}, "missing field 'chosen'"),
        ("dpo", {"prompt": "1+2=", "chosen": "3", "rejected": " "}, "field 'rejected' is empty"),
        ("rm", {"prompt": "1+2=", "chosen": "", "rejected": "4"}, "field 'chosen' is empty"),
        ("rm", {"chosen": "3", "rejected": "4"}, "field 'prompt' must be a string"),
    ],
)
def test_missing_or_empty_fields_name_the_row(capsys, tmp_path, pretrain_run, command, row, message):
    good = (
        {"prompt": "1+1=", "completion": "2"}
        if command == "sft"
        else {"prompt": "1+1=", "chosen": "2", "rejected": "3"}
    )
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    argv = [command, str(ROOT / f"configs/{command}_tiny.yaml"), f"run.dir={tmp_path / 'run'}"]
    err = refused(
        capsys,
        [
            *argv,
            f"model.init_from={pretrain_run}",
            "data.synthetic=null",
            f"data.path={rows}",
            "train.global_batch_size=1",
            "train.micro_batch_size=1",
        ],
        touches=tmp_path / "run",
    )
    assert f"{rows}:2: " in err and message in err, err


# ---- 2. tensors of the wrong shape, or missing ----------------------------------------------------------


def _rewrite_safetensors(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _grow(tensors: dict, name: str) -> None:
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1, *tensors[name].shape[1:])


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda t: _grow(t, "model.layers.0.mlp.gate_proj.weight"),
            "tensor model.layers.0.mlp.gate_proj.weight has shape (129, 64), but config.json makes it (128, 64)",
        ),
        (
            lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"),
            "missing ['model.layers.1.self_attn.k_proj.weight']",
        ),
    ],
    ids=["shape", "missing"],
)
def test_hf_weights_against_their_config_in_convert_generate_and_grpo(
    capsys, tmp_path, copy_of, pretrain_run, edit, message
):
    run = copy_of(pretrain_run)
    _rewrite_safetensors(run / "hf/model.safetensors", edit)
    err = refused(
        capsys, ["convert", "hf-to-ours", "--src", str(run / "hf"), "--dst", str(run / "native")], touches=run
    )
    assert message in err, err
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "1+2="}\n')
    err = refused(
        capsys,
        ["generate", "--model", str(run), "--prompts", str(prompts), "--output", str(run / "o.jsonl")],
        touches=run,
    )
    assert message in err, err
    err = refused(capsys, [*GRPO, f"run.dir={tmp_path / 'g'}", f"model.init_from={run}"], touches=run)
    assert message in err, err
    assert not (tmp_path / "g").exists()


def test_native_weights_against_their_config(capsys, tmp_path, copy_of, pretrain_run):
    run = copy_of(pretrain_run)
    assert main(["convert", "hf-to-ours", "--src", str(run / "hf"), "--dst", str(tmp_path / "native")]) == 0
    _rewrite_safetensors(tmp_path / "native/model.safetensors", lambda t: _grow(t, "final_norm.weight"))
    err = refused(
        capsys,
        ["convert", "ours-to-hf", "--src", str(tmp_path / "native"), "--dst", str(run / "hf2")],
        touches=run,
    )
    assert "tensor final_norm.weight has shape (65,), but model_config.json makes it (64,)" in err, err


def _rewrite_dcp(model_dir: Path, edit) -> None:
    import torch.distributed.checkpoint as dcp

    from core.checkpoint.sharded import load_full_state

    state = load_full_state(model_dir)
    edit(state)
    shutil.rmtree(model_dir)
    dcp.save(state, checkpoint_id=str(model_dir), no_dist=True)


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda s: s.update({"layers.1.mlp.linear_fc2.weight": torch.zeros(64, 129)}),
            "tensor layers.1.mlp.linear_fc2.weight has shape (64, 129), but the model in its meta.json makes it (64, 128)",
        ),
        (lambda s: s.pop("final_norm.weight"), "no tensor final_norm.weight"),
    ],
    ids=["shape", "missing"],
)
def test_checkpoint_tensors_against_its_meta_in_grpo(capsys, tmp_path, copy_of, pretrain_run, edit, message):
    run = copy_of(pretrain_run)
    _rewrite_dcp(run / "checkpoints/step_2/model", edit)
    err = refused(
        capsys,
        [*GRPO, f"run.dir={tmp_path / 'g'}", f"model.init_from={run / 'checkpoints/step_2'}"],
        touches=run,
    )
    assert message in err, err
    assert not (tmp_path / "g").exists()


# ---- 3. a tokenizer larger than the model's vocabulary ---------------------------------------------------


def test_generate_refuses_a_tokenizer_past_the_vocabulary(capsys, tmp_path, copy_of, pretrain_run):
    import dataclasses

    from core.bridge import save_hf
    from core.bridge.hf import read_hf_config
    from core.transformer.model import GPTModel

    run = copy_of(pretrain_run)
    _, config = read_hf_config(run / "hf")
    small = tmp_path / "small"
    save_hf(GPTModel(dataclasses.replace(config, vocab_size=16)), small, tokenizer_dir=run / "hf")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "1+2="}\n')
    before = snapshot(small)
    err = refused(
        capsys,
        ["generate", "--model", str(small), "--prompts", str(prompts), "--output", str(small / "o.jsonl")],
    )
    assert "more than the model's vocab_size=16" in err, err
    assert snapshot(small) == before


# ---- 4. Ray layouts, before Ray starts ----------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["placement.num_bundles=2", "parallel.dp=3"],
            "placement.num_bundles=2 bundles for parallel.world_size=3 ranks",
        ),
        (["placement.num_bundles=4", "parallel.dp=2"], "2 would stay idle"),
        (
            ["placement.mode=disaggregated", "placement.pools.policy=1"],
            "placement.mode=disaggregated: rl pretrain runs one worker group",
        ),
        (["placement.num_bundles=2", "parallel.dp=2", "ray.num_cpus=1"], "missing {CPU: 1}"),
        (
            ["placement.num_bundles=1", "parallel.dp=2", "placement.gpus_per_bundle=1"],
            "each rank needs a bundle (GPU) of its own",
        ),
    ],
    ids=["uneven", "idle", "mode", "cpus", "gpu-per-rank"],
)
def test_spmd_layout_that_cannot_be_placed_stops_before_ray(
    capsys, copy_of, pretrain_run, overrides, message
):
    import ray

    run = copy_of(pretrain_run)
    err = refused(capsys, [*PRETRAIN, f"run.dir={run}", "train.max_steps=3", *overrides], touches=run)
    assert message in err, err
    assert not ray.is_initialized()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a GPU")
def test_gpu_bundles_on_a_machine_without_gpus_stop_before_ray(capsys, copy_of, pretrain_run):
    import ray

    run = copy_of(pretrain_run)
    err = refused(
        capsys,
        [*PRETRAIN, f"run.dir={run}", "placement.num_bundles=1", "placement.gpus_per_bundle=1"],
        touches=run,
    )
    assert "missing {GPU: 1}" in err, err
    assert not ray.is_initialized()


def test_grpo_layout_that_cannot_be_placed_stops_before_ray(capsys, tmp_path, pretrain_run):
    import ray

    run_dir = tmp_path / "g"
    argv = [
        *GRPO,
        f"run.dir={run_dir}",
        f"model.init_from={pretrain_run}",
        "rollout.n=6",
        "train.global_batch_size=24",
        "train.micro_batch_size=8",
    ]
    err = refused(capsys, [*argv, "placement.num_bundles=2", "parallel.dp=3"], touches=run_dir)
    assert "placement.num_bundles=2 bundles for parallel.world_size=3 ranks" in err, err
    err = refused(
        capsys,
        [
            *argv,
            "placement.mode=disaggregated",
            "placement.pools.policy=2",
            "placement.pools.generation=1",
            "parallel.dp=3",
        ],
        touches=run_dir,
    )
    assert "placement.pools.policy=2 bundles for parallel.world_size=3 ranks" in err, err
    assert not ray.is_initialized()


# ---- 5. a run's own config.yaml reproduces the run --------------------------------------------------------


@pytest.mark.parametrize("command", ["pretrain", "sft", "dpo", "rm", "grpo"])
def test_a_runs_config_yaml_loads_back_to_the_same_config(tmp_path, command):
    from core.config import dump_config
    from rl.config import load_config
    from rl.training import training_command

    schema = training_command(command).load_schema()
    for overrides in ([], ["placement.num_bundles=2", "parallel.dp=2"]):
        cfg = load_config(schema, ROOT / f"configs/{command}_tiny.yaml", overrides)
        dump_config(cfg, tmp_path / "config.yaml")
        again = load_config(schema, tmp_path / "config.yaml")
        assert again == cfg
        assert again.on_ray == bool(overrides)  # no placement, no Ray: the saved null sections stay null


@pytest.mark.slow
def test_rl_pretrain_on_its_own_config_yaml_resumes_in_this_process(copy_of, pretrain_run, monkeypatch):
    import rl.spmd_cluster

    run = copy_of(pretrain_run)

    def no_ray(*args, **kwargs):
        raise AssertionError("went to Ray")

    monkeypatch.setattr(rl.spmd_cluster, "run_spmd_on_ray", no_ray)
    assert main(["pretrain", str(run / "config.yaml"), f"run.dir={run}", "train.max_steps=3"]) == 0
    assert (run / "checkpoints/step_3/COMPLETE").is_file()


# ---- 6. a resume may change how long and how fast, not what is trained ---------------------------------


def test_pretrain_resume_with_changed_keys_names_each(capsys, copy_of, pretrain_run):
    run = copy_of(pretrain_run)
    changed = ["data.seq_len=64", "model.hidden_size=96", "train.global_batch_size=16", "train.seed=7"]
    err = refused(capsys, [*PRETRAIN, f"run.dir={run}", "train.max_steps=4", *changed], touches=run)
    for key in (
        "data.seq_len: 32 -> 64",
        "model.hidden_size: 64 -> 96",
        "train.global_batch_size: 8 -> 16",
        "train.seed: 1234 -> 7",
    ):
        assert key in err, err
    assert "max_steps" not in err


@pytest.mark.slow
def test_resume_accepts_keys_that_may_change(copy_of, pretrain_run, sft_run):
    from algorithms.trainer import check_resume_config
    from rl.config import load_config
    from rl.training import training_command

    mutable = [
        "train.max_steps=9",
        "optim.lr=1e-3",
        "optim.min_lr=1e-4",
        "train.log_every=3",
        "train.eval_every=2",
        "train.save_every=5",
        "train.keep_last=4",
        "train.progress_bar=true",
        "parallel.dp=2",
    ]
    for argv, source in ((PRETRAIN, pretrain_run), ([*SFT, f"model.init_from={pretrain_run}"], sft_run)):
        run = copy_of(source)
        command = training_command(argv[0])
        cfg = load_config(command.load_schema(), argv[1], [*argv[2:], f"run.dir={run}", *mutable])
        check_resume_config(cfg, command.name)  # no InputError


@pytest.mark.slow
def test_sft_resume_with_changed_data_names_each(capsys, copy_of, pretrain_run, sft_run):
    run = copy_of(sft_run)
    argv = [*SFT, f"run.dir={run}", f"model.init_from={pretrain_run}", "train.max_steps=2"]
    err = refused(capsys, [*argv, "data.seq_len=48", "data.synthetic.seed=3"], touches=run)
    assert "data.seq_len: 32 -> 48" in err and "data.synthetic.seed: 2 -> 3" in err, err
    err = refused(capsys, [*argv, f"model.init_from={run}"], touches=run)
    assert f"model.init_from: {pretrain_run} -> {run}" in err, err


# ---- 7. checkpoint files are loaded as data, never as code ------------------------------------------------


class Payload:
    """Unpickling it would run a command (writing the marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plant_trainer_pt(step: Path, marker: Path) -> None:
    torch.save({"step": 2, "data": Payload(marker)}, step / "trainer.pt")


def _plant_rng(step: Path, marker: Path) -> None:
    torch.save({"rng": Payload(marker)}, step / "rng_rank0.pt")


def _plant_metadata(step: Path, marker: Path) -> None:
    (step / "model/.metadata").write_bytes(pickle.dumps(Payload(marker)))


def _plant_dcp_object(step: Path, marker: Path) -> None:
    _rewrite_dcp(step / "model", lambda s: s.update({"optim.param_groups": Payload(marker)}))


@pytest.mark.parametrize(
    "plant, message",
    [
        (_plant_trainer_pt, "trainer.pt: refused to load: it names posix.system"),
        (_plant_rng, "rng_rank0.pt: refused to load: it names posix.system"),
        (_plant_metadata, "model/.metadata: refused to load: it names posix.system"),
        (_plant_dcp_object, "entry 'optim.param_groups': refused to load: it names posix.system"),
    ],
    ids=["trainer.pt", "rng", "dcp-metadata", "dcp-object"],
)
def test_a_pickle_payload_in_a_checkpoint_is_refused_and_never_runs(
    capsys, tmp_path, copy_of, pretrain_run, plant, message
):
    run = copy_of(pretrain_run)
    marker = tmp_path / "payload-ran"
    plant(run / "checkpoints/step_2", marker)
    err = refused(capsys, [*PRETRAIN, f"run.dir={run}", "train.max_steps=3"], touches=run)  # resume
    assert message in err, err
    err = refused(
        capsys,
        [*GRPO, f"run.dir={tmp_path / 'g'}", f"model.init_from={run / 'checkpoints/step_2'}"],
        touches=run,
    )
    assert message in err, err
    assert not marker.exists()
    assert not (tmp_path / "g").exists()
