"""A cluster's own log: what dask-rawvm logged about it, kept in memory for ``get_logs()``.

distributed's ``Cluster`` keeps what its subclass passes to ``Cluster._log`` in
``_cluster_manager_logs`` and returns it as ``get_logs()["Cluster"]``; dask-rawvm logs through
:mod:`logging` instead, so a :class:`ClusterLog` handler on the ``dask_rawvm`` logger keeps
those records, the last :data:`CAPACITY`, for the cluster they are about.

Which cluster a record is about: the one whose coroutine logged it (:func:`about`, a context
variable its tasks inherit). Records logged outside any cluster's coroutine (a thread, an
import) are kept by every cluster of the process: in the usual process of one cluster,
all of them are its own.
"""

from __future__ import annotations

import datetime
import logging
from collections import deque
from contextvars import ContextVar

#: The logger every dask-rawvm module logs under.
ROOT_LOGGER = "dask_rawvm"
#: Records a cluster keeps: ~150 bytes each, 1000 are a cluster's start, scaling and close
#: many times over and cost ~150 kB.
CAPACITY = 1000

_current: ContextVar[str | None] = ContextVar("dask_rawvm_cluster", default=None)


def about(cluster: str) -> None:
    """What the calling coroutine (and the tasks it starts) logs from now on is about
    ``cluster``."""
    _current.set(cluster)


class ClusterLog(logging.Handler):
    """The last ``capacity`` dask-rawvm records about ``cluster``, as
    ``(time, formatted line)`` pairs (what ``Cluster._cluster_manager_logs`` holds).

    Parameters
    ----------
    cluster
        The cluster's name.
    capacity
        How many records to keep (the oldest go first).
    """

    def __init__(self, cluster: str, capacity: int = CAPACITY) -> None:
        super().__init__(logging.INFO)
        self.cluster = cluster
        self.records: deque[tuple[datetime.datetime, str]] = deque(maxlen=capacity)
        self.setFormatter(logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if _current.get() not in (None, self.cluster):
            return  # another cluster's
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.records.append((datetime.datetime.fromtimestamp(record.created), line))

    def attach(self) -> None:
        """Start keeping records. The ``dask_rawvm`` logger logs INFO from then on (unless
        its level was set), as distributed's logs INFO by default."""
        logger = logging.getLogger(ROOT_LOGGER)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
        logger.addHandler(self)

    def detach(self) -> None:
        """Stop keeping records (what is kept stays readable)."""
        logging.getLogger(ROOT_LOGGER).removeHandler(self)
