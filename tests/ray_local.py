"""A local Ray cluster for the Ray tests (127.0.0.1, a bounded object store), started with retries."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rl.cluster import init_ray, shutdown_ray


@contextmanager
def local_ray(object_store_mb: int, num_cpus: int = 4, attempts: int = 3) -> Iterator[None]:
    """Ray up for the body, down after it. An overloaded 2-core machine can make a local start time out,
    so a failed start is retried (after a clean shutdown) before the error is raised."""
    for attempt in range(attempts):
        try:
            init_ray(num_cpus=num_cpus, object_store_memory=object_store_mb * 1024**2)
            break
        except Exception:
            shutdown_ray()
            if attempt == attempts - 1:
                raise
    try:
        yield
    finally:
        shutdown_ray()
