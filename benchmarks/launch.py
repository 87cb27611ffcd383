"""Launch benchmark: RawVMCluster.scale(N) next to one raw RunInstances for N, same cloud.

For N requested workers on the local cloud (boot delay long enough that no VM
boots during the measurement: this measures the control path), prints the wall
time from ``scale(N)`` until every instance is accepted, the mutating EC2 calls
that took, and the same for one raw RunInstances call of N instances made with
the same HTTP client stack (aiobotocore). Runs alternate and the median of
``--repeat`` runs is reported. Targets: ratio <= 1.5, at most 2 mutating calls
per pass.

    python benchmarks/launch.py [--sizes 20 200] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid

from aiobotocore.session import get_session

from dask_rawvm import RawVMCluster
from dask_rawvm.environment import bootstrap
from dask_rawvm.localcloud import CREDENTIALS, LocalCloud
from dask_rawvm.localcloud.faults import is_mutating


async def time_cluster_scale(cloud: LocalCloud, n: int) -> tuple[float, int]:
    async with RawVMCluster(
        endpoint_url=cloud.endpoint_url,
        region=cloud.region,
        scheduler="local",
        asynchronous=True,
    ) as cluster:
        cloud.reset_calls()
        began = time.perf_counter()
        cluster.scale(n)
        await cluster._correct_state()
        elapsed = time.perf_counter() - began
        assert len(cluster.instances) == n
        mutating = sum(count for action, count in cloud.calls.items() if is_mutating(action))
    return elapsed, mutating


async def time_raw_run_instances(cloud: LocalCloud, n: int, ami: str) -> float:
    script = bootstrap.worker_script("raw", "tcp://127.0.0.1:8786", "worker-", 0, 60)
    async with get_session().create_client("ec2", **cloud.client_kwargs()) as ec2:
        began = time.perf_counter()
        response = await ec2.run_instances(
            ImageId=ami,
            InstanceType="t3.large",
            MinCount=n,
            MaxCount=n,
            UserData=script,
            InstanceInitiatedShutdownBehavior="terminate",
            ClientToken=uuid.uuid4().hex,
            TagSpecifications=[
                {
                    "ResourceType": "instance",
                    "Tags": [{"Key": "dask-rawvm:cluster", "Value": "raw"}],
                }
            ],
        )
        elapsed = time.perf_counter() - began
        ids = [i["InstanceId"] for i in response["Instances"]]
        await ec2.terminate_instances(InstanceIds=ids)
    return elapsed


async def ami_of(cloud: LocalCloud) -> str:
    async with get_session().create_client("ssm", **cloud.client_kwargs()) as ssm:
        name = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"
        return str((await ssm.get_parameter(Name=name))["Parameter"]["Value"])


async def main(sizes: list[int], repeat: int) -> None:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", CREDENTIALS["aws_access_key_id"])
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", CREDENTIALS["aws_secret_access_key"])
    with LocalCloud(boot_delay=3600) as cloud:
        ami = await ami_of(cloud)
        await time_raw_run_instances(cloud, 1, ami)  # warm moto up before measuring
        for n in sizes:
            ours, raw, calls = [], [], []
            for i in range(repeat):
                # Alternate who goes first: moto slows a little as instances accumulate.
                if i % 2:
                    raw.append(await time_raw_run_instances(cloud, n, ami))
                elapsed, mutating = await time_cluster_scale(cloud, n)
                ours.append(elapsed)
                calls.append(mutating)
                if not i % 2:
                    raw.append(await time_raw_run_instances(cloud, n, ami))
            a, b = statistics.median(ours), statistics.median(raw)
            print(
                f"launch N={n}: dask_rawvm scale(N) {a:.3f} s with {max(calls)} mutating call(s); "
                f"raw RunInstances {b:.3f} s; ratio {a / b:.2f} (target <= 1.5)"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20, 200])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.sizes, args.repeat))
