"""The embedded local cloud as a provider: EC2 against a :class:`LocalCloud` it owns.

``provider="local"`` starts a local cloud with the cluster and stops it with the
cluster; in between this is the EC2 provider, talking to the cloud over HTTP as it
would to AWS. (A local cloud running elsewhere, ``dask-rawvm localcloud``, is reached
with ``provider="aws"`` and its ``endpoint_url``.)
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from dask_rawvm.config import ClusterOptions
from dask_rawvm.errors import OptionError
from dask_rawvm.localcloud import CREDENTIALS, LocalCloud
from dask_rawvm.localcloud.vmimage import ImageName
from dask_rawvm.providers.base import ImagePythons
from dask_rawvm.providers.ec2.provider import EC2Provider


class LocalCloudProvider(EC2Provider):
    """EC2 on an embedded local cloud that lives and dies with the cluster.

    Parameters
    ----------
    cluster
        Cluster name.
    region
        The region the local cloud answers for.
    boot_delay
        Seconds a VM of the local cloud stays pending.
    image
        The machine image of its VMs: ``"warm"`` or ``"bare"``
        (:data:`dask_rawvm.localcloud.IMAGES`).
    **kwargs
        For :class:`~dask_rawvm.providers.ec2.provider.EC2Provider`.
    """

    # The local cloud's VMs are processes of this machine: they reach loopback.
    in_process_scheduler_host = "127.0.0.1"

    def __init__(
        self,
        cluster: str,
        region: str = "us-east-1",
        boot_delay: float = 0.0,
        image: str = "warm",
        **kwargs: Any,
    ) -> None:
        super().__init__(cluster, region=region, **kwargs)
        self.boot_delay = boot_delay
        self.image = image
        #: The local cloud, from :meth:`start` on (made there: it makes a work directory).
        self.cloud: LocalCloud | None = None

    @classmethod
    def from_options(cls, options: ClusterOptions, cluster: str) -> LocalCloudProvider:
        return cls(
            cluster,
            region=options.region or "us-east-1",
            boot_delay=options.boot_delay,
            image=options.local_image,
            **cls.machine_options(options),
        )

    def image_pythons(self, vm_type: str) -> ImagePythons | None:
        """The local cloud's image has one Python (its ``python3``), and its VMs reach
        package registries only: no download of a Python build."""
        if self.cloud is None:
            return None
        return ImagePythons(
            (self.cloud.image.python_version,),
            False,
            f"the local cloud's {self.image} image",
            "use local_image='warm' (VMs with this machine's Python)",
        )

    def check_outlives_client(self) -> None:
        raise OptionError(
            "shutdown_on_close=False needs a cloud that outlives this process, and an "
            "embedded local cloud does not: run `dask-rawvm localcloud` and pass "
            "endpoint_url=..., or use provider='aws'"
        )

    async def start(self) -> None:
        """Start a local cloud, then connect to it as to any EC2 endpoint."""
        self.cloud = LocalCloud(
            region=self.region or "us-east-1",
            boot_delay=self.boot_delay,
            image=cast(ImageName, self.image),
        )
        await asyncio.to_thread(self.cloud.start)
        self.endpoint_url, self.credentials = self.cloud.endpoint_url, dict(CREDENTIALS)
        await super().start()

    async def close(self) -> None:
        """Disconnect, then close the local cloud: every VM it runs is halted."""
        try:
            await super().close()
        finally:
            if self.cloud is not None:
                await asyncio.to_thread(self.cloud.close)

    def cleanup_blocking(self) -> list[str]:
        """Close the local cloud, which halts every VM it runs (no call needed)."""
        if self.cloud is not None:
            self.cloud.close()
        return []
