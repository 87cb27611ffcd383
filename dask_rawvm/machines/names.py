"""Worker names: ``worker-0``, ``worker-1``, ... known before a VM boots, never reused.

The one place a worker name is made (:class:`WorkerNames`) and read back
(:func:`worker_index`).
"""

from __future__ import annotations

import re

WORKER_PREFIX = "worker-"
_WORKER_NAME = re.compile(re.escape(WORKER_PREFIX) + r"(\d+)")


def worker_index(name: str) -> int:
    """The number in a worker name: ``worker-12`` -> 12.

    Raises
    ------
    ValueError
        For a name this package did not make.
    """
    match = _WORKER_NAME.fullmatch(str(name))
    if match is None:
        raise ValueError(f"not a dask-rawvm worker name: {name!r}")
    return int(match.group(1))


def is_worker_name(name: str) -> bool:
    """Whether ``name`` is one :class:`WorkerNames` makes."""
    return _WORKER_NAME.fullmatch(str(name)) is not None


def contiguous_runs(names: list[str]) -> list[list[str]]:
    """Split worker names into runs of consecutive numbers (one launch call each)."""
    runs: list[list[str]] = []
    for name in sorted(names, key=worker_index):
        if runs and worker_index(name) == worker_index(runs[-1][-1]) + 1:
            runs[-1].append(name)
        else:
            runs.append([name])
    return runs


class WorkerNames:
    """Hands out worker names in order, each once for the life of a cluster.

    A name freed by a worker that left is never handed out again: a worker's name is
    its identity in logs, dashboards and ``retire_workers``.
    """

    def __init__(self) -> None:
        self._next = 0

    @property
    def next_name(self) -> str:
        """The name the next worker gets (not taken)."""
        return f"{WORKER_PREFIX}{self._next}"

    def take(self) -> str:
        """A name never handed out before."""
        name = self.next_name
        self._next += 1
        return name

    def seen(self, name: str) -> None:
        """A name in use already (a worker adopted on reconnecting): never hand it out."""
        self._next = max(self._next, worker_index(name) + 1)
