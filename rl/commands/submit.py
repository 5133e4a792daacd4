"""`rl submit [options] COMMAND CONFIG [overrides]`: run a training command as a Ray job on a cluster."""

from __future__ import annotations

import argparse
import sys

from core.errors import InputError
from rl.commands.job import add_cluster_args

HELP = """Run a training command (e.g. `pretrain`) as a Ray job: the job runs
`python -m rl.cli COMMAND CONFIG [overrides]` in a copy of this project that Ray uploads with it
(.venv, .git, runs/ and other generated folders are left out; add --exclude patterns or a .rayignore).
The config is loaded and checked here first: a bad key or value stops before anything is sent.

Cluster: --address, else RAY_API_SERVER_ADDRESS or RAY_ADDRESS, else a cluster whose dashboard answers
at http://127.0.0.1:8265 (`ray start --head`), else a local Ray started for this job alone (which then
always follows the job and stops when it ends).

Results: on a cluster on this machine a relative run.dir is made absolute here, so the results land
where `rl COMMAND` would put them. On a remote cluster give --run-dir a path on shared storage.

Inputs (model.init_from, tokenizers, data and eval files, a reward model: every path the config reads)
mean in the job what they mean here: on a cluster on this machine they are made absolute; on a remote
cluster a relative one must be inside the upload (runs/ never is): use absolute paths on shared storage,
or --upload a small file (it lands in the job's _uploads/ and the keys naming it point there).

Prints the job id on stdout (first line), then follows the job's output until it ends (exit 0 if it
SUCCEEDED, 1 if not) unless --no-wait. Then: rl job status|logs|stop ID."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "submit",
        help="run a training command as a Ray job on a cluster",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_cluster_args(p)
    wait = p.add_mutually_exclusive_group()
    wait.add_argument(
        "--follow",
        dest="no_wait",
        action="store_false",
        help="print the job's output until it ends (default)",
    )
    wait.add_argument("--no-wait", action="store_true", help="return once submitted")
    p.add_argument("--run-dir", metavar="DIR", help="the run directory (overrides run.dir)")
    p.add_argument(
        "--upload",
        action="append",
        default=[],
        metavar="PATH",
        help="ship this file or directory with the job; config keys naming it are pointed at the copy",
    )
    p.add_argument("--name", help="a label shown by `rl job list` and the Ray dashboard")
    p.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable of the job"
    )
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="leave out of the upload (gitignore syntax)",
    )
    p.add_argument(
        "--python",
        metavar="EXE",
        help="interpreter that runs the job (default: this one for a cluster on this machine, else `python`)",
    )
    p.add_argument("--num-cpus", type=float, default=0, help="CPUs reserved for the job's driver")
    p.add_argument("--num-gpus", type=float, default=0, help="GPUs reserved for the job's driver")
    p.add_argument(
        "train_command", metavar="COMMAND", help="training command, e.g. pretrain, or pipeline (rl pipeline)"
    )
    p.add_argument("config", help="YAML recipe inside the project, e.g. configs/pretrain_tiny.yaml")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.set_defaults(func=run, no_wait=False)


def run(args: argparse.Namespace) -> int:
    from rl import jobs

    address = jobs.resolve_address(args.address)
    start_local = address is None and not jobs.dashboard_answers(jobs.DEFAULT_ADDRESS)
    if start_local and args.no_wait:
        raise InputError(
            "no cluster to leave the job on (no --address, RAY_ADDRESS, or dashboard at "
            f"{jobs.DEFAULT_ADDRESS}): start one with `ray start --head`, or drop --no-wait"
        )
    address = address or (None if start_local else jobs.DEFAULT_ADDRESS)
    spec = jobs.build_job(
        args.train_command,
        args.config,
        args.overrides,
        local=start_local or jobs.is_local_address(address),
        run_dir=args.run_dir,
        env=jobs.parse_env(args.env),
        python=args.python,
        excludes=args.exclude,
        uploads=args.upload,
    )
    if not start_local:
        return _submit(args, spec, address, follow=not args.no_wait)
    _note(f"no cluster at {jobs.DEFAULT_ADDRESS}: starting a local Ray for this job")
    with jobs.local_cluster() as local_address:
        return _submit(args, spec, local_address, follow=True, local_ray=True)


def _submit(args: argparse.Namespace, spec, address: str, *, follow: bool, local_ray: bool = False) -> int:
    from rl import jobs

    client = jobs.connect(address, args.auth_token)
    job_id = jobs.submit(
        client, spec, name=args.name, resources={"num_cpus": args.num_cpus, "num_gpus": args.num_gpus}
    )
    print(job_id, flush=True)
    _note(f"submitted `rl {spec.command}` to {address} as job {job_id}")
    for line in spec.notes:
        _note(line)
    flags = f" --address {address}"
    if not follow:
        _note(f"follow: rl job logs {job_id} --follow{flags}; stop: rl job stop {job_id}{flags}")
        return 0
    try:
        jobs.stream_logs(client, job_id)
    except KeyboardInterrupt:
        if local_ray:
            _note("stopped: the local Ray stops, and the job with it")
        else:
            _note(f"stopped following; the job goes on (rl job stop {job_id}{flags})")
        return 130
    status = jobs.wait(client, job_id)
    _note(f"job {job_id} {status}")
    return 0 if status == "SUCCEEDED" else 1


def _note(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
