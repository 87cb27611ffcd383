"""Amazon EC2 (or any EC2-compatible endpoint, such as the local cloud) through aiobotocore."""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import botocore.session

from dask_rawvm.config import ClusterOptions
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
)
from dask_rawvm.providers.ec2.account import EC2Account, live_instances_sync
from dask_rawvm.providers.ec2.artifacts import ArtifactStore
from dask_rawvm.providers.ec2.boot import IMDS_PRELUDE
from dask_rawvm.providers.ec2.calls import MAX_IDS_PER_CALL, ec2_call
from dask_rawvm.providers.ec2.catalog import (
    PriceTable,
    VMType,
    choose_vm_types,
    fetch_instance_types,
)
from dask_rawvm.providers.ec2.clients import EC2Clients
from dask_rawvm.providers.ec2.fleet import (
    FleetLaunchError,
    FleetResult,
    FleetTopUp,
    LaunchedInstance,
    LaunchTemplate,
    ensure_launch_template,
    launch_fleet,
)
from dask_rawvm.providers.ec2.security_groups import (
    create_cluster_security_group,
    default_vpc_id,
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
        public address when None (the cluster's members always reach each other).
    zones
        Availability zones to launch into; every zone of the region when None.
    capacity_retry_timeout
        How long to keep asking for capacity a launch could not get at once: the one
        clock of it (a cluster gives up on its missing workers when this provider does).
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
        zones: list[str] | None = None,
        capacity_retry_timeout: float = 600.0,
    ) -> None:
        self.cluster = cluster
        self.region = region
        self.endpoint_url = endpoint_url
        self.credentials = credentials or {}
        self.ami = ami
        self.throttle_timeout = throttle_timeout
        self.allow_ingress_from = allow_ingress_from
        self.zones = zones
        self.capacity_retry_timeout = capacity_retry_timeout
        self.security_group: str | None = None
        self._subnets: list[tuple[str, str]] | None = None
        self._vpc_id: str | None = None
        self._template: LaunchTemplate | None = None
        self._topups: dict[str, FleetTopUp] = {}
        self.catalog: dict[str, VMType] = {}  # the types chosen or checked, by name
        self._amis: dict[str, str] = {}
        self._clients: EC2Clients | None = None
        self.bucket: str | None = None
        self._prices: PriceTable | None = None
        self._artifacts: ArtifactStore | None = None  # the account's, made on first use

    @classmethod
    def from_options(cls, options: ClusterOptions, cluster: str) -> EC2Provider:
        return cls(
            cluster,
            region=options.region,
            endpoint_url=options.endpoint_url,
            ami=options.ami,
            allow_ingress_from=options.allow_ingress_from,
            zones=[options.zone] if isinstance(options.zone, str) else options.zone,
            capacity_retry_timeout=options.capacity_retry_timeout,
        )

    # -- lifecycle -----------------------------------------------------------------
    async def start(self) -> None:
        self._clients = await EC2Clients.open(self.region, self.endpoint_url, self.credentials)
        self.region = self._clients.region

    async def close(self) -> None:
        for batch in list(self._topups):
            self.stop_asking(batch)
        clients, self._clients = self._clients, None
        if clients is not None:
            await clients.close()

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

    # -- preflight -----------------------------------------------------------------
    async def preflight(self, roles: dict[str, str]) -> None:
        """Every type known in this region (with suggestions when not), its image, the zones."""
        await self.choose(names=sorted(set(roles.values())))
        for vm_type in set(roles.values()):
            await self.image_for(vm_type)
        if self.ami:
            await self._check_ami(sorted(set(roles.values())))
        await self.subnets()

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
        return [vm.name for vm in chosen]

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

    async def subnets(self) -> list[tuple[str, str]]:
        """``(subnet, zone)`` of the default VPC for each zone launched into, checked once."""
        if self._subnets is None:
            vpc = await self._vpc()
            response = await self._call(
                self.clients.ec2.describe_subnets,
                "DescribeSubnets",
                Filters=[
                    {"Name": "vpc-id", "Values": [vpc]},
                    {"Name": "default-for-az", "Values": ["true"]},
                ],
            )
            by_zone = {s["AvailabilityZone"]: s["SubnetId"] for s in response["Subnets"]}
            unknown = sorted(set(self.zones or ()) - set(by_zone))
            if unknown:
                raise ProviderError(
                    f"zone(s) {unknown} are not zones of {self.region} with a default subnet; "
                    f"its zones are {sorted(by_zone)}: pass zone= one of those, or none for all"
                )
            zones = self.zones or sorted(by_zone)
            self._subnets = [(by_zone[zone], zone) for zone in zones]
        return self._subnets

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
        try:
            result = await launch(count=spec.count, capacity_retry_timeout=timeout)
        except FleetLaunchError as e:
            # What launched before the error is ours to clean up: nobody else knows of it.
            if e.result.ids:
                await self.terminate(e.result.ids)
            raise
        # launch_fleet has logged what is missing, and why.
        if result.missing and on_late is not None:
            if self.capacity_retry_timeout > 0:
                self._ask_later(spec, launch, result.missing, on_late, on_gave_up)
            elif on_gave_up is not None:  # nobody will ask: given up already
                asyncio.get_running_loop().call_soon(on_gave_up)
        tags = self.tags(spec.role, spec.tags)
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
        self._template = await ensure_launch_template(
            self.clients.ec2,
            self.cluster,
            user_data=spec.user_data,
            tags=self.tags(spec.role, spec.tags),
            security_group_ids=[await self._security_group()],
            template=self._template,
        )
        return partial(
            launch_fleet,
            self.clients.ec2_launch,
            template=self._template,
            candidates=candidates,
            subnets=await self.subnets(),
            ami_by_arch=amis,
            spot_policy=spec.spot_policy,
            throttle_timeout=self.throttle_timeout,
            cluster=self.cluster,
        )

    def _ask_later(
        self,
        spec: LaunchSpec,
        launch: Callable[..., Awaitable[FleetResult]],
        missing: int,
        on_late: OnLate,
        on_gave_up: OnGaveUp | None,
    ) -> None:
        def landed(instances: list[LaunchedInstance]) -> None:
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
        """The cluster's security group, created on first launch (preflight creates nothing)."""
        if self.security_group is None:
            cidrs = await ingress_cidrs(self.allow_ingress_from, self.endpoint_url)
            self.security_group = await create_cluster_security_group(
                self.clients.ec2, self.cluster, await self._vpc(), cidrs
            )
        return self.security_group

    async def _vpc(self) -> str:
        """The default VPC, where the cluster's subnets and security group are (looked up once)."""
        if self._vpc_id is None:
            self._vpc_id = await default_vpc_id(self.clients.ec2)
        return self._vpc_id

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
            chunk = ids[start : start + MAX_IDS_PER_CALL]
            response = await self._call(
                self.clients.ec2.describe_instances, "DescribeInstances", InstanceIds=chunk
            )
            machines += [_machine(i) for r in response["Reservations"] for i in r["Instances"]]
        return machines

    async def live_machines(self, cluster: str) -> list[Machine]:
        """Every instance tagged with ``cluster`` that is not terminated."""
        filters = [
            {"Name": f"tag:{CLUSTER_TAG}", "Values": [cluster]},
            {"Name": "instance-state-name", "Values": list(LIVE_STATES)},
        ]
        response = await self._call(
            self.clients.ec2.describe_instances, "DescribeInstances", Filters=filters
        )
        machines = [_machine(i) for r in response["Reservations"] for i in r["Instances"]]
        token = response.get("NextToken")
        while token:
            response = await self._call(
                self.clients.ec2.describe_instances,
                "DescribeInstances",
                Filters=filters,
                NextToken=token,
            )
            machines += [_machine(i) for r in response["Reservations"] for i in r["Instances"]]
            token = response.get("NextToken")
        return machines

    async def cleanup(self, cluster: str) -> list[str]:
        """Remove everything tagged with ``cluster`` (:meth:`EC2Account.remove_cluster`);
        return the instances terminated."""
        removed = await self.account.remove_cluster(cluster)
        if cluster == self.cluster:  # what it made is gone: a later launch makes it anew
            self.bucket = None
            self.security_group = None
            self._template = None
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
        """An expiring GET URL for a stored file; presigning is local, no API call."""
        if self.bucket is None:  # a URL of something stored later (a name map)
            self.bucket = await self._create_bucket()
        params = {"Bucket": self.bucket, "Key": key}
        return str(
            await self.clients.s3.generate_presigned_url(
                "get_object", Params=params, ExpiresIn=expires
            )
        )

    async def artifact_urls(self, key: str, expires: int = 3600) -> ArtifactURLs | None:
        """URLs of an environment artifact in the account's artifact store of this region
        (:mod:`dask_rawvm.providers.ec2.artifacts`), which outlives the cluster."""
        if self._artifacts is None:
            self._artifacts = ArtifactStore(self.clients, self.credentials, self.throttle_timeout)
        return await self._artifacts.urls(key, expires)

    async def _create_bucket(self) -> str:
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
        response = await self._call(
            self.clients.ec2.get_console_output,
            "GetConsoleOutput",
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
    )
