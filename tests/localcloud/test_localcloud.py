"""The embedded local cloud: EC2 API over HTTP, VMs that run, faults, the standalone server."""

from __future__ import annotations

import asyncio
import os
import time

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from helpers import standalone_cloud, wait_for

from dask_rawvm.localcloud import LocalCloud

# A boot script that reports what IMDS told it, then waits to be stopped.
REPORTER = """#!/bin/bash
IMDS="${RAWVM_IMDS:-http://169.254.169.254}"
TOKEN=$(curl -sf -X PUT -H "X-aws-ec2-metadata-token-ttl-seconds: 60" "$IMDS/latest/api/token")
meta() { curl -sf -H "X-aws-ec2-metadata-token: $TOKEN" "$IMDS/latest/meta-data/$1"; }
echo "id=$(meta instance-id) index=$(meta ami-launch-index) type=$(meta instance-type)"
echo "ip=$(meta local-ipv4) role=$(meta tags/instance/role)"
echo "unauthenticated=$(curl -s -o /dev/null -w '%{http_code}' $IMDS/latest/meta-data/instance-id)"
sleep 300 &
echo "child=$!"
wait
"""
EXITS = "#!/bin/bash\necho bye\n"


def ec2_client(cloud: LocalCloud, retries: int = 1):
    config = Config(retries={"total_max_attempts": retries})
    return boto3.client("ec2", config=config, **cloud.client_kwargs())


def run(cloud: LocalCloud, script: str, count: int = 1, **kwargs: object) -> list[str]:
    ec2 = ec2_client(cloud)
    response = ec2.run_instances(
        ImageId="ami-12c6146b",
        MinCount=count,
        MaxCount=count,
        InstanceType="t3.micro",
        UserData=script,
        InstanceInitiatedShutdownBehavior="terminate",
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "role", "Value": "w"}]}],
        **kwargs,
    )
    return [i["InstanceId"] for i in response["Instances"]]


def state(cloud: LocalCloud, instance_id: str) -> str:
    response = ec2_client(cloud).describe_instances(InstanceIds=[instance_id])
    return str(response["Reservations"][0]["Instances"][0]["State"]["Name"])


def test_instances_boot_their_user_data_with_instance_metadata(cloud: LocalCloud) -> None:
    # Tags reach instance metadata only with InstanceMetadataTags enabled, as on EC2.
    ids = run(cloud, REPORTER, count=2, MetadataOptions={"InstanceMetadataTags": "enabled"})
    for index, instance_id in enumerate(ids):
        wait_for(lambda i=instance_id: "child=" in cloud.console_output(i), 30, "boot")
        output = cloud.console_output(instance_id)
        assert f"id={instance_id} index={index} type=t3.micro" in output
        assert "role=w" in output
        assert "unauthenticated=401" in output  # IMDSv2 only, as on EC2
    ips = [cloud.runtime.vms[i].ip for i in ids]  # type: ignore[union-attr]
    assert len(set(ips)) == 2 and all(ip.startswith("127.") for ip in ips)
    described = ec2_client(cloud).describe_instances(InstanceIds=ids)["Reservations"][0]
    assert {i["PrivateIpAddress"] for i in described["Instances"]} == set(ips)
    assert state(cloud, ids[0]) == "running"


def test_terminate_kills_the_whole_process_group(cloud: LocalCloud) -> None:
    (instance_id,) = run(cloud, REPORTER)
    wait_for(lambda: "child=" in cloud.console_output(instance_id), 30, "boot")
    child = int(cloud.console_output(instance_id).split("child=")[1].split()[0])
    ec2_client(cloud).terminate_instances(InstanceIds=[instance_id])
    assert state(cloud, instance_id) == "terminated"
    wait_for(lambda: not _alive(child), 10, "the VM's background process to die")


def test_a_boot_script_that_exits_terminates_its_instance(cloud: LocalCloud) -> None:
    (instance_id,) = run(cloud, EXITS)
    wait_for(lambda: state(cloud, instance_id) == "terminated", 30, "self-termination")
    instance = ec2_client(cloud).describe_instances(InstanceIds=[instance_id])
    reason = instance["Reservations"][0]["Instances"][0]["StateReason"]["Code"]
    assert reason == "Client.InstanceInitiatedShutdown"
    assert "bye" in cloud.console_output(instance_id)


def test_shutdown_command_powers_the_vm_off(cloud: LocalCloud) -> None:
    (instance_id,) = run(cloud, "#!/bin/bash\nsleep 300 &\nshutdown -h now\nsleep 300\n")
    wait_for(lambda: state(cloud, instance_id) == "terminated", 30, "poweroff")


def test_boot_delay_keeps_instances_pending() -> None:
    with LocalCloud(boot_delay=1.5) as cloud:
        (instance_id,) = run(cloud, EXITS)
        assert state(cloud, instance_id) == "pending"
        wait_for(lambda: state(cloud, instance_id) != "pending", 30, "boot")
        # Terminated while pending, it never boots: a VM launched after it boots
        # after it (same delay), so once the later one runs, the earlier one's
        # boot time has passed.
        (cancelled,) = run(cloud, REPORTER)
        ec2_client(cloud).terminate_instances(InstanceIds=[cancelled])
        (later,) = run(cloud, REPORTER)
        wait_for(lambda: state(cloud, later) == "running", 30, "the later VM to boot")
        assert cloud.runtime.vms[cancelled].process is None  # type: ignore[union-attr]
        assert state(cloud, cancelled) == "terminated"


def test_injected_errors_carry_aws_codes_and_statuses(cloud: LocalCloud) -> None:
    cloud.inject("RunInstances", error="InsufficientInstanceCapacity", count=2)
    for _ in range(2):
        with pytest.raises(ClientError) as error:
            run(cloud, EXITS)
        assert error.value.response["Error"]["Code"] == "InsufficientInstanceCapacity"
        assert error.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    run(cloud, EXITS)  # the third call goes through
    assert cloud.calls["RunInstances"] == 3

    cloud.inject("DescribeInstances", error="RequestLimitExceeded")
    with pytest.raises(ClientError) as error:
        ec2_client(cloud).describe_instances()
    assert error.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503


def test_injected_latency(cloud: LocalCloud) -> None:
    cloud.inject("DescribeRegions", latency=0.5)
    began = time.monotonic()
    ec2_client(cloud).describe_regions()
    assert time.monotonic() - began >= 0.5
    cloud.clear_faults()


def test_two_clouds_share_nothing(cloud: LocalCloud) -> None:
    with LocalCloud() as other:
        run(other, EXITS)
        assert ec2_client(cloud).describe_instances()["Reservations"] == []


def test_standalone_server_and_remote_control() -> None:
    with standalone_cloud() as remote:  # stops with SIGTERM and exit code 0
        remote.inject("RunInstances", error="InsufficientInstanceCapacity")
        ec2 = boto3.client(
            "ec2", config=Config(retries={"total_max_attempts": 1}), **remote.client_kwargs()
        )
        with pytest.raises(ClientError, match="InsufficientInstanceCapacity"):
            ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1)
        (instance,) = ec2.run_instances(
            ImageId="ami-12c6146b", MinCount=1, MaxCount=1, UserData=EXITS
        )["Instances"]
        assert remote.calls["RunInstances"] == 2
        wait_for(lambda: "bye" in remote.console_output(instance["InstanceId"]), 30, "boot")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too: it only waits for its parent to reap it.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


async def test_console_output_reaches_the_provider_verbatim(cloud: LocalCloud) -> None:
    # "abcdabcd" is valid base64: decoding botocore's already-decoded text would garble it.
    from dask_rawvm.localcloud import CREDENTIALS
    from dask_rawvm.providers.ec2 import EC2Provider

    (instance_id,) = run(cloud, "#!/bin/bash\necho abcdabcd\nsleep 300\n")
    provider = EC2Provider("t", cloud.region, cloud.endpoint_url, dict(CREDENTIALS))
    await provider.start()
    try:
        deadline = time.monotonic() + 30
        while "abcdabcd" not in await provider.console_output(instance_id):
            assert time.monotonic() < deadline, await provider.console_output(instance_id)
            await asyncio.sleep(0.1)
    finally:
        await provider.close()


def test_terminating_a_terminated_instance_answers_its_state_as_ec2_does() -> None:
    # A VM that powered itself off, then terminated by its cluster's close(): moto alone
    # fails deleting its delete-on-termination network interface a second time.
    with LocalCloud(boot_delay=3600) as cloud:
        ec2 = ec2_client(cloud)
        group = ec2.describe_security_groups(GroupNames=["default"])["SecurityGroups"][0]
        subnet = ec2.describe_subnets()["Subnets"][0]
        image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
        (instance,) = ec2.run_instances(
            ImageId=image,
            InstanceType="t3.micro",
            MinCount=1,
            MaxCount=1,
            NetworkInterfaces=[
                {
                    "DeviceIndex": 0,
                    "SubnetId": subnet["SubnetId"],
                    "Groups": [group["GroupId"]],
                    "DeleteOnTermination": True,
                }
            ],
        )["Instances"]
        ids = [instance["InstanceId"]]
        ec2.terminate_instances(InstanceIds=ids)

        def state() -> str:
            reservations = ec2.describe_instances(InstanceIds=ids)["Reservations"]
            return str(reservations[0]["Instances"][0]["State"]["Name"])

        wait_for(lambda: state() == "terminated", 30, "the instance to terminate")
        (again,) = ec2.terminate_instances(InstanceIds=ids)["TerminatingInstances"]
        assert again["PreviousState"]["Name"] == "terminated"  # an answer, not an error


def test_instances_are_found_by_id_after_launches_and_terminations() -> None:
    # The local cloud looks instances up through an index (moto scans them all): one
    # launched after the index was built is found, an unknown id is EC2's NotFound.
    with LocalCloud(boot_delay=3600) as cloud:
        ec2 = ec2_client(cloud)

        def instance_type(instance_id: str) -> str:
            answer = ec2.describe_instance_attribute(
                InstanceId=instance_id, Attribute="instanceType"
            )
            return str(answer["InstanceType"]["Value"])

        first = run(cloud, EXITS, count=300)
        assert {instance_type(i) for i in first[:3]} == {"t3.micro"}
        ec2.terminate_instances(InstanceIds=first)  # each detaches its volume: a lookup
        assert {state(cloud, i) for i in (first[0], first[-1])} <= {"shutting-down", "terminated"}
        (later,) = run(cloud, EXITS)
        assert instance_type(later) == "t3.micro"
        with pytest.raises(ClientError, match=r"InvalidInstanceID\.NotFound"):
            instance_type("i-0123456789abcdef0")
