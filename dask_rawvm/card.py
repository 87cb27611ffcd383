"""What a ``RawVMCluster`` shows of itself: its VMs in a phrase, its workers by state, and the
notebook card's rows, environment notes, worker table and scaling limits.

Pure functions of what the cluster knows (no cloud call, no Dask call): the cluster passes
its state in, and a repr that runs every second in a notebook stays cheap.
"""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Collection, Iterable, Mapping

from dask_rawvm.cost import CostReport
from dask_rawvm.environment import Bundle
from dask_rawvm.environment.fidelity import FidelityReport
from dask_rawvm.machines import is_worker_name, worker_index
from dask_rawvm.providers import Machine

#: The states of :meth:`RawVMCluster.workers_by_state`, in the order a worker goes through.
WORKER_STATES = ("connected", "retiring", "booting", "waiting for capacity", "not launched")
#: Rows of the notebook card's worker table: a 1000-worker cluster's card stays small.
MAX_WORKER_ROWS = 50


def worker_order(name: str) -> tuple[int, str]:
    """``worker-2`` before ``worker-10``; names of workers not ours last."""
    return (worker_index(name), name) if is_worker_name(name) else (1 << 62, name)


def vm_summary(machines: Iterable[Machine]) -> str:
    """``3 x t3.large on-demand in us-east-1a``, one phrase per kind of VM."""
    kinds = Counter((m.vm_type, m.market, m.zone or "?") for m in machines)
    return ", ".join(f"{n} x {t} {mk} in {z}" for (t, mk, z), n in sorted(kinds.items()))


def workers_by_state(
    names: Iterable[str],
    status: Mapping[str, str],
    waiting: Collection[str],
    launched: Collection[str],
) -> dict[str, list[str]]:
    """Worker ``names`` by state: ``status`` is the scheduler's, by name, of the connected
    ones (``"running"`` or another :class:`distributed.core.Status` name); ``waiting``
    those waiting for capacity; ``launched`` those with a VM."""
    states: dict[str, list[str]] = {state: [] for state in WORKER_STATES}
    for name in sorted({*names, *status}, key=worker_order):
        if name in status:
            states["connected" if status[name] == "running" else "retiring"].append(name)
        elif name in waiting:
            states["waiting for capacity"].append(name)
        elif name in launched:
            states["booting"].append(name)
        else:
            states["not launched"].append(name)
    return states


def environment_notes(
    bundles: Mapping[str, Bundle], reports: Mapping[str, FidelityReport], check: str
) -> list[str]:
    """One line per role: the environment its VMs install and what the check (``check`` is
    ``environment_check``) found."""
    notes = []
    for role, bundle in sorted(bundles.items()):
        target = bundle.target
        lock = bundle.lock
        what = (
            f"{role} VMs: {target.arch} {target.accelerator}, Python "
            f"{target.python_version}, {len(lock.pins)} pins"
            f"{' (lock from cache)' if lock.from_cache else ''}"
        )
        report = reports.get(role)
        if check == "off":
            what += "; not checked (environment_check='off')"
        elif report is None:
            what += "; not checked yet"
        elif report.errors:
            what += f"; {len(report.errors)} imported package(s) differ"
        elif report.warnings:
            what += f"; imported packages the same, {len(report.warnings)} other(s) differ"
        else:
            what += "; checked: same versions"
        notes.append(what)
    # environment=None (in a config section): no bundle, the image's own Python.
    return notes or ["the image's own Python and packages (environment: null)"]


def spent_by_line(report: CostReport) -> str:
    """The card's line of a cost report: "on-demand t3.large $0.01 (2 running)"."""
    return "; ".join(
        f"{line.market} {line.vm_type} ${line.spent:.2f} ({line.running} running)"
        for line in report.lines
    )


def card_rows(rows: list[tuple[str, str]], notes: list[str], table: str) -> str:
    """The card's own rows: ``rows`` (label, HTML) two to a line, then the environment's
    ``notes`` and the worker ``table``, each a line of its own."""
    cells = [f'<td style="text-align: left;"><strong>{k}:</strong> {v}</td>' for k, v in rows]
    html_rows = "".join(f"<tr>{''.join(cells[i : i + 2])}</tr>" for i in range(0, len(cells), 2))
    shown = "<br/>".join(html.escape(note) for note in notes)
    return (
        f'{html_rows}<tr><td style="text-align: left;" colspan="2">'
        f"<strong>Environment:</strong> {shown}</td></tr>"
        f'<tr><td style="text-align: left;" colspan="2">{table}</td></tr>'
    )


def workers_table(states: Mapping[str, list[str]], machines: Mapping[str, Machine]) -> str:
    """A folded table: each worker's state and VM (type, market, zone, instance), the
    first :data:`MAX_WORKER_ROWS`; ``machines`` are the launched workers' VMs, by name."""
    rows: list[str] = []
    for state, names in states.items():
        for name in names[: MAX_WORKER_ROWS - len(rows)]:
            machine = machines.get(name)
            vm = (
                (machine.vm_type, machine.market, machine.zone or "", machine.id)
                if machine is not None
                else ("", "", "", "")
            )
            cells = "".join(f"<td>{html.escape(str(c))}</td>" for c in (name, state, *vm))
            rows.append(f"<tr>{cells}</tr>")
    total = sum(len(names) for names in states.values())
    more = f"<p>and {total - len(rows)} more</p>" if total > len(rows) else ""
    head = "".join(
        f"<th>{h}</th>" for h in ("worker", "state", "type", "market", "zone", "instance")
    )
    return (
        f"<details><summary><strong>Workers by state</strong> ({total})</summary>"
        f"<table><tr>{head}</tr>{''.join(rows)}</table>{more}</details>"
    )


def limits_row(max_workers: int | None, max_hourly_cost: float | None) -> str:
    """The Scaling tab's row of the limits a scale-up meets."""
    limits = [
        f"max_workers={max_workers}" if max_workers else "",
        f"max_hourly_cost=${max_hourly_cost:g}/h" if max_hourly_cost else "",
    ]
    shown = ", ".join(limit for limit in limits if limit) or "none"
    return f'<tr><td style="text-align: left;">Limits: {html.escape(shown)}</td></tr>'
