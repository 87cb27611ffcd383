"""Amazon EC2: the provider, its fleet launches, instance catalog and prices, the network
(VPC, subnets, zones), security groups, the account-wide operations behind ``dask-rawvm ls``
and ``down``, the IAM policy it needs (``dask-rawvm iam-policy``) and ``dask-rawvm check``."""

from dask_rawvm.providers.ec2.provider import EC2Provider

__all__ = ["EC2Provider"]
