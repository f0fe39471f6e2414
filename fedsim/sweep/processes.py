"""Running a sweep's runs in worker processes, and stopping them at a point each run
resumes from (Ctrl-C, SIGTERM)."""

from __future__ import annotations

import ctypes
import itertools
import multiprocessing
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as connection_wait
from pathlib import Path
from typing import Any

from fedsim import atomic
from fedsim.errors import UserError
from fedsim.flower_log import quiet_flower
from fedsim.notices import run_label
from fedsim.sweep.plan import ERROR_FILE, RunOutcome, RunTask

GRACE_S = 5.0  # how long a stopping worker may take to leave its run resumable before it is killed


class StopSignals:
    """SIGINT and SIGTERM while a sweep runs (in the main thread; elsewhere Python's own
    handling stays). At first they raise KeyboardInterrupt, SIGTERM as SIGINT does; after
    :meth:`defer` they are recorded, and wake :func:`multiprocessing.connection.wait` on
    this object, so that the sweep stops its workers itself."""

    def __init__(self) -> None:
        self.received: int | None = None  # the first signal
        self.count = 0
        self._deferred = False
        self._previous: dict[int, Any] = {}
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)

    def __enter__(self) -> StopSignals:
        self.install()
        return self

    def install(self) -> None:
        """(Re)install the handlers: Ray's ``init`` replaces the SIGTERM handler."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous = signal.signal(signum, self._handle)
            self._previous.setdefault(signum, previous)

    def defer(self) -> None:
        self._deferred = True

    def _handle(self, signum: int, _frame: Any) -> None:
        self.count += 1
        if self.received is None:
            self.received = signum
        if not self._deferred:
            raise KeyboardInterrupt
        try:
            os.write(self._write, b"\0")
        except OSError:  # the pipe is full: it is awake already
            pass

    def fileno(self) -> int:
        return self._read

    def drain(self) -> None:
        """Read the wake-ups, so that the next wait blocks until the next signal."""
        try:
            while os.read(self._read, 512):
                pass
        except (BlockingIOError, OSError):
            pass

    def __exit__(self, *_exc: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        os.close(self._read)
        os.close(self._write)


def remove_temporary_files(folder: Path) -> None:
    """The ``.NAME.*.tmp`` files of :mod:`fedsim.atomic` that a killed writer left."""
    if folder.is_dir():
        for path in folder.rglob(".*.tmp"):
            if path.is_file():
                path.unlink(missing_ok=True)


def execute_run(task: RunTask) -> RunOutcome:
    """Run one run in a worker; any error becomes a failed outcome, with its traceback in
    the run directory's error.txt, and an interruption an "interrupted" one."""
    # lazy: only the worker processes run experiments; the sweep's own process starts without torch
    from fedsim.runner import run_experiment

    started = time.monotonic()
    quiet_flower()
    (Path(task.path) / ERROR_FILE).unlink(missing_ok=True)  # a previous attempt's
    try:
        with run_label(task.name):
            result = run_experiment(task.experiment, task.path, overwrite=task.overwrite, progress=False)
    except KeyboardInterrupt:  # the sweep stops: the run resumes from its last checkpoint
        _leave_run()
        return RunOutcome(task.name, "interrupted", None, round(time.monotonic() - started, 3))
    except Exception as error:  # one run's failure must not stop the sweep
        atomic.write_text(Path(task.path) / ERROR_FILE, traceback.format_exc())
        return RunOutcome(task.name, "failed", one_line(error), round(time.monotonic() - started, 3))
    status = {"new": "done", "resume": "resumed", "finished": "skipped"}[result.status]
    return RunOutcome(task.name, status, None, round(time.monotonic() - started, 3))


def one_line(error: BaseException) -> str:
    text = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
    lines = text.strip().splitlines()
    return lines[0][:500] if lines else type(error).__name__


# --- worker processes ------------------------------------------------------------------


@dataclass
class _Worker:
    task: RunTask
    process: multiprocessing.process.BaseProcess
    conn: Connection
    outcome: RunOutcome | None = None

    def receive(self) -> None:
        try:
            if self.outcome is None and self.conn.poll():
                self.outcome = self.conn.recv()
        except (EOFError, OSError):
            pass


def run_in_processes(
    tasks: list[RunTask],
    workers: int | None,
    address: str | None,
    on_outcome: Callable[[RunOutcome], None],
    stop: StopSignals,
) -> list[RunTask]:
    """Worker processes on this machine, a fresh one (spawn) for every run, so that no run
    inherits another's state or caches. Each run uses the torch threads its experiment
    sets (the in-process engine's ``num_threads``, 1 by default), so ``--workers`` times
    that should not exceed the cores. Nothing waits in a queue, so a stopped sweep stops
    at the runs in progress: it returns those, stopped."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(workers or cpus, len(tasks))
    context = multiprocessing.get_context("spawn")
    queue = iter(tasks)
    running: list[_Worker] = []
    try:
        while not stop.received:
            for task in itertools.islice(queue, workers - len(running)):
                running.append(_start_worker(context, task))
            if not running:
                return []
            ready = set(connection_wait([*(w.process.sentinel for w in running), *(w.conn for w in running), stop]))
            stop.drain()
            for worker in list(running):
                if worker.conn in ready:
                    worker.receive()
                if worker.process.sentinel in ready:
                    worker.process.join()
                    worker.receive()
                    running.remove(worker)
                    if worker.outcome is None:  # killed (out of memory, a signal) before it could report
                        remove_temporary_files(Path(worker.task.path))
                    on_outcome(unfinished_is_failed(worker.outcome or _lost(worker)))
        for worker in _stop_workers(running, stop):
            on_outcome(worker.outcome)
        return [worker.task for worker in running]
    finally:
        for worker in running:  # only after an error in the sweep itself
            if worker.process.is_alive():
                worker.process.kill()
            worker.process.join()


def _start_worker(context: Any, task: RunTask) -> _Worker:
    """A worker starts with SIGINT and SIGTERM blocked and unblocks them once its handlers
    are in place, so that a Ctrl-C while it starts up neither kills it nor prints a traceback."""
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_worker_main, args=(task, sender), name=f"fedsim sweep: {task.name}")
    posix = hasattr(signal, "pthread_sigmask")
    if posix:
        resource_tracker.ensure_running()  # which would unblock the signals if it started in process.start()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        process.start()
    finally:
        if posix:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    sender.close()
    return _Worker(task, process, receiver)


def _stop_workers(running: list[_Worker], stop: StopSignals) -> list[_Worker]:
    """SIGTERM to every worker, which stops its run where it resumes from (an atomic write
    in progress removes its temporary file); SIGKILL to any still running after GRACE_S
    seconds, or at a second Ctrl-C. Returns the workers, each with its outcome."""
    for worker in running:
        if worker.process.is_alive():
            os.kill(worker.process.pid, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    signals = stop.count
    while stop.count == signals and (alive := [w for w in running if w.process.is_alive()]):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready = connection_wait([*(w.process.sentinel for w in alive), *(w.conn for w in alive), stop], left)
        stop.drain()
        for worker in alive:
            if worker.conn in ready:
                worker.receive()
    for worker in running:
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join()
        worker.receive()
        if worker.outcome is None:
            worker.outcome = RunOutcome(worker.task.name, "interrupted")
    return running


def unfinished_is_failed(outcome: RunOutcome) -> RunOutcome:
    """A run stopped by a signal to its worker alone, while the sweep goes on, did not
    finish: the sweep must not report success."""
    if outcome.status != "interrupted":
        return outcome
    return RunOutcome(outcome.name, "failed", "stopped by a signal to its worker; the same command resumes it")


def _lost(worker: _Worker) -> RunOutcome:
    code = worker.process.exitcode
    how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
    return RunOutcome(worker.task.name, "failed", f"worker lost: {how}")


_RUN_ACTIVE = False  # in a worker: whether SIGTERM should stop a run (else the worker just exits)
_RETRY_S = 0.05  # when a stopping run swallowed its KeyboardInterrupt, it gets another this soon


def _worker_main(task: RunTask, conn: Connection) -> None:
    """A worker process: one run, its outcome sent back through ``conn``."""
    global _RUN_ACTIVE
    _die_with_parent()
    signal.signal(signal.SIGINT, _ignore_signal)  # a terminal's Ctrl-C reaches the sweep, which stops us
    signal.signal(signal.SIGTERM, _stop_run)
    sys.unraisablehook = _unraisable(sys.unraisablehook)
    _RUN_ACTIVE = True
    try:
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})  # a pending one acts now
        outcome = execute_run(task)
    except KeyboardInterrupt:  # outside execute_run's own handling
        _leave_run()
        outcome = RunOutcome(task.name, "interrupted")
    _leave_run()
    try:
        conn.send(outcome)
        conn.close()
    except OSError:
        pass
    # Its run has unwound (after an interruption, perhaps in the middle of an import), so
    # there is nothing left to tear down but the interpreter, which can take seconds.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    os._exit(0)


def _ignore_signal(_signum: int, _frame: Any) -> None:
    pass


def _stop_run(signum: int, _frame: Any) -> None:
    """SIGTERM in a worker: unwind the run (atomic writes remove their temporary files,
    the run directory is released), else leave at once."""
    if not _RUN_ACTIVE:
        os._exit(128 + signum)
    signal.signal(signal.SIGALRM, _stop_run)  # for the hook below
    raise KeyboardInterrupt


def _unraisable(default: Callable[[Any], None]) -> Callable[[Any], None]:
    """Python ignores an exception raised in a ``__del__`` or a weakref callback, where the
    signal may have struck: the run would go on. It is raised again, soon, silently."""

    def hook(unraisable: Any) -> None:
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            default(unraisable)
        elif _RUN_ACTIVE:
            signal.setitimer(signal.ITIMER_REAL, _RETRY_S)

    return hook


def _leave_run() -> None:
    """The run has stopped (or finished): no more interruptions."""
    global _RUN_ACTIVE
    if _RUN_ACTIVE:
        _RUN_ACTIVE = False
        signal.setitimer(signal.ITIMER_REAL, 0)


def _die_with_parent() -> None:
    """A worker outliving a killed sweep would write into a run the next sweep resumes;
    on Linux the kernel kills it with its parent."""
    try:
        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before prctl took effect
        os._exit(1)
