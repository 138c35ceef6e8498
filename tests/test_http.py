"""dispatch_aio.http against a real HTTP server on loopback, in and out of durable functions."""

from __future__ import annotations

import asyncio
import pickle
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from endpoint_driver import Driver, serve_app

from dispatch_aio import Dispatch, Status, errors, http
from dispatch_aio._codec import decode_error, encode_error
from dispatch_aio._status import Classifier


async def _status(request: web.Request) -> web.Response:
    code = int(request.match_info["code"])
    return web.Response(status=code, text=f"status {code} body")


async def _json(request: web.Request) -> web.Response:
    return web.json_response({"a": 1}, headers={"X-Multi": "1"})


async def _latin(request: web.Request) -> web.Response:
    return web.Response(body="café".encode("latin-1"), content_type="text/plain", charset="latin-1")


async def _echo(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "method": request.method,
            "query": dict(request.query),
            "header": request.headers.get("X-Test"),
            "body": await request.text(),
        }
    )


async def _slow(request: web.Request) -> web.Response:
    await asyncio.sleep(0.5)
    return web.Response(text="late")


@pytest.fixture
async def server() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_get("/status/{code}", _status)
    app.router.add_get("/json", _json)
    app.router.add_get("/latin", _latin)
    app.router.add_route("*", "/echo", _echo)
    app.router.add_get("/slow", _slow)
    runner, url = await serve_app(app)
    yield url
    await runner.cleanup()


async def test_get_returns_the_whole_response(server: str) -> None:
    response = await http.get(server + "/json")
    assert response.ok and response.status == 200 and response.reason == "OK"
    assert response.json() == {"a": 1}
    assert response.text() == '{"a": 1}'
    assert response.headers["x-multi"] == "1"  # case-insensitive
    assert response.url == server + "/json"
    assert response.method == "GET"
    assert (await http.get(server + "/latin")).text() == "café"


async def test_request_options(server: str) -> None:
    response = await http.post(
        server + "/echo", json={"k": [1, 2]}, params={"q": 3}, headers={"X-Test": "yes"}
    )
    assert response.json() == {
        "method": "POST",
        "query": {"q": "3"},
        "header": "yes",
        "body": '{"k": [1, 2]}',
    }
    for send in (http.put, http.patch, http.delete):
        assert (await send(server + "/echo", data="raw")).json()["body"] == "raw"
    assert (await http.request("options", server + "/echo")).json()["method"] == "OPTIONS"
    assert (await http.head(server + "/json")).body == b""
    with pytest.raises(ValueError, match="either json= or data="):
        await http.post(server + "/echo", json={}, data=b"")


@pytest.mark.parametrize(
    ("code", "error", "category", "status"),
    [
        (
            400,
            http.InvalidArgumentStatusError,
            errors.InvalidArgumentError,
            Status.INVALID_ARGUMENT,
        ),
        (401, http.UnauthenticatedStatusError, errors.UnauthenticatedError, Status.UNAUTHENTICATED),
        (
            403,
            http.PermissionDeniedStatusError,
            errors.PermissionDeniedError,
            Status.PERMISSION_DENIED,
        ),
        (404, http.NotFoundStatusError, errors.NotFoundError, Status.NOT_FOUND),
        (408, http.TimeoutStatusError, errors.DispatchTimeoutError, Status.TIMEOUT),
        (418, http.PermanentStatusError, errors.PermanentError, Status.PERMANENT_ERROR),
        (429, http.ThrottledStatusError, errors.ThrottledError, Status.THROTTLED),
        (500, http.TemporaryStatusError, errors.TemporaryError, Status.TEMPORARY_ERROR),
        (501, http.PermanentStatusError, errors.PermanentError, Status.PERMANENT_ERROR),
        (503, http.TemporaryStatusError, errors.TemporaryError, Status.TEMPORARY_ERROR),
    ],
)
async def test_error_statuses_raise_the_matching_errors(
    server: str, code: int, error: type[Exception], category: type[Exception], status: Status
) -> None:
    with pytest.raises(error) as caught:
        await http.get(server + f"/status/{code}?token=secret")
    exc = caught.value
    assert isinstance(exc, category) and isinstance(exc, http.HTTPStatusError)
    assert exc.status_code == code and exc.response.body == f"status {code} body".encode()
    assert f"GET {server}/status/{code} answered HTTP {code}" in str(exc)
    assert "secret" not in str(exc)  # the query string may hold credentials
    assert Classifier().status_for_error(exc) is status
    # It travels to a caller intact, response included.
    decoded = decode_error(encode_error(exc))
    assert type(decoded) is error
    assert isinstance(decoded, http.HTTPStatusError) and decoded.response == exc.response


async def test_error_statuses_can_be_returned_instead(server: str) -> None:
    response = await http.get(server + "/status/503", raise_for_status=False)
    assert not response.ok and response.status == 503
    assert http.response_status(response) is Status.TEMPORARY_ERROR
    assert pickle.loads(pickle.dumps(response)) == response
    with pytest.raises(http.TemporaryStatusError):
        response.raise_for_status()
    with pytest.raises(errors.InvalidResponseError, match="is not JSON"):
        response.json()


async def test_failures_without_a_response(server: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(errors.TCPError, match=f"GET http://127.0.0.1:{port}/x failed"):
        await http.get(f"http://127.0.0.1:{port}/x")
    with pytest.raises(errors.DispatchTimeoutError, match="/slow failed"):
        await http.get(server + "/slow", timeout=0.2)
    with pytest.raises(errors.InvalidArgumentError):
        await http.get("not a url")


async def test_a_given_session_is_used_and_left_open(server: str) -> None:
    async with aiohttp.ClientSession(headers={"X-Test": "session"}) as session:
        response = await http.get(server + "/echo", session=session)
        assert response.json()["header"] == "session"
        assert not session.closed


async def test_inside_durable_functions(server: str) -> None:
    dispatch = Dispatch(env={}, endpoint_addr="127.0.0.1:0", api_url="http://127.0.0.1:9")

    @dispatch.function(name="fetch")
    async def fetch(path: str) -> Any:
        return (await http.get(server + path)).json()

    @dispatch.function(name="fetch_with_session")
    async def fetch_with_session(path: str) -> Any:
        async with aiohttp.ClientSession(headers={"X-Test": "inner"}) as session:
            return (await http.get(server + path, session=session)).json()

    @dispatch.function(name="status_of")
    async def status_of(path: str) -> http.Response:
        return await http.get(server + path, raise_for_status=False)

    @dispatch.function(name="parent")
    async def parent(code: int) -> str:
        try:
            await fetch(f"/status/{code}")
        except errors.ThrottledError as exc:
            got = exc.status_code if isinstance(exc, http.HTTPStatusError) else None
            return f"throttled: {got}"
        return "no error"

    async with dispatch, await dispatch.start() as endpoint, aiohttp.ClientSession() as session:
        driver = Driver(session, endpoint.url)
        outcome = await driver.call("fetch", "/json")
        assert (outcome.status, outcome.output) == (Status.OK, {"a": 1})
        outcome = await driver.call("fetch_with_session", "/echo")
        assert (outcome.status, outcome.output["header"]) == (Status.OK, "inner")

        # An error status escaping the function is the call's status.
        outcome = await driver.call("fetch", "/status/429")
        assert outcome.status is Status.THROTTLED
        assert isinstance(outcome.error, http.ThrottledStatusError)

        # A returned response reports the status of its code.
        outcome = await driver.call("status_of", "/status/503")
        assert outcome.status is Status.TEMPORARY_ERROR
        assert isinstance(outcome.output, http.Response) and outcome.output.status == 503

        # A caller catches the error of a durable call by its category.
        assert (await driver.call("parent", 429)).output == "throttled: 429"
