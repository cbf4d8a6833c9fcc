"""The directory source: ``dir:PATH``, a manifest directory followed for changes.

The directory is checked (stat signatures, then a content hash of the files whose
signature changed) when inotify says something happened in it, and every
``dir_rescan_interval`` anyway; where inotify is unavailable (not Linux, no instances
left, a filesystem without it) every ``dir_poll_interval``. Files are parsed off the
event loop; unchanged files keep their very same parsed dicts, so the store skips them.

A file takes effect only once it is completely written (rule S9: a half-written file
must never count as the operator's intent, and a truncated one must not read as
deletions). A changed file is read when

* no writer holds it: inotify saw it closed after writing (``IN_CLOSE_WRITE``) or
  renamed into place (``IN_MOVED_TO``) since it was last modified, and
* it has settled: its size, mtime and inode stayed the same for ``dir_settle_interval``
  (and did not change while it was read).

Every check obeys both, the periodic safety net included; until then the file's
previous documents stay in force. A file that cannot be parsed once settled keeps its
last parsed contents too, and is reported.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import hashlib
import logging
import os
import struct
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

from control.node.config import ClusterSource, Settings
from control.node.sources.supervise import Backoff, supervise
from control.node.store import ClusterSink, DocDiff
from control.semantics import manifests
from control.semantics.model import InvalidObject

logger = logging.getLogger(__name__)


@dataclass
class _File:
    signature: tuple
    digest: bytes
    docs: list  # [(source, obj)]
    error: Optional[str] = None


# inotify(7): what wakes a directory check. A file written in place wakes on close, a
# file renamed over another (how editors and kubectl-like tools write) on the move;
# IN_MODIFY and IN_CREATE mark a file as being written until one of those two.
IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE, IN_MOVED_FROM, IN_MOVED_TO = 0x2, 0x4, 0x8, 0x40, 0x80
IN_CREATE, IN_DELETE, IN_DELETE_SELF, IN_MOVE_SELF = 0x100, 0x200, 0x400, 0x800
IN_Q_OVERFLOW, IN_IGNORED, IN_ISDIR = 0x4000, 0x8000, 0x40000000
_WATCH_MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
               | IN_DELETE_SELF | IN_MOVE_SELF)
_IN_NONBLOCK, _IN_CLOEXEC = os.O_NONBLOCK, getattr(os, "O_CLOEXEC", 0o2000000)
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of name)
_libc = None


class DirWatch:
    """inotify on one directory (Linux, through ctypes): a file descriptor that turns
    readable when something in the directory changes. :meth:`open` returns None where
    inotify is unavailable; the caller then polls."""

    def __init__(self, fd: int):
        self.fd = fd
        #: False once the directory itself went away (deleted, moved, unmounted).
        self.alive = True
        #: Names of the files being written: modified or created, not yet closed after
        #: writing nor renamed into place. Read by the directory check in its thread.
        self.writing: set[str] = set()

    @classmethod
    def open(cls, path: str) -> Optional["DirWatch"]:
        global _libc
        if not sys.platform.startswith("linux"):
            return None
        try:
            if _libc is None:
                _libc = ctypes.CDLL(None, use_errno=True)
            fd = _libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        except (OSError, AttributeError) as e:
            logger.debug("inotify unavailable: %s", e)
            return None
        if fd < 0:
            logger.debug("inotify_init1: %s", os.strerror(ctypes.get_errno()))
            return None
        if _libc.inotify_add_watch(fd, os.fsencode(path), _WATCH_MASK) < 0:
            logger.debug("inotify_add_watch %s: %s", path, os.strerror(ctypes.get_errno()))
            os.close(fd)
            return None
        return cls(fd)

    def drain(self) -> int:
        """Read every pending event (following which files are being written);
        returns how many there were."""
        count = 0
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return count
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                self.alive = False
                return count
            if not data:
                return count
            pos = 0
            while pos + _EVENT.size <= len(data):
                _, mask, _, length = _EVENT.unpack_from(data, pos)
                name = data[pos + _EVENT.size: pos + _EVENT.size + length].rstrip(b"\0")
                pos += _EVENT.size + length
                count += 1
                self._note(mask, os.fsdecode(name))

    def _note(self, mask: int, name: str) -> None:
        if mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED):
            self.alive = False
        elif mask & IN_Q_OVERFLOW:
            self.writing.clear()  # events were lost: the settle rule alone decides
        elif mask & IN_ISDIR or not name:
            return
        elif mask & (IN_MODIFY | IN_CREATE):
            self.writing.add(name)
        elif mask & (IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE):
            self.writing.discard(name)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class DirSource:
    """A manifest directory. :meth:`poll` is synchronous and may run in a thread;
    :meth:`run` checks the directory whenever inotify reports a change (at most
    ``rescan`` seconds apart; every ``interval`` seconds without inotify, and when a
    changed file is due to have settled) and feeds the sink on the event loop."""

    def __init__(self, spec: ClusterSource, sink: ClusterSink, interval: float = 0.25,
                 rescan: Optional[float] = 1.0, watch: bool = True, settle: Optional[float] = None,
                 backoff: Optional[Backoff] = None, clock: Callable[[], float] = time.monotonic):
        self.spec = spec
        self.path = spec.path or ""
        self.sink = sink
        self.interval = interval
        self.rescan = rescan if rescan is not None else interval
        self.watch = watch
        #: Seconds a changed file's signature must stay the same before it is read.
        self.settle = Settings.dir_settle_interval if settle is None else settle
        self.backoff = backoff or Backoff(Settings.backoff_initial, Settings.backoff_max)
        self.clock = clock
        self._files: dict[str, _File] = {}
        self._listing: Optional[tuple] = None
        #: Changed files not read yet: path -> (signature, when it was first seen so;
        #: None while a writer holds the file).
        self._unsettled: dict[str, tuple[tuple, Optional[float]]] = {}
        self.reloads = 0
        self.diff: Optional[DocDiff] = None
        #: Directory checks by cause: inotify event, timer, a changed file settling.
        self.wakeups = {"inotify": 0, "timer": 0, "settle": 0}
        self._watch: Optional[DirWatch] = None
        self._woken: Optional[asyncio.Event] = None

    def _signatures(self) -> dict[str, tuple]:
        out = {}
        with os.scandir(self.path) as it:
            for entry in it:
                if entry.name.endswith(manifests.SUFFIXES) and not entry.name.startswith(".") and entry.is_file():
                    st = entry.stat()
                    out[entry.path] = (st.st_mtime_ns, st.st_size, st.st_ino)
        return out

    @property
    def unsettled(self) -> list[str]:
        """Files changed on disk whose new contents are not in force yet (being
        written, or not settled): their previous documents stay."""
        return sorted(self._unsettled)

    def settle_due(self) -> Optional[float]:
        """Seconds until the next changed file may have settled (None: none pending)."""
        seen = [t for _, t in self._unsettled.values() if t is not None]
        if not seen:
            return None  # nothing, or only files being written: their close wakes a check
        return max(0.0, min(seen) + self.settle - self.clock())

    def _settled(self, path: str, sig: tuple, writing: frozenset) -> bool:
        """Whether a changed file may be read now (see the module's docstring)."""
        now = self.clock()
        if os.path.basename(path) in writing:
            self._unsettled[path] = (sig, None)  # the settle interval starts at the close
            return False
        pending = self._unsettled.get(path)
        if pending is None or pending[0] != sig or pending[1] is None:
            self._unsettled[path] = (sig, now)
            return self.settle <= 0
        return now - pending[1] >= self.settle

    def _read(self, path: str, sig: tuple) -> Optional[bytes]:
        """A settled file's contents, or None when it changed meanwhile (it is then
        pending again) or vanished (the next check sees that)."""
        try:
            with open(path, "rb") as f:
                data = f.read(manifests.MAX_FILE_BYTES + 1)
                st = os.fstat(f.fileno())
        except OSError as e:
            logger.debug("Directory %s: %s", self.path, e)
            self._listing = None
            return None
        now_sig = (st.st_mtime_ns, st.st_size, st.st_ino)
        if now_sig != sig or len(data) != st.st_size:
            self._unsettled[path] = (now_sig, self.clock())
            return None
        self._unsettled.pop(path, None)
        return data

    def poll(self, writing: frozenset = frozenset()) -> Optional[list]:
        """Check the directory; ``writing`` names the files being written. Returns
        every document when something in force changed (for
        :meth:`ClusterSink.replace_all`), None when nothing did. Raises OSError when
        the directory cannot be read."""
        sigs = self._signatures()
        listing = tuple(sorted(sigs.items()))
        if listing == self._listing and not self._unsettled:
            return None
        self._listing = listing
        changed = set(self._files) - set(sigs)
        gone: list = []  # documents no longer there (kept alive until the sink saw them)
        for path in list(changed):
            gone.extend(self._files.pop(path).docs)
        for path in [p for p in self._unsettled if p not in sigs]:
            del self._unsettled[path]
        added: list = []
        for path, sig in sigs.items():
            old = self._files.get(path)
            if old is not None and old.signature == sig:
                self._unsettled.pop(path, None)
                continue
            if not self._settled(path, sig, writing):
                continue
            data = self._read(path, sig)
            if data is not None and self._load(path, sig, data, old, added, gone):
                changed.add(path)
        if not changed and self.reloads:
            return None
        if not self.reloads and self._unsettled:
            return None  # the first list waits for every file to be complete
        self.reloads += 1
        #: What this reload changed, for :meth:`ClusterSink.replace_all`.
        self.diff = DocDiff(self.reloads - 1 if self.reloads > 1 else None, self.reloads, added, gone)
        return [doc for path in sorted(self._files) for doc in self._files[path].docs]

    def _load(self, path: str, sig: tuple, data: bytes, old: Optional[_File], added: list, gone: list) -> bool:
        """Parse one settled file into ``_files``; returns whether its contents changed."""
        digest = hashlib.blake2b(data, digest_size=16).digest()
        if old is not None and old.digest == digest:
            old.signature = sig
            return False
        try:
            if len(data) > manifests.MAX_FILE_BYTES:
                manifests.read_bytes(path)  # raises, naming the file and the limit
            parsed = manifests.split_documents(path, manifests.parse_documents(path, data))
            docs = [(d.source, d.obj) for d in parsed]
        except InvalidObject as err:
            # Rule S9 at file level: what the file said last stays in force.
            logger.warning("Cluster %s: %s", self.sink.name, err)
            self._files[path] = _File(sig, digest, old.docs if old else [], str(err))
            return True
        self._files[path] = _File(sig, digest, docs)
        added.extend(docs)
        gone.extend(old.docs if old else ())
        return True

    @property
    def file_errors(self) -> dict[str, str]:
        return {p: f.error for p, f in self._files.items() if f.error}

    async def step(self) -> None:
        """One poll, parsed in a worker thread, applied on the event loop."""
        loop = asyncio.get_running_loop()
        writing = frozenset(self._watch.writing) if self.watched else frozenset()
        try:
            docs = await loop.run_in_executor(None, self.poll, writing)
        except OSError as e:
            self.sink.down(f"directory {self.path}: {e.strerror or e}")
            self._listing = None
            return
        self.sink.up()
        self.sink.file_errors = self.file_errors
        if docs is not None:
            self.sink.replace_all(docs, self.diff)
            self.diff = None  # let the gone documents go

    @property
    def watched(self) -> bool:
        """Whether inotify is following the directory now."""
        return self._watch is not None and self._watch.alive

    def _ensure_watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Follow the directory with inotify when possible (again after it was
        replaced): set up before a check, so nothing between the two is missed."""
        if not self.watch or self.watched:
            return
        self._drop_watch(loop)
        self._watch = DirWatch.open(self.path)
        if self._watch is not None:
            loop.add_reader(self._watch.fd, self._on_event)

    def _drop_watch(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._watch is not None:
            loop.remove_reader(self._watch.fd)
            self._watch.close()
            self._watch = None

    def _on_event(self) -> None:
        if self._watch is not None and self._watch.drain() and self._woken is not None:
            self._woken.set()

    async def run(self) -> None:
        """Follow the directory until cancelled; a crash of this source is reported
        and the source restarted (:func:`supervise`)."""
        await supervise(self.sink, self._run_once, self.backoff, self._forget_listing)

    def _forget_listing(self) -> None:
        self._listing = None  # check everything again after a restart

    async def _run_once(self) -> None:
        loop = asyncio.get_running_loop()
        self._woken = asyncio.Event()
        try:
            while True:
                self._ensure_watch(loop)
                self._woken.clear()
                await self.step()
                if self._woken.is_set():
                    self.wakeups["inotify"] += 1
                    continue  # changed again while it was read
                await self._wait()
        finally:
            self._drop_watch(loop)

    async def _wait(self) -> None:
        """Until inotify reports a change, a changed file may have settled, or the
        periodic check is due, whichever comes first."""
        period = self.rescan if self.watched else self.interval
        due = self.settle_due()
        timeout = period if due is None else min(period, due + 0.001)
        try:
            await asyncio.wait_for(self._woken.wait(), timeout)
            self.wakeups["inotify"] += 1
        except asyncio.TimeoutError:
            self.wakeups["settle" if due is not None and due < period else "timer"] += 1
