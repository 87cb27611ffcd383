"""Cost that tells the truth: the estimate prices each worker on the market it will get and
names where the price comes from; ``cost_report()`` says what was spent by market and type."""

from __future__ import annotations

from pathlib import Path

import dask
import pytest
from helpers import asking_options

from dask_rawvm import RawVMCluster
from dask_rawvm.cost import BudgetExceeded
from dask_rawvm.localcloud import LocalCloud


def options(cloud: LocalCloud, **kwargs: object) -> dict[str, object]:
    """10 m6i.large workers under $0.8/h, asked for (:func:`asking_options`)."""
    # 10 x m6i.large with disk and address: ~$1.06/h on-demand, ~$0.43/h as spot at the
    # default discount (the local cloud's live spot price, $0.00001, is not believable).
    defaults: dict[str, object] = {
        "worker_vm_type": "m6i.large",
        "n_workers": 10,
        "max_hourly_cost": 0.8,
    }
    return asking_options(cloud, **{**defaults, **kwargs})


def test_spot_workers_are_priced_as_spot_and_the_price_source_is_named(
    quiet_cloud: LocalCloud,
) -> None:
    with pytest.raises(BudgetExceeded) as refused:
        RawVMCluster(**options(quiet_cloud))
    message = str(refused.value)
    assert "10 x m6i.large on-demand @" in message
    assert "on-demand priced as the list price" in message
    assert "use spot (spot_policy='spot_with_fallback')" in message  # a fix that helps
    assert quiet_cloud.calls["CreateFleet"] == 0

    with RawVMCluster(**options(quiet_cloud, spot_policy="spot_with_fallback")) as cluster:
        cluster.sync(cluster._correct_state)
        own = cluster.get_logs(scheduler=False, workers=False)["Cluster"]
        assert "estimated cost: " in own
        assert "10 x m6i.large spot @" in own
        assert "spot priced as the on-demand less the default 65% spot discount" in own
        report = cluster.cost_report()
        assert [(line.market, line.vm_type, line.running) for line in report.lines] == [
            ("spot", "m6i.large", 10)
        ]
        assert report.per_hour == pytest.approx(cluster.cost_per_hour)
        assert 0 < report.per_hour <= 0.8
        assert report.spent > 0 and set(report.by_market()) == {"spot"}
        table = str(report)
        assert table.splitlines()[1].split()[:4] == ["spot", "m6i.large", "10", "10"]
        assert table.splitlines()[-1].startswith("total")


def test_a_spot_estimate_over_budget_does_not_suggest_spot(quiet_cloud: LocalCloud) -> None:
    with pytest.raises(BudgetExceeded) as refused:
        RawVMCluster(**options(quiet_cloud, spot_policy="spot", max_hourly_cost=0.2))
    message = str(refused.value)
    assert "10 x m6i.large spot @" in message and "default 65% spot discount" in message
    assert "use spot" not in message


def test_the_readme_cost_guard_example_starts_as_written() -> None:
    """The README's example, copied (up to its close): workers on spot, priced as spot,
    under its budget (it failed with BudgetExceeded while spot was priced as on-demand).
    Run on the local cloud it starts itself (the default section), whose VMs stay pending
    and whose scheduler runs here: this is about the estimate, not the VMs. (The docs'
    test runs it whole, VMs and all.)"""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    after = readme.split("The same in Python, with the cost guard", 1)[1]
    example = after.split("```python\n", 1)[1].split("```", 1)[0]
    example = example.replace("cluster.close()", "")
    quiet = {
        "boot-delay": "1 hour",
        "scheduler": "local",
        "wait-for-workers": False,
        "environment": None,
    }
    with dask.config.set({f"rawvm.local.{key}": value for key, value in quiet.items()}):
        namespace: dict[str, object] = {"RawVMCluster": RawVMCluster, "print": lambda *_: None}
        exec(example, namespace)
        cluster = namespace["cluster"]
        assert isinstance(cluster, RawVMCluster)
        try:
            cluster.sync(cluster._correct_state)
            report = cluster.cost_report()
            assert {line.market for line in report.lines} == {"spot"}
            assert sum(line.running for line in report.lines) == 2
            assert report.per_hour <= 1.0
        finally:
            cluster.close()
