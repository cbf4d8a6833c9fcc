"""A daemon on manifest directories inside the test's own event loop, with an HTTP
client for its REST endpoint — shared by the API, daemon and source tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any, Optional

import aiohttp

from control.node.config import ClusterSource, Settings
from control.node.daemon import Daemon


def dir_settings(specs: list[tuple[str, str]], local: Optional[str] = None, **overrides: Any) -> Settings:
    s = Settings(
        node_name="node-1",
        local_cluster=local or specs[0][0],
        clusters=[ClusterSource(name, "dir", path) for name, path in specs],
        api_listen="127.0.0.1:0",
        dir_poll_interval=0.05,
        coalesce_delay=0.005,
    )
    for k, v in overrides.items():
        setattr(s, k, v)
    return s.validate()


class Client:
    """GETs against a running daemon's REST endpoint, TCP or unix socket."""

    def __init__(self, daemon: Daemon):
        listen = daemon.settings.api_listen
        if listen.startswith("unix:"):
            self.session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=listen[5:]))
            self.base = "http://mcnp"
        else:
            host, port = daemon.api_addresses[0][:2]
            self.session = aiohttp.ClientSession()
            self.base = f"http://{host}:{port}"

    async def get(self, path: str, **params: Any) -> tuple[int, Any]:
        async with self.session.get(self.base + path, params={k: str(v) for k, v in params.items()}) as r:
            if r.content_type == "application/json":
                return r.status, await r.json()
            return r.status, await r.text()

    async def close(self) -> None:
        await self.session.close()


@contextlib.asynccontextmanager
async def running(settings: Settings, settle: bool = True, **kwargs: Any):
    daemon = Daemon(settings, **kwargs)
    await daemon.start()
    client = Client(daemon) if daemon.api_addresses or settings.api_listen.startswith("unix:") else None
    try:
        if settle:
            await daemon.wait_settled(10)
        yield daemon, client
    finally:
        if client is not None:
            await client.close()
        await daemon.stop()


async def eventually(predicate, timeout: float = 2.0, interval: float = 0.02):
    """Wait until ``await predicate()`` is truthy; returns its value or raises."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


def write_yaml(path: str, text: str) -> None:
    """Write atomically, as kubectl-style tooling and editors do (rename)."""
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
