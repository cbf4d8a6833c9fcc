"""What keeps a source running: backoff between attempts, and a supervisor that turns
a crashed source into a visible, restarted one instead of a dead and silent task.

A source's task dying would leave its cluster's last state in force with nothing
saying that it no longer follows changes (``/readyz`` still 200). Under
:func:`supervise` any exception out of a source is reported on its cluster
(:meth:`ClusterSink.failed`: not ready, the reason in ``last_error``, the log) and
the source is started again after a jittered, growing wait.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import traceback
from typing import Awaitable, Callable, Optional

from control.node.store import ClusterSink, redact

logger = logging.getLogger(__name__)


class Backoff:
    """Exponential backoff with full jitter, so many nodes do not reconnect in step."""

    def __init__(self, initial: float, maximum: float, rng: Optional[random.Random] = None):
        self.initial, self.maximum = initial, maximum
        self.attempt = 0
        self.rng = rng or random.Random()

    def next(self) -> float:
        ceiling = min(self.maximum, self.initial * (2 ** self.attempt))
        self.attempt += 1
        return self.rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0


def describe_error(e: BaseException) -> str:
    """``Type: first line`` of an exception, credentials masked (the one place source
    errors become text). An exception group is described by its first member."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    lines = str(e).strip().splitlines()
    return redact(f"{type(e).__name__}: {lines[0][:200] if lines else ''}".rstrip(": "))


async def supervise(sink: ClusterSink, body: Callable[[], Awaitable[None]], backoff: Backoff,
                    restart: Optional[Callable[[], None]] = None) -> None:
    """Run ``body`` until cancelled. When it raises, report the failure on ``sink``,
    call ``restart`` (to drop what the failed run left behind), wait and run it again.
    A run that lasted longer than the longest wait starts the backoff afresh."""
    while True:
        started = time.monotonic()
        try:
            await body()
            return
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure: report, restart, never die silently
            if time.monotonic() - started > backoff.maximum:
                backoff.reset()
            sink.failed(describe_error(e))
            logger.debug("Cluster %s: source failure: %s", sink.name, redact("".join(traceback.format_exception(e))))
            if restart is not None:
                restart()
        await asyncio.sleep(backoff.next())
