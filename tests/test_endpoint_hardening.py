"""The endpoint refuses replayed signed requests, and unsigned ones from other machines."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from endpoint_driver import RUN_PATH, Driver
from test_endpoint import build_dispatch, connect_error, run_request

from dispatch_aio import Status
from dispatch_aio._signature import (
    InvalidSignatureError,
    ReplayGuard,
    Verified,
    public_key_to_base64,
    sign_request,
    verify_request,
)

KEY = Ed25519PrivateKey.generate()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_a_captured_signed_request_runs_once(session: aiohttp.ClientSession) -> None:
    runs: list[str] = []
    dispatch = build_dispatch(verification_key=public_key_to_base64(KEY.public_key()))

    @dispatch.function(name="effect")
    async def effect(x: str) -> str:
        runs.append(x)
        return x

    async with await dispatch.start() as server:
        driver = Driver(session, server.url, key=KEY)
        body = run_request("effect", "once")
        captured = driver.signed_headers(body)
        first = await driver.post(body, captured)
        assert Status(first.run_response().status) is Status.OK
        for _ in range(20):
            reply = await driver.post(body, captured)
            assert connect_error(reply) == (403, "permission_denied")
            assert b"already received" in reply.body
        # The same body signed anew, in the same second, is a new request: it runs.
        again = await driver.post(body, driver.signed_headers(body))
        assert Status(again.run_response().status) is Status.OK
    assert runs == ["once", "once"]


def test_two_signatures_of_one_request_differ() -> None:
    headers = {"Content-Type": "application/proto"}
    url = "http://127.0.0.1:1" + RUN_PATH
    one = sign_request(KEY, "POST", url, headers, b"body", created=1000)
    two = sign_request(KEY, "POST", url, headers, b"body", created=1000)
    assert one["Signature"] != two["Signature"]
    assert "nonce=" in one["Signature-Input"]
    verified = verify_request(KEY.public_key(), "POST", url, headers | one, b"body", now=1000)
    assert verified.created == 1000


def test_replay_guard_forgets_what_left_the_window() -> None:
    guard = ReplayGuard(max_age=10)
    guard.admit(Verified(b"a", 100), now=100)
    with pytest.raises(InvalidSignatureError, match="already received"):
        guard.admit(Verified(b"a", 100), now=105)
    guard.admit(Verified(b"b", 105), now=105)
    guard.admit(Verified(b"c", 112), now=112)  # "a" (created 100) left the window at 110
    assert len(guard) == 2


def test_replay_guard_stays_within_its_capacity_and_refuses_what_it_forgot() -> None:
    guard = ReplayGuard(capacity=3, max_age=300)
    for i in range(10):
        guard.admit(Verified(bytes([i]), 1000 + i), now=1000 + i)
        assert len(guard) <= 3
    # Signatures 0..6 were forgotten: anything created at or before 1006 is refused,
    # replayed or not, since the guard can no longer tell.
    for created in (1000, 1006):
        with pytest.raises(InvalidSignatureError, match="cannot be told apart"):
            guard.admit(Verified(b"new", created), now=1010)
    with pytest.raises(InvalidSignatureError, match="already received"):
        guard.admit(Verified(bytes([9]), 1009), now=1010)
    guard.admit(Verified(b"fresh", 1010), now=1010)


def _outbound_address() -> str:
    """This machine's address on its default route (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("203.0.113.1", 9))  # TEST-NET-3: chooses a route, sends nothing
        except OSError:
            return "127.0.0.1"  # no route at all
        return str(probe.getsockname()[0])


@pytest.mark.parametrize("insecure", [False, True])
async def test_mounted_routes_refuse_unsigned_requests_from_other_machines(
    session: aiohttp.ClientSession, insecure: bool
) -> None:
    address = _outbound_address()
    if address.startswith("127."):
        pytest.skip("this machine has no address other than loopback")
    dispatch = build_dispatch(insecure=insecure)  # no verification key
    app = web.Application()
    app.add_routes(dispatch.routes())
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "0.0.0.0", 0)
    await site.start()
    try:
        body = run_request("add", 2, 3)
        headers = {"Content-Type": "application/proto"}
        local = await Driver(session, f"http://127.0.0.1:{site.port}").post(body, headers)
        assert Status(local.run_response().status) is Status.OK
        remote = await Driver(session, f"http://{address}:{site.port}").post(body, headers)
        if insecure:
            assert Status(remote.run_response().status) is Status.OK
        else:
            assert connect_error(remote) == (403, "permission_denied")
            assert address.encode() in remote.body
            assert b"DISPATCH_VERIFICATION_KEY" in remote.body
            assert b"DISPATCH_INSECURE" in remote.body
    finally:
        await runner.cleanup()
