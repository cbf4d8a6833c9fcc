"""A headless Chromium driven over the DevTools protocol, for tests of the live page.

Only what the tests need: open a page, evaluate JavaScript in it, wait for a condition,
take a screenshot. The browser resolves no host name (every name maps to nothing), so a
page that tried to load anything from the network would fail visibly rather than reach
out; it runs in a profile directory of its own and is ended by its PID.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
from typing import Any, Optional

import aiohttp

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> Optional[str]:
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


class Browser:
    """One headless Chromium with one page. ``async with Browser(profile) as b``."""

    def __init__(self, profile_dir: str, width: int = 1400, height: int = 1000):
        self.profile_dir = profile_dir
        self.size = (width, height)
        self.proc: Optional[subprocess.Popen] = None
        self.session: Optional[aiohttp.ClientSession] = None
        self.ws = None
        self._ids = itertools.count(1)
        self.console: list[str] = []
        #: Every URL the page asked for (Network.requestWillBeSent).
        self.requests: list[str] = []

    async def __aenter__(self) -> "Browser":
        exe = find_chromium()
        if exe is None:
            raise RuntimeError("no chromium installed (./dev setup installs Debian's chromium)")
        os.makedirs(self.profile_dir, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):  # a previous browser's port
            os.unlink(os.path.join(self.profile_dir, "DevToolsActivePort"))
        self.proc = subprocess.Popen([
            exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-extensions", "--disable-default-apps",
            "--no-proxy-server", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", f"--window-size={self.size[0]},{self.size[1]}",
            f"--user-data-dir={self.profile_dir}", "--remote-debugging-port=0", "about:blank",
        ], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            port = await self._devtools_port()
            self.session = aiohttp.ClientSession()
            async with self.session.get(f"http://127.0.0.1:{port}/json/list") as r:
                pages = [t for t in await r.json() if t.get("type") == "page"]
            self.ws = await self.session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
            await self.send("Page.enable")
            await self.send("Runtime.enable")
            await self.send("Network.enable")
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _devtools_port(self, timeout: float = 20.0) -> int:
        path = os.path.join(self.profile_dir, "DevToolsActivePort")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with code {self.proc.returncode}")
            try:
                with open(path) as f:
                    first = f.readline().strip()
                if first.isdigit():
                    return int(first)
            except FileNotFoundError:
                pass
            await asyncio.sleep(0.1)
        raise RuntimeError(f"chromium did not open its DevTools port within {timeout} s")

    async def send(self, method: str, **params: Any) -> dict:
        """One DevTools command; returns its result (events on the way are noted)."""
        ident = next(self._ids)
        await self.ws.send_json({"id": ident, "method": method, "params": params})
        while True:
            msg = await asyncio.wait_for(self.ws.receive(), 30)
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"DevTools connection closed ({msg.type})")
            data = json.loads(msg.data)
            if data.get("method") == "Runtime.consoleAPICalled":
                self.console.append(" ".join(str(a.get("value", a.get("description"))) for a in data["params"]["args"]))
            if data.get("method") == "Network.requestWillBeSent":
                self.requests.append(data["params"]["request"]["url"])
            if data.get("id") == ident:
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                return data.get("result", {})

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} raised {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 10.0, interval: float = 0.1) -> Any:
        """Until ``expression`` is truthy in the page; returns its value or raises."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last = None
        while loop.time() < deadline:
            try:
                last = await self.evaluate(expression)
            except RuntimeError:
                last = None
            if last:
                return last
            await asyncio.sleep(interval)
        raise AssertionError(f"{expression!r} not true within {timeout} s (last value {last!r}; console {self.console[-5:]})")

    async def screenshot(self, path: str) -> None:
        data = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        with open(path, "wb") as f:
            f.write(base64.b64decode(data["data"]))

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
            self.ws = None
        if self.session is not None:
            await self.session.close()
            self.session = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
