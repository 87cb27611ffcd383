"""The local cloud's capacity model: EC2 Fleet (instant) and RunInstances answer as AWS does
when capacity pools run out, over HTTP (boto3 against the embedded moto server)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from helpers import wait_for

from dask_rawvm.localcloud import LocalCloud, RemoteCloud

AL2023 = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-{arch}"
BOOT = "#!/bin/sh\necho booted\n"


@dataclass
class Setup:
    """What a fleet needs: subnets by zone, AMIs by architecture, a template and its group."""

    ec2: Any
    subnets: dict[str, str]
    amis: dict[str, str]
    template: str
    group: str

    @property
    def zones(self) -> list[str]:
        return sorted(self.subnets)

    def override(
        self, vm_type: str, zone: str, priority: float | None = None, arch: str = "x86_64"
    ) -> dict[str, Any]:
        override: dict[str, Any] = {
            "InstanceType": vm_type,
            "SubnetId": self.subnets[zone],
            "ImageId": self.amis[arch],
        }
        if priority is not None:
            override["Priority"] = priority
        return override

    def fleet(
        self,
        overrides: list[dict[str, Any]],
        total: int,
        market: str = "on-demand",
        **params: Any,
    ) -> dict[str, Any]:
        """One instant fleet of one launch-template config."""
        config = {
            "LaunchTemplateSpecification": {"LaunchTemplateId": self.template, "Version": "1"},
            "Overrides": overrides,
        }
        request = {
            "Type": "instant",
            "LaunchTemplateConfigs": [config],
            "TargetCapacitySpecification": {
                "TotalTargetCapacity": total,
                "DefaultTargetCapacityType": market,
                **params.pop("targets", {}),
            },
            "OnDemandOptions": {"AllocationStrategy": "prioritized"},
            "SpotOptions": {"AllocationStrategy": "price-capacity-optimized"},
            **params,
        }
        return dict(self.ec2.create_fleet(**request))

    def instances(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        pages = self.ec2.get_paginator("describe_instances").paginate(InstanceIds=ids)
        return {
            i["InstanceId"]: i
            for page in pages
            for reservation in page["Reservations"]
            for i in reservation["Instances"]
        }


def _client(cloud: LocalCloud, service: str = "ec2") -> Any:
    # Retries off: ICE is an HTTP 500, which botocore would send again.
    return boto3.client(
        service, config=Config(retries={"total_max_attempts": 1}), **cloud.client_kwargs()
    )


def _setup(cloud: LocalCloud, script: str = BOOT) -> Setup:
    ec2 = _client(cloud)
    default = [{"Name": "default-for-az", "Values": ["true"]}]
    subnets = {
        s["AvailabilityZone"]: s["SubnetId"]
        for s in ec2.describe_subnets(Filters=default)["Subnets"]
    }
    ssm = _client(cloud, "ssm")
    amis = {
        arch: ssm.get_parameter(Name=AL2023.format(arch=arch))["Parameter"]["Value"]
        for arch in ("x86_64", "arm64")
    }
    group = ec2.create_security_group(GroupName="workers", Description="dask workers")["GroupId"]
    tags = [{"Key": "cluster", "Value": "capacity-test"}]
    template = ec2.create_launch_template(
        LaunchTemplateName="workers",
        LaunchTemplateData={
            "UserData": base64.b64encode(script.encode()).decode(),
            "InstanceInitiatedShutdownBehavior": "terminate",
            "TagSpecifications": [{"ResourceType": "instance", "Tags": tags}],
            # As the project's templates do: the groups sit on the primary interface.
            "NetworkInterfaces": [
                {"DeviceIndex": 0, "Groups": [group], "AssociatePublicIpAddress": True}
            ],
        },
    )["LaunchTemplate"]["LaunchTemplateId"]
    return Setup(ec2, subnets, amis, template, group)


@pytest.fixture
def idle_cloud() -> Iterator[LocalCloud]:
    """A local cloud whose instances never boot: these tests look at the API only."""
    with LocalCloud(boot_delay=3600) as cloud:
        yield cloud


@pytest.fixture
def setup(idle_cloud: LocalCloud) -> Setup:
    return _setup(idle_cloud)


def _launched(answer: dict[str, Any]) -> list[tuple[str, str, str, int]]:
    """(type, zone, lifecycle, count) of each ``Instances`` entry of a CreateFleet answer."""
    return [
        (
            item["InstanceType"],
            item["LaunchTemplateAndOverrides"]["Overrides"]["AvailabilityZone"],
            item["Lifecycle"],
            len(item["InstanceIds"]),
        )
        for item in answer["Instances"]
    ]


def _errors(answer: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(type, zone, lifecycle, code) of each ``Errors`` entry of a CreateFleet answer."""
    return [
        (
            item["LaunchTemplateAndOverrides"]["Overrides"]["InstanceType"],
            item["LaunchTemplateAndOverrides"]["Overrides"]["AvailabilityZone"],
            item["Lifecycle"],
            item["ErrorCode"],
        )
        for item in answer["Errors"]
    ]


def _ids(answer: dict[str, Any]) -> list[str]:
    return [i for item in answer["Instances"] for i in item["InstanceIds"]]


# -- CreateFleet (instant) ---------------------------------------------------------------------


def test_without_limits_every_instance_comes_from_the_first_priority(setup: Setup) -> None:
    a, b = setup.zones[:2]
    answer = setup.fleet(
        [setup.override("c6i.large", b, priority=1.0), setup.override("m6i.large", a, 0.0)], 5
    )
    assert answer["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert _launched(answer) == [("m6i.large", a, "on-demand", 5)]
    assert answer["Errors"] == []


def test_priority_order_across_overrides_and_configs_fills_pool_after_pool(
    idle_cloud: LocalCloud, setup: Setup
) -> None:
    a, b, c = setup.zones[:3]
    idle_cloud.set_capacity("m6i.large", a, count=2)
    idle_cloud.set_capacity("m7g.large", b, count=3)
    x86 = [setup.override("c6i.large", c, 2.0), setup.override("m6i.large", a, 0.0)]
    arm = [setup.override("m7g.large", b, 1.0, arch="arm64")]
    spec = {"LaunchTemplateId": setup.template, "Version": "1"}
    answer = setup.ec2.create_fleet(
        Type="instant",
        LaunchTemplateConfigs=[
            {"LaunchTemplateSpecification": spec, "Overrides": x86},
            {"LaunchTemplateSpecification": spec, "Overrides": arm},
        ],
        TargetCapacitySpecification={
            "TotalTargetCapacity": 10,
            "DefaultTargetCapacityType": "on-demand",
        },
        OnDemandOptions={"AllocationStrategy": "prioritized"},
    )
    # Priority 0, then 1 (another config), then 2 takes the rest.
    assert sorted(_launched(answer)) == [
        ("c6i.large", c, "on-demand", 5),
        ("m6i.large", a, "on-demand", 2),
        ("m7g.large", b, "on-demand", 3),
    ]
    assert sorted(_errors(answer)) == [
        ("m6i.large", a, "on-demand", "InsufficientInstanceCapacity"),
        ("m7g.large", b, "on-demand", "InsufficientInstanceCapacity"),
    ]
    live = setup.instances(_ids(answer))
    assert {(i["InstanceType"], i["ImageId"]) for i in live.values()} == {
        ("m6i.large", setup.amis["x86_64"]),
        ("c6i.large", setup.amis["x86_64"]),
        ("m7g.large", setup.amis["arm64"]),
    }


def test_partial_fulfilment_is_a_success_with_per_pool_errors_shaped_like_aws(
    idle_cloud: LocalCloud, setup: Setup
) -> None:
    a, b, c = setup.zones[:3]
    idle_cloud.set_capacity("m6i.large", a, "spot", count=0)
    idle_cloud.set_capacity("m6i.large", b, "spot", count=4)
    idle_cloud.mark_unsupported("m6i.large", c)
    overrides = [setup.override("m6i.large", z, 0.0) for z in (a, b, c)]
    answer = setup.fleet(overrides, 10, "spot")

    assert answer["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert _launched(answer) == [("m6i.large", b, "spot", 4)]
    assert sorted(_errors(answer)) == [
        ("m6i.large", a, "spot", "InsufficientInstanceCapacity"),
        ("m6i.large", b, "spot", "InsufficientInstanceCapacity"),
        ("m6i.large", c, "spot", "Unsupported"),
    ]
    error = next(e for e in answer["Errors"] if e["ErrorCode"] == "Unsupported")
    assert error["LaunchTemplateAndOverrides"] == {
        "LaunchTemplateSpecification": {"LaunchTemplateId": setup.template, "Version": "1"},
        "Overrides": {**overrides[2], "AvailabilityZone": c},
    }
    assert error["ErrorMessage"].startswith(
        f"Your requested instance type (m6i.large) is not supported in your requested "
        f"Availability Zone ({c})."
    )
    # The pools are spent: the same request now launches nothing, and says why.
    again = setup.fleet(overrides, 1, "spot")
    assert again["Instances"] == [] and len(again["Errors"]) == 3


def test_on_demand_ice_is_worded_as_aws_words_it(idle_cloud: LocalCloud, setup: Setup) -> None:
    a = setup.zones[0]
    idle_cloud.set_capacity("m6i.large", a, "on-demand", count=0)
    answer = setup.fleet([setup.override("m6i.large", a)], 1)
    (error,) = answer["Errors"]
    assert error["ErrorMessage"].startswith(
        f"We currently do not have sufficient m6i.large capacity in the Availability Zone you "
        f"requested ({a}). Our system will be working on provisioning additional capacity."
    )
    assert a not in error["ErrorMessage"].split("choosing")[1]


def test_spot_and_on_demand_targets_launch_in_their_markets(
    idle_cloud: LocalCloud, setup: Setup
) -> None:
    a, b = setup.zones[:2]
    idle_cloud.set_capacity(zone=a, market="spot", count=1)  # a zone-wide spot limit
    overrides = [setup.override("m6i.large", a, 0.0), setup.override("m6i.large", b, 1.0)]
    answer = setup.fleet(overrides, 5, "on-demand", targets={"SpotTargetCapacity": 3})

    assert sorted(_launched(answer)) == [
        ("m6i.large", a, "on-demand", 2),
        ("m6i.large", a, "spot", 1),
        ("m6i.large", b, "spot", 2),
    ]
    live = setup.instances(_ids(answer))
    spot = {i for i, d in live.items() if d.get("InstanceLifecycle") == "spot"}
    assert len(spot) == 3 and len(live) == 5
    spot_ids = {
        i
        for item in answer["Instances"]
        if item["Lifecycle"] == "spot"
        for i in item["InstanceIds"]
    }
    assert spot == spot_ids
    assert all("InstanceLifecycle" not in live[i] for i in set(live) - spot)
    requests = setup.ec2.describe_spot_instance_requests()["SpotInstanceRequests"]
    assert {r["InstanceId"] for r in requests} == spot


@pytest.mark.parametrize("market", ["on-demand", "spot"])
def test_instances_get_the_template_s_groups_user_data_tags_and_the_override_s_place(
    idle_cloud: LocalCloud, setup: Setup, market: str
) -> None:
    b = setup.zones[1]
    answer = setup.fleet([setup.override("m6i.large", b)], 2, market)
    live = setup.instances(_ids(answer))
    assert len(live) == 2
    for instance_id, instance in live.items():
        assert [g["GroupId"] for g in instance["SecurityGroups"]] == [setup.group]
        assert instance["SubnetId"] == setup.subnets[b]
        assert instance["Placement"]["AvailabilityZone"] == b
        assert instance["ImageId"] == setup.amis["x86_64"]
        assert {"Key": "cluster", "Value": "capacity-test"} in instance["Tags"]
        data = setup.ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
        assert base64.b64decode(data["UserData"]["Value"]).decode() == BOOT
        behaviour = setup.ec2.describe_instance_attribute(
            InstanceId=instance_id, Attribute="instanceInitiatedShutdownBehavior"
        )
        assert behaviour["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"


def test_the_same_client_token_gets_the_same_fleet_and_launches_once(setup: Setup) -> None:
    overrides = [setup.override("m6i.large", setup.zones[0])]
    first = setup.fleet(overrides, 3, ClientToken="launch-1")
    again = setup.fleet(overrides, 3, ClientToken="launch-1")
    assert (again["FleetId"], _ids(again)) == (first["FleetId"], _ids(first))
    assert len(setup.instances([])) == 3
    other = setup.fleet(overrides, 3, ClientToken="launch-2")
    assert other["FleetId"] != first["FleetId"] and len(setup.instances([])) == 6


def test_a_pool_the_type_cannot_run_on_is_an_error_of_that_pool(setup: Setup) -> None:
    a = setup.zones[0]
    bad_arch = setup.override("m7g.large", a, 0.0)  # an arm type with an x86 AMI
    bogus = {**setup.override("m6i.large", a, 1.0), "InstanceType": "m6x.nonesuch"}
    good = setup.override("c6i.large", a, 2.0)
    answer = setup.fleet([bad_arch, bogus, good], 2)
    assert _launched(answer) == [("c6i.large", a, "on-demand", 2)]
    assert [(e["ErrorCode"], e["ErrorMessage"][:60]) for e in answer["Errors"]] == [
        (
            "InvalidParameterValue",
            "The architecture 'arm64' of the specified instance type does",
        ),
        ("InvalidParameterValue", "Invalid value 'm6x.nonesuch' for InstanceType."),
    ]


def test_diversified_spot_spreads_over_the_pools(setup: Setup) -> None:
    overrides = [setup.override("m6i.large", z) for z in setup.zones[:3]]
    answer = setup.fleet(overrides, 7, "spot", SpotOptions={"AllocationStrategy": "diversified"})
    assert sorted(n for *_, n in _launched(answer)) == [2, 2, 3]


# -- RunInstances --------------------------------------------------------------------------------


def _run(setup: Setup, zone: str, count: int = 1, **params: Any) -> list[str]:
    request = {
        "ImageId": setup.amis["x86_64"],
        "InstanceType": "m6i.large",
        "MinCount": count,
        "MaxCount": count,
        "SubnetId": setup.subnets[zone],
        **params,
    }
    response = setup.ec2.run_instances(**request)
    return [i["InstanceId"] for i in response["Instances"]]


def test_run_instances_answers_ice_as_a_500_and_launches_nothing(
    idle_cloud: LocalCloud, setup: Setup
) -> None:
    a, b = setup.zones[:2]
    idle_cloud.set_capacity("m6i.large", a, count=3)
    assert len(_run(setup, a, 2)) == 2
    with pytest.raises(ClientError) as raised:
        _run(setup, a, 2)  # 1 left: MinCount 2 cannot be met
    error = raised.value.response
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 500
    assert error["Error"]["Code"] == "InsufficientInstanceCapacity"
    assert error["Error"]["Message"].startswith(
        f"We currently do not have sufficient m6i.large capacity in the Availability Zone you "
        f"requested ({a}). Our system will be working on provisioning additional capacity. "
        f"You can currently get m6i.large capacity by not specifying an Availability Zone in "
        f"your request or choosing {b}, "
    )
    assert len(setup.instances([])) == 2
    assert len(_run(setup, a, 1)) == 1  # what the refused call did not take is still there
    assert len(_run(setup, b, 5)) == 5  # another zone is another pool


def test_run_instances_spot_and_unsupported(idle_cloud: LocalCloud, setup: Setup) -> None:
    a = setup.zones[0]
    idle_cloud.set_capacity(market="spot", count=0)
    spot = {"InstanceMarketOptions": {"MarketType": "spot"}}
    with pytest.raises(ClientError, match="InsufficientInstanceCapacity"):
        _run(setup, a, **spot)
    (instance_id,) = _run(setup, a)  # on-demand is another market
    assert "InstanceLifecycle" not in setup.instances([instance_id])[instance_id]

    idle_cloud.mark_unsupported("c6i.large", a)
    with pytest.raises(ClientError) as raised:
        _run(setup, a, InstanceType="c6i.large")
    assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert raised.value.response["Error"]["Code"] == "Unsupported"


def test_run_instances_is_validated_as_ec2_validates_it(setup: Setup) -> None:
    a = setup.zones[0]
    cases = [
        ({"InstanceType": "m6x.nonesuch"}, "InvalidParameterValue"),
        ({"InstanceType": "m7g.large"}, "InvalidParameterValue"),  # arm type, x86 AMI
        ({"ImageId": "ami-0123456789abcdef0"}, "InvalidAMIID.NotFound"),
    ]
    for params, code in cases:
        with pytest.raises(ClientError) as raised:
            _run(setup, a, **params)
        assert raised.value.response["Error"]["Code"] == code
    assert setup.instances([]) == {}


# -- restoring capacity, control over HTTP, independence ----------------------------------------


def test_restored_capacity_lets_the_same_request_succeed(
    idle_cloud: LocalCloud, setup: Setup
) -> None:
    a = setup.zones[0]
    idle_cloud.set_capacity(market="spot", count=0)
    idle_cloud.mark_unsupported("c6i.large", a)
    overrides = [setup.override("m6i.large", a, 0.0), setup.override("c6i.large", a, 1.0)]
    assert _ids(setup.fleet(overrides, 4, "spot")) == []
    idle_cloud.restore_capacity()
    answer = setup.fleet(overrides, 4, "spot")
    assert _launched(answer) == [("m6i.large", a, "spot", 4)]
    assert answer["Errors"] == []  # c6i.large was not needed (and stays unsupported)
    assert idle_cloud.capacity.supported("c6i.large", a) is False


def test_a_remote_cloud_sets_and_restores_capacity_over_the_control_api(
    idle_cloud: LocalCloud, setup: Setup
) -> None:
    a, b = setup.zones[:2]
    remote = RemoteCloud(idle_cloud.endpoint_url)
    remote.set_capacity("m6i.large", a, "on-demand", count=1)
    remote.mark_unsupported("m6i.large", b)
    assert idle_cloud.capacity.available("m6i.large", a, "on-demand") == 1
    assert not idle_cloud.capacity.supported("m6i.large", b)
    remote.reset_calls()
    answer = setup.fleet([setup.override("m6i.large", a), setup.override("m6i.large", b)], 3)
    assert _launched(answer) == [("m6i.large", a, "on-demand", 1)]
    (request,) = remote.requests("CreateFleet")
    assert request["TargetCapacitySpecification.TotalTargetCapacity"] == "3"
    remote.restore_capacity()
    assert idle_cloud.capacity.available("m6i.large", a, "on-demand") is None


def test_two_clouds_have_their_own_capacity(idle_cloud: LocalCloud, setup: Setup) -> None:
    a = setup.zones[0]
    idle_cloud.set_capacity(count=0)  # nothing left anywhere, for anything
    with LocalCloud(boot_delay=3600) as other:
        elsewhere = _setup(other)
        answer = elsewhere.fleet([elsewhere.override("m6i.large", a)], 2)
        assert len(_ids(answer)) == 2
    assert _ids(setup.fleet([setup.override("m6i.large", a)], 2)) == []


# -- fleet instances boot ------------------------------------------------------------------------


def test_fleet_instances_boot_exactly_once_on_demand_and_spot(cloud: LocalCloud) -> None:
    setup = _setup(cloud)
    a, b = setup.zones[:2]
    cloud.set_capacity("m6i.large", a, count=1)
    overrides = [setup.override("m6i.large", a, 0.0), setup.override("m6i.large", b, 1.0)]
    answer = setup.fleet(overrides, 4, "on-demand", targets={"SpotTargetCapacity": 2})
    ids = _ids(answer)
    assert len(ids) == 4 and len(answer["Errors"]) == 2  # pool a ran dry in both markets

    # The boot script prints and exits: the VM powers off and, as its template says,
    # terminates (spot instances included).
    def all_terminated() -> bool:
        states = {i["State"]["Name"] for i in setup.instances(ids).values()}
        return states == {"terminated"}

    wait_for(all_terminated, 60, "every fleet instance to boot and power off")
    for instance_id in ids:
        assert cloud.console_output(instance_id).count("booted") == 1
    assert set(cloud.runtime.vms) == set(ids)  # type: ignore[union-attr]


# -- what EC2 refuses and moto accepts, as tests turn it on -------------------------------------


def test_a_single_zone_fleet_launches_in_the_zone_that_can_give_most(
    idle_cloud: LocalCloud, setup: Setup
) -> None:
    """SingleAvailabilityZone: every instance in one zone, the one EC2 finds capacity in."""
    first, second, third = setup.zones[:3]
    idle_cloud.set_capacity(zone=first, count=2)  # the best-ranked zone cannot give 5
    overrides = [setup.override("m6i.large", z, priority=i) for i, z in enumerate(setup.zones)]
    for market, options in (("on-demand", "OnDemandOptions"), ("spot", "SpotOptions")):
        answer = setup.fleet(
            overrides,
            total=5,
            market=market,
            **{options: {"SingleAvailabilityZone": True}},
        )
        assert {zone for _, zone, _, _ in _launched(answer)} == {second}
        assert sum(n for *_, n in _launched(answer)) == 5
    spread = setup.fleet(overrides, total=5)  # without it: the first zone's 2, then the next
    assert [(zone, n) for _, zone, _, n in _launched(spread)] == [(first, 2), (second, 3)]
    assert third  # the region has more zones than the fleet needed


def test_spot_refused_without_the_service_linked_role_per_pool_on_demand_untouched(
    idle_cloud: LocalCloud, setup: Setup
) -> None:
    idle_cloud.refuse_spot_service_linked_role()
    overrides = [setup.override("m6i.large", z) for z in setup.zones[:2]]
    answer = setup.fleet(overrides, total=3, market="spot")
    assert answer["Instances"] == []
    codes = {code for *_, code in _errors(answer)}
    assert codes == {"AuthFailure.ServiceLinkedRoleCreationNotPermitted"}
    assert len(answer["Errors"]) == 2  # one per spot pool, as EC2 reports it
    assert sum(n for *_, n in _launched(setup.fleet(overrides, total=3))) == 3
    with pytest.raises(ClientError, match="ServiceLinkedRoleCreationNotPermitted"):
        setup.ec2.run_instances(
            ImageId=setup.amis["x86_64"],
            MinCount=1,
            MaxCount=1,
            InstanceType="m6i.large",
            InstanceMarketOptions={"MarketType": "spot"},
        )
    idle_cloud.refuse_spot_service_linked_role(False)
    assert _launched(setup.fleet(overrides, total=1, market="spot"))


def test_tag_keys_ec2_refuses_with_metadata_tags_enabled(
    idle_cloud: LocalCloud, setup: Setup
) -> None:
    idle_cloud.refuse_metadata_tag_keys()
    tags = [{"Key": "Cost Center", "Value": "x"}, {"Key": "team/owner", "Value": "y"}]
    launch = {
        "ImageId": setup.amis["x86_64"],
        "MinCount": 1,
        "MaxCount": 1,
        "InstanceType": "t3.micro",
        "TagSpecifications": [{"ResourceType": "instance", "Tags": tags}],
    }
    enabled = {"HttpTokens": "required", "InstanceMetadataTags": "enabled"}
    with pytest.raises(ClientError, match="'Cost Center', 'team/owner'") as refused:
        setup.ec2.run_instances(MetadataOptions=enabled, **launch)
    assert refused.value.response["Error"]["Code"] == "InvalidParameterValue"
    setup.ec2.run_instances(
        MetadataOptions={**enabled, "InstanceMetadataTags": "disabled"}, **launch
    )
    # A fleet whose template enables metadata tags is refused as a whole.
    version = setup.ec2.create_launch_template_version(
        LaunchTemplateId=setup.template,
        LaunchTemplateData={
            "MetadataOptions": enabled,
            "TagSpecifications": [{"ResourceType": "instance", "Tags": tags}],
        },
    )["LaunchTemplateVersion"]["VersionNumber"]
    config = {
        "LaunchTemplateSpecification": {
            "LaunchTemplateId": setup.template,
            "Version": str(version),
        },
        "Overrides": [setup.override("m6i.large", setup.zones[0])],
    }
    with pytest.raises(ClientError, match="InvalidParameterValue"):
        setup.ec2.create_fleet(
            Type="instant",
            LaunchTemplateConfigs=[config],
            TargetCapacitySpecification={
                "TotalTargetCapacity": 1,
                "DefaultTargetCapacityType": "on-demand",
            },
        )


def test_fleet_instances_get_the_template_s_root_volume(
    idle_cloud: LocalCloud, setup: Setup
) -> None:
    version = setup.ec2.create_launch_template_version(
        LaunchTemplateId=setup.template,
        SourceVersion="1",
        LaunchTemplateData={
            "BlockDeviceMappings": [
                {
                    "DeviceName": "/dev/xvda",
                    "Ebs": {"VolumeSize": 55, "VolumeType": "gp3", "DeleteOnTermination": True},
                }
            ]
        },
    )["LaunchTemplateVersion"]["VersionNumber"]
    config = {
        "LaunchTemplateSpecification": {
            "LaunchTemplateId": setup.template,
            "Version": str(version),
        },
        "Overrides": [setup.override("m6i.large", setup.zones[0])],
    }
    for market in ("on-demand", "spot"):
        answer = setup.ec2.create_fleet(
            Type="instant",
            LaunchTemplateConfigs=[config],
            TargetCapacitySpecification={
                "TotalTargetCapacity": 1,
                "DefaultTargetCapacityType": market,
            },
        )
        (instance,) = setup.instances(_ids(answer)).values()
        (mapping,) = instance["BlockDeviceMappings"]
        assert mapping["DeviceName"] == instance["RootDeviceName"] == "/dev/xvda"
        volume = setup.ec2.describe_volumes(VolumeIds=[mapping["Ebs"]["VolumeId"]])["Volumes"][0]
        assert (volume["Size"], volume["VolumeType"]) == (55, "gp3")
