"""`rl submit` / `rl job` against a real Ray head (`ray start --head`, auth disabled), started once per module
on 127.0.0.1 with its own ports and temp dir so it never meets another test's Ray, and stopped by signalling
its own `ray start --block` process (never `ray stop`, which stops every Ray cluster on the machine).
Token authentication is tested against a stand-in dashboard that answers as Ray's does (401 without a
token, 403 with a wrong one)."""

from __future__ import annotations

import http.server
import io
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import get_args

import pytest
import torch
from ray.util.state import list_actors

from algorithms.rl_inputs import load_init, resolve_init
from core.checkpoint.checkpointer import latest_checkpoint
from core.config import INPUT_PATH
from core.utils.metrics import read_metrics
from rl import job_files, jobs
from rl.cli import build_parser, main
from rl.training import training_commands

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(ROOT / "configs/pretrain_tiny.yaml")
# A run of a few seconds on 2 cores: small model, few steps, a handful of eval problems, saved at the end.
TINY = [
    "model.hidden_size=64",
    "model.num_layers=1",
    "model.num_attention_heads=2",
    "model.num_kv_heads=1",
    "model.ffn_hidden_size=128",
    "data.seq_len=32",
    "data.synthetic.n_train=500",
    "data.synthetic.n_eval=20",
    "eval.num_problems=5",
    "train.global_batch_size=8",
    "train.micro_batch_size=8",
    "train.log_every=1",
    "train.eval_every=0",
    "train.save_every=0",
    "optim.warmup_steps=1",
]
START_TIMEOUT_S = 480
JOB_TIMEOUT_S = 240
AUTH_ENV = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Head:
    """One `ray start --head --block` (auth disabled) in its own session; its dashboard at `address`."""

    def __init__(self, worker_port_base: int) -> None:
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rljob", dir="/tmp"))  # short: socket paths are capped
        ports = {
            name: free_port()
            for name in (
                "port",
                "dashboard-port",
                "ray-client-server-port",
                "node-manager-port",
                "object-manager-port",
                "dashboard-agent-listen-port",
                "dashboard-agent-grpc-port",
                "metrics-export-port",
                "runtime-env-agent-port",
            )
        }
        self.address = f"http://127.0.0.1:{ports['dashboard-port']}"
        self.cmd = [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            "--include-dashboard=true",
            "--disable-usage-stats",
            "--num-cpus=2",
            f"--temp-dir={self.temp_dir}",
            f"--min-worker-port={worker_port_base}",  # below the ephemeral range the other ports come from
            f"--max-worker-port={worker_port_base + 49}",
            *(f"--{name}={port}" for name, port in ports.items()),
        ]
        self.env = {k: v for k, v in os.environ.items() if k not in AUTH_ENV}
        self.env |= {"RAY_AUTH_MODE": "disabled", "HOME": str(self.temp_dir), "OMP_NUM_THREADS": "1"}
        self.proc: subprocess.Popen | None = None

    def start(self, deadline: float, attempts: int = 6) -> None:
        """On an overloaded machine the raylet may give up waiting for its dashboard agent (15 s, fixed in
        Ray) and the start fails with "timed out during startup": then it is tried again (at a load of
        10-15 on 2 cores that took up to 4 tries here; on an idle machine the first start works)."""
        for attempt in range(1, attempts + 1):
            log = self.temp_dir / f"ray_start_{attempt}.log"
            with open(log, "w") as out:
                self.proc = subprocess.Popen(
                    self.cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
            while self.proc.poll() is None and "Ray runtime started." not in log.read_text():
                assert time.monotonic() < deadline, f"Ray head did not start in time: {log}"
                time.sleep(0.5)
            if self.proc.poll() is None:
                while not jobs.dashboard_answers(self.address):
                    assert time.monotonic() < deadline, f"Ray dashboard did not answer in time: {log}"
                    time.sleep(0.5)
                return
            self.stop()
            text = log.read_text()
            assert "timed out during startup" in text and attempt < attempts, text[-3000:]

    def stop(self) -> None:
        """SIGTERM makes `ray start --block` stop its own cluster; its process group is killed after."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever of this cluster is left: its own group
        except ProcessLookupError:
            pass
        self.proc.wait()


@pytest.fixture(scope="module")
def head():
    """A cluster started with auth disabled. (A second head with token auth costs 1-3 minutes more on
    an overloaded 2-core machine; token handling is tested against a stand-in dashboard below.)"""
    started = Head(20000 + (os.getpid() % 80) * 100)
    try:
        started.start(time.monotonic() + START_TIMEOUT_S)
        yield started
    finally:
        started.stop()
        shutil.rmtree(started.temp_dir, ignore_errors=True)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No token or address leaks in from the developer's environment or ~/.ray/auth_token."""
    for key in AUTH_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def rl(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def logged(run_dir: Path) -> list[dict]:
    """metrics.jsonl rows, less a line a stopped job was writing."""
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def job_ids(capsys, address: str) -> list[str]:
    code, out, err = rl(capsys, "job", "list", "--address", address)
    assert code == 0, err
    return [line.split()[0] for line in out.splitlines()[1:]]


# ---- against the clusters -------------------------------------------------------------------------


GRPO_TINY = [  # two GRPO steps of 4 prompts x 4 samples, each one optimizer step over both dp ranks
    "train.max_steps=2",
    "train.global_batch_size=16",
    "train.micro_batch_size=8",
    "train.log_every=1",
    "train.eval_every=0",
    "train.save_every=0",
    "train.progress_bar=false",
    "data.synthetic.n_train=64",
    "data.synthetic.n_eval=8",
    "rollout.prompts_per_step=4",
    "rollout.n=4",
    "rollout.max_tokens=4",
    "eval.num_prompts=4",
    "eval.samples=0",
]
RAY_PLACEMENT = ["placement.mode=colocated", "placement.num_bundles=2", "parallel.dp=2"]


@pytest.fixture(scope="module")
def pretrained(head, tmp_path_factory):
    """`rl submit pretrain` from a fresh directory, as a user would start: (its directory, exit code,
    stdout, stderr). The run lands in runs/pretrain_tiny there (a relative run.dir, made absolute)."""
    cwd = tmp_path_factory.mktemp("user")
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, redirect_stdout(out), redirect_stderr(err):
        for key in AUTH_ENV:
            mp.delenv(key, raising=False)
        mp.chdir(cwd)
        code = main(
            ["submit", "--address", head.address, "--name", "tiny", "pretrain", TINY_CONFIG, *TINY,
             "train.max_steps=6", "run.dir=runs/pretrain_tiny"]
        )  # fmt: skip
    return cwd, code, out.getvalue(), err.getvalue()


def test_pretrain_then_grpo_from_its_checkpoint(head, pretrained, capsys, monkeypatch):
    """The sequence the README shows: both jobs SUCCEED, GRPO starting from a checkpoint named by a path
    relative to the user's directory, its worker group placed on the job's own cluster."""
    cwd, code, out, err = pretrained
    assert code == 0, err + out[-3000:]
    job_id = out.splitlines()[0]
    run_dir = cwd / "runs/pretrain_tiny"
    assert f"run directory: {run_dir} (on this machine: the cluster is local)" in err
    assert "loss=" in out  # the training's own progress output, streamed while it ran
    assert f"job {job_id} SUCCEEDED" in err
    assert [r["step"] for r in read_metrics(run_dir) if "train/loss" in r] == list(range(1, 7))
    assert (run_dir / "checkpoints/step_6").is_dir() and (run_dir / "hf/config.json").is_file()

    code, out, _ = rl(capsys, "job", "status", job_id, "--address", head.address)
    assert code == 0 and f"{job_id}: SUCCEEDED" in out and f"run directory: {run_dir}" in out
    rows = read_metrics(run_dir)
    loss = [r["train/loss"] for r in rows if "train/loss" in r][-1]
    accuracy = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r][-1]
    assert f"last step: 6 of 6: train/loss={loss:.4g}" in out
    assert "last eval (step 6): eval/loss=" in out and f"eval/accuracy={accuracy:.4g}" in out
    code, out, _ = rl(capsys, "job", "logs", job_id, "--address", head.address)
    assert code == 0 and "loss=" in out

    monkeypatch.chdir(cwd)
    code, out, err = rl(
        capsys, "submit", "--address", head.address, "grpo", str(ROOT / "configs/grpo_tiny.yaml"), *GRPO_TINY,
        *RAY_PLACEMENT, "model.init_from=runs/pretrain_tiny/checkpoints/step_6",
    )  # fmt: skip
    assert code == 0, err + out[-3000:]
    grpo_id, grpo_dir = out.splitlines()[0], cwd / "runs/grpo_tiny"
    assert f"input model.init_from: {run_dir / 'checkpoints/step_6'}" in err
    assert f"job {grpo_id} SUCCEEDED" in err
    rows = read_metrics(grpo_dir)
    assert [r["step"] for r in rows if "reward/mean" in r] == [1, 2] and "eval/accuracy" in rows[-1]
    assert (grpo_dir / "hf/config.json").is_file() and (grpo_dir / "checkpoints/step_2").is_dir()
    # its policy workers ran in this cluster, under this job (no nested local Ray)
    ray_job = jobs.job_info(jobs.connect(head.address), grpo_id).job_id
    actors = list_actors(address=head.address, filters=[("job_id", "=", ray_job)], limit=100)
    assert sorted(a.class_name for a in actors if "PolicyWorker" in a.class_name) == ["PolicyWorker"] * 2


def test_upload_ships_an_input_with_the_job(head, pretrained, capsys, monkeypatch, tmp_path):
    """--upload: a prompt/completion file the job reads from its own working directory (the key naming it
    points there), whatever the cluster (the same spec works on a remote one)."""
    cwd, code, _, _ = pretrained
    assert code == 0
    monkeypatch.chdir(tmp_path)
    rows = [{"prompt": f"{a}+{a}=", "completion": str(2 * a)} for a in range(10, 90)]
    Path("sums.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    code, out, err = rl(
        capsys, "submit", "--address", head.address, "--upload", "sums.jsonl", "sft",
        str(ROOT / "configs/sft_tiny.yaml"), "data.synthetic=null", "data.path=sums.jsonl",
        f"model.init_from={cwd / 'runs/pretrain_tiny/checkpoints/step_6'}", "run.dir=sft", "train.max_steps=2",
        "data.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=8", "train.log_every=1",
        "train.progress_bar=false",
    )  # fmt: skip
    assert code == 0, err + out[-3000:]
    assert "input data.path: _uploads/sums.jsonl" in err
    assert "data:\n  path: _uploads/sums.jsonl" in (tmp_path / "sft/config.yaml").read_text()
    assert [r["step"] for r in read_metrics(tmp_path / "sft") if "train/loss" in r] == [1, 2]


def test_stopped_job_keeps_a_loadable_checkpoint_and_a_resubmit_resumes(head, capsys, tmp_path):
    run_dir = tmp_path / "long"
    argv = ["pretrain", TINY_CONFIG, *TINY, "train.save_every=2", f"run.dir={run_dir}"]
    code, out, err = rl(
        capsys, "submit", "--no-wait", "--address", head.address, *argv, "train.max_steps=100000"
    )
    assert code == 0, err
    job_id = out.strip()
    client = jobs.connect(head.address)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while latest_checkpoint(run_dir / "checkpoints") is None:
        assert jobs.job_info(client, job_id).status.value in ("PENDING", "RUNNING")
        assert time.monotonic() < deadline
        time.sleep(0.5)
    code, out, err = rl(capsys, "job", "stop", job_id, "--address", head.address)
    assert code == 0 and out.strip() == f"{job_id}: STOPPED", err

    newest = latest_checkpoint(run_dir / "checkpoints")  # stopped mid-run: the newest complete one loads
    step = int(newest.name.removeprefix("step_"))
    model, _ = load_init(resolve_init(str(newest)))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    before = [r for r in logged(run_dir) if r["step"] <= step]

    code, out, err = rl(
        capsys, "submit", "--no-wait", "--address", head.address, *argv, f"train.max_steps={step + 2}"
    )
    assert code == 0, err
    resumed_id = out.strip()
    code, out, _ = rl(capsys, "job", "logs", resumed_id, "--follow", "--address", head.address)
    assert (
        code == 0 and jobs.job_info(client, resumed_id).status.value == "SUCCEEDED"
    )  # --follow ran to its end
    rows = read_metrics(run_dir)
    # resumed, not restarted: the stopped job's rows stay as logged (a fresh run rewrites them, new timings)
    assert [r for r in rows if r["step"] <= step] == before
    assert [r["step"] for r in rows if "train/loss" in r and r["step"] > step] == [step + 1, step + 2]
    assert latest_checkpoint(run_dir / "checkpoints").name == f"step_{step + 2}"


def test_a_placement_the_cluster_cannot_hold_stops_before_any_worker(head, capsys, tmp_path):
    code, out, err = rl(
        capsys, "submit", "--address", head.address, "pretrain", TINY_CONFIG, *TINY, "train.max_steps=2",
        f"run.dir={tmp_path / 'gpus'}", *RAY_PLACEMENT, "train.micro_batch_size=4", "placement.gpus_per_bundle=1",
    )  # fmt: skip
    assert code == 1
    job_id = out.splitlines()[0]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: the placement needs 2 x {CPU: 1, GPU: 1} = {CPU: 2, GPU: 2} but the Ray cluster has "
        "{CPU: 2, GPU: 0} in all (missing {GPU: 2}): use fewer or smaller bundles (placement.num_bundles / "
        "pools, gpus_per_bundle, cpus_per_bundle, parallel.*) or a larger cluster"
    ], out[-3000:]
    info = jobs.job_info(jobs.connect(head.address), job_id)
    assert info.status.value == "FAILED" and info.job_id  # it had attached to the cluster, then stopped
    assert list_actors(address=head.address, filters=[("job_id", "=", info.job_id)]) == []


def test_bad_input_sends_nothing(head, capsys):
    before = job_ids(capsys, head.address)
    code, out, err = rl(
        capsys, "submit", "--address", head.address, "pretrain", TINY_CONFIG, "train.max_stepz=6"
    )
    assert (code, out) == (2, "")
    assert err == f"error: {TINY_CONFIG}: unknown key 'train.max_stepz'; did you mean 'train.max_steps'?\n"
    code, _, err = rl(capsys, "submit", "--address", head.address, "data", TINY_CONFIG)
    assert code == 2 and "'data' is not a training command; rl submit runs one of: pretrain" in err
    code, _, err = rl(capsys, "submit", "--address", head.address, "pretrain", "/nowhere/x.yaml")
    assert code == 2 and "config file not found" in err
    assert job_ids(capsys, head.address) == before


# ---- without a cluster ------------------------------------------------------------------------------


class TokenDashboard(http.server.BaseHTTPRequestHandler):
    """Answers /api/version as a Ray 2.60 dashboard with token auth does (see Ray's
    http_token_authentication.py): 401 without an Authorization header, 403 with a wrong token."""

    token = "right-token"

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        auth = self.headers.get("Authorization")
        status = 401 if not auth else 403 if auth != f"Bearer {self.token}" else 200
        body = json.dumps({"ray_version": "2.60.0", "version": "4"}).encode() if status == 200 else b"denied"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def token_dashboard():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), TokenDashboard)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_token_auth_missing_wrong_and_right(token_dashboard, capsys, monkeypatch, tmp_path):
    code, out, err = rl(capsys, "job", "list", "--address", token_dashboard)
    assert (code, out) == (2, "") and err.count("\n") == 1
    assert err.startswith(f"error: Ray cluster at {token_dashboard} requires token authentication")
    code, _, err = rl(capsys, "job", "list", "--address", token_dashboard, "--auth-token", "wrong")
    assert code == 2 and "rejected the token from --auth-token" in err
    # the right token, from each place Ray keeps it: the client gets past the version handshake
    assert jobs.connect(token_dashboard, "right-token").get_address() == token_dashboard
    monkeypatch.setenv("RAY_AUTH_TOKEN", "right-token")
    assert jobs.connect(token_dashboard).get_address() == token_dashboard
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    (tmp_path / "home/.ray").mkdir(parents=True)
    (tmp_path / "home/.ray/auth_token").write_text("right-token\n")
    assert jobs.connect(token_dashboard).get_address() == token_dashboard


@pytest.mark.parametrize("argv", [["submit", "pretrain", TINY_CONFIG], ["job", "status", "raysubmit_x"]])
def test_unreachable_address_is_one_line_exit_2(capsys, argv):
    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    code, out, err = rl(capsys, *argv, "--address", address)
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and err.startswith(f"error: cannot reach a Ray dashboard at {address}")


def test_upload_limit_and_excludes(tmp_path):
    (tmp_path / "big").mkdir()
    (tmp_path / "big/weights.bin").write_bytes(b"x" * 3000)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs/ckpt.pt").write_bytes(b"x" * 5000)
    (tmp_path / "train.py").write_text("print()\n")
    assert jobs.check_upload_size(tmp_path, jobs.EXCLUDES, limit=4000) == 3000 + 8  # runs/ never uploads
    with pytest.raises(jobs.InputError, match=r"over Ray's 0.0 MiB limit .*largest: big 0.0 MiB"):
        jobs.check_upload_size(tmp_path, jobs.EXCLUDES, limit=2000)
    assert jobs.check_upload_size(tmp_path, [*jobs.EXCLUDES, "big/"], limit=2000) == 8


def test_job_spec_and_addresses(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    spec = jobs.build_job("pretrain", TINY_CONFIG, ["train.max_steps=6"], local=True, env={"A": "1"})
    assert spec.entrypoint.startswith(f"{sys.executable} -m rl.cli pretrain configs/pretrain_tiny.yaml ")
    assert spec.entrypoint.endswith(f"train.max_steps=6 run.dir={Path.cwd() / 'runs/pretrain_tiny'}")
    assert spec.runtime_env["working_dir"] == str(ROOT) and spec.runtime_env["env_vars"]["A"] == "1"
    spec = jobs.build_job("pretrain", TINY_CONFIG, ["run.dir=r0"], local=True, run_dir="r1")
    assert spec.entrypoint.endswith(f"configs/pretrain_tiny.yaml run.dir={tmp_path / 'r1'}")  # --run-dir wins
    remote = jobs.build_job("pretrain", TINY_CONFIG, [], local=False, run_dir="/shared/r1")
    assert remote.entrypoint.startswith("python -m rl.cli") and remote.run_dir == "/shared/r1"
    assert "relative" in jobs.place_run_dir("runs/x", local=False)[1]
    outside = tmp_path / "c.yaml"
    outside.write_text("train: {max_steps: 2}\n")
    with pytest.raises(jobs.InputError, match="outside the project directory"):
        jobs.build_job("pretrain", str(outside), [], local=True)

    assert jobs.resolve_address("10.0.0.5:8265") == "http://10.0.0.5:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265/")
    assert jobs.resolve_address(None) == "http://head:8265"
    with pytest.raises(jobs.InputError, match="Ray Client address"):
        jobs.resolve_address("ray://head:10001")
    assert jobs.is_local_address("http://127.0.0.1:8265") and jobs.is_local_address("http://localhost:1")
    assert not jobs.is_local_address("http://203.0.113.7:8265")
    token_file = tmp_path / "token"
    token_file.write_text("abc\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    assert jobs.find_token() == ("abc", str(token_file))
    assert jobs.find_token("xyz") == ("xyz", "--auth-token")


@pytest.mark.parametrize(
    "argv", [["submit"], ["job"], ["job", "status"], ["job", "logs"], ["job", "stop"], ["job", "list"]]
)
def test_every_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args([*argv, "--help"])
    assert done.value.code == 0 and "usage: rl" in capsys.readouterr().out


RAY_OVERRIDES = ["placement.mode=colocated", "placement.num_bundles=2", "parallel.dp=2"]


@pytest.mark.parametrize("command", training_commands())
@pytest.mark.parametrize("ray", [False, True], ids=["in_process", "ray"])
def test_submit_accepts_every_config_its_command_accepts(command, ray, monkeypatch, tmp_path):
    """One schema per loop: whatever `rl COMMAND` loads (a Ray placement included), `rl submit` sends;
    and a key the command rejects, submit rejects too, with the command's own message."""
    from rl.config import load_config
    from rl.training import TRAINING_COMMANDS

    monkeypatch.chdir(tmp_path)
    config = str(ROOT / f"configs/{command}_tiny.yaml")
    overrides = RAY_OVERRIDES if ray else []
    cfg = load_config(TRAINING_COMMANDS[command].load_schema(), config, overrides)
    assert cfg.on_ray == ray
    spec = jobs.build_job(command, config, overrides, local=True)
    assert spec.entrypoint.split()[2:5] == ["rl.cli", command, f"configs/{command}_tiny.yaml"]
    assert all(o in spec.entrypoint for o in overrides)
    with pytest.raises(jobs.InputError, match="unknown key 'placement.bundles'"):
        jobs.build_job(command, config, ["placement.bundles=2"], local=True)


@pytest.mark.parametrize("command", training_commands())
def test_every_training_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args([command, "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and f"usage: rl {command}" in out and "placement" in out


# ---- input paths, placement checks, progress: no cluster -------------------------------------------

PATHLIKE = {"path", "eval_path", "init_from", "tokenizer", "teacher", "plugin", "plugins"}


@pytest.mark.parametrize("command", training_commands())
def test_every_path_field_of_every_command_is_an_input_path(command):
    """A field named like a path must be typed InputPath, or `rl submit` would send it as is (the bug of
    issue 17: a relative model.init_from not found inside the job)."""
    from pydantic import BaseModel

    from rl.training import TRAINING_COMMANDS

    def models(annotation):
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield annotation
        for arg in get_args(annotation):
            yield from models(arg)

    unmarked, seen, todo = [], set(), [TRAINING_COMMANDS[command].load_schema()]
    while todo:
        schema = todo.pop()
        seen.add(schema)
        for name, info in schema.model_fields.items():
            section = any(True for _ in models(info.annotation))  # e.g. distill's teacher: {init_from, ...}
            if (
                name in PATHLIKE
                and not section
                and INPUT_PATH not in info.metadata
                and not job_files._marked(info.annotation)
            ):
                unmarked.append(f"{schema.__name__}.{name}")
            todo += [m for m in models(info.annotation) if m not in seen]
    assert unmarked == []


def test_inputs_mean_the_same_in_the_job(monkeypatch, tmp_path):
    """Local cluster: every input made absolute. Remote: absolute kept (shared storage), relative inside the
    upload made relative to the project, relative outside it refused naming the key; --upload rewrites."""
    monkeypatch.chdir(tmp_path)
    grpo = str(ROOT / "configs/grpo_tiny.yaml")
    Path("prompts.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n')
    prompts = ["data.synthetic=null", "data.path=prompts.jsonl", "data.eval_path=prompts.jsonl"]
    spec = jobs.build_job("grpo", grpo, prompts, local=True)
    args = shlex.split(spec.entrypoint)
    for key, value in (
        ("model.init_from", tmp_path / "runs/pretrain_tiny/checkpoints/step_400"),
        ("data.path", tmp_path / "prompts.jsonl"),
        ("data.eval_path", tmp_path / "prompts.jsonl"),
    ):
        assert args.count(f"{key}={value}") == 1 and f"input {key}: {value}" in spec.notes
    assert "data.path=prompts.jsonl" not in args  # replaced, not repeated
    assert args[-1] == f"run.dir={tmp_path / 'runs/grpo_tiny'}"

    with pytest.raises(jobs.InputError) as refused:
        jobs.build_job("grpo", grpo, [*prompts, "run.dir=/shared/grpo"], local=False)
    message = str(refused.value)
    assert message.startswith("model.init_from=runs/pretrain_tiny/checkpoints/step_400 is a relative path ")
    assert "shared storage" in message and "\n" not in message

    monkeypatch.chdir(ROOT)  # inside the project: configs/ is uploaded, runs/ is not
    remote = ["model.init_from=/shared/pretrain", "run.dir=/shared/grpo"]
    spec = jobs.build_job("grpo", grpo, [*remote, "model.tokenizer=configs"], local=False)
    assert spec.notes[1:] == []  # nothing to change: absolute, or relative to the project as in the job
    monkeypatch.chdir(ROOT / "configs")  # the same folder named from elsewhere: relative to the project
    spec = jobs.build_job("grpo", grpo, [*remote, "model.tokenizer=."], local=False)
    assert "model.tokenizer=configs" in shlex.split(spec.entrypoint) and "/shared/pretrain" in spec.entrypoint
    with pytest.raises(
        jobs.InputError, match=r"^model.tokenizer=../runs is a relative path outside the upload"
    ):
        jobs.build_job("grpo", grpo, [*remote, "model.tokenizer=../runs"], local=False)

    monkeypatch.chdir(tmp_path)
    for local in (True, False):
        spec = jobs.build_job("grpo", grpo, [*prompts, *remote], local=local, uploads=["prompts.jsonl"])
        args = shlex.split(spec.entrypoint)
        assert "data.path=_uploads/prompts.jsonl" in args and "data.eval_path=_uploads/prompts.jsonl" in args
        with job_files.working_dir(spec.runtime_env, spec.uploads) as runtime_env:
            staged = Path(runtime_env["working_dir"])
            assert (staged / "_uploads/prompts.jsonl").read_text() == Path("prompts.jsonl").read_text()
            assert (staged / "configs/grpo_tiny.yaml").is_file() and not (staged / ".venv").exists()
        assert not staged.exists()
    with pytest.raises(jobs.InputError, match="--upload nothing.jsonl: no such file"):
        jobs.build_job("grpo", grpo, prompts, local=True, uploads=["nothing.jsonl"])


def test_list_inputs_are_rewritten_whole(tmp_path, monkeypatch):
    from algorithms.pretrain import PretrainConfig
    from rl.config import load_config

    monkeypatch.chdir(tmp_path)
    overrides = [
        "data.synthetic=null",
        "data.tokenizer=tok",
        "data.datasets=[{path: a/b, weight: 2}, {path: /c}]",
    ]
    spec = jobs.build_job("pretrain", TINY_CONFIG, overrides, local=True)
    cfg = load_config(PretrainConfig, TINY_CONFIG, shlex.split(spec.entrypoint)[5:])
    assert [(d.path, d.weight) for d in cfg.data.datasets] == [(str(tmp_path / "a/b"), 2.0), ("/c", 1.0)]
    assert cfg.data.tokenizer == str(tmp_path / "tok")


def test_placement_shortage():
    from core.config import Placement
    from rl.cluster.placement import placement_shortage

    node = {"CPU": 8.0, "GPU": 4.0}
    assert (
        placement_shortage(Placement(num_bundles=8, gpus_per_bundle=1), {"CPU": 16, "GPU": 8}, [node, node])
        is None
    )
    assert placement_shortage(Placement(num_bundles=2, gpus_per_bundle=1), {"CPU": 8}, [{"CPU": 8}]) == (
        "the placement needs 2 x {CPU: 1, GPU: 1} = {CPU: 2, GPU: 2} but the Ray cluster has {CPU: 8, GPU: 0} "
        "in all (missing {GPU: 2})"
    )
    pools = Placement(mode="disaggregated", pools={"policy": 6, "generation": 4}, gpus_per_bundle=1)
    assert "needs 10 x" in placement_shortage(pools, {"CPU": 16, "GPU": 8}, [node, node])
    assert "no node of the Ray cluster fits one bundle {CPU: 9}" in placement_shortage(
        Placement(cpus_per_bundle=9), {"CPU": 16}, [{"CPU": 8}, {"CPU": 8}]
    )
    packed = Placement(num_bundles=6, gpus_per_bundle=1, strategy="STRICT_PACK")
    assert "on one node (STRICT_PACK)" in placement_shortage(packed, {"CPU": 16, "GPU": 8}, [node, node])


def test_status_shows_the_last_step_and_main_metrics(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert jobs.run_progress(str(tmp_path / "elsewhere"), "grpo") == [
        "progress: no step logged yet (or the run directory is not readable from here)"
    ]
    (run / "config.yaml").write_text("train:\n  max_steps: 40\n")
    rows = [
        {"step": 0, "eval/accuracy": 0.5, "eval/reward": 0.5},
        {"step": 1, "reward/mean": 0.25, "reward/accuracy": 0.25, "train/loss": 0.1, "perf/x": 3.0},
        {"step": 2, "reward/mean": 0.375, "reward/accuracy": 0.375, "train/loss": 0.2},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "rew')
    assert jobs.run_progress(str(run), "grpo") == [
        "last step: 2 of 40: reward/mean=0.375 reward/accuracy=0.375",
        "last eval (step 0): eval/accuracy=0.5 eval/reward=0.5",
    ]
