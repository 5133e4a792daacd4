"""Starting or attaching to a Ray cluster.

Token authentication (Ray >= 2.5x): a new local cluster enables it by default and writes a token to
~/.ray/auth_token; a client attaching to a cluster needs that token. `init_ray` handles both cases:
- local (address=None): the cluster lives and dies with this process and listens on 127.0.0.1, so we start
  it with auth disabled (RAY_AUTH_MODE=disabled) unless the caller set RAY_AUTH_MODE themselves;
- attach (address given): `auth_token` (or RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token,
  which Ray reads itself) is passed through the environment, which Ray's workers inherit.

A run on worker groups (`init_run_ray`) attaches to the cluster its config's `ray.address` names, else to
the one it runs in: the entrypoint of a Ray job gets RAY_ADDRESS from the job supervisor (as a script on a
node of a cluster may export it), so a job places its workers on its own cluster and never starts a
nested one. Only without either does it start a local cluster.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ray

from core.config import Placement, RayOptions
from core.errors import InputError

logger = logging.getLogger(__name__)

_AUTH_MODE = "RAY_AUTH_MODE"
# A local start fails with this when the raylet gives up waiting for its dashboard agent to write its
# port files (15 s per port, fixed in Ray 2.60) because the agent's imports take longer, as they do on an
# overloaded 2-core machine. A second try often wins (the agent's modules are in the page cache then).
_SLOW_START = "timed out during startup"
_LOCAL_START_ATTEMPTS = 2


def _set_auth_env(address: str | None, auth_token: str | None) -> None:
    if auth_token is not None:
        os.environ[_AUTH_MODE] = "token"
        os.environ["RAY_AUTH_TOKEN"] = auth_token
        os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    elif address is None:
        os.environ.setdefault(_AUTH_MODE, "disabled")
    _refresh_ray_config()


def _refresh_ray_config() -> None:
    """Ray caches RAY_* settings per process at the first ray.init; re-read them (as Ray's own auth
    helpers do) so that a second init_ray in one process sees the mode set above."""
    try:
        from ray._raylet import Config

        Config.initialize("")
    except (ImportError, AttributeError):  # older Ray without token auth: nothing cached
        pass


def init_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    *,
    num_gpus: int | None = None,
    auth_token: str | None = None,
    object_store_memory: int | None = None,
    namespace: str | None = None,
    log_to_driver: bool = True,
    include_dashboard: bool = False,
) -> dict[str, Any]:
    """Start a local Ray cluster (address=None) or attach to one ("auto", "host:port", "ray://...").

    num_cpus/num_gpus size a local cluster (logical resources: actors are scheduled by them, not
    pinned to cores); include_dashboard gives it a dashboard on 127.0.0.1 (the Ray Jobs API needs one).
    Returns the cluster's resources. Idempotent: a second call while Ray runs returns.
    """
    if ray.is_initialized():
        return ray.cluster_resources()
    if address is not None and (num_cpus is not None or num_gpus is not None):
        raise InputError(
            "num_cpus/num_gpus size a local cluster; an existing cluster at address= has its own"
        )
    _set_auth_env(address, auth_token)
    kwargs: dict[str, Any] = dict(namespace=namespace, log_to_driver=log_to_driver)
    if address is None:
        kwargs |= dict(
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            object_store_memory=object_store_memory,
            include_dashboard=include_dashboard,
            dashboard_host="127.0.0.1",
            _node_ip_address="127.0.0.1",
        )
        _start_local(
            {**kwargs, "address": "local"}
        )  # "local": a RAY_ADDRESS in the environment cannot redirect it
    else:
        _attach(address, kwargs)
    return ray.cluster_resources()


def _start_local(kwargs: dict[str, Any]) -> None:
    for attempt in range(1, _LOCAL_START_ATTEMPTS + 1):
        try:
            ray.init(**kwargs)
            return
        except Exception as e:
            if _SLOW_START not in str(e) or attempt == _LOCAL_START_ATTEMPTS:
                raise
            logger.warning("local Ray start timed out (overloaded machine?); retrying")
            ray.shutdown()


def _attach(address: str, kwargs: dict[str, Any]) -> None:
    try:
        ray.init(address=address, **kwargs)
    except Exception as e:
        if "authentication" in str(e).lower() or type(e).__name__ == "AuthenticationError":
            raise InputError(
                f"Ray cluster at {address} refused this client: {e}. Pass its token (auth_token=..., "
                "or RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH; `ray get-auth-token` prints it on the head node)"
            ) from e
        raise


def run_cluster_address(address: str | None) -> str | None:
    """The cluster a run attaches to: `address` (the config's ray.address), else RAY_ADDRESS (set in a Ray
    job's entrypoint); None: start a local one. An http(s):// RAY_ADDRESS names a dashboard (where `ray
    job submit` and `rl submit` send jobs), not a cluster to attach to."""
    env = os.environ.get("RAY_ADDRESS", "")
    return address or (env if env and not env.startswith(("http://", "https://")) else None)


def init_run_ray(options: RayOptions, placement: Placement) -> bool:
    """Ray for a run on worker groups: attach to run_cluster_address's cluster, or start a local one sized
    by ray.num_cpus/num_gpus; then check that the cluster can hold the placement (one-line InputError
    before any worker starts). True when this call connected (the caller disconnects when done)."""
    from rl.cluster.placement import check_placement_fits

    owns = not ray.is_initialized()
    if owns:
        address = run_cluster_address(options.address)
        sized = address is None or options.address is not None  # a local cluster, or the config's own
        if not sized and (options.num_cpus is not None or options.num_gpus is not None):
            logger.warning("ray.num_cpus/num_gpus size a local cluster: ignored, attaching to %s", address)
        num_cpus, num_gpus = (options.num_cpus, options.num_gpus) if sized else (None, None)
        init_ray(address, num_cpus, num_gpus=num_gpus, namespace=options.namespace)
    try:
        check_placement_fits(placement)
    except BaseException:
        if owns:
            shutdown_ray()
        raise
    return owns


def shutdown_ray() -> None:
    """Disconnect (and stop a local cluster started by init_ray). Safe to call when Ray is not running."""
    if ray.is_initialized():
        ray.shutdown()
