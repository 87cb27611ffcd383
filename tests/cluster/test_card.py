"""What a cluster shows of itself (dask_rawvm.card), from the state a cluster passes in: the
parts a running cluster's card test cannot reach cheaply (a thousand workers, every state)."""

from __future__ import annotations

from dask_rawvm import card
from dask_rawvm.needs import Market
from dask_rawvm.providers import Machine


def vm(i: int, market: Market = "on-demand", zone: str | None = "us-east-1a") -> Machine:
    return Machine(f"i-{i:04d}", i, "running", "t3.large", zone=zone, market=market)


def test_workers_by_state_in_the_order_a_worker_goes_through_numbered_naturally() -> None:
    states = card.workers_by_state(
        names=["worker-10", "worker-2", "worker-3", "worker-4", "worker-5"],
        status={"worker-2": "running", "worker-10": "closing_gracefully", "other": "running"},
        waiting={"worker-4"},
        launched={"worker-3": vm(3)},
    )
    assert states == {
        "connected": ["worker-2", "other"],  # a worker not ours is shown, last
        "retiring": ["worker-10"],
        "booting": ["worker-3"],
        "waiting for capacity": ["worker-4"],
        "not launched": ["worker-5"],
    }


def test_the_worker_table_of_a_thousand_workers_stays_small() -> None:
    names = [f"worker-{i}" for i in range(1000)]
    machines = {name: vm(i) for i, name in enumerate(names)}
    states = card.workers_by_state(names, {n: "running" for n in names}, set(), machines)
    table = card.workers_table(states, machines)
    assert table.count("<tr>") == 1 + card.MAX_WORKER_ROWS  # the head, then 50 workers
    assert "(1000)" in table and "and 950 more" in table
    assert "<td>worker-0</td><td>connected</td><td>t3.large</td>" in table
    assert "worker-50<" not in table


def test_vms_limits_and_html_are_said_and_escaped() -> None:
    machines = [vm(1), vm(2), vm(3, market="spot", zone=None)]
    assert card.vm_summary(machines) == (
        "2 x t3.large on-demand in us-east-1a, 1 x t3.large spot in ?"
    )
    assert "Limits: none" in card.limits_row(None, None)
    assert "max_workers=5, max_hourly_cost=$2.5/h" in card.limits_row(5, 2.5)
    rows = card.card_rows([("Status", "running")], ["<b>odd</b> note"], "TABLE")
    assert "&lt;b&gt;odd&lt;/b&gt; note" in rows and rows.endswith("TABLE</td></tr>")
    assert card.environment_notes({}, {}, "error") == [
        "the image's own Python and packages (environment: null)"
    ]
