"""The log volume guard: a warning on the client when workers log more than they should.

A cluster of many VMs left on debug logging writes log volume someone pays for (a
1000-node cluster on debug logging has cost a team $15k in log charges). Each worker counts
the records each logger emits (:class:`LogRateWatch`, a worker plugin: a counter per
record, nothing formatted); a logger over ``log_rate_warning`` records per second is
reported once per :data:`REPORT_EVERY` on the scheduler's :data:`TOPIC`, naming the setting
that makes it log that much. The client reads the topic (:class:`LogRateAlarm`) and warns,
once per logger, with how many workers report it.

Neutral: distributed and :mod:`logging` only, so the plugin unpickles on any worker with
dask-rawvm installed.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import cloudpickle
import dask.config
from distributed.diagnostics.plugin import WorkerPlugin
from tornado.ioloop import PeriodicCallback

logger = logging.getLogger(__name__)

#: The scheduler's event topic workers report loud loggers on.
TOPIC = "rawvm-log-volume"
#: Seconds over which a worker measures each logger's rate.
WINDOW_SECONDS = 10.0
#: A worker reports a logger again after this long.
REPORT_EVERY = 3600.0
#: How often the client reads the reports.
POLL_SECONDS = 10.0


@dataclass(frozen=True)
class LoudLogger:
    """One worker's report of a logger over the threshold."""

    worker: str
    logger: str
    per_second: float
    level: str
    #: What makes it log at that level: a dask config key or the logger that set it.
    setting: str

    def as_event(self) -> dict[str, Any]:
        """The event's fields (distributed adds the worker's address as ``worker``)."""
        return {
            "name": self.worker,
            "logger": self.logger,
            "per_second": self.per_second,
            "level": self.level,
            "setting": self.setting,
        }

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> LoudLogger:
        return cls(
            str(event["name"]),
            str(event["logger"]),
            float(event["per_second"]),
            str(event["level"]),
            str(event["setting"]),
        )


def level_setting(name: str, config: Mapping[str, Any] | None = None) -> tuple[str, str]:
    """``(level, setting)``: the effective level of logger ``name`` and what set it.

    The setting is dask's ``logging.<logger>`` config key when one sets that logger or an
    ancestor (how distributed's logging is usually turned up), else the logger whose level
    it inherits.
    """
    config = dask.config.get("logging", {}) if config is None else config
    current: logging.Logger | None = logging.getLogger(name)
    level = logging.getLevelName(logging.getLogger(name).getEffectiveLevel())
    while current is not None:
        if isinstance(config, Mapping) and current.name in config:
            value = config[current.name]
            shown = value.get("level", value) if isinstance(value, Mapping) else value
            return level, f"dask config logging.{current.name}: {shown}"
        if current.level != logging.NOTSET:
            return level, f"the level of logger {current.name!r} ({level})"
        current = current.parent
    return level, "the root logger's level"


class _Counting(logging.Handler):
    """Counts the records each logger emits: no formatting, no output."""

    def __init__(self, counts: Counter[str]) -> None:
        super().__init__(logging.NOTSET)
        self.counts = counts

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[record.name] += 1


def _stopping_points() -> list[logging.Logger]:
    """The root logger and every logger that does not pass records on (distributed's
    own): a handler on each sees every record once."""
    loggers = [logging.getLogger()]
    for candidate in logging.Logger.manager.loggerDict.values():
        if isinstance(candidate, logging.Logger) and not candidate.propagate:
            loggers.append(candidate)
    return loggers


class LogRateWatch(WorkerPlugin):
    """A worker plugin counting each logger's records; a logger over ``threshold``
    records per second (over :data:`WINDOW_SECONDS`) is reported on :data:`TOPIC`.

    Parameters
    ----------
    threshold
        Records per second per logger that count as too many.
    window
        Seconds over which the rate is measured.
    """

    name = TOPIC
    idempotent = True

    def __init__(self, threshold: float, window: float = WINDOW_SECONDS) -> None:
        self.threshold = threshold
        self.window = window

    def setup(self, worker: Any) -> None:
        self._worker = worker
        self._counts: Counter[str] = Counter()
        self._since = time.monotonic()
        self._reported: dict[str, float] = {}
        self._handler = _Counting(self._counts)
        self._attached = _stopping_points()
        for target in self._attached:
            target.addHandler(self._handler)
        self._callback = PeriodicCallback(self._tick, self.window * 1000)
        self._callback.start()

    def teardown(self, worker: Any) -> None:
        self._callback.stop()
        for target in self._attached:
            target.removeHandler(self._handler)

    def _tick(self) -> None:
        self.check()

    def check(self) -> list[LoudLogger]:
        """Report the loggers over the threshold since the last check; return them."""
        now = time.monotonic()
        # Over a whole window at least: a burst in a moment is no rate.
        elapsed, self._since = max(now - self._since, self.window), now
        counts = dict(self._counts)
        self._counts.clear()
        loud = []
        for name, count in counts.items():
            rate = count / elapsed
            if rate <= self.threshold:
                continue
            if now - self._reported.get(name, -REPORT_EVERY) < REPORT_EVERY:
                continue
            self._reported[name] = now
            level, setting = level_setting(name)
            report = LoudLogger(str(self._worker.name), name, rate, level, setting)
            self._worker.log_event(TOPIC, report.as_event())
            loud.append(report)
        return loud


def plugin_bytes(threshold: float) -> bytes:
    """A :class:`LogRateWatch` pickled by value: a worker without dask-rawvm installed (an
    image's own Python) loads it too (by reference, its worker would fail to start)."""
    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    try:
        return bytes(cloudpickle.dumps(LogRateWatch(threshold)))
    finally:
        cloudpickle.unregister_pickle_by_value(module)


def warning_text(reports: Iterable[LoudLogger], threshold: float) -> list[str]:
    """One warning per logger: its rate, on how many workers, and the setting behind it."""
    by_logger: dict[str, list[LoudLogger]] = {}
    for report in reports:
        by_logger.setdefault(report.logger, []).append(report)
    lines = []
    for name, found in sorted(by_logger.items()):
        top = max(found, key=lambda r: r.per_second)
        workers = sorted({r.worker for r in found})
        where = workers[0] if len(workers) == 1 else f"{len(workers)} workers ({workers[0]}, ...)"
        lines.append(
            f"log volume: logger {name!r} logs {top.per_second:.0f} records/s on {where}, over "
            f"log_rate_warning={threshold:g}/s: its level is {top.level}, set by "
            f"{top.setting}. Every VM ships and stores that much log; raise that level "
            "(e.g. dask.config.set({'logging.distributed': 'info'}) before the cluster "
            "starts), or raise log_rate_warning"
        )
    return lines


class LogRateAlarm:
    """Reads the scheduler's :data:`TOPIC` and warns about each loud logger once.

    Parameters
    ----------
    events
        Returns the topic's ``(time, event)`` pairs (the scheduler's ``events`` handler).
    threshold
        The workers' threshold, for the message.
    warn
        Where warnings go; this module's logger by default.
    """

    def __init__(
        self,
        events: Callable[[], Any],
        threshold: float,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.events = events
        self.threshold = threshold
        self.warn = warn or logger.warning
        self._seen = 0.0
        self._warned: set[str] = set()

    async def poll(self) -> list[str]:
        """Warn about loggers newly reported; return the warnings."""
        found = [
            (stamp, LoudLogger.from_event(event))
            for stamp, event in await self.events()
            if stamp > self._seen and isinstance(event, dict)
        ]
        if not found:
            return []
        self._seen = max(stamp for stamp, _ in found)
        new = [report for _, report in found if report.logger not in self._warned]
        lines = warning_text(new, self.threshold)
        self._warned |= {report.logger for report in new}
        for line in lines:
            self.warn(line)
        return lines
