"""Instance types, prices and choice, on the local cloud's real DescribeInstanceTypes data."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from aiobotocore.session import get_session

from dask_rawvm.errors import CatalogError
from dask_rawvm.localcloud import LocalCloud
from dask_rawvm.needs import Needs
from dask_rawvm.providers.ec2 import catalog
from dask_rawvm.providers.ec2.catalog import (
    PriceTable,
    VMType,
    choose_vm_types,
    fetch_instance_types,
    live_spot_prices,
    parse_instance_types,
    rank_candidates,
    resolve_vm_types,
)


async def _fetch(cloud: LocalCloud, **kwargs: object) -> dict[str, VMType]:
    async with get_session().create_client("ec2", **cloud.client_kwargs()) as ec2:
        return await fetch_instance_types(ec2, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def east() -> Iterator[LocalCloud]:
    with LocalCloud(region="us-east-1") as cloud:
        yield cloud


@pytest.fixture(scope="module")
def east_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def types(east: LocalCloud, east_cache: Path) -> dict[str, VMType]:
    catalog.clear_memory_cache()
    start = time.perf_counter()
    result = asyncio.run(_fetch(east, cache_directory=east_cache))
    print(f"full DescribeInstanceTypes, local cloud: {time.perf_counter() - start:.2f} s")
    return result


@pytest.fixture
def seeded(types: dict[str, VMType], east_cache: Path, tmp_path: Path) -> Path:
    """A cache directory holding a fresh copy of the us-east-1 answer."""
    (cached,) = east_cache.glob("instance-types-*.json")
    shutil.copy(cached, tmp_path / cached.name)
    return tmp_path


@pytest.fixture(scope="module")
def west_types() -> dict[str, VMType]:
    with LocalCloud(region="us-west-1") as west:
        result = asyncio.run(_fetch(west, refresh=True, cache_directory=west.workdir))
        assert west.calls["DescribeInstanceTypes"] == 1
    return result


@pytest.fixture(scope="module")
def prices() -> PriceTable:
    return PriceTable.load("us-east-1")


@pytest.fixture(autouse=True)
def _fresh_memory_cache() -> Iterator[None]:
    catalog.clear_memory_cache()
    yield
    catalog.clear_memory_cache()


def rank(
    types: dict[str, VMType], prices: PriceTable, limit: int | None = None, **options: object
) -> list[VMType]:
    return rank_candidates(types, Needs.from_options(**options), prices, limit=limit)  # type: ignore[arg-type]


# -- parsing -------------------------------------------------------------------------------


def test_parses_the_real_describe_instance_types_shape(east: LocalCloud) -> None:
    ec2 = boto3.client("ec2", **east.client_kwargs())
    pages = list(ec2.get_paginator("describe_instance_types").paginate())
    parsed = parse_instance_types(pages)
    assert len(parsed) > 1000
    m6i = parsed["m6i.large"]
    assert (m6i.vcpus, m6i.memory_mib, m6i.arch, m6i.gpus, m6i.gpu_model) == (
        2,
        8192,
        "x86_64",
        0,
        None,
    )
    assert parsed["m7g.large"].arch == "arm64"
    g5 = parsed["g5.xlarge"]
    assert (g5.gpus, g5.gpu_model, g5.gpu_memory_mib, g5.accelerated) == (1, "A10G", 22888, True)
    p4d = parsed["p4d.24xlarge"]
    assert (p4d.gpus, p4d.gpu_model, p4d.vcpus) == (8, "A100", 96)
    assert parsed["t3.medium"].burstable and parsed["t4g.micro"].burstable
    assert not parsed["m7i.large"].burstable
    inf2 = parsed["inf2.xlarge"]
    assert inf2.accelerated and inf2.gpus == 0
    assert "spot" not in parsed["hpc7g.4xlarge"].usage_classes
    assert parsed["mac1.metal"].arch == "x86_64_mac"


def test_fetch_keeps_only_the_types_the_region_offers(
    types: dict[str, VMType], west_types: dict[str, VMType]
) -> None:
    assert 0 < len(west_types) < len(types)
    assert "g5.xlarge" in types and "g5.xlarge" not in west_types


# -- the cache -----------------------------------------------------------------------------


async def test_second_fetch_makes_no_describe_call_thanks_to_the_disk_cache(
    east: LocalCloud, tmp_path: Path
) -> None:
    east.reset_calls()
    first = await _fetch(east, cache_directory=tmp_path)
    assert east.calls["DescribeInstanceTypes"] == 1
    assert len(list(tmp_path.glob("instance-types-us-east-1-*.json"))) == 1

    catalog.clear_memory_cache()  # a new process: only the disk remembers
    second = await _fetch(east, cache_directory=tmp_path)
    assert east.calls["DescribeInstanceTypes"] == 1
    assert second == first


async def test_cache_dir_comes_from_the_environment(
    east: LocalCloud, seeded: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DASK_RAWVM_CACHE_DIR", str(seeded))
    east.reset_calls()
    assert "m6i.large" in await _fetch(east)
    assert east.calls["DescribeInstanceTypes"] == 0


async def test_memory_cache_answers_without_the_disk(east: LocalCloud, seeded: Path) -> None:
    await _fetch(east, cache_directory=seeded)
    for path in seeded.iterdir():
        path.unlink()
    east.reset_calls()
    assert "m6i.large" in await _fetch(east, cache_directory=seeded)
    assert east.calls["DescribeInstanceTypes"] == 0


async def test_a_stale_cache_asks_the_cloud_again(east: LocalCloud, seeded: Path) -> None:
    east.reset_calls()
    await _fetch(east, cache_directory=seeded, ttl=0)
    assert east.calls["DescribeInstanceTypes"] == 1


async def test_a_corrupt_cache_file_is_ignored(east: LocalCloud, seeded: Path) -> None:
    (path,) = seeded.glob("instance-types-*.json")
    path.write_text("{not json")
    east.reset_calls()
    assert "m6i.large" in await _fetch(east, cache_directory=seeded)
    assert east.calls["DescribeInstanceTypes"] == 1
    assert json.loads(path.read_text())["types"]  # and it was rewritten


# -- ranking -------------------------------------------------------------------------------


def test_cpu_need_picks_the_cheapest_fitting_type_without_oversizing(
    types: dict[str, VMType], prices: PriceTable
) -> None:
    ranked = rank(types, prices, worker_cpu=2)
    assert ranked[0].name == "c6g.large"
    assert all(2 <= t.vcpus <= 8 for t in ranked)  # at most 4x what was asked
    assert not any(t.burstable or t.accelerated for t in ranked)
    keys = [catalog._rank_key(t, "on-demand") for t in ranked]
    assert keys == sorted(keys)
    assert all(t.on_demand_price is not None and t.spot_price is not None for t in ranked)


def test_cpu_and_memory_need(types: dict[str, VMType], prices: PriceTable) -> None:
    ranked = rank(types, prices, worker_cpu=4, worker_memory="16 GiB")
    assert ranked[0].name == "m6g.xlarge"
    assert all(4 <= t.vcpus <= 16 and 16384 <= t.memory_mib <= 4 * 16384 for t in ranked)


def test_arm_true_false_and_either(types: dict[str, VMType], prices: PriceTable) -> None:
    arm = rank(types, prices, worker_cpu=2, arm=True)
    x86 = rank(types, prices, worker_cpu=2, arm=False)
    assert {t.arch for t in arm} == {"arm64"}
    assert {t.arch for t in x86} == {"x86_64"}
    assert x86[0].name == "c6a.large"
    either = rank(types, prices, worker_cpu=2)
    assert {t.arch for t in either} == {"arm64", "x86_64"}


def test_gpu_count_and_model(types: dict[str, VMType], prices: PriceTable) -> None:
    a10g = rank(types, prices, worker_gpu="a10g")  # case does not matter
    assert a10g[0].name == "g5.xlarge"
    assert {t.gpu_model for t in a10g} == {"A10G"}
    assert all(t.gpus <= 4 for t in a10g)

    l4 = rank(types, prices, worker_gpu=(4, "L4"))
    assert l4[0].name == "g6.12xlarge"
    assert all(t.gpu_model == "L4" and 4 <= t.gpus <= 16 for t in l4)

    assert rank(types, prices, worker_gpu=1)[0].name == "g5g.xlarge"  # an arm T4g
    assert rank(types, prices, worker_gpu=1, arm=False)[0].name == "g4dn.xlarge"


def test_oversize_cap_never_hides_the_smallest_type_that_fits(
    types: dict[str, VMType], prices: PriceTable
) -> None:
    # Every A100 type has 8 GPUs: more than 4x one, but nothing smaller exists.
    a100 = rank(types, prices, worker_gpu="A100")
    assert [t.name for t in a100] == ["p4d.24xlarge", "p4de.24xlarge"]


def test_no_gpu_asked_means_no_accelerated_type(
    types: dict[str, VMType], prices: PriceTable
) -> None:
    assert not any(t.accelerated for t in rank(types, prices, worker_memory="64 GiB"))


def test_spot_ranks_by_spot_price(types: dict[str, VMType], prices: PriceTable) -> None:
    on_demand = rank(types, prices, limit=3, worker_cpu=2, arm=False)
    assert on_demand[0].name == "c6a.large"
    # A live spot price makes c6i.large the cheapest spot type, not on-demand.
    cheap_spot = prices.with_live_spot({("c6i.large", "us-east-1a"): 0.02})
    spot = rank(types, cheap_spot, limit=3, worker_cpu=2, arm=False, market="spot")
    assert spot[0].name == "c6i.large"
    assert spot[0].spot_price == 0.02 and spot[0].spot_price_live
    assert rank(types, cheap_spot, limit=3, worker_cpu=2, arm=False)[0].name == "c6a.large"
    spot_prices = [t.spot_price for t in spot]
    assert spot_prices == sorted(spot_prices)  # type: ignore[type-var]


def test_current_generation_wins_a_tie(types: dict[str, VMType], prices: PriceTable) -> None:
    old = dataclasses.replace(types["c6a.large"], current_generation=False)
    new = dataclasses.replace(types["c6i.large"], current_generation=True)
    # Same listed price: the previous generation must come second.
    tied = dataclasses.replace(prices, listed={"c6a.large": 0.085, "c6i.large": 0.085})
    ranked = rank_candidates({"c6a.large": old, "c6i.large": new}, Needs(cpu=2), tied)
    assert [t.name for t in ranked] == ["c6i.large", "c6a.large"]


def test_live_spot_prices_from_the_local_cloud_and_their_sanity_check(
    east: LocalCloud, types: dict[str, VMType], prices: PriceTable
) -> None:
    async def ask() -> dict[tuple[str, str], float]:
        async with get_session().create_client("ec2", **east.client_kwargs()) as ec2:
            return await live_spot_prices(ec2, ["m6i.large", "m7g.large"], zones=["us-east-1a"])

    live = asyncio.run(ask())
    assert set(live) == {("m6i.large", "us-east-1a"), ("m7g.large", "us-east-1a")}
    # moto answers $0.00001 for everything: not believable, so the default discount stands.
    assert all(p < 0.001 for p in live.values())
    price, is_live = prices.with_live_spot(live).spot(types["m6i.large"])
    assert not is_live
    assert price == pytest.approx(0.096 * (1 - prices.spot_discount))


def test_choose_vm_types_uses_names_when_given(
    types: dict[str, VMType], prices: PriceTable
) -> None:
    named = choose_vm_types(types, prices, names=["t3.medium"])  # burstable is fine by name
    assert [t.name for t in named] == ["t3.medium"]
    assert named[0].on_demand_price == pytest.approx(0.0416)
    chosen = choose_vm_types(types, prices, needs=Needs(cpu=2), limit=2)
    assert len(chosen) == 2 and chosen[0].name == "c6g.large"


# -- prices --------------------------------------------------------------------------------


def test_prices_listed_linear_estimated_and_regional(types: dict[str, VMType]) -> None:
    east_prices = PriceTable.load("us-east-1")
    assert east_prices.on_demand(types["g5.xlarge"]) == (1.006, False)
    assert east_prices.on_demand(types["m6i.4xlarge"])[0] == pytest.approx(16 * 0.048)
    estimate, estimated = east_prices.on_demand(types["c9g.large"])
    assert estimated and 0.02 < estimate < 0.2
    unlisted_l40s = dataclasses.replace(types["g6e.xlarge"], name="g99.xlarge")
    gpu_estimate, _ = east_prices.on_demand(unlisted_l40s)
    assert gpu_estimate > 1.0  # an L40S is not priced like a CPU
    frankfurt = PriceTable.load("eu-central-1")
    assert frankfurt.price(types["m6i.large"], "on-demand") == pytest.approx(0.096 * 1.2)
    assert PriceTable.load("xx-nowhere-1").multiplier == 1.2
    annotated = east_prices.annotate(types["c9g.large"])
    assert annotated.price_estimated and annotated.spot_price < annotated.on_demand_price  # type: ignore[operator]


# -- options -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gpu", "expected"),
    [
        (None, (0, None)),
        (1, (1, None)),
        ("A10G", (1, "A10G")),
        ((2, "A100"), (2, "A100")),
        (True, (1, None)),
    ],
)
def test_gpu_option_forms(gpu: object, expected: tuple[int, str | None]) -> None:
    needs = Needs.from_options(worker_gpu=gpu)  # type: ignore[arg-type]
    assert (needs.gpus, needs.gpu_model) == expected


def test_memory_option_forms() -> None:
    assert Needs.from_options(worker_memory="16 GiB").memory_mib == 16384
    assert Needs.from_options(worker_memory="8GB").memory_mib == 7630
    assert Needs.from_options(worker_memory=2**30).memory_mib == 1024


@pytest.mark.parametrize(
    ("options", "cause", "fix"),
    [
        ({"worker_memory": 16}, "worker_memory=16", "'16 GiB'"),
        ({"worker_memory": "lots"}, "'lots' is not a size", "worker_memory='16 GiB'"),
        ({"worker_gpu": (2,)}, "not understood", "worker_gpu=(2, 'A100')"),
        ({"worker_cpu": 0}, "worker_cpu=0", "at least 1 vCPU"),
        ({"market": "reserved"}, "'reserved'", "on-demand, spot"),
    ],
)
def test_bad_options_say_cause_and_fix(options: dict, cause: str, fix: str) -> None:
    with pytest.raises(CatalogError) as info:
        Needs.from_options(**options)
    assert cause in str(info.value) and fix in str(info.value)
    assert isinstance(info.value, ValueError)


# -- errors --------------------------------------------------------------------------------


def test_unknown_type_suggests_close_names(types: dict[str, VMType], prices: PriceTable) -> None:
    with pytest.raises(CatalogError, match=r"unknown instance type 'm6i\.lrage' in us-east-1") as e:
        resolve_vm_types(types, ["m6i.lrage"], prices)
    assert "Did you mean m6i.large" in str(e.value)
    assert "Fix:" in str(e.value)


def test_gpu_model_missing_in_region_lists_what_is_there(west_types: dict[str, VMType]) -> None:
    with pytest.raises(CatalogError) as e:
        rank(west_types, PriceTable.load("us-west-1"), worker_gpu="A10G")
    message = str(e.value)
    assert "no instance type with GPU 'A10G' in us-west-1" in message
    assert "GPUs available here: H100, H200, T4" in message
    assert "Fix: pass one of those as worker_gpu" in message


def test_impossible_cpu_names_the_need_the_nearest_types_and_the_fix(
    types: dict[str, VMType], prices: PriceTable
) -> None:
    with pytest.raises(CatalogError) as e:
        rank(types, prices, worker_cpu=1000)
    message = str(e.value)
    assert "none has >= 1000 vCPU" in message
    assert "nearest: u7i" in message and "896 vCPU" in message
    assert "Fix: ask for fewer vCPUs per worker" in message


def test_needs_that_rule_each_other_out_are_named_with_both_ways_out(
    types: dict[str, VMType], prices: PriceTable
) -> None:
    with pytest.raises(CatalogError) as e:
        rank(types, prices, worker_gpu="T4", arm=True)
    message = str(e.value)
    assert "GPU model T4 and arm64 rule each other out" in message
    assert "without GPU model T4: g5g.xlarge" in message
    assert "without arm64: g4dn.xlarge" in message
    assert "choose another GPU model" in message and "set arm=None" in message


def test_arm_type_with_arm_false_is_refused(types: dict[str, VMType], prices: PriceTable) -> None:
    with pytest.raises(CatalogError) as e:
        resolve_vm_types(types, ["m7g.large"], prices, Needs(arm=False))
    message = str(e.value)
    assert "m7g.large is arm64 but arm=False asks for x86_64" in message
    suggestion = message.split("such as ")[1].split(" or ")[0]
    assert types[suggestion].arch == "x86_64"
    with pytest.raises(CatalogError, match=r"m6i\.large is x86_64 but arm=True"):
        resolve_vm_types(types, ["m6i.large"], prices, Needs(arm=True))


def test_named_type_missing_a_need_is_refused(types: dict[str, VMType], prices: PriceTable) -> None:
    with pytest.raises(CatalogError) as e:
        resolve_vm_types(types, ["m6i.large"], prices, Needs.from_options(worker_gpu=1))
    assert "m6i.large (2 vCPU, 8 GiB, x86_64) does not have >= 1 GPU" in str(e.value)
    assert "Fix: name a type that has >= 1 GPU, or drop worker_gpu" in str(e.value)
    with pytest.raises(CatalogError, match=r"does not have spot support.*drop spot_policy"):
        resolve_vm_types(types, ["hpc7g.4xlarge"], prices, Needs(market="spot"))
    with pytest.raises(CatalogError, match=r"macOS.*Fix: choose a Linux type"):
        resolve_vm_types(types, ["mac1.metal"], prices)
