"""Loopback ports for local runs (tests, benchmarks, the launcher, the in-process party pool)."""

from __future__ import annotations

import socket


def free_ports(n: int) -> list[int]:
    """n distinct ports that are free right now (bound together so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
