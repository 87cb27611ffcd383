"""Amazon EC2: the provider, its fleet launches, instance catalog and prices, security
groups, and the account-wide operations behind ``dask-rawvm ls`` and ``down``."""

from dask_rawvm.providers.ec2.provider import EC2Provider

__all__ = ["EC2Provider"]
