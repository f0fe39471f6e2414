"""The Ray engine: a pool of Ray actors, each one worker, fed each round's clients in chunks.

Flower's ServerApp, strategies, messages and ClientApp stay as they are; only the Grid
changes. Each round, every distinct ArrayRecord the strategy sends (usually the one global
model) goes into Ray's object store once (``ray.put``), the round's clients are split
into one chunk per actor, balanced by training-set size, and each actor runs its chunk
with its :class:`fedsim.worker.Worker` (one model, loaded in place for each client) and
returns the replies together. Results are bit-identical to the in-process engine's when
the thread counts match (``num_cpus`` = ``[engine] num_threads``).

``address`` joins a running Ray cluster (``"auto"``, or ``"ray://host:port"`` for Ray
Client), so the same experiment scales past one machine; the run directory must then be
on storage every machine can read. ``num_gpus`` is each worker's share of a GPU
(0.125: eight workers share one); left unset, the workers share whatever GPUs the
cluster has. An actor that dies (out of memory, a crash in native code) is replaced and
its clients are retried once each; a client that kills its worker twice is reported as a
failed client, and the round goes on. An actor lost with its node (a machine that left the
cluster) is not replaced while the remaining nodes have no room for it: its clients run on
the surviving workers, which gives the same bits, since every client's result depends on
the seeds alone; with no worker left, the run stops with a one-line error and resumes from
its last checkpoint.
"""

from __future__ import annotations

import math
import os
import re
import socket
from collections import deque
from collections.abc import Callable, Sequence
from typing import Annotated, Any

from flwr.app import ArrayRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from pydantic import Field

from fedsim.engine.base import ServerMain
from fedsim.engine.grid import SimulatedGrid
from fedsim.engine.inprocess import Device, Vectorize
from fedsim.engine.tasks import ClientTask, TaskResult, run_tasks
from fedsim.environment import RunEnvironment
from fedsim.errors import ClientFailure, UserError
from fedsim.flower_log import ray_log_options
from fedsim.notices import warn
from fedsim.worker import settle_garbage_collector, worker_for
from partitioners import Partition, PopulationPartition


def quiet_ray_environment() -> None:
    """Keep Ray from rewriting CUDA_VISIBLE_DEVICES for GPU-less actors (its future
    default, and it silences a warning): fedsim chooses each worker's device itself."""
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def connect(address: str | None, where: str = "[engine] address") -> bool:
    """Start Ray here, or join the cluster at ``address``; True if this call started it
    (or joined a cluster), so that the caller shuts it down.

    Ray's workers import what the driver imports, so the driver's current folder and
    ``PYTHONPATH`` go with them: a strategy in ``./my_strategy.py`` works as in-process.
    """
    import ray

    if ray.is_initialized():
        return False
    check_reachable(address, where)
    quiet_ray_environment()
    path = os.pathsep.join([os.getcwd(), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
    options = dict(
        address=address,
        include_dashboard=False,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
        **ray_log_options(),
    )
    try:
        for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
            try:
                ray.init(**options)
                break
            except Exception as error:
                if address is not None or not _is_startup_timeout(error) or attempt == LOCAL_START_ATTEMPTS:
                    raise
                _stop_half_started_node(error)
                ray.shutdown()
                warn(
                    "the local Ray node did not start within Ray's wait (a busy machine, or a stuck start); "
                    f"retrying ({attempt + 1} of {LOCAL_START_ATTEMPTS})"
                )
    except ConnectionError as error:
        # ray.init("ray://...") switches the process to Ray Client mode before it connects; a
        # failed connection leaves it there, and every later ray.init in this process fails
        ray.shutdown()
        raise UserError(f"{where} = {address!r}: no Ray cluster there ({_first_line(error)})") from None
    return True


LOCAL_START_ATTEMPTS = 3


def _is_startup_timeout(error: Exception) -> bool:
    """Ray gave up on a new local node: its fixed 30 s wait for the node, which a loaded
    machine can exceed, or its wait for the GCS server to write its port, which a GCS
    process stuck before it ran never does (seen in a process whose other threads were
    inside gRPC when Ray forked it). A fresh attempt then usually starts at once."""
    text = str(error)
    return "timed out during startup" in text or ("Timed out waiting for file" in text and "gcs_server_port" in text)


def _stop_half_started_node(error: Exception) -> None:
    """Stop the GCS and raylet of the node whose start just failed, so that a retry does
    not leave them running beside the next one: Ray raised from inside ``Node.__init__``,
    whose ``self`` is in the traceback, and nothing else holds it."""
    from ray._private.node import Node

    traceback = error.__traceback__
    while traceback is not None:
        node = traceback.tb_frame.f_locals.get("self")
        if isinstance(node, Node):
            node.kill_all_processes(check_alive=False, allow_graceful=False, wait=True)
            return
        traceback = traceback.tb_next


def check_address_form(address: str | None) -> None:
    """A Ray address is ``auto``, ``host:port`` or ``ray://host:port`` (a ValueError, which
    the experiment's validation reports as a one-line error naming the key)."""
    if address not in (None, "auto") and not re.fullmatch(r"(ray://)?[^:/\s]+:\d+", address):
        raise ValueError(f"address = {address!r} is invalid: use 'auto', 'host:port' or 'ray://host:port'")


def check_reachable(address: str | None, where: str, timeout_s: float = 5.0) -> None:
    """Fail at once, in one line, when nothing listens at a ``host:port`` or
    ``ray://host:port`` address, or when ``auto`` finds no cluster: Ray itself retries
    such an address for minutes (Flower's runtime, logging a traceback each time)."""
    if not address:
        return
    if address == "auto":
        address = _address_auto_finds(where)
        if address is None:
            return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise UserError(
            f"{where} = {address!r}: no Ray cluster answers there ({reason}); start one with "
            "`ray start --head`, or correct the address"
        ) from None


def _address_auto_finds(where: str) -> str | None:
    """The ``host:port`` that ``address = "auto"`` stands for (``RAY_ADDRESS``, else the
    cluster `ray start` started on this machine); a one-line error when there is none.
    None when this Ray has moved the private helper that ``ray.init`` uses for it, and so
    leaves the answer to ``ray.init``."""
    try:
        from ray._private.services import canonicalize_bootstrap_address_or_die
    except ImportError:
        return None
    try:
        return canonicalize_bootstrap_address_or_die("auto")
    except ConnectionError as error:
        raise UserError(
            f"{where} = 'auto': no Ray cluster there ({_first_line(error)}); start one with `ray start --head`, "
            "or leave address out to start Ray on this machine"
        ) from None


class RayEngine:
    """A pool of Ray actor workers, each running a chunk of every round's clients: many
    CPUs, shared GPUs, a Ray cluster.

    There are ``num_workers`` workers, each with ``num_cpus`` CPUs and ``num_gpus`` of a GPU.

    ``num_workers`` defaults to one per ``num_cpus`` CPUs of the cluster, or, with
    ``num_gpus`` set, one per GPU share (whichever is fewer). ``device = "auto"`` trains
    on the GPU share a worker holds, else on the CPU.
    ``client_timeout_s`` ends a client still busy after that many seconds (it counts as
    timed out; the round goes on without it). ``vectorize``: each worker trains up to that
    many of its clients at once (:data:`fedsim.engine.inprocess.Vectorize`).
    """

    def __init__(
        self,
        num_workers: Annotated[int, Field(ge=1)] | None = None,
        num_cpus: Annotated[float, Field(gt=0)] = 1.0,
        num_gpus: Annotated[float, Field(ge=0)] | None = None,
        address: str | None = None,
        device: Device = "auto",
        client_timeout_s: Annotated[float, Field(gt=0)] | None = None,
        vectorize: Vectorize = 1,
    ) -> None:
        if num_gpus is not None and num_gpus > 1 and num_gpus != int(num_gpus):
            raise ValueError(f"num_gpus = {num_gpus} is invalid: a worker takes a fraction of one GPU or whole GPUs")
        if device == "cpu" and num_gpus:
            raise ValueError(f"num_gpus = {num_gpus} reserves GPUs that device = 'cpu' would not use; remove one")
        check_address_form(address)
        self.num_workers = num_workers
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.address = address
        self.requested_device = device
        self.client_timeout_s = client_timeout_s
        self.vectorize = vectorize  # read by each worker from the experiment (fedsim.worker)
        self._layout: tuple[int, float] | None = None
        self._started_ray = False  # whether this engine started Ray (and so shuts it down)

    @property
    def client_threads(self) -> int:
        """Each worker has ``num_cpus`` CPUs; torch uses that many threads."""
        return max(1, int(self.num_cpus))

    def layout(self) -> tuple[int, float]:
        """(workers, GPU share per worker), from the options and the cluster's resources.

        Joins (or starts) Ray on first use, since the cluster decides the defaults.
        """
        if self._layout is None:
            import ray

            self._started_ray |= connect(self.address)
            resources = ray.cluster_resources()
            cpus, gpus = resources.get("CPU", 1.0), resources.get("GPU", 0.0)
            by_cpu = max(1, math.floor(cpus / self.num_cpus))
            share = self.num_gpus
            if share is None:  # unset: share the cluster's GPUs, unless told to use the CPU
                share = 0.0 if self.requested_device == "cpu" or gpus == 0 else None
            if share is None:
                workers = self.num_workers or by_cpu
                share = gpus / workers if gpus / workers < 1 else math.floor(gpus / workers)
            elif share > 0:
                if gpus == 0:
                    raise UserError(f"[engine] num_gpus = {share}, but the Ray cluster has no GPUs; remove num_gpus")
                workers = self.num_workers or max(1, min(by_cpu, math.floor(gpus / share)))
            else:
                workers = self.num_workers or by_cpu
            self._layout = (workers, share)
        return self._layout

    @property
    def device(self) -> str:
        if self.requested_device != "auto":
            return self.requested_device
        return "cuda" if self.layout()[1] > 0 else "cpu"

    def execute(
        self, server_main: ServerMain, client_app: ClientApp, env: RunEnvironment, partition: Partition
    ) -> None:
        import ray

        self._started_ray |= connect(self.address)
        workers, gpu_share = self.layout()
        pool = WorkerPool(client_app, env, min(workers, partition.num_clients), self.num_cpus, gpu_share)
        try:
            grid = RayGrid(pool, partition.num_clients, client_sizes(env, partition), self.client_timeout_s)
            context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
            server_main(grid, context)
        finally:
            pool.shutdown()
            if self._started_ray:
                ray.shutdown()
                self._started_ray, self._layout = False, None


def client_sizes(env: RunEnvironment, partition: Partition) -> Callable[[int], int]:
    """Each client's training-set size, by which the rounds' chunks are balanced: read off
    the partition, or asked of a lazy population (which keeps no sizes) client by client."""
    if isinstance(partition, PopulationPartition):
        return env.dataset().client_size
    sizes = partition.sizes
    return lambda client: int(sizes[client])


class WorkerActor:
    """One worker in a Ray actor: runs chunks of client tasks through the ClientApp."""

    def __init__(self, client_app: ClientApp, env: RunEnvironment) -> None:
        self.client_app = client_app
        self.env = env

    def ready(self) -> tuple[int, str]:
        """Load the worker (dataset, partition, model) before the first round; the pid and
        the id of the Ray node the actor runs on."""
        import ray

        worker_for(self.env)
        settle_garbage_collector()
        return os.getpid(), ray.get_runtime_context().get_node_id()

    def run(
        self, shared: Sequence[ArrayRecord], tasks: Sequence[ClientTask], timeout_s: float | None = None
    ) -> list[TaskResult]:
        return run_tasks(self.client_app, shared, tasks, timeout_s)


class WorkerPool:
    """``size`` WorkerActors, each loaded (data, partition, model) before the first round;
    replaces any that dies while the cluster's live nodes have room for it.

    ``pids`` and ``nodes``: each actor's process id and Ray node id, in ``actors``' order.
    """

    def __init__(self, client_app: ClientApp, env: RunEnvironment, size: int, num_cpus: float, num_gpus: float) -> None:
        import ray

        self._actor_class = ray.remote(max_restarts=0, max_task_retries=0)(WorkerActor).options(
            num_cpus=num_cpus, num_gpus=num_gpus
        )
        self._arguments = (client_app, env)
        self._resources = (num_cpus, num_gpus)
        self.actors = [self._actor_class.remote(*self._arguments) for _ in range(size)]
        self.pids, self.nodes = map(list, zip(*self._ready(self.actors), strict=True))

    def recover(self, actor: Any, error: BaseException) -> Any | None:
        """A dead actor's replacement, in its place; or None when the live nodes hold no
        room for one more worker (its node left the cluster), and the pool shrinks. A
        one-line ClientFailure when no worker is left (``error``, Ray's word on the last
        death, goes in its details)."""
        import ray

        slot = self.actors.index(actor)
        ray.kill(actor, no_restart=True)
        if len(self.actors) <= self.capacity():
            replacement = self._actor_class.remote(*self._arguments)
            loaded = self._ready_while_room(replacement)
            if loaded is not None:
                self.actors[slot] = replacement
                self.pids[slot], self.nodes[slot] = loaded
                return replacement
        del self.actors[slot], self.pids[slot], self.nodes[slot]
        if not self.actors:
            raise ClientFailure(
                "every Ray worker was lost with its node; the run resumes from its last checkpoint when run "
                "again on a cluster with room for a worker",
                str(error),
            )
        return None

    def capacity(self) -> int:
        """How many workers the cluster's live nodes can hold, by each node's CPUs and GPUs."""
        import ray

        num_cpus, num_gpus = self._resources
        total = 0
        for node in ray.nodes():
            if node.get("Alive"):
                resources = node.get("Resources", {})
                fits = math.floor(resources.get("CPU", 0.0) / num_cpus + 1e-9)
                if num_gpus:
                    fits = min(fits, math.floor(resources.get("GPU", 0.0) / num_gpus + 1e-9))
                total += fits
        return total

    def _ready_while_room(self, actor: Any) -> tuple[int, str] | None:
        """Wait until a replacement has loaded its worker, as :meth:`_ready`; None (and the
        replacement ended) once the live nodes have no room for it: a worker can die on a
        node that is leaving before the cluster counts that node as gone."""
        import ray

        loaded = actor.ready.remote()
        while not ray.wait([loaded], timeout=1.0)[0]:
            if len(self.actors) > self.capacity():
                ray.kill(actor, no_restart=True)
                return None
        return self._loaded([loaded])[0]

    @classmethod
    def _ready(cls, actors: list) -> list[tuple[int, str]]:
        """Wait until the actors have loaded their workers; a worker that cannot start is a
        one-line error (a UserError from the experiment stays one)."""
        return cls._loaded([actor.ready.remote() for actor in actors])

    @staticmethod
    def _loaded(futures: list) -> list[tuple[int, str]]:
        import ray

        try:
            return ray.get(futures)
        except ray.exceptions.RayTaskError as error:
            if isinstance(error.cause, UserError):
                raise UserError(str(error.cause)) from None
            raise ClientFailure(f"a Ray worker failed to start: {_first_line(error.cause)}", str(error)) from None
        except ray.exceptions.RayActorError as error:
            raise ClientFailure(
                f"a Ray worker died while starting (out of memory, or the cluster went away): {_first_line(error)}",
                str(error),
            ) from None

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class RayGrid(SimulatedGrid):
    """A Grid that runs each push's tasks on a WorkerPool, a chunk per actor."""

    def __init__(
        self,
        pool: WorkerPool,
        num_clients: int,
        client_size: Callable[[int], int],
        client_timeout_s: float | None = None,
    ) -> None:
        super().__init__(num_clients)
        self.pool = pool
        self.client_size = client_size
        self.client_timeout_s = client_timeout_s

    def chunks(self, tasks: Sequence[ClientTask]) -> list[list[int]]:
        """Task indices per actor: the largest clients first, each to the least-loaded
        actor (longest-processing-time first), each chunk in the tasks' order."""
        count = min(len(self.pool.actors), len(tasks))
        loads, chunks = [0] * count, [[] for _ in range(count)]
        sizes = [max(1, int(self.client_size(task.client))) for task in tasks]
        for index in sorted(range(len(tasks)), key=lambda i: -sizes[i]):
            slot = loads.index(min(loads))
            chunks[slot].append(index)
            loads[slot] += sizes[index]
        return [sorted(chunk) for chunk in chunks if chunk]

    def execute(self, shared: Sequence[ArrayRecord], tasks: Sequence[ClientTask]) -> list[TaskResult]:
        import ray

        if not tasks:
            return []
        shared_ref = ray.put(list(shared))  # once per push, however many clients read it
        running = {
            self.pool.actors[slot].run.remote(shared_ref, [tasks[i] for i in chunk], self.client_timeout_s): (
                slot,
                chunk,
            )
            for slot, chunk in enumerate(self.chunks(tasks))
        }
        results: list[TaskResult | None] = [None] * len(tasks)
        retry: list[int] = []
        dead = []
        for future, (slot, chunk) in running.items():
            try:
                for index, result in zip(chunk, ray.get(future), strict=True):
                    results[index] = result
            except ray.exceptions.RayActorError as error:
                dead.append((self.pool.actors[slot], error))
                retry += chunk
        for actor, error in dead:
            self.pool.recover(actor, error)
        self._retry_one_by_one(shared_ref, tasks, sorted(retry), results)
        return results  # type: ignore[return-value]

    def _retry_one_by_one(
        self, shared_ref: Any, tasks: Sequence[ClientTask], indices: list[int], results: list[TaskResult | None]
    ) -> None:
        """Run each task of a dead worker once more, alone, so that a client that kills its
        worker again fails by itself; at most one task per actor at a time. A task whose
        worker was lost with its node goes back in the queue (the client did nothing wrong)."""
        import ray

        pending, running = deque(indices), {}
        idle = list(self.pool.actors)
        while pending or running:
            while pending and idle:
                actor, index = idle.pop(), pending.popleft()
                running[actor.run.remote(shared_ref, [tasks[index]], self.client_timeout_s)] = (actor, index)
            [future], _ = ray.wait(list(running), num_returns=1)
            actor, index = running.pop(future)
            try:
                results[index] = ray.get(future)[0]
            except ray.exceptions.RayActorError as error:
                replacement = self.pool.recover(actor, error)
                if replacement is None:
                    pending.append(index)
                    continue
                results[index], actor = _worker_died(tasks[index], error), replacement
            idle.append(actor)


def _worker_died(task: ClientTask, error: Exception) -> TaskResult:
    """An error reply for a client whose worker died twice while running it."""
    reason = (
        f"WorkerDied: the Ray worker running this client died twice (out of memory, or a crash in "
        f"native code): {_first_line(error)}"
    )
    request = Message(content=RecordDict(), metadata=task.metadata)
    return TaskResult(
        Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=request), task.state
    )
