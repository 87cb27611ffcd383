"""Where a cluster's machines go: its VPC, the subnets (so the zones) they launch in.

``vpc=``, ``subnets=`` and ``zone=`` choose (:func:`resolve_network`): the subnets given
(of one VPC), else every subnet of the VPC given, else the default VPC's default subnets;
the zones asked for must be zones of those subnets. Everything is checked before anything
is launched, and each refusal names the options that fix it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dask_rawvm.config import ZONE_ANY, ZONE_AUTO
from dask_rawvm.errors import OptionError, ProviderError
from dask_rawvm.providers.ec2.calls import ec2_call, paginate


@dataclass(frozen=True)
class Network:
    """The VPC a cluster launches in, its address ranges, and the subnets to use."""

    vpc_id: str
    #: The VPC's IPv4 and IPv6 ranges: who may reach a scheduler without a public address.
    cidrs: tuple[str, ...]
    #: ``(subnet id, zone)``, by zone then id.
    subnets: tuple[tuple[str, str], ...]
    #: ``zone="auto"``: one zone for the whole cluster, the one EC2 finds capacity in.
    single_zone: bool = True

    @property
    def zones(self) -> list[str]:
        return sorted({zone for _, zone in self.subnets})

    def in_zone(self, zone: str) -> list[tuple[str, str]]:
        """The subnets of one zone."""
        return [s for s in self.subnets if s[1] == zone]


def zones_of(zone: str | Sequence[str]) -> list[str] | None:
    """The zones ``zone=`` names; None for ``"auto"`` and ``"any"`` (every zone)."""
    if zone in (ZONE_AUTO, ZONE_ANY):
        return None
    return [zone] if isinstance(zone, str) else list(zone)


async def resolve_network(
    ec2: Any,
    region: str,
    *,
    vpc: str | None = None,
    subnets: Sequence[str] | None = None,
    zone: str | Sequence[str] = ZONE_AUTO,
    throttle_timeout: float = 120.0,
) -> Network:
    """The VPC and subnets ``vpc=``, ``subnets=`` and ``zone=`` choose, checked.

    Raises
    ------
    ProviderError
        No default VPC and neither ``vpc`` nor ``subnets`` given (naming both options and
        the region's VPCs); an unknown VPC or subnet; subnets of several VPCs, or not of
        the VPC given; a VPC without subnets.
    OptionError
        A zone asked for that no subnet is in (naming the subnets' zones).
    """
    if subnets:
        try:
            found = await paginate(
                ec2.describe_subnets,
                "DescribeSubnets",
                "Subnets",
                throttle_timeout=throttle_timeout,
                SubnetIds=list(subnets),
            )
        except ProviderError as e:
            if e.code != "InvalidSubnetID.NotFound":
                raise
            raise ProviderError(
                f"subnets={list(subnets)}: not all are subnets in {region} ({e})", e.code
            ) from e
        vpcs = sorted({s["VpcId"] for s in found})
        if len(vpcs) > 1:
            raise ProviderError(
                f"subnets={list(subnets)} are in several VPCs ({vpcs}); a cluster's machines "
                "share one security group, so one VPC: pass subnets of one of them"
            )
        if vpc is not None and vpcs != [vpc]:
            raise ProviderError(
                f"subnets={list(subnets)} are in {vpcs[0]}, not in vpc={vpc!r}: pass subnets "
                "of that VPC, or leave vpc unset"
            )
        vpc = vpcs[0]
    elif vpc is not None:
        found = await paginate(
            ec2.describe_subnets,
            "DescribeSubnets",
            "Subnets",
            throttle_timeout=throttle_timeout,
            Filters=[{"Name": "vpc-id", "Values": [vpc]}],
        )
        if not found:
            await _describe_vpc(ec2, vpc, region, throttle_timeout)  # unknown: say so
            raise ProviderError(
                f"vpc={vpc!r} has no subnets in {region}: create one in each zone to use "
                "(aws ec2 create-subnet), or pass subnets=[...] of another VPC"
            )
    else:
        vpc = await default_vpc_id(ec2, region, throttle_timeout)
        found = await paginate(
            ec2.describe_subnets,
            "DescribeSubnets",
            "Subnets",
            throttle_timeout=throttle_timeout,
            Filters=[
                {"Name": "vpc-id", "Values": [vpc]},
                {"Name": "default-for-az", "Values": ["true"]},
            ],
        )
    described = await _describe_vpc(ec2, vpc, region, throttle_timeout)
    chosen = sorted((s["AvailabilityZone"], s["SubnetId"]) for s in found)
    wanted = zones_of(zone)
    if wanted is not None:
        have = sorted({z for z, _ in chosen})
        outside = sorted(set(wanted) - set(have))
        if outside:
            where = f"subnets {list(subnets)}" if subnets else f"the subnets of {vpc}"
            raise OptionError(
                f"zone={zone!r}: {outside} {'is' if len(outside) == 1 else 'are'} not a zone of "
                f"{where}, which are in {have}: pass zone= some of those, 'auto' or 'any', or "
                "subnets in the zones you want"
            )
        chosen = [(z, s) for z, s in chosen if z in wanted]
    cidrs = [described.get("CidrBlock")]
    cidrs += [a.get("CidrBlock") for a in described.get("CidrBlockAssociationSet", [])]
    cidrs += [a.get("Ipv6CidrBlock") for a in described.get("Ipv6CidrBlockAssociationSet", [])]
    return Network(
        vpc_id=vpc,
        cidrs=tuple(dict.fromkeys(c for c in cidrs if c)),
        subnets=tuple((s, z) for z, s in chosen),
        single_zone=zone == ZONE_AUTO,
    )


async def default_vpc_id(ec2: Any, region: str = "", throttle_timeout: float = 120.0) -> str:
    """The id of the region's default VPC.

    Raises
    ------
    ProviderError
        When the region has none (deleted, or an account made without one), naming the
        options that choose another and the VPCs there are.
    """
    defaults = await paginate(
        ec2.describe_vpcs,
        "DescribeVpcs",
        "Vpcs",
        throttle_timeout=throttle_timeout,
        Filters=[{"Name": "is-default", "Values": ["true"]}],
    )
    if defaults:
        return str(defaults[0]["VpcId"])
    others = await paginate(
        ec2.describe_vpcs, "DescribeVpcs", "Vpcs", throttle_timeout=throttle_timeout
    )
    listed = ", ".join(v["VpcId"] for v in others[:10]) or "none"
    raise ProviderError(
        f"{region or 'this region'} has no default VPC: pass vpc='vpc-...' (every subnet of it "
        "is used) or subnets=['subnet-...', ...] (one VPC), and public_ip=False if those "
        f"subnets reach the internet through a NAT gateway. VPCs here: {listed}"
    )


async def _describe_vpc(ec2: Any, vpc: str, region: str, throttle_timeout: float) -> Any:
    try:
        response = await ec2_call(
            ec2.describe_vpcs, "DescribeVpcs", throttle_timeout=throttle_timeout, VpcIds=[vpc]
        )
    except ProviderError as e:
        if e.code != "InvalidVpcID.NotFound":
            raise
        raise ProviderError(f"vpc={vpc!r} is not a VPC in {region}: {e}", e.code) from e
    return response["Vpcs"][0]
