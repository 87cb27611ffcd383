"""The providers under the contract suite, each against a real backend: the EC2 provider
against a local cloud over HTTP (whose VMs never boot: the contract is about the API), the
SSH provider against the lab's two sshd hosts."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from sshd import Lab

from dask_rawvm.config import resolve_options
from dask_rawvm.localcloud import CREDENTIALS, LocalCloud
from dask_rawvm.providers.base import Provider
from dask_rawvm.providers.ec2 import EC2Provider
from dask_rawvm.providers.ssh import SSHProvider


@dataclass
class Subject:
    """A started provider of the cluster ``cluster``, whose machines are ``vm_type``."""

    provider: Provider
    cluster: str
    vm_type: str


@pytest.fixture(params=["ec2", "ssh"])
async def subject(request: pytest.FixtureRequest) -> AsyncIterator[Subject]:
    cluster = f"contract-{uuid.uuid4().hex[:6]}"
    cloud: LocalCloud | None = None
    provider: Provider
    if request.param == "ec2":
        cloud = LocalCloud(boot_delay=3600).start()
        provider, vm_type = (
            EC2Provider(cluster, cloud.region, cloud.endpoint_url, dict(CREDENTIALS)),
            "t3.micro",
        )
    else:
        lab: Lab = request.getfixturevalue("lab")
        options = resolve_options(
            provider="ssh",
            hosts=lab.hosts,
            workers_per_host=2,
            connect_options=lab.connect_options(),
        )
        provider, vm_type = SSHProvider(cluster, options, stop_grace=2), "w"
    try:
        await provider.start()
        await provider.preflight({"worker": vm_type})
        yield Subject(provider, cluster, vm_type)
    finally:
        try:
            await provider.cleanup(cluster)
        finally:
            await provider.close()
            if cloud is not None:
                cloud.close()
