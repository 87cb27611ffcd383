"""Provisioning benchmark: EC2 calls and wall time of a scale-up, next to one raw CreateFleet.

For N requested workers on the local cloud (VMs never boot during the measurement:
this measures the control path), prints, per N:

- dask_rawvm: the EC2 calls one ``scale(N)`` makes (all of them, read-only ones
  included) and the wall time until every instance is accepted (each worker has its
  instance and its name), on a cluster whose security group and launch template
  exist (made by its first launch, as the scheduler VM's launch does in real use);
- the same cluster's first-ever launch, which also creates those (+3 calls);
- one raw ``CreateFleet`` call for N instances from a ready launch template, with the
  same HTTP client stack (aiobotocore), as the floor;
- dask-cloudprovider's ``EC2Cluster`` on the same kind of cloud, for N = 20 and 100,
  from :mod:`cloudprovider` (its own virtualenv) when ``--cloudprovider`` is given.

Runs alternate and the median of ``--repeat`` runs is reported. Targets: at most
ceil(N/1000) + 3 calls per scale-up; wall time within 1.3x of the raw call; at least
20x fewer calls than EC2Cluster.

    python benchmarks/provision.py [--sizes 20 200 1000] [--repeat 3] [--cloudprovider]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import math
import os
import statistics
import time
import uuid
from typing import Any

import boto3
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from dask_rawvm import RawVMCluster
from dask_rawvm.environment import bootstrap
from dask_rawvm.localcloud import CREDENTIALS, LocalCloud
from dask_rawvm.providers.ec2.provider import AMI_PARAMETER

OPTIONS: dict[str, Any] = {
    "scheduler": "local",
    "environment": None,
    "asynchronous": True,
    "silence_logs": logging.ERROR,
}


def ec2_calls(cloud: LocalCloud) -> int:
    """EC2 calls since the last reset (S3 actions are named ``s3:...``)."""
    return sum(n for action, n in cloud.calls.items() if ":" not in action)


async def time_scale_up(cluster: RawVMCluster, cloud: LocalCloud, n: int) -> tuple[float, int]:
    cloud.reset_calls()
    began = time.perf_counter()
    cluster.scale(n)
    await cluster._correct_state()
    elapsed = time.perf_counter() - began
    assert len(cluster.instances) == n, f"{len(cluster.instances)} of {n} launched"
    calls = ec2_calls(cloud)
    cluster.scale(0)
    await cluster._correct_state()
    return elapsed, calls


async def first_launch_calls(cloud: LocalCloud, n: int) -> int:
    async with RawVMCluster(endpoint_url=cloud.endpoint_url, region=cloud.region, **OPTIONS) as c:
        cloud.reset_calls()
        c.scale(n)
        await c._correct_state()
        return ec2_calls(cloud)


class RawFleet:
    """One CreateFleet for N from a launch template made beforehand (not timed)."""

    def __init__(self, cloud: LocalCloud) -> None:
        self.cloud = cloud
        ec2 = boto3.client("ec2", **cloud.client_kwargs())
        ssm = boto3.client("ssm", **cloud.client_kwargs())
        self.ami = ssm.get_parameter(Name=AMI_PARAMETER.format(arch="x86_64"))["Parameter"]["Value"]
        # The cluster's request shape: one override per zone of the region.
        subnets = ec2.describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])
        self.subnets = sorted(s["SubnetId"] for s in subnets["Subnets"])
        script = bootstrap.worker_script("raw", "tls://127.0.0.1:8786", "worker-", 0, 60)
        template = ec2.create_launch_template(
            LaunchTemplateName=f"raw-{uuid.uuid4().hex[:8]}",
            LaunchTemplateData={
                "UserData": base64.b64encode(script.encode()).decode(),
                "InstanceInitiatedShutdownBehavior": "terminate",
            },
        )
        self.template = template["LaunchTemplate"]["LaunchTemplateId"]

    async def time(self, n: int) -> float:
        config = AioConfig(retries={"total_max_attempts": 1})
        kwargs = self.cloud.client_kwargs()
        async with get_session().create_client("ec2", config=config, **kwargs) as ec2:
            began = time.perf_counter()
            response = await ec2.create_fleet(
                Type="instant",
                ClientToken=uuid.uuid4().hex,
                LaunchTemplateConfigs=[
                    {
                        "LaunchTemplateSpecification": {
                            "LaunchTemplateId": self.template,
                            "Version": "$Latest",
                        },
                        "Overrides": [
                            {"InstanceType": "t3.large", "SubnetId": subnet, "ImageId": self.ami}
                            for subnet in self.subnets
                        ],
                    }
                ],
                TargetCapacitySpecification={
                    "TotalTargetCapacity": n,
                    "DefaultTargetCapacityType": "on-demand",
                },
            )
            elapsed = time.perf_counter() - began
            ids = [i for item in response.get("Instances", []) for i in item["InstanceIds"]]
            assert len(ids) == n, f"raw fleet launched {len(ids)} of {n}"
            for start in range(0, len(ids), 1000):
                await ec2.terminate_instances(InstanceIds=ids[start : start + 1000])
        return elapsed


async def measure(cloud: LocalCloud, n: int, repeat: int) -> None:
    raw = RawFleet(cloud)
    await raw.time(1)  # warm moto up before measuring
    first = await first_launch_calls(cloud, n)
    ours, floor, calls = [], [], []
    async with RawVMCluster(endpoint_url=cloud.endpoint_url, region=cloud.region, **OPTIONS) as c:
        c.scale(1)  # its security group and launch template, as a scheduler VM would make
        await c._correct_state()
        c.scale(0)
        await c._correct_state()
        for i in range(repeat):
            # Alternate who goes first: moto slows a little as instances accumulate.
            if i % 2:
                floor.append(await raw.time(n))
            elapsed, made = await time_scale_up(c, cloud, n)
            ours.append(elapsed)
            calls.append(made)
            if not i % 2:
                floor.append(await raw.time(n))
    a, b = statistics.median(ours), statistics.median(floor)
    limit = math.ceil(n / 1000) + 3
    print(f"provision N={n}: dask_rawvm scale-up EC2 calls {max(calls)} (target <= {limit})")
    print(f"provision N={n}: dask_rawvm first launch EC2 calls {first} (target <= {limit})")
    print(
        f"provision N={n}: dask_rawvm scale(N) {a:.3f} s; raw CreateFleet {b:.3f} s; "
        f"ratio {a / b:.2f} (target <= 1.3)"
    )


def cloudprovider_section(sizes: list[int]) -> None:
    """dask-cloudprovider's EC2Cluster on the same kind of cloud (its own virtualenv)."""
    from cloudprovider import cloudprovider_rows

    for line in cloudprovider_rows(sizes):
        print(line)


async def main(sizes: list[int], repeat: int) -> None:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", CREDENTIALS["aws_access_key_id"])
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", CREDENTIALS["aws_secret_access_key"])
    for n in sizes:
        # A cloud per size: moto's Describe calls slow down as instances accumulate.
        with LocalCloud(boot_delay=3600) as cloud:
            await measure(cloud, n, repeat)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20, 200, 1000])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--cloudprovider", action="store_true", help="also EC2Cluster, N=20, 100")
    args = parser.parse_args()
    asyncio.run(main(args.sizes, args.repeat))
    if args.cloudprovider:
        cloudprovider_section([20, 100])
