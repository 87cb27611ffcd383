"""Choosing machines, preflight errors and the cost guard: all before money is spent."""

from __future__ import annotations

import boto3
import pytest
from distributed import Client
from distributed.core import rpc
from helpers import asking_options, live_instances

from dask_rawvm import RawVMCluster
from dask_rawvm.cost import BudgetExceeded
from dask_rawvm.errors import CatalogError, ProviderError
from dask_rawvm.localcloud import LocalCloud
from dask_rawvm.providers.ec2.provider import AMI_PARAMETER, GPU_AMI_PARAMETER
from dask_rawvm.tls import ClusterTLS


def launched_types(cloud: LocalCloud) -> set[str]:
    return {i["InstanceType"] for i in live_instances(cloud)}


def test_worker_type_chosen_by_need(quiet_cloud: LocalCloud) -> None:
    with RawVMCluster(
        n_workers=2, worker_cpu=4, worker_memory="16 GiB", **asking_options(quiet_cloud)
    ) as cluster:
        chosen = cluster.options.worker_vm_type
        vm = cluster.provider.catalog[chosen]  # type: ignore[attr-defined]
        assert vm.vcpus >= 4 and vm.memory_mib >= 16 * 1024
        assert vm.arch == "x86_64" or vm.arch == "arm64"
        assert launched_types(quiet_cloud) == {chosen}
        assert cluster.cost_per_hour > 0


def test_arm_need_picks_a_graviton_type(quiet_cloud: LocalCloud) -> None:
    with RawVMCluster(worker_cpu=2, arm=True, **asking_options(quiet_cloud)) as cluster:
        vm = cluster.provider.catalog[cluster.options.worker_vm_type]  # type: ignore[attr-defined]
        assert vm.arch == "arm64"


def test_gpu_model_missing_in_region_fails_before_anything(monkeypatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    with LocalCloud(region="us-west-1") as cloud:
        with pytest.raises(CatalogError) as error:
            RawVMCluster(n_workers=1, worker_gpu="A10G", **asking_options(cloud))
        assert "A10G" in str(error.value) and "us-west-1" in str(error.value)
        assert cloud.calls["CreateFleet"] == 0 and live_instances(cloud) == []


def test_unknown_type_suggests_close_names(quiet_cloud: LocalCloud) -> None:
    with pytest.raises(CatalogError, match=r"m6i\.large"):
        RawVMCluster(worker_vm_type="m6i.larg", **asking_options(quiet_cloud))
    assert quiet_cloud.calls["CreateFleet"] == 0


def test_max_workers_refuses_before_launch_and_on_scale(quiet_cloud: LocalCloud) -> None:
    with pytest.raises(ValueError, match="max_workers=3"):
        RawVMCluster(n_workers=5, max_workers=3, **asking_options(quiet_cloud))
    with RawVMCluster(n_workers=2, max_workers=3, **asking_options(quiet_cloud)) as cluster:
        with pytest.raises(ValueError, match="max_workers=3"):
            cluster.scale(4)
        assert len(cluster.worker_spec) == 2
    assert quiet_cloud.calls["CreateFleet"] == 1


def test_budget_guard_refuses_launch_and_scale_up(quiet_cloud: LocalCloud) -> None:
    with pytest.raises(BudgetExceeded) as error:
        RawVMCluster(
            n_workers=50,
            worker_vm_type="m6i.large",
            max_hourly_cost=1.0,
            **asking_options(quiet_cloud),
        )
    assert "max_hourly_cost" in str(error.value)
    assert quiet_cloud.calls["CreateFleet"] == 0 and live_instances(quiet_cloud) == []

    with RawVMCluster(
        n_workers=2, worker_vm_type="m6i.large", max_hourly_cost=1.0, **asking_options(quiet_cloud)
    ) as cluster:
        cluster.sync(cluster._correct_state)
        before = cluster.cost_per_hour
        assert 0 < before < 1.0
        with pytest.raises(BudgetExceeded):
            cluster.scale(40)
        assert len(cluster.worker_spec) == 2
        adaptive = cluster.adapt(minimum=0, maximum=100)
        assert adaptive.maximum < 100  # clamped to what the budget allows


def test_missing_credentials_fail_clearly(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    for variable in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
    ):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(Exception, match="no AWS credentials found"):
        RawVMCluster(provider="aws", region="us-east-1")


def test_close_leaves_no_bucket(quiet_cloud: LocalCloud) -> None:
    with RawVMCluster(
        n_workers=1,
        endpoint_url=quiet_cloud.endpoint_url,
        region=quiet_cloud.region,
        scheduler="local",
        wait_for_workers=False,  # its VM never boots
    ):
        s3 = boto3.client("s3", **quiet_cloud.client_kwargs())
        buckets = {b["Name"] for b in s3.list_buckets()["Buckets"]}
        # the cluster's (its environment bundle) and the account's environment artifacts
        # (kept for the next cluster: a store of the account, not of a cluster)
        store = {b for b in buckets if b.startswith("dask-rawvm-env-")}
        assert len(store) == 1 and len(buckets - store) == 1
    assert {b["Name"] for b in s3.list_buckets()["Buckets"]} == store


def test_security_group_admits_only_the_client_and_goes_with_the_cluster(
    quiet_cloud: LocalCloud,
) -> None:
    ec2 = boto3.client("ec2", **quiet_cloud.client_kwargs())
    with RawVMCluster(n_workers=1, **asking_options(quiet_cloud)) as cluster:
        cluster.sync(cluster._correct_state)
        group_id = cluster.provider.security_group  # type: ignore[attr-defined]
        (group,) = ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"]
        rules = group["IpPermissions"]
        public = {
            (r.get("FromPort"), r.get("ToPort")): [x["CidrIp"] for x in r["IpRanges"]]
            for r in rules
            if r["IpRanges"]
        }
        # Scheduler and dashboard ports from this machine only (loopback for a local
        # cloud); never the whole internet.
        assert all(cidrs == ["127.0.0.0/8"] for cidrs in public.values())
        assert {8786, 8787} <= {port for ports in public for port in ports}
        assert any(
            pair["GroupId"] == group_id for r in rules for pair in r.get("UserIdGroupPairs", [])
        )  # members talk to each other
        (instance,) = live_instances(quiet_cloud)
        assert [g["GroupId"] for g in instance["SecurityGroups"]] == [group_id]
    groups = ec2.describe_security_groups(
        Filters=[{"Name": "tag:dask-rawvm:cluster", "Values": [cluster.cluster_name]}]
    )["SecurityGroups"]
    assert groups == []


async def test_every_dask_connection_is_mutual_tls_with_the_cluster_s_own_ca(
    cloud: LocalCloud,
) -> None:
    async with RawVMCluster(
        n_workers=1, endpoint_url=cloud.endpoint_url, region=cloud.region, asynchronous=True
    ) as cluster:
        assert cluster.scheduler_address.startswith("tls://")
        async with Client(cluster, asynchronous=True) as client:
            await client.wait_for_workers(1, timeout=120)
            assert await client.submit(sum, [1, 2, 3]) == 6
            info = client.scheduler_info()
            assert all(address.startswith("tls://") for address in info["workers"])
        # User-data carries an expiring URL to the keys, never a key.
        script = await cluster.launcher.worker_user_data(cluster.scheduler_address, ["worker-9"])
        assert "RAWVM_SECRETS_URL=" in script and "PRIVATE KEY" not in script

        host_port = cluster.scheduler_address.removeprefix("tls://")
        with pytest.raises(OSError):  # plain TCP: no Dask handshake
            async with rpc(f"tcp://{host_port}", timeout=3) as scheduler:
                await scheduler.identity()
        stranger = ClusterTLS.create("another-cluster").client_security()
        with pytest.raises(OSError):  # TLS, but a certificate of another CA
            async with rpc(
                cluster.scheduler_address,
                timeout=3,
                connection_args=stranger.get_connection_args("client"),
            ) as scheduler:
                await scheduler.identity()
        name = cluster.cluster_name
    assert live_instances(cloud, name) == []


async def test_throttled_launch_backs_off_with_jitter_and_completes(
    quiet_cloud: LocalCloud,
) -> None:
    quiet_cloud.inject("CreateFleet", error="RequestLimitExceeded", count=2)
    async with RawVMCluster(
        n_workers=5, asynchronous=True, **asking_options(quiet_cloud)
    ) as cluster:
        assert len(cluster.instances) == 5
    assert quiet_cloud.calls["CreateFleet"] == 3  # two throttled, then accepted
    assert live_instances(quiet_cloud) == []


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ({"zone": "us-east-1z"}, r"\['us-east-1z'\] is not a zone of the subnets.*us-east-1a"),
        ({"worker_vm_types": ["m6i.large", "m7g.large"]}, "mixes platforms.*m7g.large"),
        ({"worker_vm_types": ["m6i.large", "m6i.larg"]}, r"m6i\.larg"),
        ({"spot_policy": "cheap"}, "spot_policy='cheap' is not one of"),
        ({"worker_vm_types": "m6i.large"}, "non-empty list"),
    ],
)
def test_preflight_errors_name_the_cause_and_leave_nothing(
    quiet_cloud: LocalCloud, bad: dict[str, object], says: str
) -> None:
    with pytest.raises((ValueError, CatalogError, ProviderError), match=says):
        RawVMCluster(n_workers=2, **asking_options(quiet_cloud, **bad))
    made = {a for a in quiet_cloud.calls if a.startswith(("Create", "Run", "s3:PUT"))}
    assert made == set() and live_instances(quiet_cloud) == []


def test_worker_types_are_candidates_across_zones(quiet_cloud: LocalCloud) -> None:
    with RawVMCluster(
        n_workers=4,
        worker_vm_types=["m6i.large", "m5.large"],
        zone=["us-east-1b", "us-east-1c"],
        **asking_options(quiet_cloud),
    ) as cluster:
        cluster.sync(cluster._correct_state)
        instances = live_instances(quiet_cloud, cluster.cluster_name)
        assert len(instances) == 4
        assert {i["Placement"]["AvailabilityZone"] for i in instances} <= {
            "us-east-1b",
            "us-east-1c",
        }
        assert {i["InstanceType"] for i in instances} <= {"m6i.large", "m5.large"}


def test_gpu_workers_boot_the_nvidia_image_of_their_architecture(quiet_cloud: LocalCloud) -> None:
    with RawVMCluster(n_workers=1, worker_gpu=1, **asking_options(quiet_cloud)) as cluster:
        cluster.sync(cluster._correct_state)
        (instance,) = live_instances(quiet_cloud, cluster.cluster_name)
        vm = cluster.provider.catalog[instance["InstanceType"]]  # type: ignore[attr-defined]
        assert vm.gpus >= 1
    ssm = boto3.client("ssm", **quiet_cloud.client_kwargs())
    arch = "arm64" if vm.arch == "arm64" else "x86_64"
    image = ssm.get_parameter(Name=GPU_AMI_PARAMETER.format(arch=arch))["Parameter"]["Value"]
    assert instance["ImageId"] == image


def test_spot_with_fallback_fills_the_spot_shortfall_on_demand(quiet_cloud: LocalCloud) -> None:
    quiet_cloud.set_capacity(market="spot", count=3)  # three spot VMs left in the region
    with RawVMCluster(
        n_workers=8,
        spot_policy="spot_with_fallback",
        worker_vm_types=["m6i.large", "m5.large"],
        **asking_options(quiet_cloud),
    ) as cluster:
        instances = live_instances(quiet_cloud, cluster.cluster_name)
        spot = [i for i in instances if i.get("InstanceLifecycle") == "spot"]
        assert (len(instances), len(spot)) == (8, 3)
        assert sorted(cluster.instances) == [f"worker-{i}" for i in range(8)]
        assert cluster.ledger.meter.cost_per_hour() > 0
    asked = [
        (
            r["TargetCapacitySpecification.DefaultTargetCapacityType"],
            r["TargetCapacitySpecification.TotalTargetCapacity"],
        )
        for r in quiet_cloud.requests("CreateFleet")
    ]
    assert asked == [("spot", "8"), ("on-demand", "5")]  # the failover, in one pass


def test_an_arm_image_on_x86_workers_fails_before_anything(quiet_cloud: LocalCloud) -> None:
    ssm = boto3.client("ssm", **quiet_cloud.client_kwargs())
    arm_image = ssm.get_parameter(Name=AMI_PARAMETER.format(arch="arm64"))["Parameter"]["Value"]
    with pytest.raises(ProviderError, match=r"arm64 image, but \['m6i.large'\] run x86_64"):
        RawVMCluster(
            n_workers=2, worker_vm_type="m6i.large", **asking_options(quiet_cloud, ami=arm_image)
        )
    made = {a for a in quiet_cloud.calls if a.startswith(("Create", "Run", "s3:PUT"))}
    assert made == set() and live_instances(quiet_cloud) == []


def test_an_unknown_region_is_refused_with_the_closest_names(monkeypatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    with pytest.raises(ProviderError, match=r"'us-east-9' is not an EC2 region.*us-east-1"):
        RawVMCluster(provider="aws", region="us-east-9")
