"""The IAM role a cluster makes for itself (``credentials="role"`` with ``data=``), on a local
cloud over HTTP whose launches refuse a profile IAM has not propagated yet (VMs never boot:
these are about the API): what the role grants, that the launch carries it, that it goes
with the cluster, and how the account sees it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from helpers import started_ec2_provider

from dask_rawvm.errors import ProviderError
from dask_rawvm.localcloud import CREDENTIALS, LocalCloud
from dask_rawvm.providers.base import LaunchSpec
from dask_rawvm.providers.ec2.account import EC2Account, remove_clusters
from dask_rawvm.providers.ec2.clients import EC2Clients
from dask_rawvm.providers.ec2.roles import (
    ROLE_PATH,
    create_cluster_role,
    data_policy,
    role_name,
)

DATA = ["s3://lake/raw/2024", "s3://scratch/"]


@pytest.fixture
def idle_cloud() -> Iterator[LocalCloud]:
    with LocalCloud(boot_delay=3600) as cloud:
        yield cloud


def iam_of(cloud: LocalCloud) -> Any:
    return boto3.client("iam", **cloud.client_kwargs())


def ours(iam: Any) -> tuple[list[str], list[str]]:
    """The roles and instance profiles under dask-rawvm's path."""
    roles = iam.list_roles(PathPrefix=ROLE_PATH)["Roles"]
    profiles = iam.list_instance_profiles(PathPrefix=ROLE_PATH)["InstanceProfiles"]
    return [r["RoleName"] for r in roles], [p["InstanceProfileName"] for p in profiles]


def spec(count: int) -> LaunchSpec:
    return LaunchSpec(
        role="worker",
        vm_type="t3.micro",
        user_data="#!/bin/sh\n",
        count=count,
        batch=uuid.uuid4().hex[:8],
    )


def test_the_policy_names_the_buckets_and_prefixes_of_data_and_nothing_else() -> None:
    policy = data_policy(DATA)
    resources = {r for statement in policy["Statement"] for r in statement["Resource"]}
    assert resources == {
        "arn:aws:s3:::lake",
        "arn:aws:s3:::scratch",
        # the prefix and what is under it, not raw/2024-old
        "arn:aws:s3:::lake/raw/2024",
        "arn:aws:s3:::lake/raw/2024/*",
        "arn:aws:s3:::scratch/*",
    }
    actions = {a for statement in policy["Statement"] for a in statement["Action"]}
    assert all(a.startswith("s3:") for a in actions)
    assert {"s3:GetObject", "s3:PutObject", "s3:ListBucket"} <= actions
    assert "s3:DeleteBucket" not in actions and "s3:*" not in actions
    # IAM's name rules: a long or odd cluster name gets a digest.
    assert role_name("rawvm-1234abcd") == "dask-rawvm-rawvm-1234abcd"
    long = role_name("x" * 80)
    assert len(long) <= 64 and long.startswith("dask-rawvm-")
    assert role_name("a b") != role_name("a c")


async def test_the_cluster_s_role_goes_on_every_vm_and_goes_with_the_cluster(
    idle_cloud: LocalCloud,
) -> None:
    iam = iam_of(idle_cloud)
    ec2 = boto3.client("ec2", **idle_cloud.client_kwargs())
    # EC2 does not know a new profile for 3 s: the first launch is refused and asked again.
    idle_cloud.iam_propagation(3)
    provider = await started_ec2_provider(idle_cloud, "role", data_role=DATA)
    try:
        name = role_name(provider.cluster)
        assert ours(iam) == ([], [])  # starting makes nothing
        machines = await provider.launch(spec(2))
        assert len(machines) == 2
        assert idle_cloud.calls["CreateFleet"] >= 2, "the fresh profile was not refused first"

        profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
        assert profile["Path"] == ROLE_PATH
        assert [r["RoleName"] for r in profile["Roles"]] == [name]
        reservations = ec2.describe_instances(InstanceIds=[m.id for m in machines])
        carried = {
            i["IamInstanceProfile"]["Arn"]
            for r in reservations["Reservations"]
            for i in r["Instances"]
        }
        assert carried == {profile["Arn"]}

        role = iam.get_role(RoleName=name)["Role"]
        tags = {t["Key"]: t["Value"] for t in iam.list_role_tags(RoleName=name)["Tags"]}
        assert tags == {"dask-rawvm:cluster": provider.cluster, "dask-rawvm:region": "us-east-1"}
        (trust,) = role["AssumeRolePolicyDocument"]["Statement"]
        assert trust["Principal"] == {"Service": "ec2.amazonaws.com"}
        assert iam.list_role_policies(RoleName=name)["PolicyNames"] == ["data"]
        assert iam.list_attached_role_policies(RoleName=name)["AttachedPolicies"] == []
        policy = iam.get_role_policy(RoleName=name, PolicyName="data")["PolicyDocument"]
        assert policy == data_policy(DATA)

        found = (await provider.account.clusters())[provider.cluster]
        assert found["roles"] == [name]
        await provider.cleanup(provider.cluster)
        assert ours(iam) == ([], [])
    finally:
        await provider.close()


async def test_ls_sees_a_region_s_roles_only_and_down_removes_them(
    idle_cloud: LocalCloud, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", CREDENTIALS["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CREDENTIALS["aws_secret_access_key"])
    clients = await EC2Clients.open(idle_cloud.region, idle_cloud.endpoint_url, dict(CREDENTIALS))
    try:
        await create_cluster_role(clients.iam, "here", idle_cloud.region, DATA)
        await create_cluster_role(clients.iam, "elsewhere", "us-west-2", DATA)
        found = await EC2Account(clients).clusters()
        assert found == {"here": {"roles": [role_name("here")]}}
        # A cluster reconnected to finds its role; another's of the same name is an error.
        again = await create_cluster_role(clients.iam, "here", idle_cloud.region, ["s3://other"])
        assert again.endswith(f"instance-profile{ROLE_PATH}{role_name('here')}")
        iam = iam_of(idle_cloud)
        policy = iam.get_role_policy(RoleName=role_name("here"), PolicyName="data")
        assert policy["PolicyDocument"] == data_policy(["s3://other"])
        iam.untag_role(RoleName=role_name("elsewhere"), TagKeys=["dask-rawvm:cluster"])
        iam.tag_role(
            RoleName=role_name("elsewhere"), Tags=[{"Key": "dask-rawvm:cluster", "Value": "x"}]
        )
        with pytest.raises(ProviderError, match="exists and is not cluster elsewhere's"):
            await create_cluster_role(clients.iam, "elsewhere", "us-west-2", DATA)
    finally:
        await clients.close()
    removed = await remove_clusters(idle_cloud.endpoint_url, idle_cloud.region, ("here",))
    assert removed == {"here": {"roles": [role_name("here")]}}
    assert ours(iam_of(idle_cloud)) == ([role_name("elsewhere")], [role_name("elsewhere")])


async def test_a_profile_ec2_does_not_know_fails_the_launch_at_once_naming_it(
    idle_cloud: LocalCloud,
) -> None:
    provider = await started_ec2_provider(idle_cloud, "role", instance_profile="no-such-profile")
    try:
        # A profile not made here is not waited for (that would take PROPAGATION_TIMEOUT).
        with pytest.raises(ProviderError, match=r"iamInstanceProfile\.name is invalid"):
            await asyncio.wait_for(provider.launch(spec(1)), 30)
    finally:
        await provider.cleanup(provider.cluster)
        await provider.close()


async def test_an_identity_that_may_not_list_roles_still_sees_its_clusters(
    idle_cloud: LocalCloud, caplog: pytest.LogCaptureFixture
) -> None:
    """A policy from before credentials='role' made no role, and may not list them."""
    idle_cloud.deny("ListRoles")
    s3 = boto3.client("s3", **idle_cloud.client_kwargs())
    s3.create_bucket(Bucket="dask-rawvm-old")
    s3.put_bucket_tagging(
        Bucket="dask-rawvm-old", Tagging={"TagSet": [{"Key": "dask-rawvm:cluster", "Value": "old"}]}
    )
    clients = await EC2Clients.open(idle_cloud.region, idle_cloud.endpoint_url, dict(CREDENTIALS))
    try:
        assert await EC2Account(clients).clusters() == {"old": {"buckets": ["dask-rawvm-old"]}}
    finally:
        await clients.close()
    assert "lack the permission iam:ListRoles" in caplog.text
