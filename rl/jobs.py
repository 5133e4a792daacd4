"""Ray Jobs: sending an `rl` training command to a Ray cluster and following it (`rl submit`, `rl job`).

A job runs `python -m rl.cli COMMAND CONFIG [overrides]` on the cluster, inside a copy of this project's
directory that Ray uploads with the job (runtime_env working_dir; heavy and generated folders excluded).
Everything a user can get wrong is checked on the submitting machine before anything is sent: the command,
the config (loaded through the command's schema), the upload's size, the address and the token.

Where results land: the job's working directory is a temporary copy, so a relative run.dir is resolved
here. When the cluster is on this machine (its address is a loopback or local address), run.dir becomes
an absolute path on this machine. On a remote cluster run.dir must be a path the job's node can write
(shared storage, e.g. NFS/Lustre): a relative one would land in the temporary copy, and we say so.

What the run reads (every config field typed `InputPath`) must name the same file in the job as here:
rl/job_files.py makes each absolute on a cluster on this machine, keeps, rewrites or refuses it on a remote
one, and ships --upload inputs with the job.

Token authentication (Ray >= 2.5x, on by default for `ray start --head`): the dashboard answers 401 without
a token and 403 with a wrong one. The token comes from --auth-token, RAY_AUTH_TOKEN, the file named by
RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token (the same places Ray reads), and is sent as a bearer header; a
cluster started with auth disabled ignores it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlparse

from core.errors import InputError
from rl.config import load_config
from rl.job_files import (
    Upload,
    check_upload_size,
    parse_uploads,
    path_overrides,
    place_inputs,
    upload_files,
    working_dir,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"  # where `ray start --head` serves its dashboard
# Never uploaded (gitwildmatch patterns, as Ray's runtime_env "excludes"): environments, wheels, caches,
# run directories, VCS data. Ray also honours .gitignore and .rayignore files.
EXCLUDES = [
    ".git/",
    ".venv/",
    ".tools/",
    ".whl/",
    ".rlc_gpu/",
    ".gl/",
    "/runs/",
    "__pycache__/",
    "*.pyc",
    "*.egg-info/",
    ".pytest_cache/",
    ".ruff_cache/",
    "tensorboard/",
]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
PROBE_TIMEOUT_S = 10.0


# ---- what is sent -------------------------------------------------------------------------------


@dataclass
class JobSpec:
    """One submission, fully resolved on the submitting machine."""

    command: str
    entrypoint: str
    runtime_env: dict[str, Any]
    run_dir: str
    notes: list[str]  # lines telling the user where results land and what the inputs became
    metadata: dict[str, str] = field(default_factory=dict)
    uploads: tuple[Upload, ...] = ()


def training_commands() -> list[str]:
    """The registered CLI commands that train from a config (what `rl submit` accepts)."""
    from rl.training import training_commands as names

    return names()


def training_schema(command: str) -> type:
    """The schema `rl COMMAND` loads its config with (the same for in-process and Ray runs)."""
    from rl.training import TRAINING_COMMANDS

    if command not in TRAINING_COMMANDS:
        raise InputError(
            f"'{command}' is not a training command; rl submit runs one of: "
            f"{', '.join(training_commands())}, pipeline"
        )
    return TRAINING_COMMANDS[command].load_schema()


def load_command_config(command: str, config: str, overrides: list[str]) -> Any:
    """The config as `rl COMMAND` loads it; for `pipeline`, with every stage resolved and checked."""
    if command == "pipeline":
        from rl.pipeline import resolve_pipeline

        return resolve_pipeline(config, overrides).cfg
    return load_config(training_schema(command), config, overrides)


def parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--env {item!r} is not of the form KEY=VALUE")
        env[key] = value
    return env


def build_job(
    command: str,
    config: str,
    overrides: list[str],
    *,
    local: bool,
    run_dir: str | None = None,
    env: dict[str, str] | None = None,
    python: str | None = None,
    excludes: list[str] | None = None,
    uploads: list[str] | None = None,
    root: Path = PROJECT_ROOT,
) -> JobSpec:
    """Validates the run locally (exactly as the job will load it) and returns what to submit."""
    overrides = [*overrides, *([f"run.dir={run_dir}"] if run_dir else [])]
    cfg = load_command_config(command, config, overrides)
    config_in_root = _relative_to_root(Path(config), root)
    job_run_dir, note = place_run_dir(cfg.run.dir, local)
    excludes = [*EXCLUDES, *(excludes or []), *_run_dir_exclude(job_run_dir, root)]
    shipped = upload_files(root, excludes)
    placed = parse_uploads(uploads or [])
    check_upload_size(root, excludes, extra=[u.source for u in placed], files=shipped)
    inputs = place_inputs(cfg, local=local, root=root, shipped=shipped, uploads=placed)
    changed = {**inputs, **({"run.dir": job_run_dir} if job_run_dir != cfg.run.dir else {})}
    overrides = [o for o in overrides if o.partition("=")[0].strip() not in changed]
    overrides += path_overrides(cfg, changed)
    # Local cluster: this interpreter has the project's dependencies; elsewhere the cluster's `python`.
    python = python or (sys.executable if local else "python")
    entrypoint = shlex.join([python, "-m", "rl.cli", command, config_in_root, *overrides])
    runtime_env = {
        "working_dir": str(root),
        "excludes": excludes,
        "env_vars": {"PYTHONUNBUFFERED": "1", **(env or {})},  # logs stream as they are written
    }
    metadata = {"rl_command": command, "rl_run_dir": job_run_dir}
    notes = [note, *(f"input {key}: {value}" for key, value in inputs.items())]
    return JobSpec(command, entrypoint, runtime_env, job_run_dir, notes, metadata, tuple(placed))


def _relative_to_root(config: Path, root: Path) -> str:
    try:
        return config.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        raise InputError(
            f"config {config} is outside the project directory {root}, which is what the job receives: "
            "copy it into the project (e.g. configs/)"
        ) from None


def place_run_dir(run_dir: str, local: bool) -> tuple[str, str]:
    """run.dir as the job must see it, and a line telling the user where the results land."""
    path = Path(run_dir).expanduser()
    if local:
        resolved = str(path.resolve())
        return resolved, f"run directory: {resolved} (on this machine: the cluster is local)"
    if path.is_absolute():
        return run_dir, f"run directory: {run_dir} on the cluster node that runs the job (shared storage?)"
    return run_dir, (
        f"warning: run.dir={run_dir} is relative: on a remote cluster it lands inside the job's temporary "
        "copy of the project on the node that runs it, which Ray deletes later; pass --run-dir with a path "
        "on shared storage to keep the results"
    )


def _run_dir_exclude(run_dir: str, root: Path) -> list[str]:
    """A run directory inside the project is not uploaded (a resumed run would ship its checkpoints)."""
    try:
        return ["/" + Path(run_dir).resolve().relative_to(root.resolve()).as_posix() + "/"]
    except ValueError:
        return []


# ---- where it is sent ---------------------------------------------------------------------------


def resolve_address(address: str | None) -> str | None:
    """--address, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS (as `ray job` reads them); None if unset."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address or address == "auto":
        return None
    if address.startswith("ray://"):
        raise InputError(
            f"{address} is a Ray Client address; jobs go to the dashboard's address, e.g. http://HOST:8265"
        )
    if "://" not in address:
        address = f"http://{address}"
    return address.rstrip("/")


def is_local_address(address: str) -> bool:
    """True when the cluster's dashboard is on this machine (so it shares this machine's filesystem)."""
    host = urlparse(address).hostname or ""
    if host == "localhost":
        return True
    try:
        if ipaddress.ip_address(host).is_loopback:
            return True
    except ValueError:
        pass
    try:
        names = socket.gethostbyname_ex(socket.gethostname())
    except OSError:
        return False
    return host in {socket.gethostname(), names[0], *names[1], *names[2]}


def find_token(auth_token: str | None = None) -> tuple[str | None, str]:
    """The auth token and where it came from, searched where Ray looks for it."""
    if auth_token:
        return auth_token.strip(), "--auth-token"
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(named).expanduser() if named else Path.home() / ".ray" / "auth_token"
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip(), str(path)
    if named:
        raise InputError(f"RAY_AUTH_TOKEN_PATH={named}: no token there (file missing or empty)")
    return None, ""


def connect(address: str, auth_token: str | None = None):
    """A JobSubmissionClient for the dashboard at `address`; one InputError line when it cannot talk to it."""
    import requests
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    # Ray's client logs a line per ignore file, upload step and closed log stream, and warns that .git and
    # .venv are left out (as EXCLUDES has them anyway).
    for noisy in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("ray._private.runtime_env").setLevel(logging.ERROR)
    token, source = find_token(auth_token)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        # A short probe first: the client's own requests have no timeout.
        status = requests.get(f"{address}/api/version", headers=headers, timeout=PROBE_TIMEOUT_S).status_code
    except requests.RequestException as e:
        raise InputError(
            f"cannot reach a Ray dashboard at {address} ({type(e).__name__}): is the cluster running "
            "(`ray start --head`) and is this its dashboard address (http://HOST:8265)?"
        ) from None
    if status in (401, 403):
        raise InputError(_auth_message(address, status, source))
    try:
        return JobSubmissionClient(address, headers=headers or None)
    except AuthenticationError as e:
        raise InputError(f"Ray cluster at {address}: {str(e).splitlines()[0]}") from None
    except (ConnectionError, RuntimeError) as e:
        raise InputError(f"Ray dashboard at {address}: {str(e).splitlines()[0]}") from None


def _auth_message(address: str, status: int, source: str) -> str:
    where = "`ray get-auth-token` on the head node prints it"
    if status == 401 or not source:
        return (
            f"Ray cluster at {address} requires token authentication and no token was found: pass "
            f"--auth-token, set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or write it to ~/.ray/auth_token ({where})"
        )
    return f"Ray cluster at {address} rejected the token from {source} ({where})"


# ---- following a job ----------------------------------------------------------------------------


def submit(
    client, spec: JobSpec, *, name: str | None = None, resources: dict[str, float] | None = None
) -> str:
    metadata = {**spec.metadata, **({"job_name": name} if name else {})}
    kwargs = {f"entrypoint_{key}": value for key, value in (resources or {}).items() if value}
    try:
        with working_dir(
            spec.runtime_env, spec.uploads
        ) as runtime_env:  # Ray packages and uploads it inside submit_job
            return client.submit_job(
                entrypoint=spec.entrypoint, runtime_env=runtime_env, metadata=metadata, **kwargs
            )
    except ValueError as e:  # Ray's own package-size check, should the compressed upload still be too big
        raise InputError(f"cannot upload the project: {str(e).splitlines()[0]}") from None


def job_info(client, job_id: str):
    try:
        return client.get_job_info(job_id)
    except RuntimeError as e:
        if "404" in str(e) or "does not exist" in str(e):
            raise InputError(f"no job {job_id} on the cluster at {client.get_address()}") from None
        raise


def stream_logs(client, job_id: str, out: TextIO | None = None) -> None:
    """Writes the job's output (to stdout by default) as it comes until the job ends."""
    out = out or sys.stdout

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    job_info(client, job_id)
    try:
        asyncio.run(tail())
    except RuntimeError as e:  # the websocket closed abnormally (dashboard restart, network)
        print(f"log stream from the cluster broke ({str(e).splitlines()[0]})", file=sys.stderr)


def wait(client, job_id: str, timeout_s: float | None = None, poll_s: float = 1.0) -> str:
    """Polls until the job reaches a terminal status; returns it."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = str(job_info(client, job_id).status.value)
        if status in TERMINAL or (deadline is not None and time.monotonic() > deadline):
            return status
        time.sleep(poll_s)


def stop(client, job_id: str, timeout_s: float = 60.0) -> str:
    """Asks the job to stop (SIGTERM, then SIGKILL after Ray's grace period); returns the status reached."""
    status = str(job_info(client, job_id).status.value)
    if status in TERMINAL:
        return status
    client.stop_job(job_id)
    return wait(client, job_id, timeout_s)


def describe(info) -> list[str]:
    """Human lines for `rl job status`."""
    meta = info.metadata or {}
    lines = [f"{info.submission_id}: {info.status.value}"]
    if info.message:
        lines.append(f"  message: {info.message.strip().splitlines()[-1]}")
    if meta.get("job_name"):
        lines.append(f"  name: {meta['job_name']}")
    lines.append(f"  entrypoint: {info.entrypoint}")
    for label, ms in (("started", info.start_time), ("ended", info.end_time)):
        if ms:
            lines.append(f"  {label}: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ms / 1000))}")
    if meta.get("rl_run_dir"):
        lines.append(f"  run directory: {meta['rl_run_dir']}")
        lines += [f"  {line}" for line in run_progress(meta["rl_run_dir"], meta.get("rl_command"))]
    return lines


def run_progress(run_dir: str, command: str | None) -> list[str]:
    """The run's last logged step and its main metrics (the command's `summary` prefixes: loss or reward,
    and the last evaluation), read from its metrics.jsonl where this machine can read the run directory."""
    from rl.training import TRAINING_COMMANDS

    if command == "pipeline":
        return pipeline_progress(Path(run_dir))
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        where = "" if Path(run_dir).is_dir() else " (or the run directory is not readable from here)"
        return [f"progress: no step logged yet{where}"]
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the line a running job is writing
            pass
    summary = TRAINING_COMMANDS[command].summary if command in TRAINING_COMMANDS else ("eval/",)
    train = [p for p in summary if not p.startswith("eval/")]
    stepped = [r for r in rows if any(k.startswith(tuple(train)) for k in r)] if train else rows
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    lines = []
    if stepped:
        last = stepped[-1]
        of = _max_steps(Path(run_dir))
        shown = _metrics(last, tuple(train))
        lines.append(f"last step: {last['step']}{f' of {of}' if of else ''}{f': {shown}' if shown else ''}")
    if evals:
        lines.append(f"last eval (step {evals[-1]['step']}): {_metrics(evals[-1], ('eval/',))}")
    return lines or ["progress: no step logged yet"]


def pipeline_progress(run_dir: Path) -> list[str]:
    """One line per stage of an `rl pipeline` run: its status, and its last step while it runs."""
    from rl.report import load_stages

    try:
        stages = load_stages(run_dir)
    except InputError:
        return ["progress: no stage started yet"]
    lines = []
    for stage in stages:
        steps = [r["step"] for r in stage.rows if "step" in r]
        at = f", step {steps[-1]} of {stage.max_steps}" if steps and stage.status == "running" else ""
        lines.append(f"stage {stage.index} {stage.name} (rl {stage.kind}): {stage.status}{at}")
    return lines


def _metrics(row: dict[str, Any], prefixes: tuple[str, ...]) -> str:
    return " ".join(
        f"{k}={v:.4g}" for k, v in row.items() if k.startswith(prefixes) and isinstance(v, float | int)
    )


def _max_steps(run_dir: Path) -> int | None:
    import yaml

    try:
        return int(yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["max_steps"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return None


def list_lines(jobs: list) -> list[str]:
    jobs = sorted(jobs, key=lambda job: job.start_time or 0)
    rows = [("JOB ID", "STATUS", "NAME", "RUN DIRECTORY")]
    for job in jobs:
        meta = job.metadata or {}
        rows.append(
            (
                job.submission_id or job.job_id or "-",
                job.status.value,
                meta.get("job_name", "-"),
                meta.get("rl_run_dir", "-"),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return ["  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[3]]).rstrip() for row in rows]


@contextmanager
def local_cluster() -> Iterator[str]:
    """A Ray cluster on this machine for the duration of one command (auth disabled, as init_ray starts
    local clusters); yields its dashboard address."""
    import ray

    from rl.cluster.ray_utils import init_ray, shutdown_ray

    init_ray(include_dashboard=True, log_to_driver=False)
    try:
        yield f"http://{ray._private.worker.global_worker.node.address_info['webui_url']}"
    finally:
        shutdown_ray()


def dashboard_answers(address: str, timeout_s: float = 2.0) -> bool:
    """Whether anything answers HTTP at `address` (a 401 from a cluster with auth counts)."""
    import requests

    try:
        requests.get(f"{address}/api/version", timeout=timeout_s)
    except requests.RequestException:
        return False
    return True
