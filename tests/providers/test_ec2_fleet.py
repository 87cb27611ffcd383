"""EC2 Fleet launches over HTTP against the local cloud, whose instant fleets fulfil part of
a request and report per-pool errors as AWS's do (its capacity model); and the pure request
building, response parsing and failover planning on responses shaped like AWS's."""

from __future__ import annotations

import asyncio
import base64
import math
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import boto3
import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from helpers import live_instances

from dask_rawvm.backoff import Backoff
from dask_rawvm.errors import ProviderError
from dask_rawvm.localcloud import LocalCloud
from dask_rawvm.providers.base import CLUSTER_TAG, ROLE_TAG
from dask_rawvm.providers.ec2.catalog import VMType
from dask_rawvm.providers.ec2.fleet import (
    FailoverPlanner,
    FleetLaunchError,
    FleetTopUp,
    LaunchTemplate,
    PoolError,
    delete_launch_templates,
    ensure_launch_template,
    fleet_request,
    launch_fleet,
    make_pools,
    parse_fleet_response,
    whole_call_error,
)
from dask_rawvm.providers.ec2.provider import AMI_PARAMETER

CLUSTER = "fleet-test"
SCRIPT = "#!/bin/sh\necho worker\n"
FAST = Backoff(0.001, 0.01)
# Best first: an x86 type given as a catalog VMType, an arm type and another x86 type as pairs.
CANDIDATES: list[VMType | tuple[str, str]] = [
    VMType("m6i.large", vcpus=2, memory_mib=8192, arch="x86_64"),
    ("m7g.large", "arm64"),
    ("c6i.large", "x86_64"),
]


@dataclass
class Network:
    subnets: list[tuple[str, str]]
    amis: dict[str, str]
    security_group: str


@pytest.fixture
def idle_cloud() -> Iterator[LocalCloud]:
    """A local cloud whose instances never boot: launch tests need no processes."""
    with LocalCloud(boot_delay=3600) as cloud:
        yield cloud


@pytest.fixture
async def ec2(idle_cloud: LocalCloud) -> AsyncIterator[Any]:
    """A launch client as the provider makes one: botocore retries off."""
    config = AioConfig(retries={"total_max_attempts": 1})
    async with get_session().create_client(
        "ec2", config=config, **idle_cloud.client_kwargs()
    ) as client:
        yield client


@pytest.fixture
def network(idle_cloud: LocalCloud) -> Network:
    ec2 = boto3.client("ec2", **idle_cloud.client_kwargs())
    default = [{"Name": "default-for-az", "Values": ["true"]}]
    subnets = sorted(
        (s["SubnetId"], s["AvailabilityZone"])
        for s in ec2.describe_subnets(Filters=default)["Subnets"]
    )
    subnets.sort(key=lambda s: s[1])
    ssm = boto3.client("ssm", **idle_cloud.client_kwargs())
    amis = {
        arch: ssm.get_parameter(Name=AMI_PARAMETER.format(arch=arch))["Parameter"]["Value"]
        for arch in ("x86_64", "arm64")
    }
    group = ec2.describe_security_groups(GroupNames=["default"])["SecurityGroups"][0]["GroupId"]
    idle_cloud.reset_calls()
    return Network(subnets[:3], amis, group)


async def _template(ec2: Any, network: Network, script: str = SCRIPT) -> LaunchTemplate:
    return await ensure_launch_template(
        ec2,
        CLUSTER,
        user_data=script,
        tags={ROLE_TAG: "worker"},
        security_group_ids=[network.security_group],
    )


def _launch(ec2: Any, network: Network, template: LaunchTemplate, **kwargs: Any) -> Any:
    options: dict[str, Any] = {
        "template": template,
        "candidates": CANDIDATES,
        "subnets": network.subnets,
        "ami_by_arch": network.amis,
        "cluster": CLUSTER,
        "throttle_backoff": FAST,
        "capacity_backoff": FAST,
        **kwargs,
    }
    return launch_fleet(ec2, **options)


def _ice(vm_type: str, zone: str) -> str:
    """InsufficientInstanceCapacity as AWS words it: the zone asked for, then the others."""
    return (
        f"We currently do not have sufficient {vm_type} capacity in the Availability Zone you "
        f"requested ({zone}). Our system will be working on provisioning additional capacity. "
        f"You can currently get {vm_type} capacity by not specifying an Availability Zone in "
        "your request or choosing us-east-1b, us-east-1c, us-east-1d."
    )


# -- the happy path ----------------------------------------------------------------------------


@pytest.mark.parametrize("market", ["on-demand", "spot"])
async def test_25_machines_land_in_one_create_fleet(
    idle_cloud: LocalCloud, ec2: Any, network: Network, market: str
) -> None:
    template = await _template(ec2, network)
    result = await _launch(ec2, network, template, count=25, spot_policy=market)
    calls = idle_cloud.calls

    assert (len(result.instances), result.missing, result.calls) == (25, 0, 1)
    assert {i.market for i in result.instances} == {market}
    assert {i.zone for i in result.instances} <= {z for _, z in network.subnets}
    # A template and a fleet: within the ceil(N/1000) + 3 budget.
    assert calls == {"CreateLaunchTemplate": 1, "CreateFleet": 1}
    assert sum(calls.values()) <= math.ceil(25 / 1000) + 3
    assert "launched 25 of 25" in result.summary()

    live = {i["InstanceId"]: i for i in live_instances(idle_cloud, CLUSTER)}
    assert set(live) == set(result.ids)
    for instance in live.values():
        tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
        assert tags[CLUSTER_TAG] == CLUSTER and tags[ROLE_TAG] == "worker"
        assert (instance.get("InstanceLifecycle") == "spot") == (market == "spot")


async def test_instances_carry_the_template_s_user_data_and_volume_tags(
    idle_cloud: LocalCloud, ec2: Any, network: Network
) -> None:
    template = await _template(ec2, network)
    result = await _launch(ec2, network, template, count=2)
    client = boto3.client("ec2", **idle_cloud.client_kwargs())
    data = client.describe_instance_attribute(InstanceId=result.ids[0], Attribute="userData")
    assert base64.b64decode(data["UserData"]["Value"]).decode() == SCRIPT
    volumes = client.describe_volumes(
        Filters=[{"Name": "attachment.instance-id", "Values": result.ids}]
    )["Volumes"]
    assert len(volumes) == 2
    assert all({"Key": CLUSTER_TAG, "Value": CLUSTER} in v["Tags"] for v in volumes)


async def test_a_later_launch_costs_one_version_at_most(
    idle_cloud: LocalCloud, ec2: Any, network: Network
) -> None:
    first = await _template(ec2, network)
    same = await ensure_launch_template(
        ec2,
        CLUSTER,
        user_data=SCRIPT,
        tags={ROLE_TAG: "worker"},
        security_group_ids=[network.security_group],
        template=first,
    )
    assert same == first and idle_cloud.calls == {"CreateLaunchTemplate": 1}

    newer = await ensure_launch_template(
        ec2,
        CLUSTER,
        user_data="#!/bin/sh\necho newer\n",
        tags={ROLE_TAG: "worker"},
        security_group_ids=[network.security_group],
        template=first,
    )
    assert (newer.id, newer.version) == (first.id, "2")
    result = await _launch(ec2, network, newer, count=1)
    assert idle_cloud.calls == {
        "CreateLaunchTemplate": 1,
        "CreateLaunchTemplateVersion": 1,
        "CreateFleet": 1,
    }
    client = boto3.client("ec2", **idle_cloud.client_kwargs())
    data = client.describe_instance_attribute(InstanceId=result.ids[0], Attribute="userData")
    assert b"newer" in base64.b64decode(data["UserData"]["Value"])


async def test_a_template_left_by_an_earlier_run_is_reused(ec2: Any, network: Network) -> None:
    first = await _template(ec2, network)
    again = await _template(ec2, network)  # a new process knows no template: it finds it
    assert (again.id, again.version) == (first.id, "2")


async def test_cleanup_removes_the_cluster_s_templates_only(
    idle_cloud: LocalCloud, ec2: Any, network: Network
) -> None:
    mine = await _template(ec2, network)
    other = await ensure_launch_template(ec2, "other-cluster", user_data=SCRIPT)
    assert await delete_launch_templates(ec2, CLUSTER) == [mine.id]
    client = boto3.client("ec2", **idle_cloud.client_kwargs())
    left = [t["LaunchTemplateId"] for t in client.describe_launch_templates()["LaunchTemplates"]]
    assert left == [other.id]
    assert await delete_launch_templates(ec2, CLUSTER) == []


async def test_chunks_of_1000_per_create_fleet(
    idle_cloud: LocalCloud, ec2: Any, network: Network
) -> None:
    started = time.monotonic()
    template = await _template(ec2, network)
    result = await _launch(ec2, network, template, count=2500)
    assert (len(result.instances), len(set(result.ids)), result.calls) == (2500, 2500, 3)
    assert idle_cloud.calls == {"CreateLaunchTemplate": 1, "CreateFleet": 3}
    assert time.monotonic() - started < 30


async def test_1200_machines_take_two_create_fleet_calls(
    idle_cloud: LocalCloud, ec2: Any, network: Network
) -> None:
    template = await _template(ec2, network)
    idle_cloud.reset_calls()
    await _launch(ec2, network, template, count=1200)
    assert idle_cloud.calls == {"CreateFleet": 2}


# -- failover over HTTP ------------------------------------------------------------------------


async def test_spot_with_fallback_fills_the_spot_shortfall_on_demand_in_the_same_pass(
    idle_cloud: LocalCloud, ec2: Any, network: Network
) -> None:
    """The first spot chunk finds no m6i.large in the first zone: that chunk goes on-demand,
    the later chunks get spot from the pools left."""
    template = await _template(ec2, network)
    first_subnet, first_zone = network.subnets[0]
    idle_cloud.reset_calls()
    idle_cloud.inject(
        "CreateFleet",
        error="InsufficientInstanceCapacity",
        message=_ice("m6i.large", first_zone),
    )
    result = await _launch(
        ec2, network, template, count=25, spot_policy="spot_with_fallback", max_per_call=10
    )

    assert (result.missing, result.count("spot"), result.count("on-demand")) == (0, 15, 10)
    # spot (ICE), on-demand for its 10, then spot 10 and spot 5 elsewhere.
    assert idle_cloud.calls == {"CreateFleet": 4}
    assert result.failovers == [
        f"spot m6i.large in {first_zone}: InsufficientInstanceCapacity -> on-demand"
    ]
    spot_pools = {(i.vm_type, i.subnet_id) for i in result.instances if i.market == "spot"}
    assert ("m6i.large", first_subnet) not in spot_pools


async def test_spot_with_fallback_goes_on_demand_when_spot_is_gone(
    idle_cloud: LocalCloud, ec2: Any, network: Network
) -> None:
    template = await _template(ec2, network)
    idle_cloud.reset_calls()
    idle_cloud.inject("CreateFleet", error="InsufficientInstanceCapacity")  # names no pool
    result = await _launch(ec2, network, template, count=25, spot_policy="spot_with_fallback")
    assert (result.count("spot"), result.count("on-demand")) == (0, 25)
    assert idle_cloud.calls == {"CreateFleet": 2}
    assert result.failovers == ["spot any type: InsufficientInstanceCapacity -> on-demand"]


async def test_ice_on_a_named_pool_fails_over_to_the_next_zone_not_to_botocore(
    idle_cloud: LocalCloud, ec2: Any, network: Network
) -> None:
    template = await _template(ec2, network)
    first_subnet, first_zone = network.subnets[0]
    idle_cloud.reset_calls()
    idle_cloud.inject(
        "CreateFleet", error="InsufficientInstanceCapacity", message=_ice("m6i.large", first_zone)
    )
    result = await _launch(ec2, network, template, count=5)
    assert idle_cloud.calls == {"CreateFleet": 2}  # ICE is an HTTP 500 botocore did not resend
    assert result.missing == 0 and first_subnet not in {i.subnet_id for i in result.instances}
    assert result.failovers == [
        f"on-demand m6i.large in {first_zone}: InsufficientInstanceCapacity -> other types/zones"
    ]


async def test_no_capacity_anywhere_returns_what_it_got_at_once(
    idle_cloud: LocalCloud, ec2: Any, network: Network
) -> None:
    template = await _template(ec2, network)
    idle_cloud.reset_calls()
    idle_cloud.inject("CreateFleet", error="InsufficientInstanceCapacity")
    result = await _launch(ec2, network, template, count=7)
    assert (result.instances, result.missing, idle_cloud.calls) == ([], 7, {"CreateFleet": 1})
    assert "7 still missing" in result.summary()


async def test_capacity_retry_timeout_keeps_asking_until_capacity_returns(
    idle_cloud: LocalCloud, ec2: Any, network: Network
) -> None:
    template = await _template(ec2, network)
    idle_cloud.reset_calls()
    idle_cloud.inject("CreateFleet", error="InsufficientInstanceCapacity", count=3)
    result = await _launch(ec2, network, template, count=7, capacity_retry_timeout=30)
    assert result.missing == 0 and idle_cloud.calls == {"CreateFleet": 4}
    assert len(result.failovers) == 3


async def test_throttling_backs_off_and_completes(
    idle_cloud: LocalCloud, ec2: Any, network: Network
) -> None:
    template = await _template(ec2, network)
    idle_cloud.reset_calls()
    idle_cloud.inject("CreateFleet", error="RequestLimitExceeded", count=2)
    result = await _launch(ec2, network, template, count=25, spot_policy="spot")
    assert (result.missing, result.calls, result.failovers) == (0, 3, [])
    assert idle_cloud.calls == {"CreateFleet": 3}


@pytest.mark.parametrize(
    ("code", "fix"),
    [
        ("UnauthorizedOperation", "ec2:CreateFleet"),
        ("VcpuLimitExceeded", "Service Quotas"),
        ("InvalidParameterValue", "AMI of each architecture"),
    ],
)
async def test_an_error_no_failover_fixes_is_one_clear_provider_error(
    idle_cloud: LocalCloud, ec2: Any, network: Network, code: str, fix: str
) -> None:
    template = await _template(ec2, network)
    idle_cloud.reset_calls()
    idle_cloud.inject("CreateFleet", error=code, message="refused")
    with pytest.raises(ProviderError, match=code) as raised:
        await _launch(ec2, network, template, count=5, capacity_retry_timeout=60)
    assert fix in str(raised.value)
    assert isinstance(raised.value, FleetLaunchError) and raised.value.result.instances == []
    assert idle_cloud.calls == {"CreateFleet": 1}
    assert raised.value.code == code  # EC2's code, kept on the exception


async def test_spot_quota_falls_back_but_is_fatal_without_fallback(
    idle_cloud: LocalCloud, ec2: Any, network: Network
) -> None:
    template = await _template(ec2, network)
    idle_cloud.inject("CreateFleet", error="MaxSpotInstanceCountExceeded")
    result = await _launch(ec2, network, template, count=3, spot_policy="spot_with_fallback")
    assert result.count("on-demand") == 3
    idle_cloud.inject("CreateFleet", error="MaxSpotInstanceCountExceeded")
    with pytest.raises(ProviderError, match="spot_with_fallback"):
        await _launch(ec2, network, template, count=3, spot_policy="spot")


async def test_bad_inputs_fail_before_any_call(
    idle_cloud: LocalCloud, ec2: Any, network: Network
) -> None:
    template = LaunchTemplate("lt-0", "x", "1")
    with pytest.raises(ProviderError, match="no AMI for architecture"):
        await _launch(ec2, network, template, count=1, ami_by_arch={"x86_64": "ami-1"})
    with pytest.raises(ProviderError, match="spot_policy"):
        await _launch(ec2, network, template, count=1, spot_policy="cheap")
    no_spot = [VMType("hpc7g.4xlarge", 16, 131072, "arm64", usage_classes=("on-demand",))]
    with pytest.raises(ProviderError, match="can be bought on spot"):
        await _launch(ec2, network, template, count=1, candidates=no_spot, spot_policy="spot")
    with pytest.raises(ProviderError, match="16384"):
        await ensure_launch_template(ec2, CLUSTER, user_data="x" * 20000)
    assert idle_cloud.calls == {}


# -- the background top-up ---------------------------------------------------------------------


async def test_top_up_keeps_asking_and_reports_each_batch(
    idle_cloud: LocalCloud, ec2: Any, network: Network
) -> None:
    template = await _template(ec2, network)
    idle_cloud.reset_calls()
    idle_cloud.inject("CreateFleet", error="InsufficientInstanceCapacity", count=3)
    first = await _launch(ec2, network, template, count=12)
    assert first.missing == 12

    batches: list[list[Any]] = []
    launch = partial(
        launch_fleet,
        ec2,
        template=template,
        candidates=CANDIDATES,
        subnets=network.subnets,
        ami_by_arch=network.amis,
        capacity_backoff=FAST,
    )
    topup = FleetTopUp(launch, first.missing, timeout=30, on_launch=batches.append, first_delay=0)
    result = await topup.start().wait()
    assert result.missing == 0 and sum(len(b) for b in batches) == 12
    assert idle_cloud.calls == {"CreateFleet": 4}


async def test_top_up_stops_when_asked(idle_cloud: LocalCloud, ec2: Any, network: Network) -> None:
    template = await _template(ec2, network)
    idle_cloud.inject("CreateFleet", error="InsufficientInstanceCapacity", count=10**6)
    launch = partial(_launch, ec2, network, template, capacity_backoff=Backoff(0.05, 0.05))
    topup = FleetTopUp(launch, 5, timeout=600, on_launch=print, first_delay=0).start()
    topup.stop()
    with pytest.raises(asyncio.CancelledError):
        await topup.wait()


# -- the failover logic on responses shaped like AWS's (pure functions on data) ------------

SUBNETS = [("subnet-a", "us-east-1a"), ("subnet-b", "us-east-1b")]
POOLS = make_pools([("m6i.large", "x86_64"), ("m7g.large", "arm64")], SUBNETS)
AMIS = {"x86_64": "ami-x86", "arm64": "ami-arm"}
TEMPLATE = LaunchTemplate("lt-1", "dask-rawvm-x", "3")


def _override(vm_type: str, subnet: str) -> dict[str, Any]:
    return {
        "LaunchTemplateSpecification": {"LaunchTemplateId": "lt-1", "Version": "3"},
        "Overrides": {"InstanceType": vm_type, "SubnetId": subnet, "Priority": 0.0},
    }


def _response(
    instances: list[tuple[str, str, str, int]], errors: list[tuple[str, str, str, str]]
) -> dict[str, Any]:
    """A CreateFleet (instant) response: (type, subnet, lifecycle, n) and
    (type, subnet, lifecycle, error code)."""
    counter = iter(range(10**6))
    return {
        "FleetId": "fleet-1",
        "Instances": [
            {
                "LaunchTemplateAndOverrides": _override(t, s),
                "Lifecycle": life,
                "InstanceIds": [f"i-{next(counter):017x}" for _ in range(n)],
                "InstanceType": t,
            }
            for t, s, life, n in instances
        ],
        "Errors": [
            {
                "LaunchTemplateAndOverrides": _override(t, s),
                "Lifecycle": life,
                "ErrorCode": code,
                "ErrorMessage": f"{code} for {t} in {s}",
            }
            for t, s, life, code in errors
        ],
    }


def test_the_request_has_one_config_per_architecture_and_one_override_per_pool() -> None:
    request = fleet_request(TEMPLATE, POOLS, "spot", 25, AMIS, "token-1", cluster="c")
    assert request["Type"] == "instant" and request["ClientToken"] == "token-1"
    assert request["TargetCapacitySpecification"] == {
        "TotalTargetCapacity": 25,
        "DefaultTargetCapacityType": "spot",
    }
    assert request["SpotOptions"] == {"AllocationStrategy": "price-capacity-optimized"}
    assert request["OnDemandOptions"] == {"AllocationStrategy": "prioritized"}
    x86, arm = request["LaunchTemplateConfigs"]
    assert x86["LaunchTemplateSpecification"] == {"LaunchTemplateId": "lt-1", "Version": "3"}
    assert x86["Overrides"] == [
        {"InstanceType": "m6i.large", "SubnetId": s, "ImageId": "ami-x86", "Priority": 0.0}
        for s, _ in SUBNETS
    ]
    assert {o["ImageId"] for o in arm["Overrides"]} == {"ami-arm"}
    assert {o["Priority"] for o in arm["Overrides"]} == {1.0}


def test_partial_spot_fulfilment_is_parsed_and_its_shortfall_goes_on_demand() -> None:
    response = _response(
        instances=[("m7g.large", "subnet-b", "spot", 15)],
        errors=[
            ("m6i.large", "subnet-a", "spot", "InsufficientInstanceCapacity"),
            ("m6i.large", "subnet-b", "spot", "UnfulfillableCapacity"),
        ],
    )
    launched, errors = parse_fleet_response(response, POOLS, "spot")
    assert len(launched) == 15
    assert {(i.vm_type, i.zone, i.market) for i in launched} == {
        ("m7g.large", "us-east-1b", "spot")
    }
    assert [(e.vm_type, e.zone, e.code) for e in errors] == [
        ("m6i.large", "us-east-1a", "InsufficientInstanceCapacity"),
        ("m6i.large", "us-east-1b", "UnfulfillableCapacity"),
    ]

    planner = FailoverPlanner(POOLS, "spot_with_fallback")
    assert planner.record("spot", errors, shortfall=10) == [
        "spot m6i.large in us-east-1a: InsufficientInstanceCapacity -> on-demand",
        "spot m6i.large in us-east-1b: UnfulfillableCapacity -> on-demand",
    ]
    assert {p.vm_type for p in planner.available("spot")} == {"m7g.large"}
    assert len(planner.available("on-demand")) == 4  # on-demand capacity is another pool


def test_without_fallback_the_failed_pools_are_dropped_and_the_rest_asked_again() -> None:
    planner = FailoverPlanner(POOLS, "spot")
    errors = [PoolError("spot", "InsufficientInstanceCapacity", "", "m6i.large", "subnet-a")]
    assert planner.record("spot", errors, shortfall=3) == [
        "spot m6i.large in subnet-a: InsufficientInstanceCapacity -> other types/zones"
    ]
    assert planner.market() == "spot" and len(planner.available("spot")) == 3
    # A shortfall nothing explains drops the market: asking again at once would not help.
    assert planner.record("spot", [], shortfall=3) == [
        "spot: 3 not launched -> none left, retrying later"
    ]
    assert planner.market() is None
    planner.reset()
    assert len(planner.available("spot")) == 4


def test_errors_with_a_full_fleet_only_steer_later_requests() -> None:
    planner = FailoverPlanner(POOLS, "spot_with_fallback")
    errors = [PoolError("spot", "Unsupported", "", "m7g.large", "subnet-a", "us-east-1a")]
    assert planner.record("spot", errors, shortfall=0) == [
        "spot m7g.large in us-east-1a: Unsupported -> filled from other pools"
    ]


@pytest.mark.parametrize(
    ("code", "policy", "whole_call", "fatal"),
    [
        ("InsufficientInstanceCapacity", "spot", True, False),
        ("SpotMaxPriceTooLow", "spot", False, False),
        ("MaxSpotInstanceCountExceeded", "spot_with_fallback", False, False),
        ("MaxSpotInstanceCountExceeded", "spot", False, True),
        ("AuthFailure.ServiceLinkedRoleCreationNotPermitted", "spot_with_fallback", False, False),
        ("AuthFailure.ServiceLinkedRoleCreationNotPermitted", "spot", False, True),
        ("VcpuLimitExceeded", "on-demand", False, True),
        ("RequestLimitExceeded", "on-demand", True, False),  # throttled past the timeout
        # The whole call refused: no pool can fix it. One pool refused: drop that pool.
        ("InvalidParameterValue", "spot_with_fallback", True, True),
        ("InvalidParameterValue", "spot_with_fallback", False, False),
        ("SomethingEC2InventsNextYear", "on-demand", False, False),
    ],
)
def test_which_errors_no_failover_can_fix(
    code: str, policy: str, whole_call: bool, fatal: bool
) -> None:
    market = "on-demand" if policy == "on-demand" else "spot"
    error = PoolError(market, code, whole_call=whole_call)
    assert FailoverPlanner(POOLS, policy).fatal(error) is fatal


def test_a_whole_call_capacity_error_is_tied_to_the_pool_its_message_names() -> None:
    error = whole_call_error(
        "InsufficientInstanceCapacity", _ice("m7g.large", "us-east-1b"), "spot", POOLS
    )
    assert (error.vm_type, error.zone) == ("m7g.large", "us-east-1b")
    unsupported = whole_call_error(
        "Unsupported",
        "Your requested instance type (m6i.large) is not supported in your requested "
        "Availability Zone (us-east-1a). Please retry your request by not specifying an "
        "Availability Zone or choosing us-east-1b.",
        "on-demand",
        POOLS,
    )
    assert (unsupported.vm_type, unsupported.zone) == ("m6i.large", "us-east-1a")
    vague = whole_call_error("InsufficientInstanceCapacity", "no capacity", "spot", POOLS)
    assert (vague.vm_type, vague.zone) == (None, None)


# -- failover on partial fulfilment, over HTTP (the local cloud's capacity model) ------------
#
# The local cloud's instant fleets try every pool they are given, best first, and report each
# pool that could not give what was asked of it: a spot fleet falls short only once every
# pool it was asked has failed.

TWO_TYPES: list[VMType | tuple[str, str]] = [("m6i.large", "x86_64"), ("m7g.large", "arm64")]


def _pools_asked(request: dict[str, str]) -> set[tuple[str, str]]:
    """(type, subnet) of each override of a CreateFleet request, from its wire parameters."""
    overrides: dict[str, dict[str, str]] = {}
    for name, value in request.items():
        if name.startswith("LaunchTemplateConfigs.") and ".Overrides." in name:
            prefix, _, field = name.rpartition(".")
            overrides.setdefault(prefix, {})[field] = value
    return {(o["InstanceType"], o["SubnetId"]) for o in overrides.values()}


async def test_the_fallback_pass_on_a_partially_fulfilled_spot_fleet(
    idle_cloud: LocalCloud, ec2: Any, network: Network
) -> None:
    """Spot has 15 left in the region: the spot fleet launches 15 and reports every pool it
    drained; the 10 it lacked go on-demand in one more call, over every pool."""
    template = await _template(ec2, network)
    (first_subnet, a), (_, b) = network.subnets[:2]
    idle_cloud.set_capacity(market="spot", count=15)
    idle_cloud.reset_calls()
    result = await _launch(
        ec2,
        network,
        template,
        candidates=TWO_TYPES,
        subnets=network.subnets[:2],
        count=25,
        spot_policy="spot_with_fallback",
    )

    assert (result.count("spot"), result.count("on-demand"), result.calls) == (15, 10, 2)
    spot, on_demand = idle_cloud.requests("CreateFleet")
    assert spot["TargetCapacitySpecification.DefaultTargetCapacityType"] == "spot"
    assert spot["TargetCapacitySpecification.TotalTargetCapacity"] == "25"
    assert {k: v for k, v in on_demand.items() if k.startswith("TargetCapacitySpecification.")} == {
        "TargetCapacitySpecification.TotalTargetCapacity": "10",
        "TargetCapacitySpecification.DefaultTargetCapacityType": "on-demand",
    }
    assert len(_pools_asked(on_demand)) == 4
    assert spot["ClientToken"] != on_demand["ClientToken"]
    assert result.summary() == (
        "launched 25 of 25 (15 spot, 10 on-demand) in 2 CreateFleet calls; failovers: "
        f"spot m6i.large in {a}: InsufficientInstanceCapacity -> on-demand; "
        f"spot m6i.large in {b}: InsufficientInstanceCapacity -> on-demand; "
        f"spot m7g.large in {a}: InsufficientInstanceCapacity -> on-demand; "
        f"spot m7g.large in {b}: InsufficientInstanceCapacity -> on-demand"
    )
    # The best pool gave all it had of each market.
    assert {(i.vm_type, i.subnet_id, i.market) for i in result.instances} == {
        ("m6i.large", first_subnet, "spot"),
        ("m6i.large", first_subnet, "on-demand"),
    }
    live = {i["InstanceId"]: i for i in live_instances(idle_cloud, CLUSTER)}
    assert set(live) == set(result.ids)
    spot_ids = {i.id for i in result.instances if i.market == "spot"}
    assert {i for i, d in live.items() if d.get("InstanceLifecycle") == "spot"} == spot_ids


async def test_a_spot_only_pass_asks_only_the_pools_left(
    idle_cloud: LocalCloud, ec2: Any, network: Network
) -> None:
    """Chunks of 4: each fleet drops the pools it found unsupported or drained, and the next
    chunk asks only the pools left, for what is still missing."""
    template = await _template(ec2, network)
    (_, a), (_, b) = network.subnets[:2]
    subnet = dict((zone, s) for s, zone in network.subnets)
    idle_cloud.mark_unsupported("m6i.large", a)
    idle_cloud.set_capacity("m6i.large", b, "spot", count=4)
    idle_cloud.reset_calls()
    result = await _launch(
        ec2,
        network,
        template,
        candidates=TWO_TYPES,
        subnets=network.subnets[:2],
        count=10,
        spot_policy="spot",
        max_per_call=4,
    )

    assert result.missing == 0 and result.count("spot") == 10 and result.calls == 3
    first, second, third = idle_cloud.requests("CreateFleet")
    assert len(_pools_asked(first)) == 4
    assert _pools_asked(second) == {
        ("m6i.large", subnet[b]),
        ("m7g.large", subnet[a]),
        ("m7g.large", subnet[b]),
    }
    assert _pools_asked(third) == {("m7g.large", subnet[a]), ("m7g.large", subnet[b])}
    totals = [r["TargetCapacitySpecification.TotalTargetCapacity"] for r in (first, second, third)]
    assert totals == ["4", "4", "2"]
    assert result.failovers == [
        f"spot m6i.large in {a}: Unsupported -> filled from other pools",
        f"spot m6i.large in {b}: InsufficientInstanceCapacity -> filled from other pools",
    ]
    assert sorted((i.vm_type, i.zone) for i in result.instances) == [
        *[("m6i.large", b)] * 4,
        *[("m7g.large", a)] * 6,
    ]


async def test_a_per_pool_error_drops_that_pool_and_keeps_what_launched(
    idle_cloud: LocalCloud, ec2: Any, network: Network
) -> None:
    """m6i.large has 3 on-demand left; the next pools name an arm type with the x86 AMI
    (a catalog mistake): EC2 refuses those pools, which are dropped, and the 3 stay."""
    template = await _template(ec2, network)
    idle_cloud.set_capacity("m6i.large", market="on-demand", count=3)
    result = await _launch(
        ec2,
        network,
        template,
        candidates=[("m6i.large", "x86_64"), ("m7g.large", "x86_64")],
        subnets=network.subnets[:2],
        count=8,
    )
    assert len(result.ids) == 3 and result.missing == 5
    assert any("m7g.large" in f and "InvalidParameterValue" in f for f in result.failovers)
    # What launched is there, in the cloud: nothing terminated it.
    live = {i["InstanceId"] for i in live_instances(idle_cloud, CLUSTER)}
    assert live == set(result.ids)


async def test_every_pool_failing_for_good_is_one_error_naming_each_reason(
    idle_cloud: LocalCloud, ec2: Any, network: Network
) -> None:
    """Nothing can launch and waiting cannot help: one error at once, not ten minutes of
    retrying."""
    template = await _template(ec2, network)
    with pytest.raises(FleetLaunchError, match="launched none of 4") as raised:
        await _launch(
            ec2,
            network,
            template,
            candidates=[("m7g.large", "x86_64")],  # an arm type with the x86 image
            subnets=network.subnets[:2],
            count=4,
            capacity_retry_timeout=600,
        )
    assert "InvalidParameterValue" in str(raised.value) and "m7g.large" in str(raised.value)
    assert raised.value.result.instances == []


async def test_a_throttled_request_is_sent_again_with_the_same_client_token(
    idle_cloud: LocalCloud, ec2: Any, network: Network
) -> None:
    template = await _template(ec2, network)
    idle_cloud.reset_calls()
    idle_cloud.inject(
        "CreateFleet", error="RequestLimitExceeded", count=2, message="Request limit exceeded."
    )
    result = await _launch(
        ec2,
        network,
        template,
        candidates=[("m6i.large", "x86_64")],
        subnets=network.subnets[:2],
        count=2,
        spot_policy="spot",
    )
    assert result.missing == 0 and result.calls == 3
    requests = idle_cloud.requests("CreateFleet")
    assert len(requests) == 3
    assert len({r["ClientToken"] for r in requests}) == 1
