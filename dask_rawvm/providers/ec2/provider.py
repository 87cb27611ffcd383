"""Amazon EC2 (or any EC2-compatible endpoint, such as the local cloud) through aiobotocore."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import inspect
import logging
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import botocore.exceptions
import botocore.session

from dask_rawvm.config import ZONE_AUTO, ClusterOptions
from dask_rawvm.data import ForwardedCredentials
from dask_rawvm.environment.artifact import ArtifactURLs
from dask_rawvm.environment.target import Target
from dask_rawvm.errors import ProviderError
from dask_rawvm.needs import Market, Needs
from dask_rawvm.providers.base import (
    CLUSTER_TAG,
    LIVE_STATES,
    ROLE_TAG,
    ImagePythons,
    LaunchSpec,
    Machine,
    OnGaveUp,
    OnLate,
    Provider,
    WorkerSize,
)
from dask_rawvm.providers.ec2.account import HEARTBEAT_SECONDS, EC2Account, live_instances_sync
from dask_rawvm.providers.ec2.artifacts import ArtifactStore
from dask_rawvm.providers.ec2.boot import IMDS_PRELUDE
from dask_rawvm.providers.ec2.calls import (
    MAX_IDS_PER_CALL,
    SETTLE_TIMEOUT,
    THROTTLE_BACKOFF,
    ec2_call,
    paginate,
)
from dask_rawvm.providers.ec2.catalog import (
    PriceTable,
    StoragePrices,
    VMType,
    choose_vm_types,
    fetch_instance_types,
    live_spot_prices,
)
from dask_rawvm.providers.ec2.clients import EC2Clients
from dask_rawvm.providers.ec2.fleet import (
    FleetLaunchError,
    FleetResult,
    FleetTopUp,
    LaunchedInstance,
    LaunchTemplate,
    RootVolume,
    ensure_launch_template,
    launch_fleet,
)
from dask_rawvm.providers.ec2.network import Network, resolve_network
from dask_rawvm.providers.ec2.roles import (
    PROPAGATION_TIMEOUT,
    create_cluster_role,
    fresh_profile_refused,
    role_name,
)
from dask_rawvm.providers.ec2.security_groups import (
    check_extra_groups,
    create_cluster_security_group,
    ingress_cidrs,
)

logger = logging.getLogger(__name__)

# Amazon Linux 2023, by architecture, as AWS publishes it in SSM.
AMI_PARAMETER = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-{arch}"
#: The Pythons of Amazon Linux 2023: its python3 (3.9, for the image's whole life) and the
#: python3.X packages its repositories carry beside it (AWS's AL2023 documentation).
AL2023_PYTHONS = ("3.9", "3.11", "3.12", "3.13", "3.14")
# The same, with NVIDIA's driver and CUDA: AWS's Deep Learning Base OSS GPU image.
GPU_AMI_PARAMETER = (
    "/aws/service/deeplearning/ami/{arch}/base-oss-nvidia-driver-gpu-amazon-linux-2023/"
    "latest/ami-id"
)

#: What AWS takes for GetSessionToken's DurationSeconds (IAM users; root: at most 1 h).
MIN_SESSION_SECONDS, MAX_SESSION_SECONDS = 900, 36 * 3600
#: GetSessionToken's answer to temporary credentials (which cannot call it).
SESSION_TOKEN_REFUSALS = {"AccessDenied", "AccessDeniedException"}


class EC2Provider(Provider):
    """Machines from EC2.

    Parameters
    ----------
    cluster
        Cluster name: the value of the cluster tag on everything created.
    region
        AWS region; botocore's default chain when None.
    endpoint_url
        An EC2-compatible endpoint (a LocalCloud); AWS when None.
    credentials
        ``aws_access_key_id``/``aws_secret_access_key``; the default chain when None.
    ami
        Machine image for every VM; AL2023 of the type's architecture when None.
    throttle_timeout
        How long to keep backing off a throttled call before giving up.
    allow_ingress_from
        CIDRs that may reach the scheduler and dashboard ports; this machine's
        public address when None (the VPC's ranges with ``public_ip=False``; the
        cluster's members always reach each other).
    zone
        ``"auto"``: one zone for the whole cluster, the one EC2 finds capacity in for the
        first launch; ``"any"``: every zone of the subnets; a zone or a list of zones.
    capacity_retry_timeout
        How long to keep asking for capacity a launch could not get at once: the one
        clock of it (a cluster gives up on its missing workers when this provider does).
    vpc, subnets
        Where machines go (:func:`~dask_rawvm.providers.ec2.network.resolve_network`);
        the default VPC when neither is given.
    security_groups
        Extra security groups for every machine, besides the cluster's own.
    public_ip
        Whether machines get a public IPv4 address.
    instance_profile
        The IAM instance profile (name or ARN) of every machine (``credentials="role"``).
    data_role
        S3 URLs (``data=``) for a role and instance profile the cluster makes for itself on
        its first launch, scoped to them (:mod:`.roles`; ``credentials="role"`` without
        ``instance_profile``); None: no role of its own.
    disk_sizes
        GiB of gp3 root volume by role (``"worker"``, ``"scheduler"``); the image's own
        size for a role not given. Never less than the image's.
    """

    names_after_launch = True  # a fleet's instances come back in no particular order

    def __init__(
        self,
        cluster: str,
        region: str | None = None,
        endpoint_url: str | None = None,
        credentials: dict[str, str] | None = None,
        ami: str | None = None,
        throttle_timeout: float = 120.0,
        allow_ingress_from: list[str] | None = None,
        zone: str | list[str] = ZONE_AUTO,
        capacity_retry_timeout: float = 600.0,
        vpc: str | None = None,
        subnets: list[str] | None = None,
        security_groups: list[str] | None = None,
        public_ip: bool = True,
        disk_sizes: dict[str, int] | None = None,
        instance_profile: str | None = None,
        data_role: list[str] | None = None,
    ) -> None:
        self.cluster = cluster
        self.region = region
        self.endpoint_url = endpoint_url
        self.credentials = credentials or {}
        self.ami = ami
        self.instance_profile = instance_profile
        self.data_role = data_role
        #: When the cluster's own instance profile was made (EC2 may not know it for a while).
        self._profile_made: float | None = None
        self.throttle_timeout = throttle_timeout
        self.allow_ingress_from = allow_ingress_from
        self.zone = zone
        self.capacity_retry_timeout = capacity_retry_timeout
        self.vpc = vpc
        self.subnet_ids = subnets
        self.extra_groups = list(security_groups or [])
        self.public_ip = public_ip
        self.disk_sizes = dict(disk_sizes or {})
        self.security_group: str | None = None
        self._network: Network | None = None
        #: The zone the cluster keeps to (``zone="auto"``), once its first machine landed.
        self.pinned_zone: str | None = None
        self._template: LaunchTemplate | None = None
        self._topups: dict[str, FleetTopUp] = {}
        self.catalog: dict[str, VMType] = {}  # the types chosen or checked, by name
        self._amis: dict[str, str] = {}
        self._roots: dict[str, tuple[str, int]] = {}  # AMI -> (root device, its size in GiB)
        self._clients: EC2Clients | None = None
        self.bucket: str | None = None
        self._heartbeat: asyncio.Future[None] | None = None  # beating while attached
        self._reaping: asyncio.Future[None] | None = None
        self._said_expiry = False
        self._prices: PriceTable | None = None
        self._artifacts: ArtifactStore | None = None  # the account's, made on first use
        self._storage: StoragePrices | None = None

    @classmethod
    def from_options(cls, options: ClusterOptions, cluster: str) -> EC2Provider:
        return cls(
            cluster,
            region=options.region,
            endpoint_url=options.endpoint_url,
            **cls.machine_options(options),
        )

    @staticmethod
    def machine_options(options: ClusterOptions) -> dict[str, Any]:
        """The keywords of :class:`EC2Provider` that options give, whatever the endpoint."""
        return {
            "ami": options.ami,
            "allow_ingress_from": options.allow_ingress_from,
            "zone": options.zone,
            "capacity_retry_timeout": options.capacity_retry_timeout,
            "vpc": options.vpc,
            "subnets": options.subnets,
            "security_groups": options.security_groups,
            "public_ip": options.public_ip,
            "instance_profile": options.iam_instance_profile,
            "data_role": (
                list(options.data)
                if options.credentials == "role" and not options.iam_instance_profile
                else None
            ),
            "disk_sizes": {
                "worker": options.worker_disk_size,
                "scheduler": options.scheduler_disk_size,
            },
        }

    # -- lifecycle -----------------------------------------------------------------
    async def start(self) -> None:
        self._clients = await EC2Clients.open(self.region, self.endpoint_url, self.credentials)
        self.region = self._clients.region
        if self._clients.temporary_without_expiry():
            logger.warning(
                "these AWS credentials are a session token that does not refresh: every call, "
                "and the URLs the VMs fetch, stop working when the session ends; for a cluster "
                "longer than the session use a profile that refreshes (role_arn, SSO)"
            )
        # What clusters of this region left behind once certainly gone (idled out after their
        # client detached, or whose client died) goes now, beside this start.
        self._reaping = asyncio.ensure_future(self._reap())

    async def _reap(self) -> None:
        try:
            reaped = await self.account.reap(keep=self.cluster)
        except Exception as e:  # reaping is a courtesy: never a reason for a start to fail
            logger.warning("could not look for leftovers of gone clusters: %s", e)
            return
        for cluster, resources in reaped.items():
            kinds = ", ".join(f"{len(ids)} {kind}" for kind, ids in sorted(resources.items()))
            logger.info("removed the leftovers of gone cluster %s: %s", cluster, kinds)

    async def close(self) -> None:
        for batch in list(self._topups):
            self.stop_asking(batch)
        await self._stop_heartbeat(detached=self.bucket is not None)
        if self._reaping is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaping
        clients, self._clients = self._clients, None
        if clients is not None:
            await clients.close()

    async def _stop_heartbeat(self, detached: bool) -> None:
        """Stop beating; ``detached``: the bucket outlives this client (a cluster left
        running): say so, so that once the cluster's machines are gone it can be reaped."""
        beating, self._heartbeat = self._heartbeat, None
        if beating is None:
            return
        beating.cancel()
        if detached and self.bucket is not None:
            try:
                await self.account.beat(self.bucket, "detached")
            except Exception as e:
                logger.warning("could not mark %s as detached: %s", self.bucket, e)

    async def _beat(self, bucket: str) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            try:
                await self.account.beat(bucket)
            except Exception as e:  # the next beat may get through
                logger.warning("heartbeat of %s failed: %s", bucket, e)

    @property
    def clients(self) -> EC2Clients:
        """The open clients of the region (:meth:`start` opens them)."""
        if self._clients is None:
            raise ProviderError(f"the EC2 provider of {self.cluster} is not started")
        return self._clients

    @property
    def account(self) -> EC2Account:
        """Every cluster's resources in this region, through this provider's clients."""
        return EC2Account(self.clients, self.throttle_timeout)

    def boot_prelude(self) -> str:
        """EC2 machines ask the instance metadata service who they are."""
        return IMDS_PRELUDE

    # -- data --------------------------------------------------------------------------
    async def forward_credentials(self, lifetime: float) -> ForwardedCredentials:
        """This client's identity for ``lifetime`` seconds: STS ``GetSessionToken``.

        STS takes 900 s to 36 h; a shorter ``lifetime`` is served to the VMs as the
        credentials' expiry (SDKs refresh them that much sooner). Temporary credentials (an
        assumed role, SSO) cannot call ``GetSessionToken``: those are forwarded as they are,
        until they expire (botocore refreshes them here, and the next forwarding carries the
        refreshed ones).
        """
        asked = min(max(lifetime, MIN_SESSION_SECONDS), MAX_SESSION_SECONDS)
        try:
            answer = await self.clients.sts.get_session_token(DurationSeconds=int(asked))
        except botocore.exceptions.ClientError as e:
            if e.response.get("Error", {}).get("Code") not in SESSION_TOKEN_REFUSALS:
                raise ProviderError(
                    f"could not get short-lived credentials to forward to the VMs (STS "
                    f"GetSessionToken): {e}. Allow sts:GetSessionToken, or pass "
                    "credentials=None (the VMs get no AWS identity) or credentials='role'"
                ) from e
            return await self._current_credentials(lifetime)
        given = answer["Credentials"]
        now = datetime.datetime.now(datetime.timezone.utc)
        return ForwardedCredentials(
            given["AccessKeyId"],
            given["SecretAccessKey"],
            given["SessionToken"],
            min(given["Expiration"], now + datetime.timedelta(seconds=lifetime)),
        )

    async def _current_credentials(self, lifetime: float) -> ForwardedCredentials:
        held = self.clients.credentials
        if held is None:
            raise ProviderError(
                "could not get short-lived credentials to forward: the given credentials "
                "cannot call STS GetSessionToken; pass credentials=None or 'role'"
            )
        frozen = held.get_frozen_credentials()
        if inspect.isawaitable(frozen):  # aiobotocore's refreshable credentials
            frozen = await frozen
        if not frozen.token:
            raise ProviderError(
                "STS GetSessionToken was refused, and the credentials held here are long-term "
                "keys, which are never forwarded to VMs: allow sts:GetSessionToken, or pass "
                "credentials=None or 'role'"
            )
        left = self.clients.credentials_expire_in()
        expiry = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(
            seconds=lifetime if left is None else min(left, lifetime)
        )
        return ForwardedCredentials(frozen.access_key, frozen.secret_key, frozen.token, expiry)

    @property
    def storage_options(self) -> dict[str, object]:
        """s3fs options of this endpoint's S3: an EC2-compatible endpoint (a local cloud)
        serves S3 too; AWS's S3 needs none."""
        if self.endpoint_url is None:
            return {}
        options: dict[str, object] = {"endpoint_url": self.endpoint_url}
        if self.credentials:
            options["key"] = self.credentials["aws_access_key_id"]
            options["secret"] = self.credentials["aws_secret_access_key"]
        # s3fs's mkdir sends its region as the bucket's LocationConstraint, which S3 refuses
        # for us-east-1 (InvalidLocationConstraint): there the region is S3's default anyway.
        if self.region and self.region != "us-east-1":
            options["client_kwargs"] = {"region_name": self.region}
        return options

    async def bucket_region(self, bucket: str) -> str | None:
        """``GetBucketLocation``: None where this identity may not ask (or no such bucket)."""
        try:
            answer = await self.clients.s3.get_bucket_location(Bucket=bucket)
        except botocore.exceptions.ClientError as e:
            logger.info("could not tell the region of bucket %s: %s", bucket, e)
            return None
        # us-east-1's buckets answer no constraint (and the oldest EU ones "EU").
        location = answer.get("LocationConstraint") or "us-east-1"
        return "eu-west-1" if location == "EU" else str(location)

    # -- preflight -----------------------------------------------------------------
    async def preflight(self, roles: dict[str, str]) -> None:
        """Every type known in this region (with suggestions when not), its image, the
        network (VPC, subnets, zones, extra security groups)."""
        await self.choose(names=sorted(set(roles.values())))
        for vm_type in set(roles.values()):
            await self.root_device(await self.image_for(vm_type))
        if self.ami:
            await self._check_ami(sorted(set(roles.values())))
        await self.network()

    async def _check_ami(self, vm_types: list[str]) -> None:
        """An explicit image exists here and runs on every type (an arm64 AMI on x86 does not)."""
        try:
            response = await self._call(
                self.clients.ec2.describe_images, "DescribeImages", ImageIds=[self.ami]
            )
        except ProviderError as e:
            raise ProviderError(f"ami={self.ami!r} is not an image in {self.region}: {e}") from e
        images = response.get("Images", [])
        if not images:
            raise ProviderError(f"ami={self.ami!r} is not an image in {self.region}")
        arch = images[0].get("Architecture")
        wrong = [t for t in vm_types if self.architecture(t) != arch]
        if arch and wrong:
            raise ProviderError(
                f"ami={self.ami!r} is a {arch} image, but {wrong} run "
                f"{self.architecture(wrong[0])}: pass an image of that architecture, or leave "
                "ami unset to get Amazon Linux 2023 of each type's architecture"
            )

    async def choose(self, names: list[str] | None = None, needs: Needs | None = None) -> list[str]:
        """The named types checked, or the cheapest types meeting ``needs``, best first.

        Raises :class:`~dask_rawvm.errors.CatalogError` naming the cause and the fix
        (an unknown type with close names, a need no type meets, a GPU not in the region).
        """
        types = await fetch_instance_types(self.clients.ec2)
        chosen = choose_vm_types(types, self._price_table(), names=names, needs=needs)
        self.catalog.update((vm.name, vm) for vm in chosen)
        await self._learn_spot_prices([vm.name for vm in chosen])
        return [vm.name for vm in chosen]

    async def _learn_spot_prices(self, types: list[str]) -> None:
        """Price spot from DescribeSpotPriceHistory where it answers believably; the
        default discount otherwise (said once: an estimate is only as good as its source)."""
        if isinstance(self.zone, str):
            zones = None if self.zone in ("auto", "any") else [self.zone]
        else:
            zones = list(self.zone)
        try:
            live = await live_spot_prices(self.clients.ec2, types, zones)
        except ProviderError as e:
            logger.info("spot priced at the default discount: %s", e)
            return
        self._prices = self._price_table().with_live_spot(live)

    def price_source(self, vm_type: str, market: Market) -> str:
        """Where :meth:`hourly_price` of ``vm_type`` on ``market`` comes from."""
        return self._price_table().source(self.catalog[vm_type], market)

    def _price_table(self) -> PriceTable:
        if self._prices is None:
            self._prices = PriceTable.load(self.region or "us-east-1")
        return self._prices

    def architecture(self, vm_type: str) -> str:
        return "arm64" if self.catalog[vm_type].arch == "arm64" else "x86_64"

    def target_for(self, vm_type: str) -> Target:
        """The platform an environment must be built for to run on ``vm_type``.

        Amazon Linux 2023 has glibc 2.34; NVIDIA GPU types get CUDA 12 builds.
        """
        vm = self.catalog[vm_type]
        nvidia = vm.gpus > 0 and "radeon" not in (vm.gpu_model or "").lower()
        return Target(
            arch="aarch64" if self.architecture(vm_type) == "arm64" else "x86_64",
            accelerator="cuda" if nvidia else "cpu",
            cuda_major=12 if nvidia else None,
            python_version=f"{sys.version_info.major}.{sys.version_info.minor}",
            glibc="2.34",
        )

    def worker_size(self, vm_type: str) -> WorkerSize | None:
        """The type's vCPUs and memory, from the catalog (the whole VM is the worker's)."""
        vm = self.catalog.get(vm_type)
        return None if vm is None else WorkerSize(vm.vcpus, vm.memory_mib * 2**20)

    def hourly_price(self, vm_type: str, market: Market) -> float:
        """List price from the packaged table, scaled to the region (an estimate)."""
        return self._price_table().price(self.catalog[vm_type], market)

    def image_pythons(self, vm_type: str) -> ImagePythons | None:
        """Amazon Linux 2023 (the default images) has python3 3.9 and packages python3.11
        to python3.14 beside it (``dnf install python3.X``); its VMs reach the internet for
        uv's managed Python (or ``UV_PYTHON_INSTALL_MIRROR``). An image of the user's own:
        unknown."""
        if self.ami:
            return None
        return ImagePythons(AL2023_PYTHONS, True, f"Amazon Linux 2023 ({vm_type})")

    def hourly_costs(self, vm_type: str, market: Market, role: str) -> dict[str, float]:
        """What AWS bills per hour for one machine: the instance, its gp3 root volume and
        its public IPv4 address (list prices of the region: an estimate)."""
        if self._storage is None:
            self._storage = StoragePrices.load(self.region or "us-east-1")
        costs = {"instance": self.hourly_price(vm_type, market)}
        size = self.disk_size(role)
        if size:
            costs["storage"] = self._storage.volume_hourly(size)
        if self.public_ip:
            costs["public_ipv4"] = self._storage.public_ipv4_hourly
        return costs

    def disk_size(self, role: str, image: str | None = None) -> int | None:
        """GiB of root volume a ``role``'s machines get: as asked, and at least the image's
        (of ``image``, or the largest image seen); None when not asked (the image's own)."""
        wanted = self.disk_sizes.get(role)
        if wanted is None:
            return None
        roots = [self._roots[image]] if image in self._roots else list(self._roots.values())
        return max([wanted, *(size for _, size in roots)])

    async def root_device(self, ami: str) -> tuple[str, int]:
        """The root device of an image and its size in GiB (DescribeImages, once per image)."""
        if ami not in self._roots:
            response = await self._call(
                self.clients.ec2.describe_images, "DescribeImages", ImageIds=[ami]
            )
            images = response.get("Images", [])
            if not images:
                raise ProviderError(f"image {ami} is not an image in {self.region}")
            image = images[0]
            device = image.get("RootDeviceName") or "/dev/xvda"
            size = next(
                (
                    int(m["Ebs"].get("VolumeSize") or 0)
                    for m in image.get("BlockDeviceMappings", [])
                    if m.get("DeviceName") == device and m.get("Ebs")
                ),
                0,
            )
            self._roots[ami] = (device, size)
        return self._roots[ami]

    async def image_for(self, vm_type: str) -> str:
        """The AMI for a type: the explicit one, else AL2023 for its architecture, with
        NVIDIA's driver for a GPU type."""
        if self.ami:
            return self.ami
        arch = self.architecture(vm_type)
        gpu = self.target_for(vm_type).accelerator == "cuda"
        name = (GPU_AMI_PARAMETER if gpu else AMI_PARAMETER).format(arch=arch)
        if name not in self._amis:
            try:
                response = await self._call(
                    self.clients.ssm.get_parameter, "GetParameter", Name=name
                )
            except ProviderError as e:
                if e.code != "ParameterNotFound":
                    raise
                what = "NVIDIA GPU image" if gpu else "Amazon Linux 2023 image"
                raise ProviderError(
                    f"region {self.region} publishes no {what} for {arch} (SSM parameter "
                    f"{name}): pass ami=... with an image for {vm_type}"
                ) from e
            self._amis[name] = response["Parameter"]["Value"]
        return self._amis[name]

    async def network(self) -> Network:
        """The VPC and subnets the options choose, and the extra security groups, checked
        once (see :func:`~dask_rawvm.providers.ec2.network.resolve_network`)."""
        if self._network is None:
            network = await resolve_network(
                self.clients.ec2,
                self.region or "",
                vpc=self.vpc,
                subnets=self.subnet_ids,
                zone=self.zone,
                throttle_timeout=self.throttle_timeout,
            )
            self.extra_groups = await check_extra_groups(
                self.clients.ec2, self.extra_groups, network.vpc_id
            )
            self._network = network
        return self._network

    async def subnets(self) -> list[tuple[str, str]]:
        """``(subnet, zone)`` pairs a launch may use now: those of the zone the cluster keeps
        to once it has one (``zone="auto"``), else every subnet of the network."""
        network = await self.network()
        if self.pinned_zone is not None:
            return network.in_zone(self.pinned_zone)
        return list(network.subnets)

    def _landed(self, instances: list[LaunchedInstance]) -> None:
        """With ``zone="auto"``, the first machine's zone is the cluster's from now on."""
        network = self._network
        if network is None or not network.single_zone or self.pinned_zone is not None:
            return
        zone = next((i.zone for i in instances if i.zone), None)
        if zone is not None:
            self.pinned_zone = zone
            logger.info("cluster %s keeps to %s (zone='auto')", self.cluster, zone)

    # -- machines ------------------------------------------------------------------
    async def launch(
        self,
        spec: LaunchSpec,
        on_late: OnLate | None = None,
        on_gave_up: OnGaveUp | None = None,
    ) -> list[Machine]:
        """Launch through EC2 Fleet: every candidate type x zone, the markets of the policy.

        One CreateLaunchTemplateVersion (the user-data of this request) and one CreateFleet
        per 1000 machines, failing over across types, zones and markets. With ``on_late``,
        one pass now and the shortfall asked for in the background until
        ``capacity_retry_timeout``; without, the asking happens before this returns.
        """
        launch = await self._fleet_launcher(spec)
        timeout = 0.0 if on_late is not None else self.capacity_retry_timeout
        tags = self.tags(spec.role, spec.tags)
        try:
            result = await launch(count=spec.count, capacity_retry_timeout=timeout)
        except FleetLaunchError as e:
            if not e.result.instances:
                raise
            # What earlier calls of this pass launched runs, and is the cluster's: keep it
            # (terminating it would throw away capacity that was hard to get), go without
            # the rest.
            logger.error(
                "%s VMs: %s; going on with the %d launched", spec.role, e, len(e.result.ids)
            )
            self._landed(e.result.instances)
            if on_gave_up is not None:
                asyncio.get_running_loop().call_soon(on_gave_up)
            return [_launched_machine(i, tags) for i in e.result.instances]
        self._landed(result.instances)
        # launch_fleet has logged what is missing, and why.
        if result.missing and on_late is not None:
            if self.capacity_retry_timeout > 0:
                self._ask_later(spec, launch, result.missing, on_late, on_gave_up)
            elif on_gave_up is not None:  # nobody will ask: given up already
                asyncio.get_running_loop().call_soon(on_gave_up)
        return [_launched_machine(i, tags) for i in result.instances]

    async def _fleet_launcher(self, spec: LaunchSpec) -> Callable[..., Awaitable[FleetResult]]:
        """``launch_fleet`` with everything bound but the count and the retry timeout."""
        candidates = []
        for vm_type in spec.candidates:
            if vm_type not in self.catalog:
                await self.choose(names=[vm_type])
            candidates.append(self.catalog[vm_type])
        amis: dict[str, str] = {}
        for vm in candidates:
            amis.setdefault(self.architecture(vm.name), await self.image_for(vm.name))
        network = await self.network()
        self._template = await ensure_launch_template(
            self.clients.ec2,
            self.cluster,
            user_data=spec.user_data,
            tags=self.tags(spec.role, spec.tags),
            security_group_ids=[await self._security_group(), *self.extra_groups],
            public_ip=self.public_ip,
            root_volume=await self._root_volume(spec.role, list(amis.values())),
            standard_credits=_standard_credits(candidates),
            instance_profile=await self._instance_profile(),
            template=self._template,
        )
        template = self._template

        async def launch(**kwargs: Any) -> FleetResult:
            # The subnets of each call, not of the first: a cluster keeping to one zone
            # (zone="auto") asks only that zone once its first machine landed.
            return await self._while_profile_propagates(
                launch_fleet,
                self.clients.ec2_launch,
                template=template,
                candidates=candidates,
                subnets=await self.subnets(),
                ami_by_arch=amis,
                spot_policy=spec.spot_policy,
                throttle_timeout=self.throttle_timeout,
                cluster=self.cluster,
                single_zone=network.single_zone,
                **kwargs,
            )

        return launch

    async def _instance_profile(self) -> str | None:
        """The instance profile of every machine: the one named, else the cluster's own
        (``data_role``), made on first use (preflight makes nothing), else None."""
        if self.instance_profile is None and self.data_role is not None:
            self.instance_profile = await create_cluster_role(
                self.clients.iam,
                self.cluster,
                self.clients.region,
                self.data_role,
                self.throttle_timeout,
            )
            self._profile_made = time.monotonic()
            logger.info(
                "cluster %s: IAM role %s for the VMs, scoped to %s",
                self.cluster,
                role_name(self.cluster),
                self.data_role,
            )
        return self.instance_profile

    async def _while_profile_propagates(
        self, launch: Callable[..., Awaitable[FleetResult]], *args: Any, **kwargs: Any
    ) -> FleetResult:
        """``launch``, asked again while EC2 refuses the cluster's own instance profile as
        invalid in the first :data:`~.roles.PROPAGATION_TIMEOUT` seconds of its life (IAM
        is eventually consistent); any other error, or a profile not made here, at once."""
        delays = THROTTLE_BACKOFF.delays()
        while True:
            try:
                return await launch(*args, **kwargs)
            except FleetLaunchError as e:
                made = self._profile_made
                if (
                    made is None
                    or e.result.instances
                    or not fresh_profile_refused(e.code, str(e))
                    or time.monotonic() - made > PROPAGATION_TIMEOUT
                ):
                    raise
                logger.info("EC2 does not know the new instance profile yet: asking again")
            await asyncio.sleep(next(delays))

    async def _root_volume(self, role: str, amis: list[str]) -> RootVolume | None:
        """The root volume of a launch's machines: the role's size on the image's root device
        (one image per launch: a launch's types share one platform)."""
        if self.disk_sizes.get(role) is None:
            return None
        roots = {ami: await self.root_device(ami) for ami in amis}
        devices = {device for device, _ in roots.values()}
        if len(devices) > 1:
            logger.warning("images %s have different root devices %s", sorted(roots), devices)
        device = sorted(devices)[0]
        size = max(self.disk_size(role, ami) or 0 for ami in amis)
        wanted = self.disk_sizes[role]
        if size > wanted:
            logger.info(
                "%s root volume: %d GiB, the size of its image (%d GiB asked for)",
                role,
                size,
                wanted,
            )
        return RootVolume(device, size)

    def _ask_later(
        self,
        spec: LaunchSpec,
        launch: Callable[..., Awaitable[FleetResult]],
        missing: int,
        on_late: OnLate,
        on_gave_up: OnGaveUp | None,
    ) -> None:
        def landed(instances: list[LaunchedInstance]) -> None:
            self._landed(instances)
            on_late([_launched_machine(i, self.tags(spec.role, spec.tags)) for i in instances])

        topup = FleetTopUp(launch, missing, self.capacity_retry_timeout, landed).start()
        self._topups[spec.batch] = topup
        logger.warning(
            "%s VMs: asking for the %d missing in the background for up to %.0f s",
            spec.role,
            missing,
            self.capacity_retry_timeout,
        )
        assert topup.task is not None
        topup.task.add_done_callback(partial(self._asked, spec.batch, on_gave_up))

    def _asked(
        self, batch: str, on_gave_up: OnGaveUp | None, task: asyncio.Task[FleetResult]
    ) -> None:
        # A result is logged by launch_fleet (and FleetTopUp); an error only here.
        self._topups.pop(batch, None)
        if task.cancelled():  # stop_asking: the caller no longer wants them
            return
        error = task.exception()
        if error is not None:
            logger.error("asking for missing VMs failed: %s", error)
        if (error is not None or task.result().missing) and on_gave_up is not None:
            on_gave_up()

    def stop_asking(self, batch: str) -> None:
        topup = self._topups.pop(batch, None)
        if topup is not None:
            topup.stop()

    async def _security_group(self) -> str:
        """The cluster's security group, created on first launch (preflight creates nothing).

        Who may reach the scheduler: ``allow_ingress_from``; else, with ``public_ip=False``,
        the VPC's own ranges (a client without a public route to the VMs is in the VPC, or
        comes through a VPN or peering whose ranges it must name); else this machine's
        public address.
        """
        if self.security_group is None:
            network = await self.network()
            if self.allow_ingress_from is None and not self.public_ip:
                cidrs = list(network.cidrs)
            else:
                cidrs = await ingress_cidrs(self.allow_ingress_from, self.endpoint_url)
            self.security_group = await create_cluster_security_group(
                self.clients.ec2, self.cluster, network.vpc_id, cidrs
            )
        return self.security_group

    def tags(self, role: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {
            **(extra or {}),
            "Name": f"{self.cluster}-{role}",
            CLUSTER_TAG: self.cluster,
            ROLE_TAG: role,
        }

    async def terminate(self, ids: list[str]) -> None:
        await self.account.terminate(ids)

    async def describe(self, ids: list[str]) -> list[Machine]:
        machines = []
        for start in range(0, len(ids), MAX_IDS_PER_CALL):
            reservations = await paginate(
                self.clients.ec2.describe_instances,
                "DescribeInstances",
                "Reservations",
                throttle_timeout=self.throttle_timeout,
                settle=SETTLE_TIMEOUT,  # machines just launched may be unknown for a moment
                InstanceIds=ids[start : start + MAX_IDS_PER_CALL],
            )
            machines += [_machine(i) for r in reservations for i in r["Instances"]]
        return machines

    async def live_machines(self, cluster: str) -> list[Machine]:
        """Every instance tagged with ``cluster`` that is not terminated."""
        filters = [
            {"Name": f"tag:{CLUSTER_TAG}", "Values": [cluster]},
            {"Name": "instance-state-name", "Values": list(LIVE_STATES)},
        ]
        reservations = await paginate(
            self.clients.ec2.describe_instances,
            "DescribeInstances",
            "Reservations",
            throttle_timeout=self.throttle_timeout,
            Filters=filters,
        )
        machines = [_machine(i) for r in reservations for i in r["Instances"]]
        if cluster == self.cluster and self._network is not None and self.pinned_zone is None:
            # A cluster reconnected to keeps to the zone it runs in (zone="auto").
            zone = next((m.zone for m in machines if m.zone), None)
            if zone is not None and self._network.single_zone:
                self.pinned_zone = zone
        return machines

    async def cleanup(self, cluster: str) -> list[str]:
        """Remove everything tagged with ``cluster`` (:meth:`EC2Account.remove_cluster`);
        return the instances terminated."""
        if cluster == self.cluster:
            await self._stop_heartbeat(detached=False)
        removed = await self.account.remove_cluster(cluster)
        if cluster == self.cluster:  # what it made is gone: a later launch makes it anew
            self.bucket = None
            self.security_group = None
            self._template = None
            if self._profile_made is not None:
                self.instance_profile = self._profile_made = None
        return removed.get("instances", [])

    def cleanup_blocking(self) -> list[str]:
        """Terminate the cluster's instances through synchronous botocore.

        Synchronous on purpose: at interpreter exit the cluster's event loop may be gone
        and executors refuse new work, which aiobotocore needs.
        """
        ec2 = botocore.session.get_session().create_client(
            "ec2", region_name=self.region, endpoint_url=self.endpoint_url, **self.credentials
        )
        try:
            ids = [i["InstanceId"] for i in live_instances_sync(ec2, self.cluster)]
            for start in range(0, len(ids), MAX_IDS_PER_CALL):
                ec2.terminate_instances(InstanceIds=ids[start : start + MAX_IDS_PER_CALL])
        except Exception as e:
            raise ProviderError(f"terminating the instances of {self.cluster} failed: {e}") from e
        finally:
            ec2.close()
        return ids

    # -- files for the VMs -------------------------------------------------------------
    async def store(self, key: str, path: str) -> None:
        """Upload a file the VMs will fetch to the cluster's bucket (created on first use)."""
        if self.bucket is None:
            self.bucket = await self._create_bucket()
        with open(path, "rb") as f:
            await self._call(
                self.clients.s3.put_object,
                "PutObject",
                service="S3",
                Bucket=self.bucket,
                Key=key,
                Body=f.read(),
                ServerSideEncryption="AES256",
            )

    async def fetch(self, key: str) -> bytes:
        """A stored file, from any bucket of this cluster (a reconnecting client has its own)."""
        for bucket, tags in await self.account.buckets():
            if {t["Key"]: t["Value"] for t in tags}.get(CLUSTER_TAG) != self.cluster:
                continue
            try:
                response = await self._call(
                    self.clients.s3.get_object, "GetObject", service="S3", Bucket=bucket, Key=key
                )
            except ProviderError:
                continue
            async with response["Body"] as body:
                return bytes(await body.read())
        raise ProviderError(f"no bucket of cluster {self.cluster} holds {key}")

    async def url_for(self, key: str, expires: int = 3600) -> str:
        """An expiring GET URL for a stored file; presigning is local, no API call.

        Signed with temporary credentials, a URL dies with them whatever ``expires`` says:
        its expiry is then capped at theirs, and a cap that shortens it is said once.
        """
        if self.bucket is None:  # a URL of something stored later (a name map)
            self.bucket = await self._create_bucket()
        left = self.clients.credentials_expire_in()
        if left is not None and left < expires:
            if not self._said_expiry:
                logger.warning(
                    "the AWS credentials expire in %.0f s: URLs the VMs fetch die with them "
                    "(VMs launched after that get URLs of the refreshed credentials)",
                    left,
                )
                self._said_expiry = True
            expires = max(1, int(left))
        params = {"Bucket": self.bucket, "Key": key}
        return str(
            await self.clients.s3.generate_presigned_url(
                "get_object", Params=params, ExpiresIn=expires
            )
        )

    async def upload_form(self, prefix: str, max_bytes: int, expires: int) -> str | None:
        """An S3 presigned POST (local, no API call) for keys under ``prefix``, its size
        capped by a ``content-length-range`` condition S3 enforces; its expiry capped at
        temporary credentials' as :meth:`url_for`'s."""
        if self.bucket is None:
            self.bucket = await self._create_bucket()
        left = self.clients.credentials_expire_in()
        if left is not None:
            expires = max(1, min(expires, int(left)))
        post = await self.clients.s3.generate_presigned_post(
            self.bucket,
            prefix + "${filename}",
            Conditions=[["starts-with", "$key", prefix], ["content-length-range", 0, max_bytes]],
            ExpiresIn=expires,
        )
        fields = "".join(f"{k}={v}\n" for k, v in post["fields"].items() if k != "key")
        return f"{post['url']}\n{fields}"

    async def artifact_urls(self, key: str, expires: int = 3600) -> ArtifactURLs | None:
        """URLs of an environment artifact in the account's artifact store of this region
        (:mod:`dask_rawvm.providers.ec2.artifacts`), which outlives the cluster."""
        if self._artifacts is None:
            self._artifacts = ArtifactStore(self.clients, self.credentials, self.throttle_timeout)
        return await self._artifacts.urls(key, expires)

    async def _create_bucket(self) -> str:
        """The cluster's bucket: the one it has (a client reconnecting to a cluster left
        running), else a new one; beating its heartbeat from now on."""
        name = await self._existing_bucket() or await self._new_bucket()
        await self.account.beat(name)
        self._heartbeat = asyncio.ensure_future(self._beat(name))
        return name

    async def _existing_bucket(self) -> str | None:
        for bucket, tags in await self.account.buckets():
            if {t["Key"]: t["Value"] for t in tags}.get(CLUSTER_TAG) == self.cluster:
                return bucket
        return None

    async def _new_bucket(self) -> str:
        # Bucket names are global: the cluster's name (sanitised) plus a random suffix.
        stem = re.sub(r"[^a-z0-9-]", "-", self.cluster.lower())[:40].strip("-")
        name = f"dask-rawvm-{stem}-{uuid.uuid4().hex[:8]}"
        params: dict[str, Any] = {"Bucket": name}
        if self.region != "us-east-1":
            params["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        s3 = self.clients.s3
        await self._call(s3.create_bucket, "CreateBucket", service="S3", **params)
        tags = [{"Key": k, "Value": v} for k, v in self.tags("bucket").items()]
        await self._call(
            s3.put_bucket_tagging,
            "PutBucketTagging",
            service="S3",
            Bucket=name,
            Tagging={"TagSet": tags},
        )
        return name

    async def console_output(self, machine_id: str) -> str:
        """The machine's boot log (raises a ProviderError where GetConsoleOutput is denied:
        callers treat boot logs as optional)."""
        response = await self._call(
            self.clients.ec2.get_console_output,
            "GetConsoleOutput",
            settle=SETTLE_TIMEOUT,
            InstanceId=machine_id,
            Latest=True,
        )
        # EC2 sends the log base64-encoded and botocore decodes it (an after-call handler):
        # decoding again would turn text into garbage whenever it happens to look like base64.
        return str(response.get("Output") or "")

    # -- calls -----------------------------------------------------------------------
    async def _call(
        self,
        method: Callable[..., Awaitable[Any]],
        action: str,
        service: str = "EC2",
        **params: Any,
    ) -> Any:
        return await ec2_call(
            method, action, throttle_timeout=self.throttle_timeout, service=service, **params
        )


def _standard_credits(candidates: list[VMType]) -> bool:
    """Launch with standard CPU credits when every candidate is burstable (T family): T3 and
    T4g default to unlimited, billing surplus credits beyond the hourly price; EC2 takes the
    option for burstable types only, so a mix keeps the account's default."""
    burstable = [vm.burstable for vm in candidates]
    if any(burstable) and not all(burstable):
        logger.warning(
            "burstable and other types mixed in one launch (%s): the burstable ones get the "
            "account's default CPU credit option (unlimited for T3/T4g)",
            ", ".join(vm.name for vm in candidates),
        )
    return bool(burstable) and all(burstable)


def _launched_machine(instance: LaunchedInstance, tags: dict[str, str]) -> Machine:
    """A machine just launched, tagged as its template tags it: no address yet
    (``describe`` has it once it is running)."""
    return Machine(
        id=instance.id,
        launch_index=0,
        state="pending",
        vm_type=instance.vm_type,
        zone=instance.zone,
        market="spot" if instance.market == "spot" else "on-demand",
        tags=dict(tags),
    )


def _machine(instance: dict[str, Any]) -> Machine:
    return Machine(
        id=instance["InstanceId"],
        launch_index=int(instance.get("AmiLaunchIndex", 0)),
        state=instance["State"]["Name"],
        vm_type=instance["InstanceType"],
        private_ip=instance.get("PrivateIpAddress"),
        public_ip=instance.get("PublicIpAddress"),
        zone=instance.get("Placement", {}).get("AvailabilityZone"),
        market="spot" if instance.get("InstanceLifecycle") == "spot" else "on-demand",
        state_reason=instance.get("StateReason", {}).get("Message"),
        tags={t["Key"]: t["Value"] for t in instance.get("Tags", [])},
        launched_at=_timestamp(instance.get("LaunchTime")),
    )


def _timestamp(when: Any) -> float | None:
    """``time.time()`` seconds of a datetime botocore parsed; None for anything else."""
    return when.timestamp() if isinstance(when, datetime.datetime) else None
