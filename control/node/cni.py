"""The daemon's side of ``mcnp-cni``: a unix-socket server that learns pod sandboxes.

The container runtime runs the chained plugin (csrc/mcnp_cni.c) for every pod sandbox;
the plugin sends one JSON line here and waits for one back. This module validates the
request, turns it into a :class:`Sandbox`, records it on disk and asks a handler (the
dataplane side) to take it. A pod must never carry traffic before it is enforced, so
ADD is answered ``ok`` only after the handler took the sandbox and its record is on
disk; DEL always ends with the record gone once the handler let go of it.

Why a record on disk: the kubelet reports a pod's IP only after ADD returns, and a
daemon restarted later must find every sandbox of its node again, including those whose
pods the API does not know yet. :func:`load_sandboxes` reads them back
(``<state_dir>/sandboxes/<containerID>.json``, written by write-temp, fsync, rename).

Wire format (one request per connection, one line each way)::

    -> {"command": "ADD"|"DEL"|"CHECK", "containerID", "netns", "ifname", "args",
        "path", "config": {the network configuration, with prevResult}}
    <- {"ok": true} | {"ok": false, "code": N, "msg": "...", "details": "..."}

Codes are the CNI spec's: 4 invalid configuration, 7 invalid environment, 11 try again
later, 999 anything else. A handler refuses by raising :class:`CniError`; anything else
it raises becomes a 999 reply, never a crash of the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import re
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Protocol

logger = logging.getLogger(__name__)

#: Where the daemon listens and the plugin connects unless the network configuration
#: names another path (its "socket" key).
DEFAULT_SOCKET = "/run/mcnp/cni.sock"
#: Where sandbox records live; must survive a daemon restart (a host directory).
DEFAULT_STATE_DIR = "/var/lib/mcnp"
#: Largest request accepted (the plugin itself sends at most ~600 KiB).
MAX_REQUEST = 1024 * 1024
#: Seconds a client may take to send its request, and the reply to be taken.
IO_TIMEOUT = 10.0

CODE_INCOMPATIBLE = 1
CODE_INVALID_CONFIG = 4
CODE_INVALID_ENV = 7
CODE_TRY_LATER = 11
CODE_OTHER = 999

COMMANDS = ("ADD", "DEL", "CHECK")
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")

#: CNI spec: a container ID is alphanumerics, hyphen, underscore and period; it also
#: names the record file, so it must not start with a period.
_CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,254}")
_IFNAME = re.compile(r"[^/\s:]{1,15}")


class CniError(Exception):
    """A refusal the plugin passes on to the runtime as a CNI error."""

    def __init__(self, code: int, msg: str, details: str = ""):
        super().__init__(f"{msg}: {details}" if details else msg)
        self.code, self.msg, self.details = code, msg, details

    def reply(self) -> dict:
        return {"ok": False, "code": self.code, "msg": self.msg, "details": self.details}


@dataclass(frozen=True)
class Sandbox:
    """One pod sandbox as the CNI chain built it."""

    container_id: str
    netns: str  # path of the sandbox's network namespace
    ifname: str  # the interface inside the sandbox (CNI_IFNAME)
    namespace: str  # K8S_POD_NAMESPACE, "" when the runtime gave none
    pod_name: str  # K8S_POD_NAME, "" when the runtime gave none
    ips: tuple[str, ...]  # addresses of prevResult.ips, without prefix length
    mac: str  # MAC of the sandbox interface in prevResult, or ""
    host_ifname: str  # the host-side veth named in prevResult (not the bridge), or ""

    def to_json(self) -> dict:
        return {**asdict(self), "ips": list(self.ips)}

    @classmethod
    def from_json(cls, data: Any) -> "Sandbox":
        """The inverse of :meth:`to_json`; ValueError when the shape is wrong."""
        names = [f for f in cls.__dataclass_fields__]
        if not isinstance(data, dict) or set(data) != set(names):
            raise ValueError(f"expected the keys {', '.join(names)}")
        if not isinstance(data["ips"], list) or not all(isinstance(i, str) for i in data["ips"]):
            raise ValueError("ips must be a list of strings")
        for name in names:
            if name != "ips" and not isinstance(data[name], str):
                raise ValueError(f"{name} must be a string")
        if not _CONTAINER_ID.fullmatch(data["container_id"]):
            raise ValueError(f"invalid container id {data['container_id']!r}")
        for ip in data["ips"]:
            ipaddress.ip_address(ip)
        return cls(**{**data, "ips": tuple(data["ips"])})


class Handler(Protocol):
    """What the server calls; raise :class:`CniError` to refuse."""

    async def add(self, sandbox: Sandbox) -> None: ...

    async def check(self, sandbox: Sandbox) -> None: ...

    async def delete(self, container_id: str, sandbox: Optional[Sandbox]) -> None: ...


# --------------------------------------------------------------------------- validation


def parse_cni_args(text: str) -> dict[str, str]:
    """``K=V;K=V`` (CNI_ARGS) as a dict; an item without ``=`` is invalid (code 7)."""
    out: dict[str, str] = {}
    for item in text.split(";") if text else []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CniError(CODE_INVALID_ENV, "invalid CNI_ARGS", f"{item!r} is not KEY=VALUE")
        out[key] = value
    return out


def _string(req: dict, key: str, code: int) -> str:
    value = req.get(key, "")
    if not isinstance(value, str):
        raise CniError(code, "invalid request", f"{key} must be a string")
    return value


def _address(entry: Any) -> str:
    if not isinstance(entry, dict) or not isinstance(entry.get("address"), str):
        raise CniError(CODE_INVALID_CONFIG, "invalid prevResult", "every entry of ips needs an address")
    try:
        return str(ipaddress.ip_interface(entry["address"]).ip)
    except ValueError as e:
        raise CniError(CODE_INVALID_CONFIG, "invalid prevResult", f"ips: {e}") from None


def _interfaces(prev: dict) -> list[dict]:
    interfaces = prev.get("interfaces", [])
    if not isinstance(interfaces, list) or not all(isinstance(i, dict) for i in interfaces):
        raise CniError(CODE_INVALID_CONFIG, "invalid prevResult", "interfaces must be a list of objects")
    for i in interfaces:
        if not isinstance(i.get("name", ""), str) or not isinstance(i.get("mac", ""), str) \
                or not isinstance(i.get("sandbox", ""), str):
            raise CniError(CODE_INVALID_CONFIG, "invalid prevResult", "interface name, mac and sandbox must be strings")
    return interfaces


def _sandbox_interfaces(prev: dict, ifname: str, bridge: str) -> tuple[str, str]:
    """(mac of the sandbox interface, host-side veth) named by prevResult."""
    interfaces = _interfaces(prev)
    inside = [i for i in interfaces if i.get("sandbox")]
    mine = [i for i in inside if i.get("name") == ifname] or inside
    mac = mine[0].get("mac", "") if mine else ""
    host = [i.get("name", "") for i in interfaces if not i.get("sandbox") and i.get("name") and i.get("name") != bridge]
    return mac, host[0] if host else ""


def _config(req: dict) -> dict:
    config = req.get("config")
    if not isinstance(config, dict):
        raise CniError(CODE_INVALID_CONFIG, "invalid network configuration", "config must be an object")
    version = config.get("cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(CODE_INCOMPATIBLE, "incompatible CNI version",
                       f"cniVersion {version!r}; supported: {' '.join(SUPPORTED_VERSIONS)}")
    return config


def sandbox_from_request(req: dict) -> Sandbox:
    """The sandbox an ADD or CHECK request describes; CniError (4 or 7) if invalid."""
    config = _config(req)
    container_id = container_id_of(req)
    netns, ifname = _string(req, "netns", CODE_INVALID_ENV), _string(req, "ifname", CODE_INVALID_ENV)
    if not netns.startswith("/"):
        raise CniError(CODE_INVALID_ENV, "invalid CNI_NETNS", f"{netns!r} is not an absolute path")
    if not _IFNAME.fullmatch(ifname):
        raise CniError(CODE_INVALID_ENV, "invalid CNI_IFNAME", f"{ifname!r} is not an interface name")
    args = parse_cni_args(_string(req, "args", CODE_INVALID_ENV))
    prev = config.get("prevResult")
    if not isinstance(prev, dict):
        raise CniError(CODE_INVALID_CONFIG, "invalid network configuration",
                       "no prevResult: mcnp-cni must be chained after a plugin that creates the interface")
    ips = prev.get("ips", [])
    if not isinstance(ips, list):
        raise CniError(CODE_INVALID_CONFIG, "invalid prevResult", "ips must be a list")
    bridge = config.get("bridge", "") if isinstance(config.get("bridge"), str) else ""
    mac, host_ifname = _sandbox_interfaces(prev, ifname, bridge)
    return Sandbox(container_id=container_id, netns=netns, ifname=ifname,
                   namespace=args.get("K8S_POD_NAMESPACE", ""), pod_name=args.get("K8S_POD_NAME", ""),
                   ips=tuple(_address(e) for e in ips), mac=mac, host_ifname=host_ifname)


def container_id_of(req: dict) -> str:
    container_id = _string(req, "containerID", CODE_INVALID_ENV)
    if not _CONTAINER_ID.fullmatch(container_id):
        raise CniError(CODE_INVALID_ENV, "invalid CNI_CONTAINERID",
                       f"{container_id[:80]!r}: letters, digits, '-', '_' and '.' only")
    return container_id


def parse_request(line: bytes) -> dict:
    """One request line as a dict with a known command; CniError otherwise."""
    try:
        req = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise CniError(CODE_INVALID_CONFIG, "malformed request", str(e)[:200]) from None
    if not isinstance(req, dict):
        raise CniError(CODE_INVALID_CONFIG, "malformed request", "not a JSON object")
    if req.get("command") not in COMMANDS:
        raise CniError(CODE_INVALID_ENV, "invalid CNI_COMMAND", f"{str(req.get('command'))[:40]!r}")
    return req


# --------------------------------------------------------------------------- records


def _records(state_dir: str | os.PathLike) -> Path:
    return Path(state_dir) / "sandboxes"


def save_sandbox(state_dir: str | os.PathLike, sandbox: Sandbox) -> None:
    """Write the sandbox's record atomically: temp file, fsync, rename, fsync the dir."""
    directory = _records(state_dir)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(directory / f"{sandbox.container_id}.json", json.dumps(sandbox.to_json(), sort_keys=True).encode())


def atomic_write(path: str | os.PathLike, data: bytes, mode: int = 0o600) -> None:
    """Replace path with data so that a reader sees the old file or the new one, never
    a part (write a hidden temp file beside it, fsync, rename, fsync the directory).
    A temp file left by a crash starts with a period and ends with ``.tmp``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fchmod(fd, mode)  # not narrowed by the umask
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def remove_sandbox(state_dir: str | os.PathLike, container_id: str) -> None:
    directory = _records(state_dir)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(directory / f"{container_id}.json")
        _fsync_dir(directory)


def read_sandbox(state_dir: str | os.PathLike, container_id: str) -> Optional[Sandbox]:
    """The record of one container, None when there is none or it is unreadable."""
    path = _records(state_dir) / f"{container_id}.json"
    try:
        return Sandbox.from_json(json.loads(path.read_bytes()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        logger.warning("Sandbox record %s is unreadable: %s", path, e)
        return None


def load_sandboxes(state_dir: str | os.PathLike, problems: Optional[list[str]] = None) -> list[Sandbox]:
    """Every recorded sandbox; corrupt records are skipped, logged and listed in problems."""
    out: list[Sandbox] = []
    directory = _records(state_dir)
    if not directory.is_dir():
        return out
    for path in sorted(directory.glob("*.json")):
        if path.name.startswith("."):
            continue  # a temp file a crash left behind
        try:
            sandbox = Sandbox.from_json(json.loads(path.read_bytes()))
            if path.name != f"{sandbox.container_id}.json":
                raise ValueError(f"holds container {sandbox.container_id}")
        except (OSError, ValueError) as e:
            message = f"{path}: skipped, not a sandbox record: {e}"
            logger.warning("%s", message)
            if problems is not None:
                problems.append(message)
            continue
        out.append(sandbox)
    return out


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- the server


class CniServer:
    """Answers mcnp-cni on a unix socket (mode 0600), one request per connection."""

    def __init__(self, handler: Handler, state_dir: str | os.PathLike = DEFAULT_STATE_DIR, *,
                 max_request: int = MAX_REQUEST, io_timeout: float = IO_TIMEOUT):
        self.handler = handler
        self.state_dir = Path(state_dir)
        self.max_request = max_request
        self.io_timeout = io_timeout
        self.path: Optional[str] = None
        self._server: Optional[asyncio.base_events.Server] = None
        self._inode: Optional[tuple[int, int]] = None
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}  # container -> (lock, [users])

    async def start(self, path: str = DEFAULT_SOCKET) -> None:
        """Listen on path. The socket is bound under a temporary name, given mode 0600
        and renamed into place, so it is never reachable with a wider mode. A live
        socket at path (another daemon) is an error; a stale one is replaced."""
        parent = os.path.dirname(path) or "."
        os.makedirs(parent, mode=0o755, exist_ok=True)
        if _answers(path):
            raise OSError(f"{path}: another process is listening there")
        tmp = os.path.join(parent, f".{os.path.basename(path)}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(tmp)
            os.chmod(tmp, 0o600)
            sock.listen(128)
            os.replace(tmp, path)
        except BaseException:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        st = os.stat(path)
        self.path, self._inode = path, (st.st_dev, st.st_ino)
        self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=self.max_request)
        logger.info("CNI socket listening on %s", path)

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        await self._server.wait_closed()
        self._server = None
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:  # not replaced by a newer daemon
                os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                line = await asyncio.wait_for(reader.readuntil(b"\n"), self.io_timeout)
                reply = await self.dispatch(parse_request(line))
            except CniError as e:
                reply = e.reply()
            except asyncio.LimitOverrunError:
                reply = CniError(CODE_INVALID_CONFIG, "request too large", f"more than {self.max_request} bytes").reply()
            except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError) as e:
                logger.warning("CNI request not received: %s", type(e).__name__)
                return
            writer.write(json.dumps(reply).encode() + b"\n")
            await asyncio.wait_for(writer.drain(), self.io_timeout)
        except (asyncio.TimeoutError, ConnectionError) as e:
            logger.warning("CNI reply not delivered: %s", type(e).__name__)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def dispatch(self, req: dict) -> dict:
        """Run one validated request; the reply as a dict. Requests about the same
        container run one at a time."""
        container_id = container_id_of(req)
        lock, users = self._locks.setdefault(container_id, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                return await self._run(req["command"], container_id, req)
        except CniError:
            raise
        except Exception as e:
            logger.exception("CNI %s %s: the handler failed", req["command"], container_id)
            raise CniError(CODE_OTHER, "mcnp daemon error", f"{type(e).__name__}: {e}"[:400]) from None
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._locks[container_id]

    async def _run(self, command: str, container_id: str, req: dict) -> dict:
        if command == "DEL":
            await self.handler.delete(container_id, read_sandbox(self.state_dir, container_id))
            remove_sandbox(self.state_dir, container_id)
            logger.info("CNI DEL %s", container_id)
            return {"ok": True}
        sandbox = sandbox_from_request(req)
        if command == "CHECK":
            if read_sandbox(self.state_dir, container_id) is None:
                raise CniError(CODE_OTHER, "unknown sandbox", f"no ADD was recorded for {container_id}")
            await self.handler.check(sandbox)
            return {"ok": True}
        # ADD: recorded first, so a daemon that dies before answering finds it again
        # (the runtime then sees a failed ADD and sends DEL); refused: forgotten.
        save_sandbox(self.state_dir, sandbox)
        try:
            await self.handler.add(sandbox)
        except BaseException:
            remove_sandbox(self.state_dir, container_id)
            raise
        logger.info("CNI ADD %s: %s/%s %s", container_id, sandbox.namespace, sandbox.pod_name, ",".join(sandbox.ips))
        return {"ok": True}


def _answers(path: str) -> bool:
    """Whether something accepts connections on the unix socket at path."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()
