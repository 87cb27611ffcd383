"""The aiobotocore clients one EC2 region is reached through, opened and checked in one place.

Used by the provider of a cluster and by the account-wide operations (``dask-rawvm ls``,
``down``) alike: the region and credentials are checked before any call, with errors
that say what to set.
"""

from __future__ import annotations

import datetime
import difflib
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import botocore.session
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from dask_rawvm.errors import ProviderError

#: Retries of read and housekeeping calls: botocore's standard mode (throttling, 5xx).
STANDARD = AioConfig(retries={"mode": "standard", "max_attempts": 5})
#: Launch calls are never retried by botocore: capacity errors come back as HTTP 500,
#: which it would retry blindly; :mod:`.fleet` decides what to retry itself.
NO_RETRY = AioConfig(retries={"total_max_attempts": 1})


@dataclass
class EC2Clients:
    """``ec2`` (retrying), ``ec2_launch`` (not retrying), ``ssm``, ``s3``, ``sts`` and ``iam``
    (global, for the roles of ``credentials="role"``) clients of a region.

    Open with :meth:`open`, release with :meth:`close`.
    """

    region: str
    endpoint_url: str | None
    ec2: Any
    ec2_launch: Any
    ssm: Any
    s3: Any
    sts: Any
    iam: Any
    _stack: AsyncExitStack
    credentials: Any = None  # botocore's, from the default chain (None: given explicitly)

    def credentials_expire_in(self) -> float | None:
        """Seconds until the current temporary credentials expire; None when they do not
        (long-term keys) or the chain does not say (a session token in the environment).

        Presigned URLs signed with temporary credentials die with them, whatever their own
        expiry (AWS's S3 documentation). botocore's refreshable credentials (assume-role,
        SSO, instance profiles) keep the expiry in ``_expiry_time``: no public accessor.
        """
        expiry = getattr(self.credentials, "_expiry_time", None)
        if expiry is None:
            return None
        return float((expiry - datetime.datetime.now(datetime.timezone.utc)).total_seconds())

    def temporary_without_expiry(self) -> bool:
        """A session token whose expiry nobody here knows (not refreshable): calls and URLs
        stop working when the session ends."""
        token = getattr(self.credentials, "token", None)
        return bool(token) and getattr(self.credentials, "_expiry_time", None) is None

    @classmethod
    async def open(
        cls,
        region: str | None = None,
        endpoint_url: str | None = None,
        credentials: dict[str, str] | None = None,
    ) -> EC2Clients:
        """Clients of ``region`` (botocore's default when None) at ``endpoint_url`` (AWS when None).

        Raises
        ------
        ProviderError
            Without a region, for a region EC2 does not have (naming the closest), or
            without credentials (naming where they come from).
        """
        session = get_session()
        region = region or session.get_config_variable("region")
        if not region:
            raise ProviderError(
                "no AWS region: pass region=... or set AWS_DEFAULT_REGION (or a profile's region)"
            )
        check_region(region)
        found = None if credentials else await session.get_credentials()
        if not credentials and found is None:
            raise ProviderError(
                "no AWS credentials found: set AWS_PROFILE or AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY, or run `aws configure`"
            )
        stack = AsyncExitStack()
        common = {"region_name": region, "endpoint_url": endpoint_url, **(credentials or {})}
        # SigV4 presigned URLs (a default client presigns SigV2, which newer regions refuse);
        # path-style addressing for endpoints other than AWS's own.
        s3_config = AioConfig(
            signature_version="s3v4",
            retries={"mode": "standard", "max_attempts": 5},
            s3={"addressing_style": "path"} if endpoint_url else None,
        )
        create = session.create_client
        try:
            return cls(
                region=region,
                endpoint_url=endpoint_url,
                credentials=found,
                ec2=await stack.enter_async_context(create("ec2", config=STANDARD, **common)),
                ec2_launch=await stack.enter_async_context(
                    create("ec2", config=NO_RETRY, **common)
                ),
                ssm=await stack.enter_async_context(create("ssm", config=STANDARD, **common)),
                s3=await stack.enter_async_context(create("s3", config=s3_config, **common)),
                sts=await stack.enter_async_context(create("sts", config=STANDARD, **common)),
                iam=await stack.enter_async_context(create("iam", config=STANDARD, **common)),
                _stack=stack,
            )
        except BaseException:
            await stack.aclose()
            raise

    async def close(self) -> None:
        await self._stack.aclose()


def check_region(region: str) -> None:
    """Refuse a region EC2 does not have, with the closest names, before any call."""
    session = botocore.session.get_session()  # botocore's endpoint data: local, no call
    known = {
        name
        for partition in session.get_available_partitions()
        for name in session.get_available_regions("ec2", partition_name=partition)
    }
    if known and region not in known:
        close = difflib.get_close_matches(region, sorted(known), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ProviderError(f"region {region!r} is not an EC2 region{hint}: pass region=...")
