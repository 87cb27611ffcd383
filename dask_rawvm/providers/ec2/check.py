"""``dask-rawvm check``: will a cluster start on this account, before one is started?

One row per concern, each ``ok``, ``warning`` or ``blocker`` with what was found and, when
not ok, the fix: credentials (STS GetCallerIdentity), region, instance types and images,
VPC and subnets, the vCPU quotas of the chosen families for each market used (Service
Quotas' applied value, else its AWS default: the fallback AWS documents for a quota with
no applied value), the spot service-linked role, and a DryRun launch of one worker
(RunInstances with ``DryRun``: permissions and parameters checked, nothing launched).
Nothing is created.
"""

from __future__ import annotations

import math
import re
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, Literal

from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from dask_rawvm.config import ClusterOptions
from dask_rawvm.errors import RawVMError
from dask_rawvm.needs import Needs, markets_of
from dask_rawvm.providers.base import CLUSTER_TAG, ROLE_TAG
from dask_rawvm.providers.ec2.calls import DENIED, error_code, error_message
from dask_rawvm.providers.ec2.clients import STANDARD
from dask_rawvm.providers.ec2.fleet import RootVolume
from dask_rawvm.providers.ec2.provider import EC2Provider

Status = Literal["ok", "warning", "blocker"]

#: EC2's vCPU quotas by instance-family group: (on-demand quota code, spot quota code).
#: Codes as AWS's Service Quotas console names them (re-check there).
QUOTA_CODES: dict[str, tuple[str, str]] = {
    "Standard (A, C, D, H, I, M, R, T, Z)": ("L-1216C47A", "L-34B43A08"),
    "G and VT": ("L-DB2E81BA", "L-3819A6DF"),
    "P": ("L-417A185B", "L-7212CCBC"),
    "F": ("L-74FC7D96", "L-88CF9481"),
    "Inf": ("L-1945791B", "L-B5D1601B"),
    "X": ("L-7295265B", "L-E3A00192"),
    "Trn": ("L-2C3B7624", "L-6B0D517C"),
}
#: The role EC2 needs in an account before its first spot launch.
SPOT_ROLE = "AWSServiceRoleForEC2Spot"


@dataclass(frozen=True)
class Check:
    """One row of the report."""

    name: str
    status: Status
    detail: str


#: Families whose vCPU quota is not the standard one, by the letters their names start with.
_FAMILY_GROUPS = {
    "g": "G and VT",
    "gr": "G and VT",
    "vt": "G and VT",
    "p": "P",
    "f": "F",
    "inf": "Inf",
    "x": "X",
    "trn": "Trn",
}
#: Families with quotas of their own this table leaves to Service Quotas.
_OWN_QUOTAS = ("dl", "hpc", "u", "mac")


def quota_group(vm_type: str) -> str | None:
    """The vCPU-quota group of an instance type (``"G and VT"`` for ``g5.xlarge``); None for
    families with quotas of their own this table does not know (high memory, mac, HPC, DL)."""
    letters = re.match(r"[a-z]+", vm_type.split(".", 1)[0])
    prefix = letters.group(0) if letters else ""
    if prefix in _FAMILY_GROUPS:
        return _FAMILY_GROUPS[prefix]
    if prefix in _OWN_QUOTAS or prefix[:1] not in tuple("acdhimrtz"):
        return None
    return "Standard (A, C, D, H, I, M, R, T, Z)"


async def check_account(options: ClusterOptions, workers: int = 1) -> list[Check]:
    """Every check, in order; later checks are skipped when an earlier one makes them moot."""
    provider = EC2Provider.from_options(options, cluster="dask-rawvm-check")
    rows: list[Check] = []
    try:
        await provider.start()
    except RawVMError as e:
        return [Check("credentials and region", "blocker", str(e))]
    try:
        async with AsyncExitStack() as stack:
            clients = await _clients(stack, provider)
            rows.append(await _credentials(clients["sts"]))
            if rows[-1].status == "blocker":
                return rows
            rows.append(Check("region", "ok", f"{provider.region}"))
            types = await _types(provider, options, rows)
            network = await _network(provider, rows)
            if types is not None:
                rows += await _quotas(clients["service-quotas"], provider, options, types, workers)
            rows.append(await _spot_role(clients["iam"], options))
            if types is not None and network:
                rows.append(await _dry_run(provider, options, types[0]))
    finally:
        await provider.close()
    return rows


async def _clients(stack: AsyncExitStack, provider: EC2Provider) -> dict[str, Any]:
    common = {
        "region_name": provider.region,
        "endpoint_url": provider.endpoint_url,
        "config": STANDARD,
        **provider.credentials,
    }
    session = get_session()
    return {
        name: await stack.enter_async_context(session.create_client(name, **common))
        for name in ("sts", "iam", "service-quotas")
    }


async def _credentials(sts: Any) -> Check:
    try:
        identity = await sts.get_caller_identity()
    except ClientError as e:
        return Check(
            "credentials",
            "blocker",
            f"AWS does not accept these credentials: {error_code(e)}: {error_message(e)}. "
            "Fix: check AWS_PROFILE or the keys (aws sts get-caller-identity)",
        )
    except BotoCoreError as e:
        return Check("credentials", "blocker", f"STS did not answer: {e}")
    return Check("credentials", "ok", f"account {identity['Account']} as {identity['Arn']}")


async def _types(
    provider: EC2Provider, options: ClusterOptions, rows: list[Check]
) -> list[str] | None:
    """The worker types (best first) and the scheduler type, with their images."""
    needs = (options.worker_cpu, options.worker_memory, options.worker_gpu, options.arm)
    given = Needs.from_options(*needs) if any(n is not None for n in needs) else None
    try:
        if options.worker_vm_types:
            workers = await provider.choose(names=list(options.worker_vm_types), needs=given)
        elif given is not None:
            workers = await provider.choose(needs=given)
        else:
            workers = await provider.choose(names=[options.worker_vm_type])
        scheduler = await provider.choose(names=[options.scheduler_vm_type])
        images = {t: await provider.image_for(t) for t in [*workers[:1], *scheduler]}
    except RawVMError as e:
        rows.append(Check("instance types", "blocker", str(e)))
        return None
    rows.append(
        Check(
            "instance types",
            "ok",
            f"workers {', '.join(workers)}; scheduler {scheduler[0]}; images "
            + ", ".join(f"{t}: {ami}" for t, ami in images.items()),
        )
    )
    return [*workers, *scheduler]


async def _network(provider: EC2Provider, rows: list[Check]) -> bool:
    try:
        network = await provider.network()
    except RawVMError as e:
        rows.append(Check("VPC and subnets", "blocker", str(e)))
        return False
    subnets = ", ".join(f"{s} ({z})" for s, z in network.subnets)
    extra = f"; extra groups {', '.join(provider.extra_groups)}" if provider.extra_groups else ""
    where = "one zone EC2 picks" if network.single_zone else "spread over the zones"
    public = "public IPv4 on" if provider.public_ip else "no public IPv4 (client inside the VPC)"
    rows.append(
        Check(
            "VPC and subnets",
            "ok" if network.subnets else "blocker",
            f"{network.vpc_id}: {subnets or 'no subnet'}; {where}; {public}{extra}",
        )
    )
    return bool(network.subnets)


async def _quota(quotas: Any, code: str) -> tuple[float | None, str]:
    """``(vCPUs, where from)``: the applied value, else AWS's default, else None and why."""
    try:
        answer = await quotas.get_service_quota(ServiceCode="ec2", QuotaCode=code)
        return float(answer["Quota"]["Value"]), "applied"
    except ClientError as e:
        if error_code(e) != "NoSuchResourceException":
            return None, f"{error_code(e)}: {error_message(e)}"
    except BotoCoreError as e:
        return None, str(e)
    try:
        answer = await quotas.get_aws_default_service_quota(ServiceCode="ec2", QuotaCode=code)
        return float(answer["Quota"]["Value"]), "AWS default"
    except (ClientError, BotoCoreError) as e:
        return None, str(e)


async def _quotas(
    quotas: Any, provider: EC2Provider, options: ClusterOptions, types: list[str], workers: int
) -> list[Check]:
    """Each (family group, market) the cluster would use: its quota against what it needs."""
    worker, scheduler = types[0], types[-1]
    need: dict[tuple[str | None, str], float] = {}  # (quota group, market) -> vCPUs
    for market in markets_of(options.spot_policy):
        key = (quota_group(worker), market)
        need[key] = need.get(key, 0) + provider.catalog[worker].vcpus * max(workers, 1)
    with_scheduler = None
    if options.scheduler == "vm":
        with_scheduler = (quota_group(scheduler), "on-demand")
        need[with_scheduler] = need.get(with_scheduler, 0) + provider.catalog[scheduler].vcpus
    rows = []
    for (group, on), vcpus in sorted(need.items(), key=str):
        name = f"vCPU quota, {on} {group or worker}"
        if group is None:
            rows.append(
                Check(name, "warning", "a family with quotas of its own: see Service Quotas")
            )
            continue
        code = QUOTA_CODES[group][on == "spot"]
        value, source = await _quota(quotas, code)
        if value is None:
            rows.append(Check(name, "warning", f"could not read quota {code}: {source}"))
            continue
        fallback = on == "spot" and options.spot_policy == "spot_with_fallback"
        short = value < vcpus
        status: Status = "ok" if not short else "warning" if fallback else "blocker"
        who = f"{workers} worker(s)" + (
            " and the scheduler" if (group, on) == with_scheduler else ""
        )
        detail = f"{value:g} vCPUs ({source}, {code}); {who} need {vcpus:g}"
        if short:
            detail += (
                f". Fix: ask for {math.ceil(vcpus):d} or more in Service Quotas (quota {code})"
                + (", meanwhile the shortfall goes on-demand" if fallback else "")
            )
        rows.append(Check(name, status, detail))
    return rows


async def _spot_role(iam: Any, options: ClusterOptions) -> Check:
    name = "spot service-linked role"
    uses_spot = "spot" in markets_of(options.spot_policy)
    try:
        await iam.get_role(RoleName=SPOT_ROLE)
        return Check(name, "ok", f"{SPOT_ROLE} exists")
    except ClientError as e:
        code = error_code(e)
        if code != "NoSuchEntity":
            status: Status = "warning" if uses_spot else "ok"
            return Check(name, status, f"could not read {SPOT_ROLE}: {code}: {error_message(e)}")
    except BotoCoreError as e:
        return Check(name, "warning" if uses_spot else "ok", f"IAM did not answer: {e}")
    if not uses_spot:
        return Check(name, "ok", f"{SPOT_ROLE} missing; not needed for spot_policy='on-demand'")
    return Check(
        name,
        "warning",
        f"{SPOT_ROLE} missing: the first spot launch creates it only with "
        "iam:CreateServiceLinkedRole. Fix: `aws iam create-service-linked-role "
        "--aws-service-name spot.amazonaws.com` once",
    )


async def _dry_run(provider: EC2Provider, options: ClusterOptions, vm_type: str) -> Check:
    """RunInstances of one worker with DryRun: EC2 checks the permission and the parameters."""
    name = "dry-run launch"
    try:
        ami = await provider.image_for(vm_type)
        subnet, zone = (await provider.subnets())[0]
        device, size = await provider.root_device(ami)
        root = RootVolume(device, max(options.worker_disk_size, size))
        tags = [
            {"Key": k, "Value": v}
            for k, v in {
                **options.tags,
                CLUSTER_TAG: "dask-rawvm-check",
                ROLE_TAG: "worker",
            }.items()
        ]
        interface: dict[str, Any] = {
            "DeviceIndex": 0,
            "SubnetId": subnet,
            "AssociatePublicIpAddress": provider.public_ip,
            "DeleteOnTermination": True,
        }
        if provider.extra_groups:
            interface["Groups"] = provider.extra_groups
        params: dict[str, Any] = {
            "DryRun": True,
            "ImageId": ami,
            "InstanceType": vm_type,
            "MinCount": 1,
            "MaxCount": 1,
            "NetworkInterfaces": [interface],
            "BlockDeviceMappings": [root.mapping()],
            "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
            "TagSpecifications": [{"ResourceType": "instance", "Tags": tags}],
        }
        if provider.catalog[vm_type].burstable:
            params["CreditSpecification"] = {"CpuCredits": "standard"}
        await provider.clients.ec2_launch.run_instances(**params)
    except ClientError as e:
        code = error_code(e)
        if code == "DryRunOperation":
            return Check(name, "ok", f"EC2 would launch a {vm_type} in {zone} ({subnet})")
        if code in DENIED:
            return Check(
                name,
                "blocker",
                "these credentials may not launch (ec2:RunInstances). Fix: attach the policy "
                "`dask-rawvm iam-policy` prints",
            )
        return Check(name, "blocker", f"EC2 refused a launch: {code}: {error_message(e)}")
    except (RawVMError, BotoCoreError) as e:
        return Check(name, "blocker", str(e))
    return Check(name, "warning", "the endpoint ignored DryRun and launched: terminate it")


def blocked(rows: list[Check]) -> bool:
    """Whether any row is a blocker (the command exits non-zero)."""
    return any(row.status == "blocker" for row in rows)
