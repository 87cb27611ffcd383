"""Real clusters on a local cloud as strict as EC2: contradictions refused before launch, the
network and zone options, what the meter counts, tags EC2 would refuse in metadata, every
strictness at once, and a whole cluster as an identity holding exactly the documented IAM
policy (moto's IAM enforcement on, in a cloud process of its own), its VMs holding the role
it made for the data it names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import boto3
import dask.array as da
import pytest
from distributed import Client
from helpers import live_instances, standalone_cloud, wait_for

from dask_rawvm import RawVMCluster
from dask_rawvm.errors import CatalogError, OptionError, ProviderError
from dask_rawvm.localcloud import LocalCloud
from dask_rawvm.providers.ec2.catalog import StoragePrices
from dask_rawvm.providers.ec2.iam import POLICY


def options(cloud: Any, **kwargs: object) -> dict[str, object]:
    return {
        "endpoint_url": cloud.endpoint_url,
        "region": cloud.region,
        "scheduler": "local",
        "environment": None,
        **kwargs,
    }


def connected(client: Client) -> set[str]:
    return {w["name"] for w in client.scheduler_info()["workers"].values()}


def nothing_made(cloud: LocalCloud) -> bool:
    made = {a for a in cloud.calls if a.startswith(("Create", "Run", "s3:PUT"))}
    return made == set() and live_instances(cloud) == []


@pytest.mark.parametrize(
    ("contradiction", "says"),
    [
        ({"worker_gpu": 1, "worker_vm_types": ["m6i.large"]}, "does not have >= 1 GPU"),
        ({"arm": True, "worker_vm_types": ["m6i.large", "m5.large"]}, "m6i.large is x86_64"),
        ({"zone": "us-east-1z"}, "not a zone of the subnets"),
    ],
)
def test_contradictions_are_errors_before_launch(
    quiet_cloud: LocalCloud, contradiction: dict[str, object], says: str
) -> None:
    with pytest.raises((CatalogError, OptionError), match=says):
        RawVMCluster(n_workers=2, **options(quiet_cloud, **contradiction))
    assert nothing_made(quiet_cloud)


def test_a_vpc_of_your_own_without_a_default_one(quiet_cloud: LocalCloud) -> None:
    vpc = quiet_cloud.remove_default_vpc()
    with pytest.raises(ProviderError, match=r"no default VPC: pass vpc=.*subnets="):
        RawVMCluster(n_workers=1, **options(quiet_cloud))
    assert nothing_made(quiet_cloud)
    ec2 = boto3.client("ec2", **quiet_cloud.client_kwargs())
    subnets = [
        s["SubnetId"]
        for s in ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["Subnets"]
    ]
    with RawVMCluster(n_workers=2, subnets=subnets[:2], zone="any", **options(quiet_cloud)) as c:
        c.sync(c._correct_state)
        instances = live_instances(quiet_cloud, c.cluster_name)
        assert len(instances) == 2 and {i["SubnetId"] for i in instances} <= set(subnets[:2])
        assert {i["VpcId"] for i in instances} == {vpc}


def test_the_cluster_keeps_to_one_zone_unless_told_to_spread(quiet_cloud: LocalCloud) -> None:
    quiet_cloud.set_capacity(zone="us-east-1a", count=0)
    with RawVMCluster(n_workers=3, **options(quiet_cloud)) as cluster:
        cluster.sync(cluster._correct_state)
        cluster.scale(6)
        cluster.sync(cluster._correct_state)
        zones = {i["Placement"]["AvailabilityZone"] for i in live_instances(quiet_cloud)}
        assert len(zones) == 1 and zones != {"us-east-1a"}
        assert len(live_instances(quiet_cloud, cluster.cluster_name)) == 6
    quiet_cloud.restore_capacity()
    for zone in ("us-east-1a", "us-east-1b", "us-east-1c"):
        quiet_cloud.set_capacity(zone=zone, count=2)
    with RawVMCluster(n_workers=6, zone="any", **options(quiet_cloud)) as cluster:
        cluster.sync(cluster._correct_state)
        instances = live_instances(quiet_cloud, cluster.cluster_name)
        assert len({i["Placement"]["AvailabilityZone"] for i in instances}) == 3


def test_the_meter_counts_disks_and_public_addresses_and_the_budget_sees_them(
    quiet_cloud: LocalCloud,
) -> None:
    with RawVMCluster(n_workers=2, worker_vm_type="t3.large", **options(quiet_cloud)) as cluster:
        cluster.sync(cluster._correct_state)
        parts = cluster.ledger.meter.cost_per_hour_by_part()
        gp3 = StoragePrices.load("us-east-1")
        assert parts["storage"] == pytest.approx(2 * gp3.volume_hourly(40))
        assert parts["public_ipv4"] == pytest.approx(2 * 0.005)
        assert cluster.cost_per_hour == pytest.approx(sum(parts.values()))
        instance = parts["instance"] / 2
    # 20 t3.large fit under $1.70/h on instance hours alone ($1.66); with their disks and
    # addresses ($0.00438 + $0.005 each) they do not.
    assert 20 * instance < 1.70 < 20 * (instance + gp3.volume_hourly(40) + 0.005)
    with pytest.raises(Exception, match="max_hourly_cost"):
        RawVMCluster(
            n_workers=20, worker_vm_type="t3.large", max_hourly_cost=1.70, **options(quiet_cloud)
        )
    with RawVMCluster(
        n_workers=1, worker_vm_type="t3.large", public_ip=False, **options(quiet_cloud)
    ) as cluster:
        cluster.sync(cluster._correct_state)
        assert "public_ipv4" not in cluster.ledger.meter.cost_per_hour_by_part()


def test_tag_keys_ec2_refuses_in_metadata_work_because_metadata_has_no_tags(
    quiet_cloud: LocalCloud,
) -> None:
    quiet_cloud.refuse_metadata_tag_keys()
    tags = {"Cost Center": "4711", "team/owner": "data"}
    with RawVMCluster(n_workers=2, tags=tags, **options(quiet_cloud)) as cluster:
        cluster.sync(cluster._correct_state)
        for instance in live_instances(quiet_cloud, cluster.cluster_name):
            assert tags.items() <= {t["Key"]: t["Value"] for t in instance["Tags"]}.items()


def test_a_whole_cluster_with_every_strictness_of_ec2_at_once(cloud: LocalCloud) -> None:
    """Eventual consistency, expiring IMDS tokens, tag keys EC2 refuses in metadata, no
    default VPC, no spot service-linked role, GetConsoleOutput denied, paged listings."""
    vpc = cloud.strict(consistency_calls=2, imds_token_ttl=3.0, page_size=2)
    with RawVMCluster(
        n_workers=2,
        endpoint_url=cloud.endpoint_url,
        region=cloud.region,
        vpc=vpc,
        spot_policy="spot_with_fallback",
        tags={"Cost Center": "4711", "team/owner": "data"},
        death_timeout=20,
    ) as cluster:
        name = cluster.cluster_name
        client = cluster.get_client()
        client.wait_for_workers(2, timeout=180)
        assert {m.market for m in cluster.ledger.assigned.values()} == {"on-demand"}
        zones = {i["Placement"]["AvailabilityZone"] for i in live_instances(cloud, name)}
        assert len(zones) == 1
        # Boot logs are denied: the cluster goes on without them.
        logs = cluster.get_logs()
        assert cloud.calls["GetConsoleOutput"] > 0 and "Scheduler" in logs
        data = client.persist(da.random.random((400, 400), chunks=100))
        expected = float(data.sum().compute())
        # The spot watcher outlived many 3 s tokens: an interruption notice still retires
        # the worker gracefully, its data moved first.
        victim = max(client.has_what().items(), key=lambda kv: len(kv[1]))[0]
        victim_name = client.scheduler_info()["workers"][victim]["name"]
        cloud.interrupt(cluster.instances[victim_name], delay=30)
        wait_for(lambda: victim_name not in connected(client), 60, "the notice to retire it")
        assert float(data.sum().compute()) == pytest.approx(expected)
        cluster.scale(3)
        wait_for(lambda: len(connected(client)) == 3, 180, "a scale-up in the same zone")
        zones = {i["Placement"]["AvailabilityZone"] for i in live_instances(cloud, name)}
        assert len(zones) == 1
    assert live_instances(cloud, name) == []
    ec2 = boto3.client("ec2", **cloud.client_kwargs())
    tagged = [{"Name": "tag:dask-rawvm:cluster", "Values": [name]}]
    assert ec2.describe_security_groups(Filters=tagged)["SecurityGroups"] == []
    assert ec2.describe_launch_templates(Filters=tagged)["LaunchTemplates"] == []


ADMIN = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
}


def test_a_whole_cluster_as_an_identity_holding_exactly_the_documented_policy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """moto's IAM enforcement is process-global: the cloud runs in a process of its own."""
    with standalone_cloud() as remote:
        admin = remote.create_identity("admin", ADMIN)
        user = remote.create_identity("dask-rawvm", POLICY)
        without = json.loads(json.dumps(POLICY))
        without["Statement"][0]["Action"].remove("ec2:DescribeSubnets")
        lacking = remote.create_identity("lacking", without)
        remote.enforce_iam()
        observer = {**remote.client_kwargs(), **admin}
        ec2 = boto3.client("ec2", **observer)
        s3 = boto3.client("s3", **observer)

        monkeypatch.setenv("AWS_ACCESS_KEY_ID", lacking["aws_access_key_id"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", lacking["aws_secret_access_key"])
        with pytest.raises(ProviderError, match="lack the permission ec2:DescribeSubnets"):
            RawVMCluster(n_workers=1, endpoint_url=remote.endpoint_url, region=remote.region)

        # The data the cluster's own role may read and write, and data beside it.
        s3.create_bucket(Bucket="lake")
        for key in ("in/a.txt", "out/b.txt"):
            s3.put_object(Bucket="lake", Key=key, Body=key.encode())

        monkeypatch.setenv("AWS_ACCESS_KEY_ID", user["aws_access_key_id"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", user["aws_secret_access_key"])
        # The policy lets forwarding get its short-lived credentials (the default mode).
        sts = boto3.client("sts", **{**remote.client_kwargs(), **user})
        assert sts.get_session_token(DurationSeconds=900)["Credentials"]["SessionToken"]
        # IAM reaches EC2 a few seconds late: the first launches wait for the new profile.
        remote.iam_propagation(3)
        with RawVMCluster(
            n_workers=1,
            endpoint_url=remote.endpoint_url,
            region=remote.region,
            death_timeout=20,
            credentials="role",
            data=["s3://lake/in"],
        ) as cluster:
            name = cluster.cluster_name
            client = cluster.get_client()
            client.wait_for_workers(1, timeout=180)
            x = da.arange(100_000, chunks=10_000).persist()
            assert int(x.sum().compute()) == 4999950000
            # The workers are the role: what data= names, and nothing beside it.
            def read_s3(bucket: str, key: str) -> str:  # local: pickled by value
                import botocore.session

                session = botocore.session.get_session()
                s3 = session.create_client("s3", region_name="us-east-1")
                body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
                method = session.get_credentials().method
                return f"{body.decode()} {method.replace('iam-role', 'instance')}"

            assert client.submit(read_s3, "lake", "in/a.txt").result() == "in/a.txt instance"
            with pytest.raises(Exception, match="AccessDenied"):
                client.submit(read_s3, "lake", "out/b.txt").result()
            cluster.scale(2)
            wait_for(lambda: len(connected(client)) == 2, 180, "scale(2)")
            cluster.adapt(minimum=1, maximum=2)
            wait_for(lambda: len(connected(client)) == 1, 120, "adapt to scale down when idle")
            assert int(x.sum().compute()) == 4999950000
        iam = boto3.client("iam", **observer)
        assert iam.list_roles(PathPrefix="/dask-rawvm/")["Roles"] == []
        assert iam.list_instance_profiles(PathPrefix="/dask-rawvm/")["InstanceProfiles"] == []
        leftover = ec2.describe_instances(
            Filters=[
                {"Name": "tag:dask-rawvm:cluster", "Values": [name]},
                {"Name": "instance-state-name", "Values": ["pending", "running"]},
            ]
        )["Reservations"]
        assert leftover == []
        where = ["--endpoint-url", remote.endpoint_url, "--region", remote.region]
        down = subprocess.run(
            [sys.executable, "-m", "dask_rawvm.cli", "down", "--all", *where],
            env={**os.environ},  # as the identity holding the policy
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert down.returncode == 0, down.stderr
        assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == ["lake"]
        # The policy's last statement lets the same identity check the account.
        check = subprocess.run(
            [sys.executable, "-m", "dask_rawvm.cli", "check", *where],
            env={**os.environ, "COLUMNS": "300"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert check.returncode == 0, check.stdout + check.stderr
        assert "blocker" not in check.stdout and "dry-run launch" in check.stdout
