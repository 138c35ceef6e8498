"""Per-request cost of signing and verifying a Dispatch Run request, before and after.

Usage::

    .venv/bin/python bench/bench_signature.py [--baseline REV] [--rounds 101] [--body 512]

Each figure is the median, over ``--rounds`` rounds, of the mean time of one call in
microseconds. The rounds interleave every implementation so that a change of the machine's
load hits all alike. The implementations are:

* ``baseline``: ``src/dispatch_aio/_signature.py`` as of git revision ``--baseline``, loaded
  into a module of its own from ``git show``;
* ``current``: the module in the working tree;
* ``general``: the current module's RFC 8941 parser and general signer alone (no fast path);
* ``floor``: what no implementation avoids: the SHA-512 of the body, and the signature
  operation of ``cryptography`` on a signature base of the same size. The column "over
  floor" is the rest: the cost of the implementation in Python.

Verification sees headers as aiohttp hands them to the endpoint (a ``CIMultiDictProxy`` with
the headers aiohttp's client sends), and the scheduler's request URL.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from hashlib import sha512
from pathlib import Path
from types import ModuleType
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from multidict import CIMultiDict, CIMultiDictProxy

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from dispatch_aio import _signature as current  # noqa: E402

MODULE = "src/dispatch_aio/_signature.py"
# The module before its verification and signing paths were reworked for cost per request.
DEFAULT_BASELINE = "dab250b"
URL = "http://127.0.0.1:8000/dispatch.sdk.v1.FunctionService/Run"
HEADERS = {"Content-Type": "application/proto"}


def load_revision(revision: str) -> ModuleType:
    """Import the signature module as of a git revision, as a module of its own."""
    source = subprocess.run(
        ["git", "show", f"{revision}:{MODULE}"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    directory = tempfile.mkdtemp(prefix="bench_signature_")
    path = Path(directory, "_signature_baseline.py")
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("_signature_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    return module


def request_headers(signed: dict[str, str], body: bytes) -> CIMultiDictProxy[str]:
    """The headers of a signed request, as aiohttp's server presents them."""
    return CIMultiDictProxy(
        CIMultiDict(
            [
                ("Host", "127.0.0.1:8000"),
                ("Content-Type", "application/proto"),
                ("Content-Digest", signed["Content-Digest"]),
                ("Signature-Input", signed["Signature-Input"]),
                ("Signature", signed["Signature"]),
                ("Accept", "*/*"),
                ("Accept-Encoding", "gzip, deflate"),
                ("User-Agent", "Python/3.11 aiohttp/3.14.1"),
                ("Content-Length", str(len(body))),
            ]
        )
    )


def per_call(fn: Callable[[], Any], number: int) -> float:
    """Mean time of one call to `fn`, in microseconds, over `number` calls."""
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="git revision compared")
    # Many short rounds: the median sees through bursts of load from other processes.
    parser.add_argument("--rounds", type=int, default=101)
    parser.add_argument("--number", type=int, default=200, help="calls per round")
    parser.add_argument("--body", type=int, default=512, help="request body size in bytes")
    args = parser.parse_args()

    baseline = load_revision(args.baseline)
    private = Ed25519PrivateKey.generate()
    public = private.public_key()
    body = os.urandom(args.body)

    baseline_signer = baseline.RequestSigner(private, "POST", URL, HEADERS)
    current_signer = current.RequestSigner(private, "POST", URL, HEADERS)
    signed = current_signer.sign(body)
    headers = request_headers(signed, body)
    params: dict[str, int | str] = {
        "created": int(time.time()),
        "keyid": "default",
        "alg": "ed25519",
        "nonce": "n",
    }
    covered = current._Parser(signed["Signature-Input"], "Signature-Input").dictionary()
    assert isinstance(covered["dispatch"], current._InnerList)
    # The floor signs and verifies a signature base of the real size.
    text = current._signature_base("POST", URL, list(headers.items()), covered["dispatch"])
    base = text.encode("ascii")
    signature = private.sign(base)

    def general_sign() -> object:
        pairs = [*HEADERS.items(), ("Content-Digest", current.content_digest(body))]
        components = current._REQUIRED_COMPONENTS
        return current._sign(private, "POST", URL, pairs, components, params, "dispatch")

    def general_parse(text: str, field: str) -> Any:
        return current._Parser(text, field).dictionary()

    def general_verify() -> object:
        return current._verify(public, "POST", URL, headers, body, parse=general_parse)

    sign: dict[str, Callable[[], Any]] = {
        "floor": lambda: (sha512(body).digest(), private.sign(base)),
        "general": general_sign,
        "baseline": lambda: baseline_signer.sign(body),
        "current": lambda: current_signer.sign(body),
    }
    verify: dict[str, Callable[[], Any]] = {
        "floor": lambda: (sha512(body).digest(), public.verify(signature, base)),
        "general": general_verify,
        "baseline": lambda: baseline.verify_request(public, "POST", URL, headers, body),
        "current": lambda: current.verify_request(public, "POST", URL, headers, body),
    }
    for fn in (*sign.values(), *verify.values()):
        fn()  # every implementation accepts these requests before it is timed

    times: dict[tuple[str, str], list[float]] = {}
    for round_ in range(args.rounds):
        for operation, table in (("sign", sign), ("verify", verify)):
            names = list(table)
            shift = round_ % len(names)  # rotate the order from round to round
            for name in names[shift:] + names[:shift]:
                times.setdefault((operation, name), []).append(per_call(table[name], args.number))

    print(f"body {args.body} B, {args.rounds} rounds of {args.number} calls")
    print(f"baseline: {MODULE} at {args.baseline}; current: the working tree")
    print(f"{'operation':<10}{'implementation':<16}{'median µs':>10}{'over floor':>12}")
    for operation, table in (("sign", sign), ("verify", verify)):
        medians = {name: statistics.median(times[operation, name]) for name in table}
        floor = medians["floor"]
        for name, value in medians.items():
            print(f"{operation:<10}{name:<16}{value:>10.2f}{value - floor:>12.2f}")
        over = (medians["baseline"] - floor, medians["current"] - floor)
        python = f"{over[0] / over[1]:.1f}x" if over[1] > 0 else "n/a (below the noise)"
        ratio = medians["baseline"] / medians["current"]
        print(f"{operation:<10}baseline/current: {ratio:.2f}x in all, {python} over the floor")


if __name__ == "__main__":
    main()
