"""Two CrypTen parties as local worker processes over the project's gRPC communicator, for tests and cost measurements.

Launching parties per call re-initialises CrypTen every time, so `LocalParties` starts two workers once, joins them
in one session of `grpc_comm` on loopback (the transport a deployment uses, no torch.distributed) and keeps them
alive: `run(fn, *args)` makes every party call `fn(*args)` and returns the results in rank order. `fn` must be a
module-level function (it is pickled by reference); results travel pickled by value, so return plain values or
tensors, not MPCTensors. Rounds and bytes are CrypTen's own counters, as with any communicator.

Workers come from a fork server (a fresh interpreter that has imported torch and CrypTen, nothing else), not from
a fork of the caller: a process that has used gRPC (the caller's own gRPC tests, or a worker) must never be forked,
gRPC's fork handlers abort the child ("Check failed: next_worker->state == KICKED", seen in CI). Each worker imports
gRPC itself, after its fork.

A party that raises would leave the other blocked in a collective, so on any error, crash or timeout the pool
kills both workers (it started them) and raises `PartyError` with the remote traceback; the next `run` starts a
fresh pair.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import pickle
import queue
import traceback
from collections.abc import Callable
from typing import Any

import torch

from mpcache.mpc.arith.crypten_compat import import_crypten
from mpcache.mpc.transport.ports import free_ports

_SESSIONS = itertools.count()
START_ATTEMPTS = 3  # the ports are picked free, but another process may take one before a worker binds it


class PartyError(RuntimeError):
    """A party raised, crashed or timed out; the message carries the remote traceback."""


def _worker(
    rank: int, peers: list[str], session: str, timeout: float, setup: Callable[[], None] | None, tasks, results
) -> None:
    torch.set_num_threads(1)  # two parties share the machine's cores
    crypten = import_crypten()
    try:
        from mpcache.mpc.transport.grpc_comm import init_party  # gRPC first loaded here, in the forked worker

        init_party(rank, len(peers), peers, session, timeout_s=timeout, connect_timeout_s=min(timeout, 60.0))
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
    crypten.uninit()  # flushes and waits for the other party: a clean close, nothing printed


class LocalParties:
    """A pool of `world_size` CrypTen parties (fork-server processes, gRPC on loopback).

    setup: module-level function every party calls after `crypten.init()` (e.g. to install a tuple provider).
    timeout: seconds to wait for one `run` before the pool is torn down (also the longest a party waits for a
    message from the other).
    """

    def __init__(self, world_size: int = 2, setup: Callable[[], None] | None = None, timeout: float = 300.0) -> None:
        if world_size < 2:
            raise ValueError(f"world_size must be at least 2, got {world_size}")
        self.world_size, self.setup, self.timeout = world_size, setup, timeout
        self._procs: list[mp.process.BaseProcess] = []
        self._tasks: list[Any] = []
        self._results: Any = None

    def _start(self) -> None:
        for attempt in range(START_ATTEMPTS):
            try:
                self._launch()
                return
            except PartyError as error:
                if "PortInUseError" not in str(error) or attempt == START_ATTEMPTS - 1:
                    raise

    def _launch(self) -> None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "mpcache.mpc.arith.numerics"])  # CrypTen: imported once, not per worker
        peers = [f"127.0.0.1:{port}" for port in free_ports(self.world_size)]
        session = f"local-{os.getpid()}-{next(_SESSIONS)}"
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(rank, peers, session, self.timeout, self.setup, self._tasks[rank], self._results),
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
                self.close(polite=False)
                raise PartyError(f"{what}: no answer within {self.timeout:.0f} s (dead parties: {dead})") from None
            value = pickle.loads(payload)
            if not ok:
                self.close(polite=False)  # the other party may wait in a collective for the one that raised
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

    def close(self, polite: bool = True) -> None:
        """Stop the workers: politely (each closes its session, both at once) if they are idle, by kill otherwise."""
        for q, p in zip(self._tasks, self._procs):
            if polite and p.is_alive():
                q.put(None)
        for p in self._procs:
            p.join(timeout=5 if polite else 0)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self._procs, self._tasks = [], []

    def __enter__(self) -> LocalParties:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
