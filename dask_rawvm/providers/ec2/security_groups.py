"""One security group per cluster, open to the client only: EC2's half of "secure by default".

The scheduler and dashboard ports are open to the client's public address only
(:func:`ingress_cidrs`), every port between members of the group, and nothing else
(:func:`create_cluster_security_group`). The group is deleted with the cluster
(:func:`delete_cluster_security_group`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from typing import Any

from botocore.exceptions import ClientError

from dask_rawvm.backoff import Backoff, retry
from dask_rawvm.errors import OptionError, ProviderError, RawVMError
from dask_rawvm.providers.base import CLUSTER_TAG
from dask_rawvm.providers.ec2.calls import SETTLE_TIMEOUT, ec2_call, error_code, paginate

logger = logging.getLogger(__name__)

# -- who may reach the scheduler ----------------------------------------------------------------

#: "What is my IP" services, asked at once; the first valid answer wins. IPv4-only
#: on purpose: a dual-stack client reaches EC2 public addresses over IPv4, so an
#: IPv6 answer would open the group to an address the client never comes from.
WHAT_IS_MY_IP = (
    "https://checkip.amazonaws.com",  # what AWS itself suggests
    "https://api.ipify.org",
    "https://ipv4.icanhazip.com",
)


class PublicAddressError(RawVMError, RuntimeError):
    """The client's public address could not be found; pass ``allow_ingress_from``."""


def _is_loopback_endpoint(endpoint_url: str | None) -> bool:
    host = urllib.parse.urlsplit(endpoint_url).hostname if endpoint_url else None
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _ask(url: str, timeout: float) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        answer = response.read(64).decode("ascii", "replace").strip()
    return str(ipaddress.ip_address(answer))  # ValueError on anything but an address


async def client_cidr(
    endpoint_url: str | None = None,
    services: Sequence[str] = WHAT_IS_MY_IP,
    timeout: float = 3.0,
) -> str:
    """This machine's public address as a CIDR (``a.b.c.d/32``), for the scheduler's ingress.

    Parameters
    ----------
    endpoint_url
        The cloud's endpoint. On loopback (the local cloud) the answer is
        ``127.0.0.0/8`` with no network call: the local cloud's VMs and the
        client all live there.
    services
        URLs answering with the caller's address as plain text; asked concurrently.
    timeout
        Seconds to wait for each.

    Raises
    ------
    PublicAddressError
        When no service answers with an address; the message says what to pass.
    """
    if _is_loopback_endpoint(endpoint_url):
        return "127.0.0.0/8"
    errors: list[str] = []
    tasks = [asyncio.ensure_future(asyncio.to_thread(_ask, url, timeout)) for url in services]
    try:
        for next_done in asyncio.as_completed(tasks):
            try:
                address = ipaddress.ip_address(await next_done)
            except (OSError, ValueError) as e:  # URLError and timeouts are OSErrors
                errors.append(str(e))
                continue
            return f"{address}/{address.max_prefixlen}"
    finally:
        for task in tasks:
            task.cancel()
    raise PublicAddressError(
        "could not find this machine's public address to open the scheduler to "
        f"(asked {', '.join(services) or 'no service'}: {'; '.join(errors) or 'no answer'}); "
        'pass allow_ingress_from=["x.x.x.x/32"] with the address clients connect from'
    )


def check_cidrs(cidrs: Iterable[str]) -> list[str]:
    """Normalise CIDRs (a bare address becomes /32 or /128); warn about open-to-all ones.

    Raises
    ------
    OptionError
        On anything that is not an IPv4 or IPv6 network (a ValueError).
    """
    if isinstance(cidrs, str):
        cidrs = [cidrs]
    networks = []
    for cidr in cidrs:
        try:
            network = ipaddress.ip_network(cidr.strip(), strict=False)
        except ValueError as e:
            raise OptionError(f"allow_ingress_from: {cidr!r} is not a CIDR ({e})") from None
        if network.prefixlen == 0:
            logger.warning(
                "allow_ingress_from=%s opens the scheduler and dashboard ports to the whole "
                "internet (still TLS with client certificates, but anyone can knock)",
                network,
            )
        networks.append(str(network))
    return list(dict.fromkeys(networks))


async def ingress_cidrs(
    allow_ingress_from: Sequence[str] | None,
    endpoint_url: str | None = None,
    services: Sequence[str] = WHAT_IS_MY_IP,
    timeout: float = 3.0,
) -> list[str]:
    """Who may reach the scheduler and dashboard: the user's choice, else this machine.

    Parameters
    ----------
    allow_ingress_from
        CIDRs given by the user (used as given, after :func:`check_cidrs`), or
        None for :func:`client_cidr`. ``0.0.0.0/0`` is never a default.
    endpoint_url, services, timeout
        For :func:`client_cidr`.
    """
    if allow_ingress_from is not None:
        return check_cidrs(allow_ingress_from)
    return [await client_cidr(endpoint_url, services, timeout)]


# -- the security group -------------------------------------------------------------------------

#: Dask's scheduler and dashboard ports (as in :mod:`dask_rawvm.environment.bootstrap`).
DEFAULT_PORTS = (8786, 8787)


def security_group_name(cluster: str) -> str:
    """The name of a cluster's security group (unique per VPC, like the cluster)."""
    return f"dask-rawvm-{cluster}"


def ingress_permissions(
    group_id: str, cidrs: Sequence[str], ports: Sequence[int] = DEFAULT_PORTS
) -> list[dict[str, Any]]:
    """The ``IpPermissions`` of a cluster's group: ``ports`` from ``cidrs``, all from itself."""
    v4 = [{"CidrIp": c} for c in cidrs if ipaddress.ip_network(c).version == 4]
    v6 = [{"CidrIpv6": c} for c in cidrs if ipaddress.ip_network(c).version == 6]
    permissions: list[dict[str, Any]] = []
    if v4 or v6:
        permissions += [
            {
                "IpProtocol": "tcp",
                "FromPort": port,
                "ToPort": port,
                "IpRanges": v4,
                "Ipv6Ranges": v6,
            }
            for port in ports
        ]
    # Workers reach the scheduler and each other (ephemeral worker, nanny and
    # dashboard ports) through membership, whatever their addresses turn out to be.
    permissions.append({"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": group_id}]})
    return permissions


async def create_cluster_security_group(
    ec2: Any,
    cluster: str,
    vpc_id: str,
    allow_ingress_from: Sequence[str],
    ports: Sequence[int] = DEFAULT_PORTS,
) -> str:
    """Create the cluster's security group; return its id.

    Ingress: ``ports`` (the scheduler's and the dashboard's) from
    ``allow_ingress_from`` only, and all traffic from members of the group.
    Egress stays EC2's default (all), which VMs need to fetch their environment.
    A group of the same name left by an earlier run of this cluster is adopted
    and its rules reset.

    Parameters
    ----------
    ec2
        An aiobotocore EC2 client.
    cluster
        The cluster's name: the group's name suffix and its ``dask-rawvm:cluster`` tag.
    vpc_id
        The VPC (see :func:`dask_rawvm.providers.ec2.network.resolve_network`).
    allow_ingress_from
        CIDRs (see :func:`ingress_cidrs`); empty admits members only.
    ports
        Ports open to ``allow_ingress_from``.
    """
    cidrs = check_cidrs(allow_ingress_from)
    name = security_group_name(cluster)
    try:
        response = await ec2_call(
            ec2.create_security_group,
            "CreateSecurityGroup",
            GroupName=name,
            Description=f"dask-rawvm cluster {cluster}: Dask ports from the client, all within",
            VpcId=vpc_id,
            TagSpecifications=[
                {
                    "ResourceType": "security-group",
                    "Tags": [
                        {"Key": CLUSTER_TAG, "Value": cluster},
                        {"Key": "Name", "Value": name},
                    ],
                }
            ],
        )
        group_id = str(response["GroupId"])
    except ProviderError as e:
        if e.code != "InvalidGroup.Duplicate":
            raise
        group_id = await _adopt_group(ec2, cluster, vpc_id, name)
    # A group just made may be unknown for a moment (EC2 is eventually consistent).
    await ec2_call(
        ec2.authorize_security_group_ingress,
        "AuthorizeSecurityGroupIngress",
        settle=SETTLE_TIMEOUT,
        GroupId=group_id,
        IpPermissions=ingress_permissions(group_id, cidrs, ports),
    )
    logger.info("security group %s (%s): ports %s from %s", group_id, name, list(ports), cidrs)
    return group_id


async def _adopt_group(ec2: Any, cluster: str, vpc_id: str, name: str) -> str:
    """Take over this cluster's leftover group (a crashed earlier run): revoke its ingress."""
    groups = await paginate(
        ec2.describe_security_groups,
        "DescribeSecurityGroups",
        "SecurityGroups",
        Filters=[
            {"Name": "group-name", "Values": [name]},
            {"Name": "vpc-id", "Values": [vpc_id]},
        ],
    )
    tags = {t["Key"]: t["Value"] for g in groups for t in g.get("Tags", [])}
    if not groups or tags.get(CLUSTER_TAG) != cluster:
        raise ProviderError(
            f"CreateSecurityGroup: a group named {name} exists in {vpc_id} and is not "
            f"tagged {CLUSTER_TAG}={cluster}; choose another cluster name"
        )
    group_id = str(groups[0]["GroupId"])
    rules = await paginate(
        ec2.describe_security_group_rules,
        "DescribeSecurityGroupRules",
        "SecurityGroupRules",
        Filters=[{"Name": "group-id", "Values": [group_id]}],
    )
    ingress = [r["SecurityGroupRuleId"] for r in rules if not r.get("IsEgress")]
    if ingress:
        await ec2.revoke_security_group_ingress(GroupId=group_id, SecurityGroupRuleIds=ingress)
    logger.info("adopted leftover security group %s of cluster %s", group_id, cluster)
    return group_id


async def cluster_security_groups(ec2: Any, cluster: str) -> list[str]:
    """Ids of every security group tagged with ``cluster`` (for cleanup by tag)."""
    groups = await paginate(
        ec2.describe_security_groups,
        "DescribeSecurityGroups",
        "SecurityGroups",
        Filters=[{"Name": f"tag:{CLUSTER_TAG}", "Values": [cluster]}],
    )
    return [str(g["GroupId"]) for g in groups]


async def check_extra_groups(ec2: Any, group_ids: Sequence[str], vpc_id: str) -> list[str]:
    """The user's extra security groups (``security_groups=``), checked: each exists and is
    in the cluster's VPC (EC2 refuses a launch with a group of another VPC).

    Raises
    ------
    ProviderError
        Naming the groups that are unknown or in another VPC, and the fix.
    """
    if not group_ids:
        return []
    try:
        groups = await paginate(
            ec2.describe_security_groups,
            "DescribeSecurityGroups",
            "SecurityGroups",
            GroupIds=list(group_ids),
        )
    except ProviderError as e:
        if e.code != "InvalidGroup.NotFound":
            raise
        raise ProviderError(
            f"security_groups={list(group_ids)}: not all of them exist ({e}); pass ids of "
            f"groups in {vpc_id}",
            e.code,
        ) from e
    elsewhere = sorted(g["GroupId"] for g in groups if g.get("VpcId") != vpc_id)
    if elsewhere:
        raise ProviderError(
            f"security_groups: {elsewhere} are not in the cluster's VPC {vpc_id}: pass groups "
            "of that VPC, or vpc=/subnets= of theirs"
        )
    return list(dict.fromkeys(group_ids))


async def delete_cluster_security_group(
    ec2: Any, group_id: str, timeout: float = 300.0, poll_interval: float = 2.0
) -> None:
    """Delete a cluster's security group, waiting while instances still hold it.

    EC2 refuses (``DependencyViolation``) until every instance in the group is
    terminated and its network interface released, which takes a while after
    TerminateInstances returns; so retry (:func:`dask_rawvm.backoff.retry`) until
    ``timeout``. A group already gone is fine.

    Parameters
    ----------
    ec2
        An aiobotocore EC2 client.
    group_id
        From :func:`create_cluster_security_group`.
    timeout
        Seconds to keep retrying.
    poll_interval
        Base of the backoff between attempts (doubling up to 15 s, full jitter).

    Raises
    ------
    ProviderError
        When the group is still in use at the deadline, or on any other error.
    """

    async def delete() -> None:
        try:
            await ec2.delete_security_group(GroupId=group_id)
        except ClientError as e:
            if error_code(e) != "InvalidGroup.NotFound":  # gone already: what we wanted
                raise

    try:
        await retry(
            delete,
            retryable=lambda e: error_code(e) == "DependencyViolation",
            timeout=timeout,
            backoff=Backoff(poll_interval, 15.0),
            what=f"DeleteSecurityGroup {group_id}",
        )
    except ClientError as e:
        code = error_code(e)
        if code == "DependencyViolation":
            raise ProviderError(
                f"DeleteSecurityGroup {group_id}: still in use after {timeout:.0f} s "
                f"(instances not yet terminated?): {e}",
                code,
            ) from e
        raise ProviderError(f"DeleteSecurityGroup {group_id}: {e}", code) from e
