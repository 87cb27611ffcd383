"""The IAM role a cluster makes for itself: ``credentials="role"`` without a profile named.

One role and one instance profile of the same name, under the path :data:`ROLE_PATH`, made
on the cluster's first launch and removed with its other resources (``close``,
``dask-rawvm down``, and the reaping of gone clusters, :mod:`.account`). The role may be
assumed by EC2 only, and its one inline policy (:func:`data_policy`) grants exactly what
``data=`` names: listing each bucket named, and reading, writing and deleting the objects
under each prefix named; nothing else of the account. The VMs get its credentials from the
instance metadata service, which rotates them before they expire, for as long as the VM
lives, client or no client.

IAM is global, a cluster regional: the role and its profile carry the cluster tag and a
region tag, so each region's listing (``dask-rawvm ls``) sees its own clusters' roles only.
IAM is also eventually consistent: EC2 may refuse an instance profile made seconds ago as
invalid (AWS's "Troubleshoot IAM roles": "wait a few seconds"). :func:`fresh_profile_refused`
recognises that refusal so the launch can wait it out (:data:`PROPAGATION_TIMEOUT`).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dask_rawvm.config import split_s3_url
from dask_rawvm.errors import ProviderError
from dask_rawvm.providers.base import CLUSTER_TAG
from dask_rawvm.providers.ec2.calls import ec2_call, paginate

#: Every role and instance profile dask-rawvm makes lives under this IAM path.
ROLE_PATH = "/dask-rawvm/"
#: The region of the cluster a role belongs to (IAM itself has no region).
REGION_TAG = "dask-rawvm:region"
#: The name of the role's one inline policy.
POLICY_NAME = "data"
#: How long a launch waits for EC2 to accept an instance profile just made. AWS documents
#: no bound ("a few seconds"); two minutes covers what is reported.
PROPAGATION_TIMEOUT = 120.0
#: IAM's limit on role names, and the characters it takes.
_MAX_NAME = 64
_NAME_CHARS = re.compile(r"^[\w+=,.@-]+$")
#: The object actions ``data=`` grants under each prefix (multipart uploads included: s3fs
#: and pyarrow write large files in parts).
OBJECT_ACTIONS = (
    "s3:GetObject",
    "s3:PutObject",
    "s3:DeleteObject",
    "s3:AbortMultipartUpload",
    "s3:ListMultipartUploadParts",
)
#: The bucket actions: listing (s3fs and pyarrow list a dataset's directory, and S3 answers
#: a missing object with 403 instead of 404 to whoever may not list), and its region.
BUCKET_ACTIONS = ("s3:ListBucket", "s3:GetBucketLocation", "s3:ListBucketMultipartUploads")


def role_name(cluster: str) -> str:
    """The name of ``cluster``'s role and instance profile: ``dask-rawvm-<cluster>``, or a
    digest of the cluster's name where IAM would refuse that (too long, other characters)."""
    name = f"dask-rawvm-{cluster}"
    if len(name) <= _MAX_NAME and _NAME_CHARS.match(name):
        return name
    return f"dask-rawvm-{hashlib.sha256(cluster.encode()).hexdigest()[:24]}"


def data_policy(data: Sequence[str], partition: str = "aws") -> dict[str, Any]:
    """The role's policy: what ``data=`` names (S3 URLs), read and write, and nothing else.

    ``s3://bucket/prefix`` grants the objects ``prefix`` and ``prefix/...`` (not
    ``prefix2/...``); ``s3://bucket`` every object of the bucket.
    """
    objects: list[str] = []
    buckets: list[str] = []
    for url in data:
        bucket, prefix = split_s3_url(url)
        arn = f"arn:{partition}:s3:::{bucket}"
        buckets.append(arn)
        objects += [f"{arn}/{prefix}", f"{arn}/{prefix}/*"] if prefix else [f"{arn}/*"]
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "ListTheBuckets",
                "Effect": "Allow",
                "Action": list(BUCKET_ACTIONS),
                "Resource": sorted(set(buckets)),
            },
            {
                "Sid": "ReadAndWriteUnderThePrefixes",
                "Effect": "Allow",
                "Action": list(OBJECT_ACTIONS),
                "Resource": sorted(set(objects)),
            },
        ],
    }


#: Who may assume the role: EC2, for the instances of its profile.
TRUST_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Principal": {"Service": "ec2.amazonaws.com"},
            "Action": "sts:AssumeRole",
        }
    ],
}


@dataclass(frozen=True)
class ClusterRole:
    """A role dask-rawvm made, as IAM lists it."""

    name: str
    cluster: str
    region: str | None
    created: datetime.datetime | None


async def create_cluster_role(
    iam: Any, cluster: str, region: str, data: Sequence[str], throttle_timeout: float = 120.0
) -> str:
    """Make ``cluster``'s role, its policy and its instance profile; return the profile's ARN.

    Each step is idempotent: a cluster reconnected to finds its role and profile and
    brings the policy up to ``data``. What a failure part-way left of a role made by this
    call is removed (:func:`delete_cluster_role`).
    """
    name = role_name(cluster)
    tags = [{"Key": CLUSTER_TAG, "Value": cluster}, {"Key": REGION_TAG, "Value": region}]
    call = _caller(throttle_timeout)
    made = False
    try:
        try:
            role = await call(
                iam.create_role,
                "CreateRole",
                RoleName=name,
                Path=ROLE_PATH,
                AssumeRolePolicyDocument=json.dumps(TRUST_POLICY),
                Description=f"dask-rawvm cluster {cluster}: the data it names ({region})",
                Tags=tags,
            )
            made = True
        except ProviderError as e:
            if e.code != "EntityAlreadyExists":
                raise
            role = await _own_role(call, iam, name, cluster)
        partition = str(role["Role"]["Arn"]).split(":")[1]
        await call(
            iam.put_role_policy,
            "PutRolePolicy",
            RoleName=name,
            PolicyName=POLICY_NAME,
            PolicyDocument=json.dumps(data_policy(data, partition)),
        )
        try:
            profile = await call(
                iam.create_instance_profile,
                "CreateInstanceProfile",
                InstanceProfileName=name,
                Path=ROLE_PATH,
                Tags=tags,
            )
        except ProviderError as e:
            if e.code != "EntityAlreadyExists":
                raise
            profile = await call(
                iam.get_instance_profile, "GetInstanceProfile", InstanceProfileName=name
            )
        if not any(r["RoleName"] == name for r in profile["InstanceProfile"].get("Roles", [])):
            await call(
                iam.add_role_to_instance_profile,
                "AddRoleToInstanceProfile",
                InstanceProfileName=name,
                RoleName=name,
            )
    except ProviderError as e:
        if made:
            await delete_cluster_role(iam, name, throttle_timeout)
        raise ProviderError(
            f"could not make the IAM role of credentials='role' for data={list(data)}: {e}. "
            "Allow the role statements of `dask-rawvm iam-policy`, or pass "
            "iam_instance_profile= (a profile of your own) or credentials='forward'",
            e.code,
        ) from e
    return str(profile["InstanceProfile"]["Arn"])


async def _own_role(call: Any, iam: Any, name: str, cluster: str) -> Any:
    """The role ``name`` that exists already, when it is ``cluster``'s (a cluster reconnected
    to); an error naming it when it is not."""
    tagged = await call(iam.list_role_tags, "ListRoleTags", RoleName=name)
    owner = {t["Key"]: t["Value"] for t in tagged.get("Tags", [])}.get(CLUSTER_TAG)
    if owner != cluster:
        raise ProviderError(
            f"an IAM role named {name} exists and is not cluster {cluster}'s (its "
            f"{CLUSTER_TAG} tag: {owner!r}): delete it, or name the cluster otherwise",
            "EntityAlreadyExists",
        )
    return await call(iam.get_role, "GetRole", RoleName=name)


async def cluster_roles(iam: Any, throttle_timeout: float = 120.0) -> list[ClusterRole]:
    """Every role dask-rawvm made in the account (under :data:`ROLE_PATH`), with its tags."""
    listed = await paginate(
        iam.list_roles,
        "ListRoles",
        "Roles",
        throttle_timeout=throttle_timeout,
        service="IAM",
        token=("Marker", "Marker"),
        PathPrefix=ROLE_PATH,
    )
    call = _caller(throttle_timeout)
    roles = []
    for role in listed:
        try:
            tagged = await call(iam.list_role_tags, "ListRoleTags", RoleName=role["RoleName"])
        except ProviderError as e:
            if e.code == "NoSuchEntity":  # deleted meanwhile
                continue
            raise
        tags = {t["Key"]: t["Value"] for t in tagged.get("Tags", [])}
        if CLUSTER_TAG in tags:  # untagged: not provably ours
            roles.append(
                ClusterRole(
                    role["RoleName"],
                    tags[CLUSTER_TAG],
                    tags.get(REGION_TAG),
                    role.get("CreateDate"),
                )
            )
    return roles


async def delete_cluster_role(iam: Any, name: str, throttle_timeout: float = 120.0) -> None:
    """Remove a role, its inline policies and its instance profile of the same name; what
    is already gone is no error."""
    call = _caller(throttle_timeout)

    async def gone_is_fine(method: Any, action: str, **params: Any) -> Any:
        try:
            return await call(method, action, **params)
        except ProviderError as e:
            if e.code != "NoSuchEntity":
                raise
            return {}

    await gone_is_fine(
        iam.remove_role_from_instance_profile,
        "RemoveRoleFromInstanceProfile",
        InstanceProfileName=name,
        RoleName=name,
    )
    await gone_is_fine(
        iam.delete_instance_profile, "DeleteInstanceProfile", InstanceProfileName=name
    )
    policies = await gone_is_fine(iam.list_role_policies, "ListRolePolicies", RoleName=name)
    for policy in policies.get("PolicyNames", []):
        await gone_is_fine(
            iam.delete_role_policy, "DeleteRolePolicy", RoleName=name, PolicyName=policy
        )
    await gone_is_fine(iam.delete_role, "DeleteRole", RoleName=name)


def fresh_profile_refused(code: str | None, message: str) -> bool:
    """Whether EC2 refused a launch for an instance profile it does not know (yet): what it
    answers for one made seconds ago, until IAM's change reaches it."""
    return code == "InvalidParameterValue" and "iaminstanceprofile" in message.lower()


def _caller(throttle_timeout: float) -> Any:
    async def call(method: Any, action: str, **params: Any) -> Any:
        return await ec2_call(
            method, action, throttle_timeout=throttle_timeout, service="IAM", **params
        )

    return call
