"""The EC2 provider on a local cloud as strict as EC2, over HTTP (VMs never boot: these are
about the API): the network options, one zone, disks and credits, what machines cost, and
surviving eventual consistency, the spot service-linked role, a denied GetConsoleOutput and
a failure later in a launch pass."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import boto3
import pytest
from helpers import live_instances, started_ec2_provider, wait_for

from dask_rawvm.errors import OptionError, ProviderError
from dask_rawvm.localcloud import LocalCloud
from dask_rawvm.machines.ledger import Ledger
from dask_rawvm.machines.session import ProviderSession
from dask_rawvm.machines.watch import BootWatch
from dask_rawvm.providers.base import LaunchSpec, Machine
from dask_rawvm.providers.ec2 import EC2Provider
from dask_rawvm.providers.ec2.boot import IMDS_PRELUDE
from dask_rawvm.providers.ec2.catalog import StoragePrices

SCRIPT = "#!/bin/sh\necho hello\n"


@pytest.fixture
def idle_cloud() -> Iterator[LocalCloud]:
    with LocalCloud(boot_delay=3600) as cloud:
        yield cloud


@pytest.fixture
def ec2(idle_cloud: LocalCloud) -> Any:
    return boto3.client("ec2", **idle_cloud.client_kwargs())


@pytest.fixture
async def started(idle_cloud: LocalCloud) -> AsyncIterator[list[EC2Provider]]:
    """Providers a test started, closed (and their clusters removed) at the end."""
    providers: list[EC2Provider] = []
    yield providers
    for provider in providers:
        try:
            await provider.cleanup(provider.cluster)
        finally:
            await provider.close()


def spec(count: int, vm_type: str = "t3.micro", **kwargs: Any) -> LaunchSpec:
    return LaunchSpec(
        role=kwargs.pop("role", "worker"),
        vm_type=vm_type,
        user_data=SCRIPT,
        count=count,
        batch=uuid.uuid4().hex[:8],
        **kwargs,
    )


def zones_of(machines: list[Machine]) -> set[str | None]:
    return {m.zone for m in machines}


def fleet_requests(cloud: LocalCloud) -> list[dict[str, str]]:
    return cloud.requests("CreateFleet")


def template_data(ec2: Any, cluster: str) -> dict[str, Any]:
    """The data of the newest version of a cluster's launch template."""
    (template,) = ec2.describe_launch_templates(
        Filters=[{"Name": "tag:dask-rawvm:cluster", "Values": [cluster]}]
    )["LaunchTemplates"]
    versions = ec2.describe_launch_template_versions(
        LaunchTemplateId=template["LaunchTemplateId"], Versions=["$Latest"]
    )["LaunchTemplateVersions"]
    return dict(versions[0]["LaunchTemplateData"])


def new_vpc(ec2: Any, cidr: str, zones: list[str]) -> tuple[str, list[str]]:
    """A VPC of the user's own, with one subnet in each zone given."""
    vpc = ec2.create_vpc(CidrBlock=cidr)["Vpc"]["VpcId"]
    base = cidr.rsplit(".", 2)[0]
    subnets = [
        ec2.create_subnet(VpcId=vpc, CidrBlock=f"{base}.{16 * i}.0/20", AvailabilityZone=zone)[
            "Subnet"
        ]["SubnetId"]
        for i, zone in enumerate(zones)
    ]
    return vpc, subnets


# -- network -------------------------------------------------------------------------------


async def test_without_a_default_vpc_the_error_names_the_options_that_fix_it(
    idle_cloud: LocalCloud, started: list[EC2Provider]
) -> None:
    vpc = idle_cloud.remove_default_vpc()
    provider = await started_ec2_provider(idle_cloud, "rules")
    started.append(provider)
    with pytest.raises(ProviderError) as error:
        await provider.network()
    assert "no default VPC" in str(error.value)
    assert "vpc=" in str(error.value) and "subnets=" in str(error.value)
    assert str(vpc) in str(error.value)  # the VPCs there are listed
    # Naming the VPC is enough: every subnet of it.
    named = await started_ec2_provider(idle_cloud, "rules", vpc=vpc, zone="any")
    started.append(named)
    network = await named.network()
    assert network.vpc_id == vpc and len(network.subnets) >= 3


async def test_the_subnets_given_are_where_machines_go_and_zones_must_be_theirs(
    idle_cloud: LocalCloud, ec2: Any, started: list[EC2Provider]
) -> None:
    zones = ["us-east-1b", "us-east-1c"]
    vpc, subnets = new_vpc(ec2, "10.42.0.0/16", zones)
    provider = await started_ec2_provider(idle_cloud, "rules", subnets=subnets, zone="any")
    started.append(provider)
    machines = await provider.launch(spec(4))
    described = await provider.describe([m.id for m in machines])
    assert {i["SubnetId"] for i in live_instances(idle_cloud, provider.cluster)} <= set(subnets)
    assert zones_of(described) <= set(zones)
    # A zone outside the subnets is refused before anything is launched.
    outside = await started_ec2_provider(idle_cloud, "rules", subnets=subnets, zone="us-east-1a")
    started.append(outside)
    idle_cloud.reset_calls()
    with pytest.raises(OptionError, match=r"us-east-1a.*us-east-1b', 'us-east-1c"):
        await outside.preflight({"worker": "t3.micro"})
    assert idle_cloud.calls["CreateFleet"] == 0
    # Subnets of two VPCs, or not of the VPC named, are refused too.
    default_subnet = ec2.describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])
    mixed = [subnets[0], default_subnet["Subnets"][0]["SubnetId"]]
    for kwargs in ({"subnets": mixed}, {"subnets": subnets, "vpc": "vpc-0123456789abcdef0"}):
        wrong = await started_ec2_provider(idle_cloud, "rules", **kwargs)
        started.append(wrong)
        with pytest.raises(ProviderError, match="subnets="):
            await wrong.network()
    assert vpc


async def test_extra_security_groups_and_no_public_address(
    idle_cloud: LocalCloud, ec2: Any, started: list[EC2Provider]
) -> None:
    vpc, subnets = new_vpc(ec2, "10.43.0.0/16", ["us-east-1a"])
    extra = ec2.create_security_group(GroupName="db-clients", Description="x", VpcId=vpc)
    provider = await started_ec2_provider(
        idle_cloud, "rules", subnets=subnets, security_groups=[extra["GroupId"]], public_ip=False
    )
    started.append(provider)
    await provider.launch(spec(1))
    data = template_data(ec2, provider.cluster)
    (interface,) = data["NetworkInterfaces"]
    assert interface["AssociatePublicIpAddress"] is False
    assert set(interface["Groups"]) == {provider.security_group, extra["GroupId"]}
    # No public address: the scheduler admits the VPC's own range, not the client's.
    (group,) = ec2.describe_security_groups(GroupIds=[provider.security_group])["SecurityGroups"]
    cidrs = {r["CidrIp"] for p in group["IpPermissions"] for r in p.get("IpRanges", [])}
    assert cidrs == {"10.43.0.0/16"}
    # A group of another VPC is refused before launch.
    other = ec2.describe_security_groups(GroupNames=["default"])["SecurityGroups"][0]["GroupId"]
    wrong = await started_ec2_provider(
        idle_cloud, "rules", subnets=subnets, security_groups=[other]
    )
    started.append(wrong)
    with pytest.raises(ProviderError, match="not in the cluster's VPC"):
        await wrong.preflight({"worker": "t3.micro"})


# -- one zone ----------------------------------------------------------------------------------


async def test_auto_zone_lets_ec2_pick_one_zone_and_the_cluster_stays_there(
    idle_cloud: LocalCloud, started: list[EC2Provider]
) -> None:
    idle_cloud.set_capacity(zone="us-east-1a", count=0)  # the first zone has nothing
    provider = await started_ec2_provider(idle_cloud, "rules")  # zone="auto", the default
    started.append(provider)
    first = await provider.launch(spec(3, spot_policy="spot_with_fallback"))
    (zone,) = zones_of(first)
    assert zone != "us-east-1a" and provider.pinned_zone == zone
    assert fleet_requests(idle_cloud)[0]["SpotOptions.SingleAvailabilityZone"] == "true"
    # Later launches ask that zone's pools only, whatever capacity elsewhere.
    idle_cloud.restore_capacity()
    idle_cloud.reset_calls()
    later = await provider.launch(spec(4))
    assert zones_of(later) == {zone}
    overrides = [v for k, v in fleet_requests(idle_cloud)[0].items() if k.endswith(".SubnetId")]
    assert len(set(overrides)) == 1
    # The on-demand fallback of a spot shortfall stays in the zone the spot ones got.
    idle_cloud.set_capacity(market="spot", count=2)
    mixed = await provider.launch(spec(5, spot_policy="spot_with_fallback"))
    assert zones_of(mixed) == {zone} and {m.market for m in mixed} == {"spot", "on-demand"}


async def test_any_zone_and_a_list_of_zones_spread(
    idle_cloud: LocalCloud, started: list[EC2Provider]
) -> None:
    listed = ["us-east-1b", "us-east-1c"]
    for zone, count, spread in (("any", 6, 3), (listed, 4, 2)):
        idle_cloud.restore_capacity()
        for name in ("us-east-1a", "us-east-1b", "us-east-1c", "us-east-1d"):
            idle_cloud.set_capacity(zone=name, count=2)  # two per zone
        provider = await started_ec2_provider(idle_cloud, "rules", zone=zone)
        started.append(provider)
        machines = await provider.launch(spec(6))
        zones = zones_of(machines)
        assert len(machines) == count and len(zones) == spread
        assert zone == "any" or zones == set(listed)
        assert provider.pinned_zone is None
        assert "OnDemandOptions.SingleAvailabilityZone" not in fleet_requests(idle_cloud)[-1]


# -- disks, credits, costs ---------------------------------------------------------------------


async def test_root_volumes_are_gp3_of_each_role_s_size_never_below_the_image(
    idle_cloud: LocalCloud, ec2: Any, started: list[EC2Provider]
) -> None:
    provider = await started_ec2_provider(
        idle_cloud, "rules", disk_sizes={"worker": 40, "scheduler": 10}
    )
    started.append(provider)
    for role, size in (("worker", 40), ("scheduler", 15)):  # moto's AL2023 image is 15 GiB
        (machine,) = await provider.launch(spec(1, role=role))
        (instance,) = [
            i for i in live_instances(idle_cloud, provider.cluster) if i["InstanceId"] == machine.id
        ]
        (mapping,) = instance["BlockDeviceMappings"]
        volume = ec2.describe_volumes(VolumeIds=[mapping["Ebs"]["VolumeId"]])["Volumes"][0]
        assert (mapping["DeviceName"], volume["Size"], volume["VolumeType"]) == (
            instance["RootDeviceName"],
            size,
            "gp3",
        )


async def test_burstable_types_get_standard_credits_others_the_default(
    idle_cloud: LocalCloud, ec2: Any, started: list[EC2Provider]
) -> None:
    provider = await started_ec2_provider(idle_cloud, "rules")
    started.append(provider)
    await provider.launch(spec(1, "t3.large"))
    assert template_data(ec2, provider.cluster)["CreditSpecification"] == {"CpuCredits": "standard"}
    await provider.launch(spec(1, "m6i.large"))
    assert "CreditSpecification" not in template_data(ec2, provider.cluster)
    # Nothing reads tags from instance metadata: it stays off, whatever the tag keys.
    assert template_data(ec2, provider.cluster)["MetadataOptions"]["InstanceMetadataTags"] == (
        "disabled"
    )


async def test_a_machine_costs_its_instance_its_disk_and_its_address(
    idle_cloud: LocalCloud, started: list[EC2Provider]
) -> None:
    provider = await started_ec2_provider(
        idle_cloud, "rules", disk_sizes={"worker": 40, "scheduler": 20}
    )
    started.append(provider)
    await provider.preflight({"worker": "t3.large"})
    costs = provider.hourly_costs("t3.large", "on-demand", "worker")
    gp3 = StoragePrices.load("us-east-1")
    assert costs["instance"] == pytest.approx(0.0832, rel=0.01)
    assert costs["storage"] == pytest.approx(40 * 0.08 / 730)
    assert costs["public_ipv4"] == 0.005 == gp3.public_ipv4_hourly
    private = await started_ec2_provider(
        idle_cloud, "rules", public_ip=False, disk_sizes={"worker": 100}
    )
    started.append(private)
    await private.preflight({"worker": "t3.large"})
    costs = private.hourly_costs("t3.large", "spot", "worker")
    assert set(costs) == {"instance", "storage"} and costs["storage"] == pytest.approx(
        100 * 0.08 / 730
    )


# -- surviving what EC2 does -------------------------------------------------------------------


async def test_things_just_made_that_ec2_does_not_see_yet_are_waited_for(
    idle_cloud: LocalCloud, started: list[EC2Provider]
) -> None:
    provider = await started_ec2_provider(idle_cloud, "rules")
    started.append(provider)
    assert provider._reaping is not None  # the start's look for leftovers: not counted here
    await asyncio.wait_for(provider._reaping, 60)
    idle_cloud.reset_calls()
    idle_cloud.eventual_consistency(calls=3)
    machines = await provider.launch(spec(2))  # a new group, a new template, then a fleet
    assert len(machines) == 2
    described = await provider.describe([m.id for m in machines])  # new instances
    assert {m.id for m in described} == {m.id for m in machines}
    await provider.terminate([m.id for m in machines])
    calls = idle_cloud.calls
    assert calls["AuthorizeSecurityGroupIngress"] == 4 and calls["CreateFleet"] == 4
    assert calls["DescribeInstances"] == 4


async def test_spot_without_the_service_linked_role_goes_on_demand_or_says_the_fix(
    idle_cloud: LocalCloud, started: list[EC2Provider]
) -> None:
    idle_cloud.refuse_spot_service_linked_role()
    provider = await started_ec2_provider(idle_cloud, "rules")
    started.append(provider)
    machines = await provider.launch(spec(3, spot_policy="spot_with_fallback"))
    assert len(machines) == 3 and {m.market for m in machines} == {"on-demand"}
    with pytest.raises(ProviderError, match="create-service-linked-role") as error:
        await provider.launch(spec(2, spot_policy="spot"))
    assert error.value.code == "AuthFailure.ServiceLinkedRoleCreationNotPermitted"


async def test_a_later_call_s_failure_keeps_what_earlier_calls_launched(
    idle_cloud: LocalCloud, started: list[EC2Provider]
) -> None:
    """Spot gets 2 of 5; the on-demand fallback, the pass's second CreateFleet, is refused:
    the 2 spot machines are the cluster's, not terminated."""
    idle_cloud.set_capacity(market="spot", count=2)
    provider = await started_ec2_provider(idle_cloud, "rules")
    started.append(provider)
    await provider.preflight({"worker": "t3.micro"})
    idle_cloud.reset_calls()
    idle_cloud.inject("CreateFleet", error="UnauthorizedOperation", after=1)
    machines = await provider.launch(spec(5, spot_policy="spot_with_fallback"))
    assert len(machines) == 2 and {m.market for m in machines} == {"spot"}
    assert idle_cloud.calls["TerminateInstances"] == 0
    assert {i["InstanceId"] for i in live_instances(idle_cloud, provider.cluster)} == {
        m.id for m in machines
    }


async def test_boot_logs_are_optional_and_a_denial_names_the_permission(
    idle_cloud: LocalCloud, started: list[EC2Provider]
) -> None:
    idle_cloud.deny("GetConsoleOutput")
    provider = await started_ec2_provider(idle_cloud, "rules")
    started.append(provider)
    (machine,) = await provider.launch(spec(1))
    with pytest.raises(ProviderError, match="ec2:GetConsoleOutput") as error:
        await provider.console_output(machine.id)
    assert error.value.code == "UnauthorizedOperation"
    session = ProviderSession(provider, provider.cluster, Ledger())
    session.is_open = True  # started above
    watch = BootWatch(session, Ledger())
    assert await watch.console_output(machine.id) == ""
    failure = await watch.boot_failure(machine, "a worker VM died at boot")
    assert "ec2:GetConsoleOutput" in failure  # says why there is no log


async def test_every_listing_follows_its_pages(
    idle_cloud: LocalCloud, started: list[EC2Provider]
) -> None:
    idle_cloud.paginate(page_size=1)
    provider = await started_ec2_provider(idle_cloud, "rules", zone="any")
    started.append(provider)
    machines = await provider.launch(spec(3))
    assert {m.id for m in await provider.live_machines(provider.cluster)} == {
        m.id for m in machines
    }
    assert len(await provider.describe([m.id for m in machines])) == 3
    assert len((await provider.network()).subnets) >= 3
    removed = await provider.cleanup(provider.cluster)
    assert set(removed) == {m.id for m in machines}


def test_the_boot_prelude_renews_its_imds_token_for_the_spot_watcher(cloud: LocalCloud) -> None:
    """Tokens live 1 s here (6 h on EC2): a watcher polling past that still sees the notice."""
    cloud.imds_token_ttl(1.0)
    script = (
        '#!/bin/bash\nlog() { echo "$*"; }\npoweroff_vm() { exit "${1:-0}"; }\n'
        + IMDS_PRELUDE
        + 'echo "id=$INSTANCE_ID index=$(launch_index)"\n'
        + "sleep 2\n"  # the first token is gone
        + 'echo "again=$(meta instance-id)"\n'
        + "until interruption_notice; do sleep 0.5; done\necho notice\nsleep 300\n"
    )
    ec2 = boto3.client("ec2", **cloud.client_kwargs())
    (instance,) = ec2.run_instances(
        ImageId="ami-12c6146b", MinCount=1, MaxCount=1, UserData=script
    )["Instances"]
    iid = instance["InstanceId"]
    wait_for(lambda: "again=" in cloud.console_output(iid), 30, "the prelude to read twice")
    assert f"id={iid} index=0" in cloud.console_output(iid)
    assert f"again={iid}" in cloud.console_output(iid)
    cloud.interrupt(iid, delay=60)
    wait_for(lambda: "notice" in cloud.console_output(iid), 30, "the watcher to see the notice")


async def test_urls_signed_with_temporary_credentials_die_with_them(
    idle_cloud: LocalCloud, started: list[EC2Provider]
) -> None:
    import datetime
    from urllib.parse import parse_qs, urlsplit

    from botocore.credentials import RefreshableCredentials

    provider = await started_ec2_provider(idle_cloud, "rules")
    started.append(provider)
    await provider.store_bytes("k", b"v")
    asked = parse_qs(urlsplit(await provider.url_for("k", expires=3600)).query)
    assert asked["X-Amz-Expires"] == ["3600"]  # long-term keys: as asked
    # Credentials of an assumed role that expire in 10 minutes: the URL cannot outlive them.
    soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=10)
    provider.clients.credentials = RefreshableCredentials.create_from_metadata(
        {**CREDENTIALS_METADATA, "expiry_time": soon.isoformat()},
        refresh_using=lambda: {},
        method="assume-role",
    )
    capped = parse_qs(urlsplit(await provider.url_for("k", expires=3600)).query)
    assert 500 < int(capped["X-Amz-Expires"][0]) <= 600


CREDENTIALS_METADATA = {"access_key": "a", "secret_key": "b", "token": "c"}
