"""Data where the workers are (issue 13), on the local cloud with real VMs, s3fs and pyarrow:
forwarded credentials served the SDKs' way and refreshed, the local cloud's S3 found the
standard way, no secret at rest, and ``files=`` on every worker, late ones included.

One cluster for the module (a cluster start is the expensive part), its forwarded
credentials shortened to seconds so that refreshes happen within the test.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import sys
import tarfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import cloudpickle
import dask.dataframe as dd
import pandas as pd
import pytest
from distributed import Client
from helpers import wait_for

import dask_rawvm.machines.data
from dask_rawvm import RawVMCluster
from dask_rawvm.config import resolve_options
from dask_rawvm.data import FILES_LIMIT, pack_files
from dask_rawvm.errors import OptionError
from dask_rawvm.localcloud import LocalCloud
from dask_rawvm.machines import Ledger, ProviderSession, check_data_regions
from dask_rawvm.providers import provider_for
from dask_rawvm.providers.ec2.roles import TRUST_POLICY

# This module is not on the VMs: its functions travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

#: Seconds the module's forwarded credentials last: refreshed every 4 s.
LIFETIME = 8.0
BUCKET = "rawvm-test-data"


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of small files for files= and upload()."""
    root = tmp_path_factory.mktemp("shipped")
    (root / "data").mkdir()
    (root / "data" / "lookup.csv").write_text("key,value\na,1\nb,2\n")
    (root / "config").mkdir()
    (root / "config" / "settings.json").write_text('{"threshold": 3}')
    return root


@pytest.fixture(scope="module")
def cluster(shipped: Path) -> Iterator[RawVMCluster]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dask_rawvm.machines.data, "LIFETIME", LIFETIME)
        # As in a notebook's directory: files= and upload() take paths relative to it.
        patch.chdir(shipped)
        with RawVMCluster(n_workers=1, files=["data/lookup.csv"], death_timeout=30) as cluster:
            yield cluster


@pytest.fixture(scope="module")
def client(cluster: RawVMCluster) -> Iterator[Client]:
    with Client(cluster) as client:
        yield client


def one(answers: dict[str, Any]) -> Any:
    """The answer of a ``client.run`` on the first worker (functions of this module travel
    by value with ``run``; a task graph would name the module, which the VMs lack)."""
    return answers[min(answers)]


def cloud_of(cluster: RawVMCluster) -> LocalCloud:
    cloud = cluster.provider.cloud  # type: ignore[attr-defined]
    assert isinstance(cloud, LocalCloud)
    return cloud


# -- what tasks run on the VMs (no storage_options anywhere) --------------------------------
def served_credentials() -> dict[str, Any]:
    """What the VM's container-credentials endpoint serves, asked as an SDK asks."""
    request = urllib.request.Request(
        os.environ["AWS_CONTAINER_CREDENTIALS_FULL_URI"],
        headers={"Authorization": os.environ["AWS_CONTAINER_AUTHORIZATION_TOKEN"]},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        return dict(json.loads(answer.read()))


def read_and_write_parquet(source: str, target: str) -> dict[str, Any]:
    import botocore.session
    import pyarrow.parquet

    frame = dd.read_parquet(source).compute(scheduler="sync")
    dd.from_pandas(frame.assign(double=frame.value * 2), npartitions=1).to_parquet(
        target, write_index=False, compute_kwargs={"scheduler": "sync"}
    )
    table = pyarrow.parquet.read_table(source)
    return {
        "rows": len(frame),
        "pyarrow_rows": table.num_rows,
        # Where botocore found its credentials: the container endpoint, nothing else.
        "method": botocore.session.get_session().get_credentials().method,
        "endpoint": os.environ.get("AWS_ENDPOINT_URL_S3"),
    }


async def round_trip_off_the_loop(source: str, target: str) -> dict[str, Any]:
    """:func:`read_and_write_parquet` as a task runs, off the worker's event loop
    (``client.run`` calls a plain function on it, which would hold up the credentials'
    refresh meanwhile)."""
    return await asyncio.to_thread(read_and_write_parquet, source, target)


def list_bucket(bucket: str) -> list[str]:
    import s3fs

    return sorted(s3fs.S3FileSystem().ls(bucket, refresh=True))


def read_shipped() -> dict[str, str]:
    out = {"lookup": Path("data/lookup.csv").read_text()}
    if Path("config/settings.json").exists():
        out["settings"] = Path("config/settings.json").read_text()
    return out


# -- the tests ---------------------------------------------------------------------------
def test_workers_read_and_write_parquet_on_s3_with_no_storage_options(
    cluster: RawVMCluster, client: Client
) -> None:
    options = cluster.storage_options
    assert options["endpoint_url"] == cloud_of(cluster).endpoint_url
    frame = pd.DataFrame({"key": list("abcdef"), "value": range(6)})
    # The client writes with cluster.storage_options (its S3 is the local cloud's) ...
    boto3.client(
        "s3",
        endpoint_url=options["endpoint_url"],
        aws_access_key_id=options["key"],
        aws_secret_access_key=options["secret"],
        region_name="us-east-1",
    ).create_bucket(Bucket=BUCKET)
    dd.from_pandas(frame, npartitions=2).to_parquet(
        f"s3://{BUCKET}/in", storage_options=options, compute_kwargs={"scheduler": "sync"}
    )
    # ... the workers read and write with none.
    result = one(client.run(round_trip_off_the_loop, f"s3://{BUCKET}/in", f"s3://{BUCKET}/out"))
    assert result["rows"] == result["pyarrow_rows"] == 6
    assert result["method"] == "container-role"
    assert result["endpoint"] == cloud_of(cluster).endpoint_url
    back = dd.read_parquet(f"s3://{BUCKET}/out", storage_options=options).compute()
    assert sorted(back.double) == [2 * v for v in range(6)]
    assert sorted(back.key) == list("abcdef")


def test_forwarded_credentials_refresh_at_half_life(cluster: RawVMCluster, client: Client) -> None:
    assert cluster.credentials is not None
    seen = [one(client.run(served_credentials))["Expiration"]]

    def refreshed() -> bool:
        expiration = one(client.run(served_credentials))["Expiration"]
        if expiration != seen[-1]:
            seen.append(expiration)
            # S3 keeps working with what the endpoint serves now.
            assert f"{BUCKET}/in" in one(client.run(list_bucket, BUCKET))
        return len(seen) >= 3

    # Refreshed every LIFETIME / 2 = 4 s: two refreshes within ~8 s.
    wait_for(refreshed, 60, "two refreshes of the forwarded credentials")
    assert seen == sorted(seen)


def test_no_secret_at_rest(cluster: RawVMCluster, client: Client) -> None:
    served = one(client.run(served_credentials))
    secrets = [served["SecretAccessKey"], served["Token"]]
    # The scheduler VM's process serves them too.
    assert client.run_on_scheduler(served_credentials)["AccessKeyId"] == served["AccessKeyId"]
    cloud = cloud_of(cluster)
    kwargs = cloud.client_kwargs()
    # The user-data of a new worker, and every launch template version's data.
    at_rest = [cluster.user_data()]
    ec2 = boto3.client("ec2", **kwargs)
    for template in ec2.describe_launch_templates()["LaunchTemplates"]:
        versions = ec2.describe_launch_template_versions(
            LaunchTemplateId=template["LaunchTemplateId"]
        )["LaunchTemplateVersions"]
        for version in versions:
            data = version["LaunchTemplateData"]
            at_rest.append(json.dumps(data, default=str))
            at_rest.append(base64.b64decode(data.get("UserData", "")).decode())
    # Every object of every bucket (the cluster's store, and this test's data).
    s3 = boto3.client("s3", **kwargs)
    objects = 0
    for bucket in s3.list_buckets()["Buckets"]:
        for item in s3.list_objects_v2(Bucket=bucket["Name"]).get("Contents", []):
            body = s3.get_object(Bucket=bucket["Name"], Key=item["Key"])["Body"].read()
            at_rest.append(body.decode("latin-1"))
            objects += 1
    # The VMs' files: user-data, console logs, homes (not the shared environments).
    for path in cloud.workdir.rglob("*"):
        if path.is_file() and path.stat().st_size < 2**20:
            at_rest.append(path.read_bytes().decode("latin-1"))
    assert objects > 0 and len(at_rest) > objects
    leaks = [i for i, text in enumerate(at_rest) for secret in secrets if secret in text]
    assert leaks == []


def test_files_reach_every_worker_including_one_added_later(
    cluster: RawVMCluster, client: Client, shipped: Path
) -> None:
    expected = (shipped / "data" / "lookup.csv").read_text()
    assert {v["lookup"] for v in client.run(read_shipped).values()} == {expected}
    cluster.upload("config")
    assert all("settings" in v for v in client.run(read_shipped).values())
    before = set(client.scheduler_info()["workers"])
    cluster.scale(2)
    client.wait_for_workers(2, timeout=300)
    (new,) = set(client.scheduler_info()["workers"]) - before
    # The new worker's first tasks: its files, and S3 with the forwarded credentials.
    first = client.run(read_shipped, workers=[new])[new]
    assert first == {"lookup": expected, "settings": '{"threshold": 3}'}
    listed = client.run(list_bucket, BUCKET, workers=[new])[new]
    assert f"{BUCKET}/in" in listed


def test_forwarding_stops_at_close_and_warns_when_credentials_outlive_no_client(
    cluster: RawVMCluster, caplog: pytest.LogCaptureFixture
) -> None:
    forwarder = cluster.credentials
    assert forwarder is not None and forwarder.forwarded >= 3
    # A cluster left running with credentials shorter than its idle_timeout says so.
    with caplog.at_level(logging.WARNING, logger="dask_rawvm.machines.data"):
        forwarder.stop(idle_timeout=1200)
    assert "expire in" in caplog.text and "idle_timeout" in caplog.text


# -- without a cluster ---------------------------------------------------------------------
def test_credentials_option_is_forward_role_or_none() -> None:
    assert resolve_options().credentials == "forward"
    assert resolve_options(credentials=None).credentials is None
    assert resolve_options(provider="ssh").credentials is None
    with pytest.raises(OptionError, match="'forward', 'role', None"):
        resolve_options(credentials="yes")
    with pytest.raises(OptionError, match="may read and write with data="):
        resolve_options(credentials="role")
    assert resolve_options(credentials="role", data=["s3://lake/raw"]).credentials == "role"
    with pytest.raises(OptionError, match="pass credentials='role' with it"):
        resolve_options(iam_instance_profile="readers")
    with pytest.raises(OptionError, match="SSH hosts keep"):
        resolve_options(provider="ssh", credentials="forward")
    with pytest.raises(OptionError, match="S3 URLs"):
        resolve_options(data="s3://bucket")


def test_files_keep_their_relative_path_and_are_capped(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "lookup.csv").write_text("a,1\n")
    archive = pack_files(["data/lookup.csv"], base=str(tmp_path))
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        assert tar.getnames() == ["data/lookup.csv"]
    (tmp_path / "big.bin").write_bytes(b"\0" * (FILES_LIMIT + 1))
    with pytest.raises(OptionError, match="put bigger data in S3"):
        pack_files(["big.bin"], base=str(tmp_path))
    with pytest.raises(OptionError, match="does not exist"):
        pack_files(["missing.csv"], base=str(tmp_path))
    # Refused before anything starts: no cloud, no VM.
    with pytest.raises(OptionError, match="put bigger data in S3"):
        RawVMCluster(files=[str(tmp_path / "big.bin")])


async def test_a_bucket_in_another_region_is_a_warning_with_its_cost(
    cloud: LocalCloud, caplog: pytest.LogCaptureFixture
) -> None:
    s3 = boto3.client("s3", **cloud.client_kwargs())
    s3.create_bucket(
        Bucket="far-data", CreateBucketConfiguration={"LocationConstraint": "us-west-2"}
    )
    s3.create_bucket(Bucket="near-data")
    options = resolve_options(
        "aws",
        endpoint_url=cloud.endpoint_url,
        region=cloud.region,
        data=["s3://far-data/x", "s3://near-data/y/", "s3://missing-bucket"],
    )
    session = ProviderSession(provider_for(options, "c"), "c", Ledger())
    await session.open()
    try:
        with caplog.at_level(logging.WARNING, logger="dask_rawvm.machines.data"):
            await check_data_regions(session, options)
    finally:
        await session.close(terminate=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "far-data is in us-west-2" in warnings[0] and "$0.02/GB" in warnings[0]


def test_credentials_role_launches_every_vm_with_the_named_profile(
    quiet_cloud: LocalCloud,
) -> None:
    """The launch carries the instance profile, and the VMs get no forwarded credentials."""
    iam = boto3.client("iam", **quiet_cloud.client_kwargs())
    trust = json.dumps(TRUST_POLICY)  # EC2 may assume it, as for the cluster's own
    iam.create_role(RoleName="data-readers", AssumeRolePolicyDocument=trust)
    iam.create_instance_profile(InstanceProfileName="data-readers")
    iam.add_role_to_instance_profile(InstanceProfileName="data-readers", RoleName="data-readers")
    with RawVMCluster(
        n_workers=1,
        endpoint_url=quiet_cloud.endpoint_url,
        region=quiet_cloud.region,
        scheduler="local",
        environment=None,
        wait_for_workers=False,
        credentials="role",
        iam_instance_profile="data-readers",
    ) as cluster:
        assert cluster.credentials is None
        assert "RAWVM_CREDENTIALS_ENDPOINT=''" in cluster.user_data()
        ec2 = boto3.client("ec2", **quiet_cloud.client_kwargs())
        wait_for(lambda: ec2.describe_launch_templates()["LaunchTemplates"], 60, "a launch")
        (template,) = ec2.describe_launch_templates()["LaunchTemplates"]
        versions = ec2.describe_launch_template_versions(
            LaunchTemplateId=template["LaunchTemplateId"]
        )["LaunchTemplateVersions"]
        profiles = {
            v["LaunchTemplateData"].get("IamInstanceProfile", {}).get("Name") for v in versions
        }
        assert profiles == {"data-readers"}
