"""The IAM policy dask-rawvm needs on EC2, written once: ``dask-rawvm iam-policy`` prints it,
the docs show it, and a test runs a whole cluster as an identity holding exactly this.

Every action is one dask-rawvm calls (or one EC2 needs for a call it makes: CreateFleet
launches through ``ec2:RunInstances`` and tags on create through ``ec2:CreateTags``), grouped
by what it is for. S3 is confined to dask-rawvm's buckets and what is in them
(``arn:aws:s3:::dask-rawvm-*``: IAM's ``*`` matches the ``/`` of an object's ARN too). EC2's
Describe* actions take no resource-level permissions; launching touches instances, volumes,
network interfaces, images, subnets, groups and templates, so EC2 actions name ``"*"``.
The service-linked roles EC2 creates on an account's first spot launch and first fleet
need ``iam:CreateServiceLinkedRole`` for those two services only. ``sts:GetSessionToken``
makes the short-lived credentials ``credentials="forward"`` gives the VMs (your data's own
permissions come from your identity's other policies). IAM is confined to roles and
instance profiles under the path ``/dask-rawvm/`` (``credentials="role"`` without a profile
of yours: the cluster's own role, scoped to ``data=``), passed to EC2 only; listing roles
finds gone clusters' roles. Holding it, an identity can write any policy into such a role
and give it to an instance: drop those two statements where that is too much (the clusters
then use ``credentials="forward"`` or a profile you name). The last statement is for
``dask-rawvm check`` alone; a cluster runs without it.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from dask_rawvm.providers.ec2.account import BUCKET_PREFIX
from dask_rawvm.providers.ec2.roles import ROLE_PATH

_BUCKETS = f"arn:aws:s3:::{BUCKET_PREFIX}*"
_ROLES = f"arn:aws:iam::*:role{ROLE_PATH}*"
_PROFILES = f"arn:aws:iam::*:instance-profile{ROLE_PATH}*"

#: The policy document (IAM JSON policy language, version 2012-10-17).
POLICY: dict[str, Any] = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Sid": "ChooseAndWatchMachines",
            "Effect": "Allow",
            "Action": [
                "ec2:DescribeInstanceTypes",
                "ec2:DescribeInstanceTypeOfferings",
                "ec2:DescribeImages",
                "ec2:DescribeVpcs",
                "ec2:DescribeSubnets",
                "ec2:DescribeSecurityGroups",
                "ec2:DescribeSecurityGroupRules",
                "ec2:DescribeLaunchTemplates",
                "ec2:DescribeInstances",
                "ec2:DescribeSpotPriceHistory",
                "ec2:GetConsoleOutput",
            ],
            "Resource": "*",
        },
        {
            "Sid": "LaunchAndTerminate",
            "Effect": "Allow",
            "Action": [
                "ec2:CreateLaunchTemplate",
                "ec2:CreateLaunchTemplateVersion",
                "ec2:DeleteLaunchTemplate",
                "ec2:CreateFleet",
                "ec2:RunInstances",
                "ec2:CreateTags",
                "ec2:TerminateInstances",
            ],
            "Resource": "*",
        },
        {
            "Sid": "ClusterSecurityGroup",
            "Effect": "Allow",
            "Action": [
                "ec2:CreateSecurityGroup",
                "ec2:AuthorizeSecurityGroupIngress",
                "ec2:RevokeSecurityGroupIngress",
                "ec2:DeleteSecurityGroup",
            ],
            "Resource": "*",
        },
        {
            "Sid": "AmazonLinuxAndGpuImagesBySsm",
            "Effect": "Allow",
            "Action": ["ssm:GetParameter"],
            "Resource": "*",
        },
        {
            "Sid": "FindClusterBuckets",
            "Effect": "Allow",
            "Action": ["s3:ListAllMyBuckets"],
            "Resource": "*",
        },
        {
            # The pattern covers the buckets and the objects in them (an IAM wildcard
            # matches "/" too).
            "Sid": "ClusterBucketsAndTheirObjects",
            "Effect": "Allow",
            "Action": [
                "s3:CreateBucket",
                "s3:DeleteBucket",
                "s3:PutBucketTagging",
                "s3:GetBucketTagging",
                "s3:GetBucketLocation",
                "s3:ListBucket",
                "s3:PutObject",
                "s3:GetObject",
                "s3:DeleteObject",
            ],
            "Resource": _BUCKETS,
        },
        {
            # credentials="forward": the VMs get this identity as short-lived credentials.
            "Sid": "ForwardShortLivedCredentials",
            "Effect": "Allow",
            "Action": ["sts:GetSessionToken"],
            "Resource": "*",
        },
        {
            # credentials="role" without a profile of yours: the cluster's own role and
            # instance profile, under the path /dask-rawvm/ only, passed to EC2 only.
            "Sid": "ClusterRolesForData",
            "Effect": "Allow",
            "Action": [
                "iam:CreateRole",
                "iam:TagRole",
                "iam:GetRole",
                "iam:ListRoleTags",
                "iam:PutRolePolicy",
                "iam:ListRolePolicies",
                "iam:DeleteRolePolicy",
                "iam:DeleteRole",
                "iam:CreateInstanceProfile",
                "iam:TagInstanceProfile",
                "iam:GetInstanceProfile",
                "iam:AddRoleToInstanceProfile",
                "iam:RemoveRoleFromInstanceProfile",
                "iam:DeleteInstanceProfile",
            ],
            "Resource": [_ROLES, _PROFILES],
        },
        {
            "Sid": "PassClusterRolesToEc2",
            "Effect": "Allow",
            "Action": ["iam:PassRole"],
            "Resource": _ROLES,
            "Condition": {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}},
        },
        {
            # Every start and `dask-rawvm ls` look for the roles of gone clusters.
            "Sid": "FindClusterRoles",
            "Effect": "Allow",
            "Action": ["iam:ListRoles"],
            "Resource": "*",
        },
        {
            "Sid": "SpotAndFleetServiceLinkedRoles",
            "Effect": "Allow",
            "Action": ["iam:CreateServiceLinkedRole"],
            "Resource": "*",
            "Condition": {
                "StringEquals": {
                    "iam:AWSServiceName": ["spot.amazonaws.com", "ec2fleet.amazonaws.com"]
                }
            },
        },
        {
            "Sid": "DaskRawvmCheckOnly",
            "Effect": "Allow",
            "Action": [
                "iam:GetRole",
                "servicequotas:GetServiceQuota",
                "servicequotas:GetAWSDefaultServiceQuota",
            ],
            "Resource": "*",
        },
    ],
}


def policy() -> dict[str, Any]:
    """A copy of :data:`POLICY`."""
    return copy.deepcopy(POLICY)


def policy_json() -> str:
    """The policy as ``aws iam create-policy --policy-document`` takes it."""
    return json.dumps(POLICY, indent=2)


def actions() -> list[str]:
    """Every action the policy allows, sorted."""
    return sorted({a for s in POLICY["Statement"] for a in s["Action"]})
