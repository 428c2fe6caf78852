"""Isolated worker processes: a small pool that outlives crashing workers, with memory and time limits per job.

Why not ``concurrent.futures.ProcessPoolExecutor``: one worker that segfaults breaks the whole
executor (every pending job fails with ``BrokenProcessPool``). Here each worker is a
``multiprocessing`` process on its own pipe, doing one job at a time; a worker that dies
(signal, ``os._exit``), runs out of its address-space limit or overstays its time fails
only the job it held, and a fresh worker takes its place.

Start method: ``fork`` when it is safe and cheap (about 10 ms a worker, against 0.4-0.5 s
for ``forkserver``/``spawn``, which import numpy, nibabel and pydicom again), that is when
the parent runs no other Python thread (tqdm's idle monitor thread aside) and has not
imported torch (whose OpenMP runtime is not fork-safe); ``forkserver`` otherwise. numpy's
OpenBLAS threads are fork-safe (OpenBLAS stops and restarts them around ``fork`` with its
own ``pthread_atfork`` handlers). With ``forkserver``/``spawn``, scripts that call this
need the usual ``if __name__ == "__main__":`` guard (a worker that cannot start stops the
batch with a StageError saying so).

A forked worker is started after the batch's jobs exist, so it has them already: it is sent
only each job's index, and nothing is pickled on the way out (ingest of 600 series of 40
files pickled 28 KB per study in the parent). ``forkserver``/``spawn`` workers are sent each
job pickled. Replies are always pickled back.

Workers forward their log records to the parent through the pipe, so the parent's
handlers (and their filters, e.g. PHI scrubbing) see them.

Test hook: ``MEDPIPE_TEST_FAULT=<kind>:<text>`` (read in the parent when a pool starts)
makes the worker fail the way a broken decoder does on every job whose (non-callable)
arguments' repr contains ``<text>``; kinds: segfault, abort, exit, sigkill, panic, memory, hang.
"""

from __future__ import annotations

import faulthandler
import gc
import logging
import logging.handlers
import multiprocessing
import os
import pickle
import resource
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Literal

from pipeline.collector import frozen
from pipeline.errors import StageError

log = logging.getLogger(__name__)

FAULT_ENV = "MEDPIPE_TEST_FAULT"
FORKSERVER_EXIT = "pipeline.forkserver_exit"  # preloaded last: see that module
StartMethod = Literal["auto", "fork", "forkserver", "spawn"]
# A reply: ("ok", value) or ("failed", code, message).
Reply = tuple[Any, ...]
Job = tuple[Callable[..., Any], tuple[Any, ...]]  # fn, args: the worker calls fn(*args)


@dataclass(frozen=True)
class Isolation:
    """Limits of each worker process; the ``*_setting`` names appear in messages as what to change."""

    memory_limit_mb: int | None = None  # address space (RLIMIT_AS) a worker may add to what it maps at start
    timeout_s: float | None = None  # per job, from the moment a worker takes it
    start_method: StartMethod = "auto"
    memory_setting: str = "the worker memory limit"
    timeout_setting: str = "the per-study time limit"


class PanicException(BaseException):  # named like the Rust decoders' (pyo3) panic type
    """What the test hook raises for ``panic``: a BaseException, like pylibjpeg-rle's Rust panics."""


_FORKSERVER_PRESTARTED: list[bool] = []  # prestart_forkserver() ran in this process


def prestart_forkserver(preload: Sequence[str]) -> None:
    """Start the forkserver now, importing ``preload`` in it; ``auto`` then picks it for every pool."""
    from multiprocessing import forkserver

    multiprocessing.get_context("forkserver").set_forkserver_preload(list(preload))
    forkserver.ensure_running()
    _FORKSERVER_PRESTARTED.append(True)


def start_method(requested: StartMethod = "auto") -> str:
    """The start method ``requested``, or for ``auto``: the forkserver when one was prestarted, else fork when it is
    safe (see the module docstring)."""
    if requested != "auto":
        return requested
    if _FORKSERVER_PRESTARTED:
        return "forkserver"
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not _harmless(t)]
    return "fork" if not others and "torch" not in sys.modules else "forkserver"


def _harmless(thread: threading.Thread) -> bool:
    """tqdm's monitor thread: started by the first progress bar and never stopped (not even for disabled
    bars), it only sleeps and rereads tqdm's own instance list, which a worker never touches."""
    return type(thread).__name__ == "TMonitor"


# ---- the worker side -----------------------------------------------------------------------


def send_logs_to(queue: Any) -> None:
    """In a child process: every log record goes to ``queue`` (anything with ``put_nowait``, through a
    QueueHandler, which formats it and drops what cannot be pickled), none to the handlers inherited through
    fork: the parent writes the logs, after :func:`replay`."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(logging.handlers.QueueHandler(queue))


def replay(record: logging.LogRecord) -> None:
    """A child's log record, handled here as if logged here: this process's handlers, and their filters (PHI
    scrubbing), see it."""
    logging.getLogger(record.name).handle(record)


class _PipeQueue:
    """The queue a QueueHandler writes to: sends each (prepared) log record up the pipe."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def put_nowait(self, record: logging.LogRecord) -> None:
        self.conn.send(("log", record))


def _mapped_bytes() -> int:
    """This process's address space now (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[0]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return 0


def limit_memory(megabytes: int | None) -> None:
    """Allow ``megabytes`` of address space on top of what the worker has mapped at its start.

    On top, because a forked worker starts with its parent's whole address space (shared,
    not copied): an absolute limit would depend on how big the parent happened to be.
    """
    if megabytes is None:
        return
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _mapped_bytes() + megabytes * 1024 * 1024
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _inject(kind: str, memory_limit_mb: int | None) -> None:
    """The test hook: fail like a broken decoder would."""
    if kind == "segfault":
        import ctypes

        ctypes.string_at(0)
    elif kind == "abort":
        os.abort()
    elif kind == "exit":
        os._exit(3)
    elif kind == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "panic":
        raise PanicException("injected decoder panic")
    elif kind == "memory":  # one allocation past the address-space limit: refused, like a decoder's would be
        if memory_limit_mb:
            bytearray((memory_limit_mb + 1) << 20)
        raise MemoryError("injected allocation failure")
    elif kind == "hang":
        time.sleep(1e6)


def _failure_reply(exc: BaseException, memory_setting: str) -> Reply:
    if isinstance(exc, MemoryError):
        return ("failed", "out_of_memory", (f"ran out of memory ({type(exc).__name__}); raise {memory_setting} "
                                            "or run this study on a machine with more memory"))
    name = type(exc).__name__
    code = "decoder_panic" if name == "PanicException" else "fatal_error"
    return ("failed", code, f"{name}: {str(exc)[:300]}")  # the caller says what was abandoned


def _worker_main(conn: Connection, memory_limit_mb: int | None, log_level: int, memory_setting: str,
                 jobs: Sequence[Job] | None) -> None:
    """Run jobs from ``conn`` until it closes or sends None; reply with ("done", index, reply). A forked
    worker has the batch's ``jobs`` already (inherited): it is sent only their indices."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    gc.enable()  # forked where the parent paused its collector (pipeline.collector): a worker collects its own
    # A crashing decoder is reported by the parent with the signal's name; a faulthandler
    # inherited from the parent (pytest enables one) would only dump the module list to stderr.
    faulthandler.disable()
    send_logs_to(_PipeQueue(conn))
    logging.getLogger().setLevel(log_level)
    limit_memory(memory_limit_mb)
    conn.send(("ready",))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        index, payload, fault = message
        try:
            fn, args = jobs[index] if payload is None else pickle.loads(payload)  # type: ignore[index]
            if fault:
                _inject(fault, memory_limit_mb)
            reply: Reply = ("ok", fn(*args))
        except BaseException as exc:  # noqa: BLE001 - a worker reports everything, even a Rust panic
            reply = _failure_reply(exc, memory_setting)
        try:
            conn.send(("done", index, reply))
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            conn.send(("done", index, ("failed", "unpicklable_result", f"the result cannot be sent back ({exc})")))
        except OSError:  # the parent is gone (killed): nobody to report to
            return


# ---- the parent side -----------------------------------------------------------------------


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _start(process: Any, *, forked: bool) -> None:
    """Start ``process``. Before a fork the parent's objects move to the collector's permanent generation, and
    back once the child exists, so the child's collections never walk them: a walk writes to every object
    (its GC header), and in a forked child each write copies a page of the parent's heap. The child keeps
    them frozen (they are the parent's modules and data, alive until it exits). Ingest of dcm_qa_nih with
    2 workers: 0.585 -> 0.547 s (median of 15, benchmarks/RESULTS.md)."""
    if not forked:
        process.start()
        return
    with frozen():  # left frozen where an outer block (pipeline.collector.long_lived) froze them already
        process.start()


class _Worker:
    def __init__(self, ctx: Any, limits: Isolation, jobs: Sequence[Job] | None) -> None:
        parent, child = ctx.Pipe(duplex=True)
        level = logging.getLogger().getEffectiveLevel()
        self.process = ctx.Process(target=_worker_main, name="medpipe-worker", daemon=True,
                                   args=(child, limits.memory_limit_mb, level, limits.memory_setting, jobs))
        _start(self.process, forked=jobs is not None)
        child.close()
        self.conn: Connection = parent
        self.job: int | None = None
        self.deadline = float("inf")
        self.ready = False  # set by the worker's first message: it started and runs our code

    def give(self, index: int, payload: bytes | None, fault: str | None, timeout_s: float | None) -> None:
        self.conn.send((index, payload, fault))
        self.job = index
        self.deadline = time.monotonic() + timeout_s if timeout_s else float("inf")

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()

    def ask_to_stop(self) -> None:
        """An idle worker is told to exit (see :meth:`stop`); a busy one is killed."""
        if self.job is not None:
            self.kill()
            return
        try:
            self.conn.send(None)
        except OSError:
            pass

    def stop(self) -> None:
        """Wait (up to 2 s) for a worker told to exit, then make sure it is gone."""
        self.process.join(timeout=2)
        self.kill()


def _death(process: Any, limits: Isolation) -> Reply:
    """The failure reply for a worker that died holding a job."""
    process.join(timeout=5)
    code = process.exitcode
    memory = (f", or it exhausted {limits.memory_setting} ({limits.memory_limit_mb} MB)"
              if limits.memory_limit_mb else "")
    if code is not None and code < 0:
        name = _signal_name(-code)
        if name == "SIGKILL":
            why = "it was killed (SIGKILL), most likely by the system's out-of-memory killer; lower the number " \
                  "of workers or convert this study alone"
        else:
            why = f"it crashed with {name} inside a library (a decoder bug triggered by this data{memory})"
        return ("failed", "worker_crashed", (f"the worker process handling this study died: {why}; the other "
                                             "studies were not affected. Check or re-export the files of this study"))
    return ("failed", "worker_died", (f"the worker process handling this study exited with status {code} "
                                      "(a library ended the process); the other studies were not affected"))


def _start_failure(process: Any) -> str:
    process.join(timeout=5)
    return (f"a worker process could not start (exit status {process.exitcode}; see the errors printed above). "
            "With the forkserver or spawn start method (used when torch is loaded or threads run), every worker "
            "imports the main script again, so a script that calls medpipe must guard its entry point with "
            "\"if __name__ == '__main__':\"")


def _fault_for(args: tuple[Any, ...], spec: str | None) -> str | None:
    if not spec or ":" not in spec:
        return None
    kind, _, text = spec.partition(":")
    return kind if text in repr([a for a in args if not callable(a)]) else None


def _context(limits: Isolation, preload: Sequence[str]) -> Any:
    method = start_method(limits.start_method)
    ctx = multiprocessing.get_context(method)
    if method == "forkserver" and preload:
        ctx.set_forkserver_preload([*preload, FORKSERVER_EXIT])  # takes effect when the server first starts
    return ctx


def run_isolated(jobs: Sequence[Job], *, workers: int, limits: Isolation,
                 preload: Sequence[str] = (), test_faults: bool = True) -> Iterator[tuple[int, Reply]]:
    """Run ``fn(*args)`` for each job in worker processes; yield ``(job index, reply)`` as jobs finish.

    A reply is ``("ok", value)`` or ``("failed", code, message)`` with code ``worker_crashed``
    (killed by a signal), ``worker_died`` (exited), ``timeout``, ``out_of_memory``,
    ``decoder_panic``, ``fatal_error`` (another BaseException) or ``unpicklable_task``.
    ``test_faults=False``: jobs that decode nothing (header reading) are not targets of the
    ``MEDPIPE_TEST_FAULT`` hook, which stands for a broken pixel decoder.
    """
    ctx = _context(limits, preload)
    inherited = jobs if ctx.get_start_method() == "fork" else None  # a forked worker has them: no pickling
    fault = os.environ.get(FAULT_ENV) if test_faults else None
    pending = deque(range(len(jobs)))
    pool: list[_Worker] = []
    try:
        while pending or any(w.job is not None for w in pool):
            while pending:
                idle = next((w for w in pool if w.job is None), None)
                if idle is None and len(pool) >= max(1, min(workers, len(jobs))):
                    break
                index = pending.popleft()
                fn, args = jobs[index]
                try:
                    payload = None if inherited is not None else pickle.dumps((fn, args))
                except (pickle.PicklingError, TypeError, AttributeError) as exc:
                    yield index, ("failed", "unpicklable_task", f"cannot send this job to a worker process ({exc})")
                    continue
                if idle is None:
                    idle = _Worker(ctx, limits, inherited)
                    pool.append(idle)
                try:
                    idle.give(index, payload, _fault_for(args, fault), limits.timeout_s)
                except OSError:  # the idle worker died since its last job: start another
                    idle.kill()
                    pool.remove(idle)
                    pending.appendleft(index)
            yield from _collect(pool, limits)
    finally:
        for worker in pool:  # all told first, so that they exit side by side (2-3 ms each)
            worker.ask_to_stop()
        for worker in pool:
            worker.stop()


def _collect(pool: list[_Worker], limits: Isolation) -> Iterator[tuple[int, Reply]]:
    """Wait for the busy workers' next messages (or deadlines); yield finished jobs, replace the dead."""
    busy = [w for w in pool if w.job is not None]
    if not busy:
        return
    timeout = max(0.0, min(w.deadline for w in busy) - time.monotonic())
    ready = set(wait([w.conn for w in busy] + [w.process.sentinel for w in busy],
                     timeout=None if timeout == float("inf") else timeout))
    for worker in busy:
        dead = False
        if worker.conn in ready or worker.process.sentinel in ready:
            try:
                while worker.conn.poll():
                    message = worker.conn.recv()
                    if message[0] == "ready":
                        worker.ready = True
                    elif message[0] == "log":
                        replay(message[1])
                    else:
                        _, index, reply = message
                        worker.job, worker.deadline = None, float("inf")
                        yield index, reply
            except (EOFError, OSError):
                dead = True
            dead = dead or (worker.process.sentinel in ready and not worker.process.is_alive())
        if dead or not worker.process.is_alive():
            if not worker.ready:
                raise StageError(_start_failure(worker.process), code="worker_start_failed")
            if worker.job is not None:
                yield worker.job, _death(worker.process, limits)
                worker.job = None
            worker.kill()
            pool.remove(worker)
        elif worker.job is not None and time.monotonic() >= worker.deadline:
            index = worker.job
            worker.kill()
            pool.remove(worker)
            yield index, ("failed", "timeout", (f"not finished after {limits.timeout_s:g} s, so its worker process "
                                                f"was stopped (a decoder may hang on corrupt data); raise "
                                                f"{limits.timeout_setting} if the study is just very large"))
