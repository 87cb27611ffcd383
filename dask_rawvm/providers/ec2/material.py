"""A VM's TLS material in S3, fetched by an expiring presigned URL.

The S3 way of :mod:`dask_rawvm.tls`'s "no secret in user-data": upload the material
of one role (:func:`upload_vm_material`), hand the VMs the presigned URL, delete it with
the cluster (:func:`delete_cluster_material`).
"""

from __future__ import annotations

import secrets
import urllib.parse
from typing import Any

from aiobotocore.config import AioConfig

from dask_rawvm.providers.base import CLUSTER_TAG
from dask_rawvm.tls import pack_vm_material

#: How long a presigned URL to a bundle stays valid: enough for a VM to boot and
#: fetch it, short enough that the URL in user-data soon opens nothing.
DEFAULT_URL_EXPIRY = 3600
#: The config for the S3 client given to :func:`upload_vm_material`: presign with SigV4.
S3_CONFIG = AioConfig(signature_version="s3v4")


def material_key(cluster: str, role: str, prefix: str = "dask-rawvm") -> str:
    """Where a cluster's bundle for ``role`` lives in the bucket.

    A random suffix per bundle: a key is never reused, so a URL handed out for
    an earlier launch never fetches a later bundle. All of a cluster's bundles
    share the prefix ``f"{prefix}/{cluster}/"`` (see :func:`delete_cluster_material`).
    """
    return f"{prefix}/{cluster}/tls-{role}-{secrets.token_hex(8)}.tar"


async def upload_vm_material(
    s3: Any,
    bucket: str,
    key: str,
    material: dict[str, str],
    expires: int = DEFAULT_URL_EXPIRY,
    *,
    cluster: str,
) -> str:
    """Put a VM bundle in S3 and return a presigned GET URL to it, for ``RAWVM_SECRETS_URL``.

    Parameters
    ----------
    s3
        An aiobotocore S3 client in the bucket's region, created with
        ``config=AioConfig(signature_version="s3v4")`` (:data:`S3_CONFIG`): without
        it botocore may presign with the deprecated signature version 2, which
        newer regions refuse.
    bucket, key
        Where to put it (see :func:`material_key`). The bucket should block
        public access; the URL's signature is what opens the object.
    material
        From :meth:`dask_rawvm.tls.ClusterTLS.vm_material`.
    expires
        Seconds the URL stays valid.
    cluster
        Value of the object's ``dask-rawvm:cluster`` tag.

    Returns
    -------
    str
        The presigned URL.
    """
    tagging = urllib.parse.urlencode({CLUSTER_TAG: cluster})
    await s3.put_object(
        Bucket=bucket,
        Key=key,
        Body=pack_vm_material(material),
        ContentType="application/x-tar",
        ServerSideEncryption="AES256",
        Tagging=tagging,
    )
    url: str = await s3.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=int(expires)
    )
    if "X-Amz-Signature=" not in url:
        await delete_vm_material(s3, bucket, key)
        raise ValueError(
            "the S3 client presigned with signature version 2; create it with "
            "config=dask_rawvm.providers.ec2.material.S3_CONFIG (signature_version='s3v4')"
        )
    return url


async def delete_vm_material(s3: Any, bucket: str, key: str) -> None:
    """Delete one bundle (once its VMs booted, or with the cluster); missing is fine."""
    await s3.delete_object(Bucket=bucket, Key=key)


async def delete_cluster_material(
    s3: Any, bucket: str, cluster: str, prefix: str = "dask-rawvm"
) -> int:
    """Delete every bundle of ``cluster`` (cleanup after a crash); return how many."""
    paginator = s3.get_paginator("list_objects_v2")
    deleted = 0
    async for page in paginator.paginate(Bucket=bucket, Prefix=f"{prefix}/{cluster}/"):
        objects = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if objects:  # at most 1000 per page, as DeleteObjects allows
            await s3.delete_objects(Bucket=bucket, Delete={"Objects": objects, "Quiet": True})
            deleted += len(objects)
    return deleted
