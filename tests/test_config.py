"""Config loading: inheritance, overrides, and one clear line (exit code 2) for every kind of bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from algorithms.pretrain import PretrainConfig
from core.errors import InputError
from rl.config import dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_inheritance_and_overrides(tmp_path):
    base = write(tmp_path / "base.yaml", {"train": {"max_steps": 10, "seed": 3}, "optim": {"lr": 1e-3}})
    child = write(tmp_path / "child.yaml", {"defaults": ["base.yaml"], "train": {"max_steps": 20}})
    cfg = load_config(PretrainConfig, child, ["optim.lr=0.01", "parallel.tp=2", "run.dir=/tmp/x"])
    assert cfg.train.max_steps == 20  # child wins over base
    assert cfg.train.seed == 3  # inherited
    assert cfg.optim.lr == 0.01  # override wins over files
    assert cfg.parallel.tp == 2 and cfg.run.dir == "/tmp/x"
    assert base.exists()


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(PretrainConfig, None, ["train.max_steps=7"])
    dump_config(cfg, tmp_path / "config.yaml")
    again = load_config(PretrainConfig, tmp_path / "config.yaml")
    assert again == cfg


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.max_stesp=5"], "unknown key 'train.max_stesp'; did you mean 'train.max_steps'?"),
        (["trian.seed=1"], "unknown key 'trian'; did you mean 'train'?"),
        (["train.max_steps=abc"], "'train.max_steps': Input should be a valid integer"),
        (["train.max_steps=0"], "'train.max_steps': Input should be greater than or equal to 1"),
        (["optim.decay=exp"], "'optim.decay': Input should be 'cosine', 'linear' or 'constant'"),
        (["optim.lr=1e-5", "optim.min_lr=1e-3"], "min_lr=0.001 is larger than lr=1e-05"),
        (["train.max_steps"], "override 'train.max_steps' is not of the form key.sub=value"),
    ],
)
def test_bad_values_name_the_key(overrides, expected):
    with pytest.raises(InputError) as err:
        load_config(PretrainConfig, None, overrides)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: 5\n  seed: [1, 2\n")
    with pytest.raises(InputError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_config(PretrainConfig, bad)
    with pytest.raises(InputError, match="config file not found"):
        load_config(PretrainConfig, tmp_path / "missing.yaml")


@pytest.mark.slow
def test_cli_exits_2_with_one_line_before_any_work(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "rl.cli",
        "pretrain",
        str(ROOT / "configs/pretrain_tiny.yaml"),
        f"run.dir={run_dir}",
        "train.max_stpes=3",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {ROOT / 'configs/pretrain_tiny.yaml'}: unknown key 'train.max_stpes'; "
        "did you mean 'train.max_steps'?"
    ]
    assert not run_dir.exists()  # nothing was started, nothing written
