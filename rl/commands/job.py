"""`rl job status|logs|stop|list`: follow the Ray jobs that `rl submit` started."""

from __future__ import annotations

import argparse
import sys

HELP = """Follow Ray jobs (submitted with `rl submit`) on a running cluster.

The cluster is --address, else RAY_API_SERVER_ADDRESS or RAY_ADDRESS, else http://127.0.0.1:8265
(the dashboard `ray start --head` opens). A cluster with token authentication needs its token:
--auth-token, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (`ray get-auth-token` prints it)."""


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        metavar="URL",
        help="the cluster's dashboard, e.g. http://HOST:8265 (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS)",
    )
    p.add_argument(
        "--auth-token",
        metavar="TOKEN",
        help="token of a cluster with token authentication (default: RAY_AUTH_TOKEN, the file "
        "RAY_AUTH_TOKEN_PATH names, ~/.ray/auth_token); the environment keeps it out of `ps`",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "job",
        help="status, logs, stop and list of Ray jobs",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="job_action", metavar="ACTION", required=True)
    for name, help_text, func in (
        ("status", "a job's status, times, run directory, last step and its main metrics", _status),
        ("logs", "a job's output so far (--follow: until it ends)", _logs),
        (
            "stop",
            "stop a job and wait until it has stopped (its checkpoints stay: resubmit to resume)",
            _stop,
        ),
        ("list", "all jobs on the cluster", _list),
    ):
        a = actions.add_parser(name, help=help_text, description=f"{help_text}. {HELP.splitlines()[2]}")
        add_cluster_args(a)
        if name != "list":
            a.add_argument("job_id", metavar="ID", help="the job id `rl submit` printed (raysubmit_...)")
        if name == "logs":
            a.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
        if name == "stop":
            a.add_argument("--no-wait", action="store_true", help="return once asked, without waiting")
        a.set_defaults(func=func)


def _client(args: argparse.Namespace):
    from rl import jobs

    return jobs.connect(jobs.resolve_address(args.address) or jobs.DEFAULT_ADDRESS, args.auth_token)


def _status(args: argparse.Namespace) -> int:
    from rl import jobs

    print("\n".join(jobs.describe(jobs.job_info(_client(args), args.job_id))))
    return 0


def _logs(args: argparse.Namespace) -> int:
    from rl import jobs

    client = _client(args)
    if args.follow:
        jobs.stream_logs(client, args.job_id)
    else:
        jobs.job_info(client, args.job_id)
        sys.stdout.write(client.get_job_logs(args.job_id))
    return 0


def _stop(args: argparse.Namespace) -> int:
    from rl import jobs

    client = _client(args)
    if args.no_wait:
        jobs.job_info(client, args.job_id)
        client.stop_job(args.job_id)
        print(f"{args.job_id}: stop requested")
        return 0
    status = jobs.stop(client, args.job_id)
    print(f"{args.job_id}: {status}")
    return 0 if status in jobs.TERMINAL else 1


def _list(args: argparse.Namespace) -> int:
    from rl import jobs

    print("\n".join(jobs.list_lines(_client(args).list_jobs())))
    return 0
