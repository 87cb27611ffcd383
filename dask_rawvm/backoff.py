"""The one way dask-rawvm waits before trying again: full-jitter exponential backoff.

Clouds throttle, answer 5xx, and stay eventually consistent for a while after a change
(a security group is "in use" until its instances' interfaces are gone). Every retry
loop of the package is :func:`retry` with a :class:`Backoff`, so each waits the same
way and gives up the same way: at a deadline, raising the last error.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """Full-jitter exponential backoff: sleep ``uniform(0, min(cap, base * 2**i))``.

    Full jitter spreads the retries of many clients over the whole window, which is
    what keeps a throttled account from being throttled again in lockstep (AWS's
    "Exponential Backoff And Jitter" analysis).
    """

    base: float = 0.2
    cap: float = 20.0

    def delays(self) -> Iterator[float]:
        """The successive waits, without end."""
        attempt = 0
        while True:
            yield random.uniform(0, min(self.cap, self.base * 2**attempt))
            attempt += 1


async def retry(
    call: Callable[[], Awaitable[T]],
    *,
    retryable: Callable[[Exception], bool],
    timeout: float,
    backoff: Backoff,
    what: str = "call",
) -> T:
    """``await call()`` until it returns, raises what is not ``retryable``, or ``timeout`` passes.

    Parameters
    ----------
    call
        Makes one attempt (a new awaitable each time).
    retryable
        Whether an error is worth another attempt (throttling, 5xx, "still in use").
    timeout
        Seconds from the first attempt after which a retryable error is raised too.
    backoff
        How long to wait between attempts; a wait never passes the deadline.
    what
        Named in the log line of each retry.

    Raises
    ------
    Exception
        The last error, once it is not retryable or the deadline has passed.
    """
    deadline = time.monotonic() + timeout
    delays = backoff.delays()
    while True:
        try:
            return await call()
        except Exception as e:
            left = deadline - time.monotonic()
            if not retryable(e) or left <= 0:
                raise
            logger.info("%s: %s; trying again", what, e)
            await asyncio.sleep(min(next(delays), left))
