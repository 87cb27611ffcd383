"""Where machines come from: one small interface, one implementation per kind of cloud.

:data:`PROVIDERS` maps the ``provider`` option to a class that builds itself from the
cluster's options (:meth:`~dask_rawvm.providers.base.Provider.from_options`). A new
cloud is one new package here and one line in :data:`PROVIDERS`.
"""

from __future__ import annotations

from dask_rawvm.config import ClusterOptions
from dask_rawvm.errors import OptionError, ProviderError
from dask_rawvm.providers.base import LaunchSpec, Machine, Provider
from dask_rawvm.providers.ec2 import EC2Provider
from dask_rawvm.providers.localcloud import LocalCloudProvider
from dask_rawvm.providers.ssh import SSHProvider

#: Provider classes by the name the ``provider`` option gives.
PROVIDERS: dict[str, type[Provider]] = {
    "local": LocalCloudProvider,
    "aws": EC2Provider,
    "ssh": SSHProvider,
}


def provider_for(options: ClusterOptions, cluster: str) -> Provider:
    """The provider ``options.provider`` names, for the cluster named ``cluster``.

    Raises
    ------
    OptionError
        For a name no provider has.
    """
    cls = PROVIDERS.get(options.provider)
    if cls is None:
        raise OptionError(f"provider={options.provider!r} is not one of {sorted(PROVIDERS)}")
    return cls.from_options(options, cluster)


__all__ = ["PROVIDERS", "LaunchSpec", "Machine", "Provider", "ProviderError", "provider_for"]
