"""Running a sweep's runs as Ray tasks, on this machine or a Ray cluster."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from fedsim.engine.ray import connect
from fedsim.sweep.plan import RunOutcome, RunTask
from fedsim.sweep.processes import GRACE_S, StopSignals, execute_run, one_line, unfinished_is_failed


def run_on_ray(
    tasks: list[RunTask],
    workers: int | None,
    address: str | None,
    on_outcome: Callable[[RunOutcome], None],
    stop: StopSignals,
) -> list[RunTask]:
    """Ray tasks: a local Ray instance, or the cluster at ``address`` ("auto" finds a local
    head node started with ``ray start``). On a cluster the sweep folder must be on
    storage every machine can write. A stopped sweep cancels its tasks (KeyboardInterrupt
    in each) and returns the runs they were running."""
    import ray

    started_here = connect(address, where="--address")
    stop.install()  # ray.init installs a SIGTERM handler of its own
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        workers = min(workers or cpus, len(tasks))
        remote = ray.remote(num_cpus=max(1, cpus // workers), max_retries=0)(execute_run)
        queue = iter(tasks)
        pending: dict[Any, RunTask] = {}
        while not stop.received:
            for task in itertools.islice(queue, workers - len(pending)):
                pending[remote.remote(task)] = task
            if not pending:
                return []
            done, _ = ray.wait(list(pending), num_returns=1, timeout=0.25)
            for ref in done:
                task = pending.pop(ref)
                on_outcome(unfinished_is_failed(_ray_outcome(ray, ref, task)))
        if not pending:
            return []
        for ref in pending:
            ray.cancel(ref)
        done, left = ray.wait(list(pending), num_returns=len(pending), timeout=GRACE_S)
        for ref in left:
            ray.cancel(ref, force=True)
        for ref, task in pending.items():
            outcome = _ray_outcome(ray, ref, task) if ref in done else RunOutcome(task.name, "interrupted")
            on_outcome(outcome if outcome.status != "failed" else RunOutcome(task.name, "interrupted"))
        return list(pending.values())
    finally:
        if started_here:
            ray.shutdown()


def _ray_outcome(ray: Any, ref: Any, task: RunTask) -> RunOutcome:
    try:
        return ray.get(ref)
    except Exception as error:  # the worker died (killed, out of memory) or was lost, or was cancelled
        return RunOutcome(task.name, "failed", f"worker lost: {one_line(error)}")
