"""Clusters as the cloud sees them, by tag: what ``dask-rawvm ls`` and ``down`` do."""

from __future__ import annotations

from dask_rawvm.providers.aws import AWSProvider


async def list_clusters(
    endpoint_url: str | None = None, region: str | None = None
) -> dict[str, dict[str, list[str]]]:
    """Each dask-rawvm cluster with resources in the region, and those resources."""
    provider = AWSProvider("", region=region, endpoint_url=endpoint_url)
    await provider.start()
    try:
        return await provider.clusters()
    finally:
        await provider.close()


async def remove_clusters(
    endpoint_url: str | None = None, region: str | None = None, names: tuple[str, ...] | None = None
) -> dict[str, dict[str, list[str]]]:
    """Remove everything of the named clusters (every cluster when ``names`` is None)."""
    provider = AWSProvider("", region=region, endpoint_url=endpoint_url)
    await provider.start()
    try:
        targets = names if names is not None else tuple(await provider.clusters())
        return {name: await provider.remove_cluster(name) for name in targets}
    finally:
        await provider.close()
