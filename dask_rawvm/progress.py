"""Live progress while a cluster comes up and while its workers boot.

A rich display in a terminal, an updating HTML table in Jupyter, and nothing when
output is redirected (logging still says what happens): a batch job's log should
not fill with redraws.
"""

from __future__ import annotations

import html
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

FIELDS = ("stage", "vms", "requested", "running", "connected")


def _in_jupyter() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


class Progress:
    """What a cluster is doing, shown where the user is looking.

    Parameters
    ----------
    title
        What is in progress (e.g. the cluster's name).
    enabled
        True/False to force it on/off; None (default) shows it in a terminal or
        Jupyter and not when output is redirected.
    """

    def __init__(self, title: str, enabled: bool | None = None) -> None:
        self.title = title
        self.state: dict[str, Any] = {}
        self._began = time.monotonic()
        self._live: Any = None
        self._handle: Any = None
        if enabled is False:
            return
        if _in_jupyter():
            from IPython.display import HTML, display

            self._handle = display(HTML(self._html()), display_id=True)
        elif enabled or sys.stderr.isatty():
            from rich.console import Console
            from rich.live import Live

            self._live = Live(self._rich(), console=Console(stderr=True), refresh_per_second=4)
            self._live.start()

    def update(self, **fields: Any) -> None:
        """Change some of ``stage``, ``vms``, ``requested``, ``running``, ``connected``."""
        self.state.update(fields)
        if self._handle is not None:
            from IPython.display import HTML

            self._handle.update(HTML(self._html()))
        elif self._live is not None:
            self._live.update(self._rich())

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
        self._handle = None

    def _rows(self) -> list[tuple[str, str]]:
        rows = [(k, str(self.state[k])) for k in FIELDS if k in self.state]
        return [*rows, ("elapsed", f"{time.monotonic() - self._began:.0f} s")]

    def _html(self) -> str:
        body = "".join(
            f"<tr><th style='text-align:left'>{k}</th><td style='text-align:left'>"
            f"{html.escape(v)}</td></tr>"
            for k, v in self._rows()
        )
        return f"<div><b>{html.escape(self.title)}</b><table>{body}</table></div>"

    def _rich(self) -> Any:
        from rich.table import Table

        table = Table(title=self.title, show_header=False, title_justify="left")
        for key, value in self._rows():
            table.add_row(key, value)
        return table


class Reporter:
    """Where the parts of a cluster report what they do: the :class:`Progress` shown, if any.

    Passed to whatever reports (the scheduler VM's start); the cluster shows a
    :class:`Progress` through it while it starts (:meth:`showing`), and reports go
    nowhere otherwise.
    """

    def __init__(self) -> None:
        self._progress: Progress | None = None

    def update(self, **fields: Any) -> None:
        """Forward to the progress shown now (see :meth:`Progress.update`)."""
        if self._progress is not None:
            self._progress.update(**fields)

    @contextmanager
    def showing(self, progress: Progress) -> Iterator[Progress]:
        """Report to ``progress`` inside the block; close it at the end."""
        self._progress = progress
        try:
            yield progress
        finally:
            self._progress = None
            progress.close()
