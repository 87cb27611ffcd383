"""Cost estimates, the meter and the budget guard, priced from the local cloud's real types."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiobotocore.session import get_session

from dask_rawvm.cost import (
    BudgetExceeded,
    CostEstimate,
    CostMeter,
    affordable_count,
    check_budget,
    estimate_cost,
    estimate_hourly,
    format_money,
)
from dask_rawvm.localcloud import LocalCloud
from dask_rawvm.providers.ec2 import catalog
from dask_rawvm.providers.ec2.catalog import PriceTable, VMType, fetch_instance_types


@pytest.fixture(scope="module")
def types(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, VMType]]:
    async def fetch(cloud: LocalCloud, cache: Path) -> dict[str, VMType]:
        async with get_session().create_client("ec2", **cloud.client_kwargs()) as ec2:
            return await fetch_instance_types(ec2, cache_directory=cache, refresh=True)

    with LocalCloud() as cloud:
        found = asyncio.run(fetch(cloud, tmp_path_factory.mktemp("cache")))
    catalog.clear_memory_cache()
    # m6i.large at a live spot price of $0.04/h, everything else as the table says.
    prices = PriceTable.load("us-east-1").with_live_spot({("m6i.large", "us-east-1a"): 0.04})
    yield prices.annotate_all(found)


# -- estimates -----------------------------------------------------------------------------


def test_estimate_reads_like_a_sentence(types: dict[str, VMType]) -> None:
    plan = [(types["m6i.large"], "spot", 3), (types["t3.medium"], "on-demand", 1)]
    estimate = estimate_cost(plan)
    assert str(estimate) == (
        "3 x m6i.large spot @ $0.04/h + 1 x t3.medium on-demand @ $0.042/h = $0.16/h"
    )
    assert estimate.per_hour == pytest.approx(3 * 0.04 + 0.0416)
    assert estimate_hourly(plan) == pytest.approx(0.1616)


def test_estimate_marks_estimated_prices_and_skips_empty_lines(
    types: dict[str, VMType],
) -> None:
    guessed = types["c9g.large"]  # not in the price table
    assert guessed.price_estimated
    estimate = estimate_cost([(guessed, "on-demand", 2), (types["m6i.large"], "on-demand", 0)])
    assert len(estimate.lines) == 1
    assert estimate.estimated
    assert str(estimate).startswith("2 x c9g.large on-demand @ ~$")
    assert " = ~$" in str(estimate)
    assert str(estimate_cost([])) == "nothing = $0/h"


def test_estimate_refuses_nonsense(types: dict[str, VMType]) -> None:
    with pytest.raises(ValueError, match="cannot be negative"):
        estimate_hourly([(types["m6i.large"], "on-demand", -1)])
    unpriced = VMType("x9.large", 2, 8192, "x86_64")
    with pytest.raises(ValueError, match=r"no on-demand price: annotate it first"):
        estimate_hourly([(unpriced, "on-demand", 1)])
    with pytest.raises(ValueError, match="'reserved' is not one of"):
        estimate_hourly([(types["m6i.large"], "reserved", 1)])


def test_on_demand_and_spot_prices_differ_as_they_should(types: dict[str, VMType]) -> None:
    g5 = types["g5.xlarge"]
    assert estimate_hourly([(g5, "on-demand", 2)]) == pytest.approx(2 * 1.006)
    assert estimate_hourly([(g5, "spot", 2)]) < estimate_hourly([(g5, "on-demand", 2)])


@pytest.mark.parametrize(
    ("amount", "text"),
    [
        (0, "$0"),
        (0.1616, "$0.16"),
        (0.0416, "$0.042"),
        (0.04, "$0.04"),
        (0.0052, "$0.0052"),
        (16.288, "$16.29"),
    ],
)
def test_money_formatting(amount: float, text: str) -> None:
    assert format_money(amount) == text


# -- the meter -----------------------------------------------------------------------------


def test_meter_bills_per_second_with_a_60_second_minimum(types: dict[str, VMType]) -> None:
    meter = CostMeter(clock=lambda: 0.0)
    meter.launched("i-short", "m6i.large", "on-demand", 0.096, at=0.0)
    meter.terminated("i-short", at=30.0)  # 30 s used, 60 s billed
    assert meter.spent(now=30.0) == pytest.approx(0.096 * 60 / 3600)
    meter.launched("i-long", types["m6i.large"], "on-demand", at=0.0)  # price from the type
    meter.terminated("i-long", at=3600.0)
    assert meter.spent(now=3600.0) == pytest.approx(0.096 * 60 / 3600 + 0.096)


def test_meter_counts_running_instances_and_their_rate(types: dict[str, VMType]) -> None:
    now = [100.0]
    meter = CostMeter(clock=lambda: now[0])
    meter.launched("i-a", types["m6i.large"], "spot", at=0.0)  # live spot $0.04
    meter.launched("i-b", "t3.medium", "on-demand", 0.0416, at=90.0)
    assert meter.cost_per_hour() == pytest.approx(0.04 + 0.0416)
    # i-a ran 100 s; i-b only 10 s but the 60 s minimum is owed already.
    assert meter.spent() == pytest.approx(0.04 * 100 / 3600 + 0.0416 * 60 / 3600)
    meter.terminated("i-a", at=100.0)
    assert meter.running() == ["i-b"]
    assert meter.cost_per_hour() == pytest.approx(0.0416)
    now[0] = 3690.0
    assert meter.spent() == pytest.approx(0.04 * 100 / 3600 + 0.0416)
    assert meter.summary() == "$0.043 spent; $0.042/h now (1 instance running)"


def test_meter_counts_what_is_billed_besides_the_instance() -> None:
    """A machine's disk and public address cost by the hour too, billed like the instance."""
    meter = CostMeter(clock=lambda: 0.0)
    parts = {"instance": 0.0832, "storage": 40 * 0.08 / 730, "public_ipv4": 0.005}
    meter.launched("i-a", "t3.large", "on-demand", parts=parts, at=0.0)
    meter.launched("i-b", "t3.medium", "on-demand", 0.0416, at=0.0)  # the instance alone
    assert meter.cost_per_hour() == pytest.approx(sum(parts.values()) + 0.0416)
    assert meter.cost_per_hour_by_part() == pytest.approx(
        {"instance": 0.0832 + 0.0416, "storage": parts["storage"], "public_ipv4": 0.005}
    )
    meter.terminated("i-a", at=3600.0)
    assert meter.spent(now=3600.0) == pytest.approx(sum(parts.values()) + 0.0416)
    assert meter.cost_per_hour_by_part() == pytest.approx({"instance": 0.0416})


def test_meter_ignores_repeats_and_strangers() -> None:
    meter = CostMeter(clock=lambda: 0.0)
    meter.launched("i-a", "m6i.large", "on-demand", 0.096, at=0.0)
    meter.launched("i-a", "m6i.large", "on-demand", 0.096, at=50.0)  # reported twice
    meter.terminated("i-a", at=120.0)
    meter.terminated("i-a", at=600.0)  # the first termination counts
    meter.terminated("i-unknown", at=10.0)  # launched before this meter
    (usage,) = meter.usage()
    assert (usage.launched_at, usage.terminated_at) == (0.0, 120.0)
    assert meter.spent(now=1000.0) == pytest.approx(0.096 * 120 / 3600)
    with pytest.raises(ValueError, match="pass hourly_price"):
        meter.launched("i-b", "m6i.large", "on-demand")


# -- the budget guard ----------------------------------------------------------------------


def test_budget_allows_up_to_the_limit() -> None:
    check_budget(0.5, 0.5, 1.0)
    check_budget(0.1 + 0.2, 0.7, 1.0)  # float rounding does not refuse an exact fit
    check_budget(100.0, 100.0, None)


def test_budget_refuses_naming_current_requested_limit_and_fixes(
    types: dict[str, VMType],
) -> None:
    more = estimate_cost([(types["m6i.large"], "on-demand", 10)])
    with pytest.raises(BudgetExceeded) as info:
        check_budget(0.24, more, 1.0)
    message = str(info.value)
    assert "10 x m6i.large on-demand @ $0.096/h = $0.96/h more" in message
    assert "running now $0.24/h + requested $0.96/h" in message
    assert "would cost $1.20/h" in message
    assert "over max_hourly_cost=$1.00/h" in message
    for fix in ("raise max_hourly_cost", "fewer workers", "spot", "smaller or cheaper"):
        assert fix in message
    assert (info.value.current, info.value.requested, info.value.limit) == (0.24, 0.96, 1.0)


def test_budget_with_a_plain_number() -> None:
    with pytest.raises(BudgetExceeded, match=r"refusing to launch \$0.50/h more"):
        check_budget(0.6, 0.5, 1.0)


def test_affordable_count() -> None:
    assert affordable_count(0.24, 0.096, 1.0) == 7
    assert affordable_count(1.5, 0.096, 1.0) == 0
    assert affordable_count(0.0, 0.25, 1.0) == 4  # exact fit despite float rounding
    assert affordable_count(0.0, 0.25, None) is None


def test_cost_estimate_is_a_value() -> None:
    assert CostEstimate(()).per_hour == 0
