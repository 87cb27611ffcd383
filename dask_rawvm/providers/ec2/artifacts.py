"""The account's environment artifacts on EC2: one S3 bucket per account and region.

A cluster's own bucket goes with the cluster; an environment's artifact (the installed venv
one VM built, :mod:`dask_rawvm.environment.artifact`) is worth keeping for the next cluster
of the same environment, so artifacts live in a bucket of the account and region,
``dask-rawvm-env-<account>-<region>``, made on first use, tagged
``dask-rawvm:store=environment-artifacts`` (not a cluster's tag: no cluster's cleanup touches
it) and with an expiry rule: an artifact is deleted :data:`EXPIRY_DAYS` days after it was
built, and the next cluster of its environment builds it again. ``dask-rawvm ls`` lists it and
``dask-rawvm down --all`` removes it.

Per environment (its key, :func:`~dask_rawvm.environment.artifact.artifact_key`) the bucket
holds ``<key>/venv.tar.gz`` (the artifact) and ``<key>/claim`` (the builder's claim). The VMs
reach them by presigned URLs only (they hold no credentials); both PUT URLs are signed with
``If-None-Match: *``, so whoever holds one can create the object, never replace it. Before a
cluster hands the URLs out it clears what would keep its VMs from building: a failed build's
note in the artifact's place, or a claim older than :data:`STALE_CLAIM_SECONDS` with no
artifact (its builder died).

The bucket's name holds the account id (STS ``GetCallerIdentity``, which needs no
permission); bucket names are global, so the bucket is only used when it is this account's
(``ExpectedBucketOwner``). Whatever fails here leaves artifacts off, with a warning: every VM
then installs the environment itself, as without a store.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiobotocore.session import get_session

from dask_rawvm.environment.artifact import (
    ARCHIVE_TYPE,
    BUILD_WAIT_SECONDS,
    ArtifactURLs,
)
from dask_rawvm.errors import ProviderError
from dask_rawvm.providers.ec2.account import BUCKET_PREFIX
from dask_rawvm.providers.ec2.calls import ec2_call
from dask_rawvm.providers.ec2.clients import EC2Clients

logger = logging.getLogger(__name__)

#: The artifact store's tag (key and value): what ``dask-rawvm ls`` finds it by.
STORE_TAG = "dask-rawvm:store"
STORE_TAG_VALUE = "environment-artifacts"
#: Days after which S3 deletes an artifact (its expiry rule): environments change, and an
#: artifact nobody uses should not be paid for forever; rebuilding one costs one install.
EXPIRY_DAYS = 30
#: A claim this old without an artifact is a builder that died: the next cluster clears it.
STALE_CLAIM_SECONDS = BUILD_WAIT_SECONDS + 600
ARTIFACT_OBJECT = "venv.tar.gz"
CLAIM_OBJECT = "claim"


def artifact_bucket_name(account: str, region: str) -> str:
    """The artifact store of ``account`` in ``region`` (at most 42 characters)."""
    return f"{BUCKET_PREFIX}env-{account}-{region}"


@dataclass(frozen=True)
class StoredArtifact:
    """One environment's artifact in the store, as ``dask-rawvm ls`` shows it."""

    key: str
    size: int
    built: datetime.datetime


class ArtifactStore:
    """The account's environment artifacts in one region (see the module docstring).

    Parameters
    ----------
    clients
        Open clients of the region.
    credentials
        The credentials the clients were opened with (for STS); the default chain when empty.
    throttle_timeout
        How long to keep backing off a throttled call.
    stale_claim_seconds
        Age past which a claim without an artifact is a dead builder's.
    """

    def __init__(
        self,
        clients: EC2Clients,
        credentials: dict[str, str] | None = None,
        throttle_timeout: float = 120.0,
        stale_claim_seconds: float = STALE_CLAIM_SECONDS,
    ) -> None:
        self.clients = clients
        self.credentials = dict(credentials or {})
        self.throttle_timeout = throttle_timeout
        self.stale_claim_seconds = stale_claim_seconds
        self._bucket: str | None = None
        self._unavailable: str | None = None  # why artifacts are off, once found
        self._settled: set[str] = set()  # keys checked by this client

    # -- the bucket ----------------------------------------------------------------------
    async def account(self) -> str:
        """This identity's account id (STS GetCallerIdentity)."""
        common = {"region_name": self.clients.region, "endpoint_url": self.clients.endpoint_url}
        async with get_session().create_client("sts", **common, **self.credentials) as sts:
            identity = await self._call(sts.get_caller_identity, "GetCallerIdentity", "STS")
        return str(identity["Account"])

    async def bucket(self, create: bool = True) -> str | None:
        """The store's bucket, made (tagged, with its expiry rule) when ``create`` and missing;
        None when there is none, or it cannot be used (logged once)."""
        if self._bucket is not None or self._unavailable is not None:
            return self._bucket
        try:
            account = await self.account()
            name = artifact_bucket_name(account, self.clients.region)
            if await self._exists(name, account):
                self._bucket = name
            elif create:
                await self._create(name)
                self._bucket = name
        except ProviderError as e:
            self._unavailable = str(e)
            logger.warning(
                "environment artifacts are off (every VM installs the environment itself): %s",
                e,
            )
        return self._bucket

    async def _exists(self, name: str, account: str) -> bool:
        try:
            await self._call(
                self.clients.s3.head_bucket,
                "HeadBucket",
                Bucket=name,
                ExpectedBucketOwner=account,
            )
        except ProviderError as e:
            if e.code in ("404", "NoSuchBucket", "NotFound"):
                return False
            raise ProviderError(
                f"the artifact bucket {name} is not this account's, or may not be read "
                f"({e.code or e}): allow s3:ListBucket on arn:aws:s3:::{BUCKET_PREFIX}*",
                e.code,
            ) from e
        return True

    async def _create(self, name: str) -> None:
        s3 = self.clients.s3
        params: dict[str, Any] = {"Bucket": name}
        if self.clients.region != "us-east-1":
            params["CreateBucketConfiguration"] = {"LocationConstraint": self.clients.region}
        try:
            await self._call(s3.create_bucket, "CreateBucket", **params)
        except ProviderError as e:
            if e.code != "BucketAlreadyOwnedByYou":  # another client of the account, just now
                raise
        await self._call(
            s3.put_bucket_tagging,
            "PutBucketTagging",
            Bucket=name,
            Tagging={"TagSet": [{"Key": STORE_TAG, "Value": STORE_TAG_VALUE}]},
        )
        rule = {
            "ID": "dask-rawvm-artifacts-expire",
            "Status": "Enabled",
            "Filter": {"Prefix": ""},
            "Expiration": {"Days": EXPIRY_DAYS},
        }
        await self._call(
            s3.put_bucket_lifecycle_configuration,
            "PutBucketLifecycleConfiguration",
            Bucket=name,
            LifecycleConfiguration={"Rules": [rule]},
        )
        logger.info("made the environment artifact store %s (expiry %d days)", name, EXPIRY_DAYS)

    # -- one environment ---------------------------------------------------------------------
    async def urls(self, key: str, expires: int = 3600) -> ArtifactURLs | None:
        """The URLs the VMs get, the way cleared for them to build (see the module
        docstring); None when artifacts are off."""
        bucket = await self.bucket()
        if bucket is None:
            return None
        if key not in self._settled:
            try:
                await self._settle(bucket, key)
            except ProviderError as e:  # the VMs cope: they wait, then install
                logger.warning("could not check the artifact of environment %s: %s", key, e)
            self._settled.add(key)
        presign = self.clients.s3.generate_presigned_url
        artifact = {"Bucket": bucket, "Key": f"{key}/{ARTIFACT_OBJECT}"}
        claim = {"Bucket": bucket, "Key": f"{key}/{CLAIM_OBJECT}"}
        once = {"IfNoneMatch": "*"}  # signed: the URL creates the object, never replaces it
        return ArtifactURLs(
            get=str(await presign("get_object", Params=artifact, ExpiresIn=expires)),
            put=str(await presign("put_object", Params={**artifact, **once}, ExpiresIn=expires)),
            claim=str(await presign("put_object", Params={**claim, **once}, ExpiresIn=expires)),
        )

    async def _settle(self, bucket: str, key: str) -> None:
        """Clear a failed build's note, or a dead builder's claim."""
        artifact = await self._head(bucket, f"{key}/{ARTIFACT_OBJECT}")
        if artifact is not None:
            if artifact.get("ContentType") == ARCHIVE_TYPE:
                return
            logger.warning(
                "the last build of environment %s failed (see a boot log of its cluster): "
                "this cluster's VMs build it again",
                key,
            )
            await self._delete(bucket, [f"{key}/{ARTIFACT_OBJECT}", f"{key}/{CLAIM_OBJECT}"])
            return
        claim = await self._head(bucket, f"{key}/{CLAIM_OBJECT}")
        if claim is None:
            return
        age = datetime.datetime.now(datetime.timezone.utc) - claim["LastModified"]
        if age.total_seconds() > self.stale_claim_seconds:
            logger.info(
                "environment %s was claimed %.0f s ago and never published: clearing the claim",
                key,
                age.total_seconds(),
            )
            await self._delete(bucket, [f"{key}/{CLAIM_OBJECT}"])

    async def _head(self, bucket: str, key: str) -> dict[str, Any] | None:
        try:
            response: dict[str, Any] = await self._call(
                self.clients.s3.head_object, "HeadObject", Bucket=bucket, Key=key
            )
        except ProviderError as e:
            if e.code in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return response

    async def _delete(self, bucket: str, keys: list[str]) -> None:
        await self._call(
            self.clients.s3.delete_objects,
            "DeleteObjects",
            Bucket=bucket,
            Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True},
        )

    # -- the whole store (dask-rawvm ls and down) -------------------------------------------
    async def artifacts(self) -> list[StoredArtifact]:
        """Every artifact in the store, oldest first; none without a store."""
        bucket = await self.bucket(create=False)
        if bucket is None:
            return []
        found = []
        paginator = self.clients.s3.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                if item["Key"].endswith("/" + ARTIFACT_OBJECT):
                    key = item["Key"].removesuffix("/" + ARTIFACT_OBJECT)
                    found.append(StoredArtifact(key, int(item["Size"]), item["LastModified"]))
        return sorted(found, key=lambda a: a.built)

    async def remove(self) -> str | None:
        """Delete the store and everything in it; return its bucket (None: there was none)."""
        bucket = await self.bucket(create=False)
        if bucket is None:
            return None
        paginator = self.clients.s3.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=bucket):
            keys = [item["Key"] for item in page.get("Contents", [])]
            if keys:
                await self._delete(bucket, keys)
        await self._call(self.clients.s3.delete_bucket, "DeleteBucket", Bucket=bucket)
        self._bucket = None
        self._settled.clear()
        return bucket

    async def _call(
        self, method: Callable[..., Awaitable[Any]], action: str, service: str = "S3", **params: Any
    ) -> Any:
        return await ec2_call(
            method, action, throttle_timeout=self.throttle_timeout, service=service, **params
        )


async def list_artifacts(
    endpoint_url: str | None = None, region: str | None = None
) -> tuple[str | None, list[StoredArtifact]]:
    """The region's artifact store (its bucket, or None) and its artifacts."""
    clients = await EC2Clients.open(region, endpoint_url)
    try:
        store = ArtifactStore(clients)
        return await store.bucket(create=False), await store.artifacts()
    finally:
        await clients.close()


async def remove_artifacts(
    endpoint_url: str | None = None, region: str | None = None
) -> str | None:
    """Delete the region's artifact store; return its bucket (None: there was none)."""
    clients = await EC2Clients.open(region, endpoint_url)
    try:
        return await ArtifactStore(clients).remove()
    finally:
        await clients.close()
