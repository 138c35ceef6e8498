"""Ports for the servers the tests start in other processes.

A port the kernel gives for a bind to port 0 comes from its ephemeral range, where it
also takes the local ports of outgoing connections: released, then bound again by a
child process a moment later, such a port may have been taken meanwhile by any
connection on the machine (the tests run in parallel, and open many). The kernel never
gives out a port below that range, so the tests take theirs there, each pytest worker
from its own slice so that two workers never pick the same one.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import socket

__all__ = ["free_port", "free_ports"]

_LOWEST = 10_000
_SLICE = 1_500


def _ephemeral_start() -> int:
    """The first port of the kernel's ephemeral range, or 0 if it cannot be read."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _worker_slice() -> range | None:
    """This worker's ports below the ephemeral range; None if there is no room."""
    slices = (_ephemeral_start() - _LOWEST) // _SLICE
    if slices < 1:
        return None
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    first = _LOWEST + (int(worker) if worker.isdigit() else 0) % slices * _SLICE
    return range(first, first + _SLICE)


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A port of 127.0.0.1 nothing is bound to now, and that no connection will take."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` different ports, each as `free_port` gives one."""
    ports = _worker_slice()
    if ports is not None:
        bindable = (port for port in random.sample(ports, 50) if _bindable(port))
        found = list(itertools.islice(bindable, count))
        if len(found) == count:
            return found
    # No room below the ephemeral range: the kernel's picks, all bound at once.
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]
