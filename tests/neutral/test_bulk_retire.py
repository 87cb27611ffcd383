"""The scheduler preload that spares workers retired together the news of each other
(dask_rawvm.bulk_retire)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from distributed import Scheduler, Worker
from helpers import async_wait_for


@pytest.mark.parametrize("preloaded", [True, False])
async def test_a_leaving_worker_is_not_told_of_its_leaving_peers(preloaded: bool) -> None:
    told: Counter[str] = Counter()  # "remove-worker" messages each worker received

    def counting(worker: Worker) -> None:
        handle = worker.stream_handlers["remove-worker"]

        def handler(**msg: Any) -> Any:
            told[str(worker.name)] += 1
            return handle(**msg)

        worker.stream_handlers["remove-worker"] = handler

    # The way the bootstrap runs it on the scheduler VM.
    preload = ["dask_rawvm.bulk_retire"] if preloaded else []
    async with Scheduler(host="127.0.0.1", dashboard_address=":0", preload=preload) as s:
        workers = [Worker(s.address, name=f"w{i}", nthreads=1) for i in range(5)]
        for worker in workers:
            await worker
            counting(worker)
        try:
            leaving = ["w0", "w1", "w2"]
            await s.retire_workers(names=leaving, close_workers=True, remove=True)
            await async_wait_for(lambda: len(s.workers) == 2, 30, "three workers retired")
            # Each worker that stays hears of each one that left, as without the preload.
            await async_wait_for(
                lambda: told["w3"] == told["w4"] == 3, 30, "the staying workers told"
            )
            if preloaded:
                assert sum(told[name] for name in leaving) == 0, told
            else:  # distributed's own: the leaving ones hear of each other too
                assert sum(told[name] for name in leaving) > 0, told
        finally:
            for worker in workers:
                await worker.close()
