"""Thin Ray adapters shared by the jobs: joining or starting a cluster."""
from __future__ import annotations

import os


def init_ray(num_cpus: int | None = None) -> None:
    """Joins the cluster a job was submitted to (RAY_ADDRESS, set by `ray job submit`), or starts an embedded local
    one: no dashboard (it costs ~1 GB of RAM), and address="local" so another Ray instance on the host is never
    joined by accident.

    Workers of a local cluster inherit this process's environment (AWS_*, HF_*). On a cluster, pass settings such as
    AWS_ENDPOINT_URL in the job's runtime environment (`ray job submit --runtime-env-json`); credentials come from the
    nodes' instance role. Nothing is forwarded from here: a second runtime_env would clash with the job's.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        # Logical CPUs beyond the cores: Ray Data's read tasks must find a slot next to actors and train workers
        # that hold one CPU each, or a 2-core machine deadlocks (the threads each actor uses are set separately).
        if num_cpus is None:
            num_cpus = (os.cpu_count() or 1) + 4
        ray.init(address="local", include_dashboard=False, num_cpus=num_cpus)


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))
