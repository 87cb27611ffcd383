"""The log volume guard on a real scheduler and worker (in this process, no VMs): a worker
logger over the threshold is reported with the setting behind it, and the client warns once."""

from __future__ import annotations

import logging

import dask
from distributed import Client, Scheduler, Worker
from helpers import async_wait_for

from dask_rawvm.log_guard import TOPIC, LogRateAlarm, LogRateWatch, level_setting


def chatter(count: int) -> None:
    """What a worker on debug logging does, in short."""
    noisy = logging.getLogger("rawvm_test.noisy")
    for i in range(count):
        noisy.debug("record %d", i)


def test_level_setting_names_the_dask_config_key_or_the_logger() -> None:
    logging.getLogger("rawvm_test.parent").setLevel(logging.DEBUG)
    try:
        assert level_setting("rawvm_test.parent.child", config={}) == (
            "DEBUG",
            "the level of logger 'rawvm_test.parent' (DEBUG)",
        )
        config = {"rawvm_test.parent": "debug"}
        assert level_setting("rawvm_test.parent.child", config=config) == (
            "DEBUG",
            "dask config logging.rawvm_test.parent: debug",
        )
    finally:
        logging.getLogger("rawvm_test.parent").setLevel(logging.NOTSET)


async def test_a_loud_worker_logger_is_reported_and_warned_about_once() -> None:
    noisy = logging.getLogger("rawvm_test.noisy")
    warnings: list[str] = []
    with dask.config.set({"logging": {"rawvm_test.noisy": "debug"}}):
        noisy.setLevel(logging.DEBUG)
        try:
            async with (
                Scheduler(dashboard_address=":0") as scheduler,
                Worker(scheduler.address, name="worker-7") as worker,
                Client(scheduler.address, asynchronous=True) as client,
            ):
                # A short window, so the test does not wait 10 s for a rate.
                await client.register_plugin(LogRateWatch(threshold=100, window=0.5), name=TOPIC)
                plugin = worker.plugins[TOPIC]
                quiet = await client.submit(chatter, 10, pure=False)  # 20/s at most: under
                assert quiet is None
                assert plugin.check() == []
                await client.submit(chatter, 5000, pure=False)

                async def events():  # as the cluster reads them, over its scheduler comm
                    return await client.scheduler.events(topic=TOPIC)

                alarm = LogRateAlarm(events, threshold=100, warn=warnings.append)
                await async_wait_for(
                    lambda: scheduler.get_events(TOPIC), 10, "a report on the topic"
                )
                assert await alarm.poll() == warnings
                (event,) = (e for _, e in scheduler.get_events(TOPIC))
                assert event["name"] == "worker-7" and event["logger"] == "rawvm_test.noisy"
                assert event["level"] == "DEBUG" and event["per_second"] > 100
                # Reported once an hour by the worker, warned about once by the client.
                await client.submit(chatter, 5000, pure=False)
                assert plugin.check() == []
                assert await alarm.poll() == []
        finally:
            noisy.setLevel(logging.NOTSET)
    (warning,) = warnings
    assert "logger 'rawvm_test.noisy' logs" in warning and "on worker-7" in warning
    assert "set by dask config logging.rawvm_test.noisy: debug" in warning
    assert "log_rate_warning=100/s" in warning
