"""What a worker is (threads, memory limit) from its type's size and the options, and that
each VM's worker is started with exactly that: against an in-memory provider."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from memory_provider import MemoryProvider, Parts

from dask_rawvm.config import resolve_options
from dask_rawvm.errors import OptionError
from dask_rawvm.machines import WorkerShape, worker_shape
from dask_rawvm.providers.base import WorkerSize

GiB = 2**30
SIZES = {
    "t3.large": WorkerSize(2, 8 * GiB),
    "m6i.xlarge": WorkerSize(4, 16 * GiB),
    "r6i.large": WorkerSize(2, 16 * GiB),
}


def shape(**options: object) -> WorkerShape | None:
    provider = MemoryProvider()
    provider.sizes = dict(SIZES)
    return worker_shape(resolve_options("aws", **options), provider)


def test_a_worker_is_its_type_vcpus_and_memory() -> None:
    assert shape(worker_vm_type="t3.large") == WorkerShape(2, 8 * GiB)
    assert shape(worker_vm_type="m6i.xlarge").spec_options() == {  # type: ignore[union-attr]
        "nthreads": 4,
        "memory_limit": 16 * GiB,
    }


def test_with_candidate_types_a_worker_is_what_the_smallest_offers() -> None:
    # A worker may land on either type: it promises neither more threads nor more memory.
    assert shape(worker_vm_types=["m6i.xlarge", "r6i.large"]) == WorkerShape(2, 16 * GiB)
    assert shape(worker_vm_types=["m6i.xlarge", "t3.large"]) == WorkerShape(2, 8 * GiB)


@pytest.mark.parametrize(
    ("nthreads", "limit", "expected"),
    [
        (None, "auto", WorkerShape(4, 16 * GiB)),
        (2, "auto", WorkerShape(2, 8 * GiB)),  # distributed's auto: memory x threads / CPUs
        (8, "auto", WorkerShape(8, 16 * GiB)),  # ... at most the whole machine
        (None, 0.5, WorkerShape(4, 8 * GiB)),  # a fraction of the type's memory
        (None, "6 GiB", WorkerShape(4, 6 * GiB)),
        (None, 3 * GiB, WorkerShape(4, 3 * GiB)),
        (None, 0, WorkerShape(4, 0)),  # no limit, as distributed says it
    ],
)
def test_worker_options_are_read_against_the_type(
    nthreads: int | None, limit: object, expected: WorkerShape
) -> None:
    got = shape(worker_vm_type="m6i.xlarge", worker_nthreads=nthreads, worker_memory_limit=limit)
    assert got == expected


def test_impossible_worker_options_are_errors_naming_the_fix() -> None:
    with pytest.raises(OptionError, match="more than the 8 GiB"):
        shape(worker_vm_type="t3.large", worker_memory_limit="12 GiB")
    with pytest.raises(OptionError, match="is not 'auto', a fraction"):
        shape(worker_vm_type="t3.large", worker_memory_limit="lots")
    with pytest.raises(OptionError, match="1 or more"):
        shape(worker_vm_type="t3.large", worker_nthreads=0)


def test_a_type_the_provider_cannot_size_leaves_the_worker_to_size_itself() -> None:
    assert shape(worker_vm_type="x9.huge") is None
    # Unless told its threads; its memory is then the worker's own "auto".
    assert shape(worker_vm_type="x9.huge", worker_nthreads=3) == WorkerShape(3, None)
    with pytest.raises(OptionError, match="fraction of the machine's memory"):
        shape(worker_vm_type="x9.huge", worker_nthreads=3, worker_memory_limit=0.5)


async def test_each_shape_boots_its_own_workers_with_exactly_its_threads_and_memory(
    parts_factory: Callable[..., Awaitable[Parts]],
) -> None:
    parts = await parts_factory()
    small, large = WorkerShape(2, 8 * GiB), WorkerShape(4, 16 * GiB)
    requests = [("worker-0", small), ("worker-1", small), ("worker-2", large)]
    await asyncio.gather(
        *(parts.launcher.launch_worker(n, "tcp://10.0.0.1:8786", s) for n, s in requests)
    )
    # One pass, one launch call per shape: a request's VMs boot one user-data.
    scripts = sorted((s.count, s.user_data) for s in parts.provider.launches)
    assert [count for count, _ in scripts] == [1, 2]
    assert "RAWVM_NTHREADS=4" in scripts[0][1]
    assert f"RAWVM_MEMORY_LIMIT={16 * GiB}" in scripts[0][1]
    assert "RAWVM_NTHREADS=2" in scripts[1][1]
    assert f"RAWVM_MEMORY_LIMIT={8 * GiB}" in scripts[1][1]
