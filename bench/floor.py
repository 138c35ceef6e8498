"""The floor of each workload: what its bare components cost on this machine, measured now.

No dispatch-aio code runs here. Three components that any implementation of our
guarantees pays for, each measured alone:

- an aiohttp exchange on loopback between two processes, with one keep-alive
  connection and a 300-byte body each way (the scheduler's Run request to an
  application, or a client's submission to the scheduler): its wall time, and the CPU
  each side spends on it;
- a SQLite transaction in WAL mode with ``synchronous=FULL`` that inserts one 300-byte
  row, in the folder of the benchmark's databases (the commit every accepted call and
  every step waits for);
- an Ed25519 signature and its verification of a 300-byte message (every Run request
  is signed by the scheduler and verified by the application);
- the peak RSS of a Python process that has only imported aiohttp, protobuf and
  cryptography, which each of our processes needs (the scheduler and the application
  are two under `dispatch-aio run`, one embedded).

From them, the best figure each workload could reach if our code cost nothing beyond
them (`floors`), and so the best ratio to dispatch-py: a target above that ratio is out
of reach with these components on this machine.

    python bench/floor.py            # prints the components
    python bench/floor.py --serve    # the echo server the exchange is measured against
"""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

BODY = b"x" * 300
EXCHANGES = 1000  # timed, after as many untimed ones
COMMITS = 200
SIGNATURES = 2000
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Components:
    """Medians, in milliseconds."""

    exchange: float  # wall time of one aiohttp exchange
    exchange_client_cpu: float  # CPU the client side spends per exchange
    exchange_server_cpu: float  # CPU the server side spends per exchange
    commit: float  # wall time of one synchronous=FULL transaction
    sign: float
    verify: float
    process_rss: float  # MB: peak RSS of a process with our dependencies imported


@dataclass(frozen=True)
class Floor:
    """The best figure of a workload on one of our systems, from its components."""

    workload: str  # as bench_e2e.py names workloads
    system: str
    figure: float  # in the workload's unit
    formula: str


BATCH = 64
"""Run requests per batch exchange at most (the scheduler's invoker)."""


def floors(c: Components) -> list[Floor]:
    """The floors of the workloads whose costs are the components' (ms in, figures out).

    A chain (W2) waits for each step's exchange (the child's run, with the parent's
    resume in it), its signature and one commit. Submissions one by one (W3one) wait
    each for an exchange with the scheduler and a commit; embedded, for the commit
    alone. A fan-out (W1, W3 in one batch) is bounded by the busier process; its Run
    requests go in batches of up to `BATCH` calls, each batch one exchange and one
    signature, so these components bound it far above what the rest of the work allows.
    """
    signed = c.sign + c.verify
    app = c.exchange_server_cpu + c.verify
    scheduler = c.exchange_client_cpu + c.sign
    busier = max(app, scheduler)
    w2 = c.exchange + signed + c.commit
    return [
        Floor(
            "w1",
            "persistent",
            BATCH * 1000 / busier,
            f"{BATCH} / max(app CPU, scheduler CPU) (batches of {BATCH})",
        ),
        Floor("w2", "persistent", w2, "exchange + sign + verify + commit"),
        Floor("w3one", "persistent", 1000 / (c.exchange + c.commit), "1 / (exchange + commit)"),
        Floor("w3batch", "persistent", BATCH * 1000 / busier, "as W1"),
        Floor("w2", "embedded", c.commit, "commit"),
        Floor("w3one", "embedded", 1000 / c.commit, "1 / commit"),
    ]


def describe(c: Components) -> str:
    return (
        f"aiohttp exchange on loopback {c.exchange:.3f} ms (CPU: client "
        f"{c.exchange_client_cpu:.3f}, server {c.exchange_server_cpu:.3f}); SQLite "
        f"synchronous=FULL commit {c.commit:.3f} ms; Ed25519 sign {c.sign:.3f}, verify "
        f"{c.verify:.3f} ms; a Python process with aiohttp, protobuf and cryptography "
        f"imported {c.process_rss:.1f} MB peak RSS"
    )


def rss_floors(c: Components) -> list[tuple[str, float, str]]:
    """The least peak RSS (MB) of all the processes of each system: system, MB, formula."""
    return [
        ("persistent", 2 * c.process_rss, "2 processes, each with the dependencies imported"),
        ("embedded", c.process_rss, "1 process with the dependencies imported"),
    ]


def measure(data_root: str | None) -> Components:
    """Measure the components once (about a second)."""
    exchange, client_cpu, server_cpu = _exchange()
    sign, verify = _signature()
    return Components(
        exchange, client_cpu, server_cpu, _commit(data_root), sign, verify, _process_rss()
    )


def median(samples: list[Components]) -> Components:
    """The median of each component over `samples`."""
    fields = Components.__dataclass_fields__
    return Components(**{f: statistics.median(getattr(s, f) for s in samples) for f in fields})


# -- the components ---------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        text = stat.read()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _exchange() -> tuple[float, float, float]:
    """Median wall ms of an exchange, and the mean CPU ms of each side per exchange."""
    server = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--serve"],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        return asyncio.run(_exchanges(port, server.pid))
    finally:
        server.terminate()
        server.wait(10)


async def _exchanges(port: int, server_pid: int) -> tuple[float, float, float]:
    from aiohttp import ClientSession

    url = f"http://127.0.0.1:{port}/run"
    async with ClientSession() as session:

        async def once() -> None:
            async with session.post(url, data=BODY) as response:
                await response.read()

        for _ in range(EXCHANGES):
            await once()
        samples = []
        cpu, server_cpu = time.process_time(), _cpu_seconds(server_pid)
        for _ in range(EXCHANGES):
            start = time.perf_counter()
            await once()
            samples.append(time.perf_counter() - start)
        cpu, server_cpu = time.process_time() - cpu, _cpu_seconds(server_pid) - server_cpu
    return (
        statistics.median(samples) * 1000,
        cpu / EXCHANGES * 1000,
        server_cpu / EXCHANGES * 1000,
    )


def serve() -> None:
    """Answer POST /run with its body, on a free loopback port printed first."""
    from aiohttp import web

    async def run(request: web.Request) -> web.Response:
        return web.Response(body=await request.read(), content_type="application/proto")

    app = web.Application()
    app.router.add_post("/run", run)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)  # before the port is printed: the client connects at once
    print(sock.getsockname()[1], flush=True)
    web.run_app(app, sock=sock, print=None, access_log=None, handle_signals=True)


_IMPORTS = (
    "import aiohttp, google.protobuf.message, sqlite3\n"
    "from cryptography.hazmat.primitives.asymmetric import ed25519\n"
    "print(next(line.split()[1] for line in open('/proc/self/status') "
    "if line.startswith('VmHWM:')))"
)


def _process_rss() -> float:
    out = subprocess.run(
        [sys.executable, "-c", _IMPORTS], capture_output=True, text=True, check=True
    )
    return int(out.stdout) / 1024  # kB to MB


def _commit(data_root: str | None) -> float:
    folder = tempfile.mkdtemp(prefix="bench-floor-", dir=data_root)
    path = os.path.join(folder, "floor.db")
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE calls (id INTEGER PRIMARY KEY, data BLOB NOT NULL)")
        samples = []
        for _ in range(COMMITS):
            start = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO calls (data) VALUES (?)", (BODY,))
            conn.execute("COMMIT")
            samples.append(time.perf_counter() - start)
    finally:
        conn.close()
        for name in os.listdir(folder):
            os.unlink(os.path.join(folder, name))
        os.rmdir(folder)
    return statistics.median(samples) * 1000


def _signature() -> tuple[float, float]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    public = key.public_key()
    signature = key.sign(BODY)
    start = time.perf_counter()
    for _ in range(SIGNATURES):
        key.sign(BODY)
    sign = (time.perf_counter() - start) / SIGNATURES * 1000
    start = time.perf_counter()
    for _ in range(SIGNATURES):
        public.verify(signature, BODY)
    verify = (time.perf_counter() - start) / SIGNATURES * 1000
    return sign, verify


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        print(describe(measure(None)))
