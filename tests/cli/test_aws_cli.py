"""``dask-rawvm iam-policy``, ``check``, and ``ls``/``down`` confined to a region and following
every page, as commands against a local cloud (whose VMs never boot: these are about the API)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from helpers import live_instances, run_cli

from dask_rawvm.localcloud import CREDENTIALS, LocalCloud
from dask_rawvm.providers.ec2.iam import POLICY

DOCS = Path(__file__).parents[2] / "docs" / "aws.rst"
PATH_STYLE = Config(s3={"addressing_style": "path"})


@pytest.fixture
def idle_cloud() -> Iterator[LocalCloud]:
    with LocalCloud(boot_delay=3600) as cloud:
        yield cloud


def command(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": CREDENTIALS["aws_access_key_id"],
        "AWS_SECRET_ACCESS_KEY": CREDENTIALS["aws_secret_access_key"],
        "COLUMNS": "300",  # one line per table row
        **(env or {}),
    }
    return run_cli(*args, env=environment)


def check(cloud: LocalCloud, *args: str, **env: str) -> tuple[int, dict[str, str]]:
    """Exit status, and each row's status and detail by the row's name."""
    done = command(
        "check", "--endpoint-url", cloud.endpoint_url, "--region", cloud.region, *args, env=env
    )
    rows = {}
    for line in done.stdout.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃|]", line) if c.strip()]
        if len(cells) >= 3 and cells[1] in ("ok", "warning", "blocker"):
            rows[cells[0]] = f"{cells[1]}: {cells[2]}"
    assert rows, done.stdout + done.stderr
    return done.returncode, rows


def test_iam_policy_is_printed_and_shown_in_the_docs() -> None:
    printed = command("iam-policy")
    assert printed.returncode == 0
    assert json.loads(printed.stdout) == POLICY
    docs = DOCS.read_text()
    block = docs.split(".. code-block:: json\n", 1)[1].split("\n\n", 1)[0]
    assert json.loads(block) == POLICY, "docs/aws.rst shows another policy than iam.py"


def test_check_passes_on_a_ready_account_and_names_each_blocker(idle_cloud: LocalCloud) -> None:
    status, rows = check(idle_cloud, "--workers", "2")
    assert status == 0, rows
    assert rows["credentials"].startswith("ok: account")
    assert rows["VPC and subnets"].startswith("ok: vpc-")
    assert rows[
        "vCPU quota, on-demand Standard (A, C, D, H, I, M, R, T, Z)"
    ].startswith(
        # 2 x t3.large + t3.medium
        "ok: 1152 vCPUs (applied, L-1216C47A); 2 worker(s) and the scheduler need 6"
    )
    assert rows["spot service-linked role"].startswith("ok:")
    assert rows["dry-run launch"].startswith("ok: EC2 would launch a t3.large")

    # Spot: the quota of each market, and the role EC2 needs on the first spot launch.
    spot = {"DASK_RAWVM__AWS__SPOT_POLICY": "spot_with_fallback"}
    idle_cloud.set_quota("L-34B43A08", None)  # no applied value: AWS's default (5 vCPUs)
    status, rows = check(idle_cloud, "--workers", "3", **spot)
    assert status == 0  # warnings only: the spot shortfall would go on-demand
    assert rows["vCPU quota, spot Standard (A, C, D, H, I, M, R, T, Z)"].startswith(
        "warning: 5 vCPUs (AWS default, L-34B43A08); 3 worker(s) need 6"
    )
    assert "create-service-linked-role" in rows["spot service-linked role"]
    # The role as EC2 makes it (moto's CreateServiceLinkedRole names it otherwise).
    iam = boto3.client("iam", **idle_cloud.client_kwargs())
    iam.create_role(
        RoleName="AWSServiceRoleForEC2Spot",
        Path="/aws-service-role/spot.amazonaws.com/",
        AssumeRolePolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Principal": {"Service": "spot.amazonaws.com"},
                        "Action": "sts:AssumeRole",
                    }
                ],
            }
        ),
    )
    assert check(idle_cloud, **spot)[1]["spot service-linked role"].startswith("ok:")

    # Blockers: an on-demand quota too small, a launch these credentials may not make, no
    # default VPC. Each makes the command exit 1.
    idle_cloud.set_quota("L-1216C47A", 4)
    status, rows = check(idle_cloud, "--workers", "2")
    assert status == 1 and rows[
        "vCPU quota, on-demand Standard (A, C, D, H, I, M, R, T, Z)"
    ].startswith("blocker: 4 vCPUs")
    idle_cloud.set_quota("L-1216C47A", 1152)
    idle_cloud.deny("RunInstances")
    status, rows = check(idle_cloud)
    assert status == 1 and "ec2:RunInstances" in rows["dry-run launch"]
    idle_cloud.deny("RunInstances", False)
    idle_cloud.remove_default_vpc()
    status, rows = check(idle_cloud)
    assert status == 1
    assert rows["VPC and subnets"].startswith("blocker: us-east-1 has no default VPC: pass vpc=")
    assert idle_cloud.calls["CreateFleet"] == 0 and live_instances(idle_cloud) == []


def make_cluster_resources(cloud: LocalCloud, cluster: str, region: str = "us-east-1") -> None:
    """What a cluster leaves: an instance, a launch template, a security group, a bucket."""
    kwargs: dict[str, Any] = {**cloud.client_kwargs(), "region_name": region}
    ec2 = boto3.client("ec2", **kwargs)
    tag = [{"Key": "dask-rawvm:cluster", "Value": cluster}]
    if region == cloud.region:
        ec2.run_instances(
            ImageId="ami-12c6146b",
            MinCount=1,
            MaxCount=1,
            TagSpecifications=[{"ResourceType": "instance", "Tags": tag}],
        )
        ec2.create_launch_template(
            LaunchTemplateName=f"dask-rawvm-{cluster}",
            LaunchTemplateData={},
            TagSpecifications=[{"ResourceType": "launch-template", "Tags": tag}],
        )
        ec2.create_security_group(
            GroupName=f"dask-rawvm-{cluster}",
            Description="x",
            TagSpecifications=[{"ResourceType": "security-group", "Tags": tag}],
        )
    s3 = boto3.client("s3", config=PATH_STYLE, **kwargs)
    bucket = f"dask-rawvm-{cluster}-0a1b2c3d"
    where = {} if region == "us-east-1" else {"LocationConstraint": region}
    s3.create_bucket(Bucket=bucket, **({"CreateBucketConfiguration": where} if where else {}))
    s3.put_object(Bucket=bucket, Key="bundle", Body=b"x")
    s3.put_bucket_tagging(Bucket=bucket, Tagging={"TagSet": tag})


def test_ls_and_down_follow_every_page_and_stay_in_their_region(idle_cloud: LocalCloud) -> None:
    for cluster in ("alpha", "beta", "gamma"):
        make_cluster_resources(idle_cloud, cluster)
    make_cluster_resources(idle_cloud, "elsewhere", region="eu-west-1")
    idle_cloud.paginate(page_size=1)  # every listing in pages of one
    where = ("--endpoint-url", idle_cloud.endpoint_url, "--region", "us-east-1")
    listing = command("ls", *where).stdout
    for cluster in ("alpha", "beta", "gamma"):
        expected = f"{cluster}: 1 buckets, 1 instances, 1 launch-templates, 1 security-groups"
        assert expected in listing, listing
    assert "elsewhere" not in listing  # its bucket is in eu-west-1

    removed = command("down", "--all", *where)
    assert removed.returncode == 0, removed.stderr
    assert "alpha: removed 1 buckets" in removed.stdout and "elsewhere" not in removed.stdout
    assert "no dask-rawvm resources" in command("ls", *where).stdout
    assert live_instances(idle_cloud) == []
    # The other region's cluster is untouched, and listed there.
    s3 = boto3.client("s3", config=PATH_STYLE, **idle_cloud.client_kwargs())
    assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == ["dask-rawvm-elsewhere-0a1b2c3d"]
    there = command("ls", "--endpoint-url", idle_cloud.endpoint_url, "--region", "eu-west-1")
    assert "elsewhere: 1 buckets" in there.stdout
