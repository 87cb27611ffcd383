"""Where machines come from: one small interface, one implementation per kind of cloud."""

from __future__ import annotations

from dask_rawvm.config import ClusterOptions
from dask_rawvm.providers.base import Provider, ProviderError


def create_provider(
    options: ClusterOptions,
    cluster: str,
    endpoint_url: str | None = None,
    credentials: dict[str, str] | None = None,
) -> Provider:
    """The provider ``options.provider`` names, for the cluster ``cluster``.

    ``local`` and ``aws`` both speak EC2 (the local cloud at ``endpoint_url``).
    """
    if options.provider in ("local", "aws"):
        from dask_rawvm.providers.aws import AWSProvider

        return AWSProvider(
            cluster,
            region=options.region,
            endpoint_url=endpoint_url or options.endpoint_url,
            credentials=credentials,
            ami=options.ami,
            allow_ingress_from=options.allow_ingress_from,
            zones=[options.zone] if isinstance(options.zone, str) else options.zone,
            capacity_retry_timeout=options.capacity_retry_timeout,
        )
    if options.provider == "ssh":
        from dask_rawvm.providers.ssh import SSHProvider

        return SSHProvider(cluster, options)
    raise ProviderError(f"no provider named {options.provider!r}")


__all__ = ["Provider", "ProviderError", "create_provider"]
