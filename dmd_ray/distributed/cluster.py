"""Thin Ray adapters shared by the jobs: joining or starting a cluster, GPU placement, run storage, failures."""
from __future__ import annotations

import contextlib
import os
import re
import time

import torch

from dmd_ray.data import storage
from dmd_ray.sd.resolve import ModelNotFoundError
from dmd_ray.typed_config import ConfigError


class TrainingDiverged(RuntimeError):
    """Losses or gradients became NaN or infinite: a resumed run replays the same steps, so a retry cannot help."""


# Errors that another attempt would meet again: a bad config, weights or files that are not there, storage that
# refuses us, a diverged run (a resume replays the same steps). A run that hits one stops at once; anything else (a
# killed or preempted worker, a lost node, a network error) is retried from the last checkpoint by Ray Train.
NOT_RETRYABLE = (ConfigError, ModelNotFoundError, storage.StorageError, PermissionError, FileNotFoundError, TrainingDiverged)


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
        hide_state_api_warnings()


# Ray Train's placement-group cleaner asks the State API every second whether the run's controller is alive; the
# embedded cluster has no dashboard to answer, so each run printed this line every second or two (303 of the README
# demo's log lines). What it guards against, a controller that dies and leaves its GPUs reserved, ends with the
# embedded cluster itself.
STATE_API_WARNING = "Failed to query Ray Train Controller actor state"


def hide_state_api_warnings() -> bool:
    """The driver stops printing the cleaner's warning: the lines Ray forwards from its workers pass two filters
    whose skip pattern (RAY_DEDUP_LOGS_SKIP_REGEX, kept if set) gains this line. Not through a runtime_env hook in
    the workers: that slowed every worker's start (a 20-step demo run took 4 min 8 s against 1 min 55 s). With a Ray
    that lacks these filters the warnings are printed again: False."""
    try:
        from ray._private import ray_logging

        filters = [ray_logging.stdout_deduplicator, ray_logging.stderr_deduplicator]
        for f in filters:
            mine = re.escape(STATE_API_WARNING)
            if f.skip_re is None or mine not in f.skip_re.pattern:
                f.skip_re = re.compile(mine if f.skip_re is None else f"(?:{f.skip_re.pattern})|{mine}")
        return True
    except (ImportError, AttributeError):
        return False


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def wants_gpu(use_gpu: str) -> bool:
    """The `use_gpu` key of training jobs: "true", "false", or "auto" (GPUs when the cluster has them now; an
    autoscaling cluster that starts without GPU nodes needs "true")."""
    return use_gpu == "true" or (use_gpu == "auto" and cluster_gpus() > 0)


def gpus_per_actor(setting: float) -> float:
    """The `gpus_per_actor` key of Ray Data jobs: a number of GPUs, or -1 for 1 when the cluster has GPUs, else 0."""
    return setting if setting >= 0 else (1.0 if cluster_gpus() > 0 else 0.0)


def past_deadline(deadline: float, device: torch.device, clock=time.monotonic) -> bool:
    """True when any worker is past `deadline` (a value of `clock`: time.time() for a deadline set on another
    process, the driver): all-reduced, so that every worker of a distributed run stops at the same step."""
    late = torch.tensor([float(clock() > deadline)], device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(late, op=torch.distributed.ReduceOp.MAX)
    return bool(late.item())


def run_config(output: str, run_name: str, keep_checkpoints: int, max_failures: int, worker_env: dict | None = None):
    """Ray Train's RunConfig for a run stored under `output` (local or s3://, through our one filesystem)."""
    import ray.train

    fs = storage.s3_filesystem() if storage.is_s3(output) else None
    return ray.train.RunConfig(
        name=run_name,
        storage_path=storage.resolve(output)[1],
        storage_filesystem=fs,
        failure_config=ray.train.FailureConfig(max_failures=max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints),
        worker_runtime_env={"env_vars": worker_env} if worker_env else None,
    )


def failure_policy_class():
    """Ray Train's default failure policy, except that a worker error in NOT_RETRYABLE ends the run at once; None on
    a Ray without the (internal) hook. Ray Train 2.60 has no public way to classify worker errors."""
    try:
        from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
        from ray.train.v2.api.exceptions import WorkerGroupError
    except ImportError:
        return None

    class UserErrorsAreFinal(DefaultFailurePolicy):
        def make_decision(self, training_failed_error):
            if isinstance(training_failed_error, WorkerGroupError) and first_user_error(training_failed_error) is not None:
                return FailureDecision.RAISE
            return super().make_decision(training_failed_error)

    return UserErrorsAreFinal


@contextlib.contextmanager
def no_retry_of_user_errors():
    """While active, TorchTrainer.fit() stops at the first worker error in NOT_RETRYABLE instead of spending
    FailureConfig.max_failures on it (the policy is built by `create_failure_policy` on the driver, swapped here)."""
    from ray.train.v2.api import data_parallel_trainer

    policy = failure_policy_class()
    original = getattr(data_parallel_trainer, "create_failure_policy", None)
    if policy is None or original is None:
        yield
        return
    data_parallel_trainer.create_failure_policy = policy
    try:
        yield
    finally:
        data_parallel_trainer.create_failure_policy = original


def fit(trainer):
    """trainer.fit(), where a worker error that no retry can fix ends the run at once and is raised as itself."""
    with no_retry_of_user_errors():
        try:
            return trainer.fit()
        except Exception as e:
            cause = first_user_error(e)
            if cause is None:
                raise
            raise cause from e


def first_user_error(error: BaseException) -> BaseException | None:
    """The NOT_RETRYABLE error inside a failed run's TrainingFailedError, if there is one."""
    for e in getattr(error, "worker_failures", {}).values():
        if isinstance(e, NOT_RETRYABLE):
            return e
    return None
