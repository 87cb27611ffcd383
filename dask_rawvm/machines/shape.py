"""What a worker is: its threads and memory limit, from its machine type and the options.

SpecCluster scales by cores and memory (``scale(cores=...)``, ``adapt(maximum_memory=...)``)
through the ``nthreads`` and ``memory_limit`` of its worker spec; the VM's worker is
started with exactly these, so the scheduler sees what the spec says.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dask.utils import parse_bytes

from dask_rawvm.config import ClusterOptions
from dask_rawvm.errors import OptionError
from dask_rawvm.providers.base import Provider, WorkerSize


@dataclass(frozen=True)
class WorkerShape:
    """A worker's threads and memory limit (bytes; 0: no limit; None: the worker's own
    ``"auto"``, for a machine the provider cannot size)."""

    nthreads: int
    memory_limit: int | None

    @classmethod
    def from_spec(cls, options: Mapping[str, Any]) -> WorkerShape | None:
        """The shape a worker spec's options say; None if they do not say its threads."""
        nthreads = options.get("nthreads")
        return None if nthreads is None else cls(int(nthreads), options.get("memory_limit"))

    def spec_options(self) -> dict[str, Any]:
        """The worker spec's options, named as SpecCluster reads them."""
        options: dict[str, Any] = {"nthreads": self.nthreads}
        if self.memory_limit is not None:  # 0 included: no limit, as distributed says it
            options["memory_limit"] = self.memory_limit
        return options


def worker_shape(options: ClusterOptions, provider: Provider) -> WorkerShape | None:
    """The shape of every worker, from the candidate types' sizes and the options.

    With several candidate types (``worker_vm_types``, or types chosen by need) a
    worker may land on any of them, so it gets what the smallest offers: it never
    promises threads or memory its VM lacks. None when the provider cannot size its
    machines and ``worker_nthreads`` is not given (the worker then sizes itself).

    ``worker_memory_limit`` means what it means to a Dask worker, measured against the
    type instead of the machine the worker happens to run on: ``"auto"`` is the type's
    memory times ``min(1, nthreads / vCPUs)``, a number up to 1 a fraction of it, bytes
    or ``"8 GiB"`` that much, 0 no limit.

    Raises
    ------
    OptionError
        For ``worker_nthreads`` under 1, or a memory limit that is none of those or
        more than the type has.
    """
    types = options.worker_vm_types or [options.worker_vm_type]
    sizes = [provider.worker_size(t) for t in types]
    known = [s for s in sizes if s is not None]
    size = (
        WorkerSize(min(s.cpus for s in known), min(s.memory for s in known))
        if known and len(known) == len(sizes)
        else None
    )
    if options.worker_nthreads is not None:
        nthreads = int(options.worker_nthreads)
        if nthreads < 1:
            raise OptionError(f"worker_nthreads={nthreads} must be 1 or more")
    elif size is not None:
        nthreads = size.cpus
    else:
        return None
    return WorkerShape(nthreads, memory_limit(options.worker_memory_limit, nthreads, size))


def memory_limit(value: Any, nthreads: int, size: WorkerSize | None) -> int | None:
    """``worker_memory_limit`` in bytes for a worker of ``nthreads`` on a machine of ``size``
    (as :func:`distributed.worker_memory.parse_memory_limit` reads it on that machine)."""
    if value is None or value == "auto":
        if size is None:
            return None
        return int(size.memory * min(1.0, nthreads / size.cpus))
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = None
    if number is not None and 0 < number <= 1:
        if size is None:
            raise OptionError(
                f"worker_memory_limit={value!r} is a fraction of the machine's memory, which "
                "this provider cannot tell: give bytes ('8 GiB') or 'auto'"
            )
        return int(size.memory * number)
    try:
        limit = int(number) if number is not None else parse_bytes(value)
    except (TypeError, ValueError) as e:
        raise OptionError(
            f"worker_memory_limit={value!r} is not 'auto', a fraction, bytes or a size like '8 GiB'"
        ) from e
    if size is not None and limit > size.memory:  # 0 (no limit) passes
        raise OptionError(
            f"worker_memory_limit={value!r} is more than the {size.memory / 2**30:g} GiB a "
            "worker's machine has: ask for at most that, or a larger worker type"
        )
    return limit
