"""Headless Chromium driven through chromedriver's W3C WebDriver HTTP protocol.

Just what the UI tests need, over aiohttp: no Selenium. `find_browser` says why the tests
skip when Chromium or chromedriver is missing (Debian: ``apt-get install chromium
chromium-driver``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from ports import free_port

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key of an element reference

_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


class WebDriverError(Exception):
    pass


def find_browser() -> tuple[str, str] | str:
    """Return (chromium, chromedriver) paths, or why they cannot be used."""
    driver = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
    browser = os.environ.get("CHROMIUM") or next(filter(None, map(shutil.which, _BROWSERS)), None)
    if not browser or not driver:
        missing = " and ".join(
            name for name, path in (("chromium", browser), ("chromedriver", driver)) if not path
        )
        return (
            f"{missing} not found: install Debian's chromium and chromium-driver packages "
            "(or set CHROMIUM and CHROMEDRIVER) to run the browser tests"
        )
    return browser, driver


class Browser:
    """One WebDriver session."""

    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self._http = http
        self._url = url

    async def _send(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body if body is not None else {}) if method == "POST" else None
        async with self._http.request(
            method, self._url + path, data=data, headers={"Content-Type": "application/json"}
        ) as resp:
            answer = await resp.json(content_type=None)
        value = answer.get("value") if isinstance(answer, dict) else None
        if resp.status != 200:
            error = value.get("error", "") if isinstance(value, dict) else ""
            message = value.get("message", "") if isinstance(value, dict) else answer
            raise WebDriverError(f"{method} {path}: {error}: {str(message)[:500]}")
        return value

    async def get(self, url: str) -> None:
        await self._send("POST", "/url", {"url": url})

    async def run(self, script: str, *args: Any) -> Any:
        """Run `script` (a function body) in the page and return its value."""
        return await self._send("POST", "/execute/sync", {"script": script, "args": list(args)})

    async def wait_for(self, script: str, *args: Any) -> Any:
        """Run `script` until it returns something truthy (10 s at most); return that."""
        last: Any = None
        try:
            async with asyncio.timeout(10):
                while True:
                    last = await self.run(script, *args)
                    if last:
                        return last
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {script!r}; last value {last!r}") from None

    async def find(self, css: str) -> str:
        value = await self._send("POST", "/element", {"using": "css selector", "value": css})
        return str(value[ELEMENT])

    async def click(self, css: str) -> None:
        # The page redraws on live updates: an element found just before may be replaced.
        for attempt in range(5):
            element = await self.find(css)
            try:
                await self._send("POST", f"/element/{element}/click")
                return
            except WebDriverError as exc:
                if "stale element" not in str(exc) or attempt == 4:
                    raise

    async def type(self, css: str, text: str) -> None:
        element = await self.find(css)
        await self._send("POST", f"/element/{element}/value", {"text": text})

    async def text(self, css: str) -> str:
        element = await self.find(css)
        return str(await self._send("GET", f"/element/{element}/text"))

    async def alert_open(self) -> bool:
        try:
            await self._send("GET", "/alert/text")
        except WebDriverError as exc:
            if "no such alert" in str(exc):
                return False
            raise
        return True

    async def screenshot(self, path: Path) -> Path:
        data = base64.b64decode(await self._send("GET", "/screenshot"))
        await asyncio.to_thread(path.write_bytes, data)
        return path


@asynccontextmanager
async def chromium(
    browser: str, driver: str, *, width: int = 1500, height: int = 1000
) -> AsyncIterator[Browser]:
    """Start chromedriver and a headless Chromium session; stop both on exit."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        driver,
        f"--port={port}",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            async with asyncio.timeout(15):
                while True:
                    try:
                        async with http.get(base + "/status") as resp:
                            if (await resp.json()).get("value", {}).get("ready"):
                                break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.05)
            capabilities = {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": browser,
                    "args": [
                        "--headless=new",
                        "--no-sandbox",  # CI runs as root
                        "--disable-gpu",
                        "--disable-dev-shm-usage",
                        "--no-first-run",
                        f"--window-size={width},{height}",
                    ],
                },
            }
            session = Browser(http, base)
            created = await session._send(
                "POST", "/session", {"capabilities": {"alwaysMatch": capabilities}}
            )
            session._url = f"{base}/session/{created['sessionId']}"
            try:
                yield session
            finally:
                await session._send("DELETE", "")
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                async with asyncio.timeout(5):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
