"""Two CrypTen parties as local worker processes over gloo, for tests and cost measurements.

Launching parties per call (CrypTen's `run_multiprocess`) re-initialises CrypTen every time, so `LocalParties`
starts two workers once, runs `crypten.init()` in each, and keeps them alive: `run(fn, *args)` makes every party
call `fn(*args)` and returns the results in rank order. `fn` must be a module-level function (it is pickled by
reference); results travel pickled by value, so return plain values or tensors, not MPCTensors.

Workers come from a fork server (a fresh interpreter that has imported torch and CrypTen, nothing else), not from
a fork of the caller: a test process that has used gRPC (the gRPC transport and dealer tests) must not be forked,
gRPC's fork handlers abort the child ("Check failed: next_worker->state == KICKED", seen in CI).

A party that raises would leave the other blocked in a collective, so on any error, crash or timeout the pool
kills both workers (it started them) and raises `PartyError` with the remote traceback; the next `run` starts a
fresh pair.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch

from mpcache.mpc.crypten_compat import import_crypten


class PartyError(RuntimeError):
    """A party raised, crashed or timed out; the message carries the remote traceback."""


def _worker(rank: int, world_size: int, rendezvous: str, setup: Callable[[], None] | None, tasks, results) -> None:
    torch.set_num_threads(1)  # two parties share the machine's cores
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), RENDEZVOUS=rendezvous, DISTRIBUTED_BACKEND="gloo")
    crypten = import_crypten()
    try:
        crypten.init()
        if setup is not None:
            setup()
    except BaseException:
        results.put((rank, False, pickle.dumps(traceback.format_exc())))
        return
    results.put((rank, True, pickle.dumps("ready")))
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = pickle.loads(task)
        try:
            payload = pickle.dumps(fn(*args, **kwargs))
            ok = True
        except BaseException:
            payload, ok = pickle.dumps(traceback.format_exc()), False
        results.put((rank, ok, payload))
    crypten.uninit()


class LocalParties:
    """A pool of `world_size` CrypTen parties (fork-server processes, gloo over a file rendezvous).

    setup: module-level function every party calls after `crypten.init()` (e.g. to install a tuple provider).
    timeout: seconds to wait for one `run` before the pool is torn down.
    """

    def __init__(self, world_size: int = 2, setup: Callable[[], None] | None = None, timeout: float = 300.0) -> None:
        if world_size < 2:
            raise ValueError(f"world_size must be at least 2, got {world_size}")
        self.world_size, self.setup, self.timeout = world_size, setup, timeout
        self._procs: list[mp.process.BaseProcess] = []
        self._tasks: list[Any] = []
        self._results: Any = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    def _start(self) -> None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "mpcache.mpc.crypten_compat"])
        self._tmp = tempfile.TemporaryDirectory(prefix="mpcache-parties-")
        rendezvous = "file://" + os.path.join(self._tmp.name, "rendezvous")
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(rank, self.world_size, rendezvous, self.setup, self._tasks[rank], self._results),
                daemon=True,
            )
            for rank in range(self.world_size)
        ]
        for p in self._procs:
            p.start()
        self._collect("start-up")

    def _collect(self, what: str) -> list[Any]:
        out: dict[int, Any] = {}
        while len(out) < self.world_size:
            try:
                rank, ok, payload = self._results.get(timeout=self.timeout)
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
                self.close()
                raise PartyError(f"{what}: no answer within {self.timeout:.0f} s (dead parties: {dead})") from None
            value = pickle.loads(payload)
            if not ok:
                self.close()
                raise PartyError(f"{what}: party {rank} raised:\n{value}")
            out[rank] = value
        return [out[r] for r in range(self.world_size)]

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Call `fn(*args, **kwargs)` in every party; return the results in rank order."""
        if not self._procs:
            self._start()
        task = pickle.dumps((fn, args, kwargs))
        for q in self._tasks:
            q.put(task)
        return self._collect(getattr(fn, "__name__", repr(fn)))

    def close(self) -> None:
        """Stop the workers (politely if they are idle, by kill otherwise)."""
        for q, p in zip(self._tasks, self._procs):
            if p.is_alive():
                q.put(None)
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self._procs, self._tasks = [], []
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LocalParties:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
