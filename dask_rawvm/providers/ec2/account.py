"""Every cluster of an account in one region, by its tag: what ``dask-rawvm ls`` and ``down`` do.

A cluster's resources (instances, launch templates, its security group, its buckets, the IAM
role of ``credentials="role"``) all carry the tag ``dask-rawvm:cluster=<name>``, so they are
found and removed whoever made them, also after the client that made them died. A cluster's
provider removes its own the same way when it closes (:meth:`EC2Account.remove_cluster`).

Everything is confined to the region of the clients: EC2 resources are regional anyway,
S3 buckets are not (ListBuckets lists every region's), so a bucket counts only where
GetBucketLocation puts it; IAM roles are global, so a role counts only in the region its
region tag names. Every listing follows its pages to the end.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from dask_rawvm.environment.bootstrap import LOG_PREFIX, NAMES_PREFIX
from dask_rawvm.errors import ProviderError
from dask_rawvm.providers.base import CLUSTER_TAG, LIVE_STATES, ROLE_TAG
from dask_rawvm.providers.ec2.calls import (
    DENIED,
    MAX_IDS_PER_CALL,
    SETTLE_TIMEOUT,
    THROTTLE_BACKOFF,
    denied_message,
    ec2_call,
    paginate,
)
from dask_rawvm.providers.ec2.clients import EC2Clients
from dask_rawvm.providers.ec2.fleet import delete_launch_templates
from dask_rawvm.providers.ec2.roles import ClusterRole, cluster_roles, delete_cluster_role
from dask_rawvm.providers.ec2.security_groups import delete_cluster_security_group

logger = logging.getLogger(__name__)

#: Every bucket dask-rawvm creates is named with this prefix (and tagged).
BUCKET_PREFIX = "dask-rawvm-"
#: The object in a cluster's bucket that says whether a client is attached to it: written
#: when the bucket is made, every HEARTBEAT_SECONDS while a client holds the cluster, and
#: "detached" when the client leaves it running (``shutdown_on_close=False``).
HEARTBEAT_KEY = "heartbeat"
HEARTBEAT_SECONDS = 300.0
#: A heartbeat this old means its client is gone (three missed beats).
HEARTBEAT_STALE = 3 * HEARTBEAT_SECONDS
#: Resources of a cluster with no heartbeat at all (no bucket) are left alone until this old:
#: a cluster still starting has made some of them and no instance yet.
REAP_AFTER = 3600.0
#: ``{cluster: {kind: [resource ids]}}``, kinds being "instances", "launch-templates",
#: "security-groups", "buckets" and "roles".
Resources = dict[str, dict[str, list[str]]]


class EC2Account:
    """The dask-rawvm resources of one account in one region.

    Parameters
    ----------
    clients
        Open clients of the region (:meth:`EC2Clients.open`).
    throttle_timeout
        How long to keep backing off a throttled call.
    """

    def __init__(self, clients: EC2Clients, throttle_timeout: float = 120.0) -> None:
        self.clients = clients
        self.throttle_timeout = throttle_timeout
        self._bucket_made: dict[str, datetime.datetime] = {}  # as ListBuckets last said

    async def clusters(self) -> Resources:
        """Each cluster with resources in this region, and its resources by kind."""
        return (await self._inventory())[0]

    async def _inventory(self) -> tuple[Resources, dict[str, datetime.datetime]]:
        """Each cluster's resources, and when its oldest known resource was made."""
        ec2 = self.clients.ec2
        found: Resources = {}
        born: dict[str, datetime.datetime] = {}

        def add(tags: list[dict[str, str]], kind: str, resource: str, made: Any = None) -> None:
            cluster = {t["Key"]: t["Value"] for t in tags}.get(CLUSTER_TAG)
            if cluster is not None:
                found.setdefault(cluster, {}).setdefault(kind, []).append(resource)
                if isinstance(made, datetime.datetime):
                    born[cluster] = min(made, born.get(cluster, made))

        tagged = [{"Name": "tag-key", "Values": [CLUSTER_TAG]}]
        live = [*tagged, {"Name": "instance-state-name", "Values": list(LIVE_STATES)}]
        reservations = await self._list(
            ec2.describe_instances, "DescribeInstances", "Reservations", Filters=live
        )
        for instance in (i for r in reservations for i in r["Instances"]):
            add(instance.get("Tags", []), "instances", instance["InstanceId"])
        templates = await self._list(
            ec2.describe_launch_templates,
            "DescribeLaunchTemplates",
            "LaunchTemplates",
            Filters=tagged,
        )
        for template in templates:
            add(
                template.get("Tags", []),
                "launch-templates",
                template["LaunchTemplateId"],
                template.get("CreateTime"),
            )
        groups = await self._list(
            ec2.describe_security_groups, "DescribeSecurityGroups", "SecurityGroups", Filters=tagged
        )
        for group in groups:
            add(group.get("Tags", []), "security-groups", group["GroupId"])
        for bucket, tags in await self.buckets():
            add(tags, "buckets", bucket, self._bucket_made.get(bucket))
        for role in await self._roles():
            if role.region == self.clients.region:
                add([{"Key": CLUSTER_TAG, "Value": role.cluster}], "roles", role.name, role.created)
        return found, born

    async def _roles(self) -> list[ClusterRole]:
        """The roles of ``credentials="role"`` clusters; none, with a warning, for an identity
        that may not list roles (a policy older than that mode: it made none either)."""
        try:
            return await cluster_roles(self.clients.iam, self.throttle_timeout)
        except ProviderError as e:
            if e.code not in DENIED:
                raise
            logger.warning("IAM roles of clusters not looked for: %s", e)
            return []

    async def orphans(self, keep: str | None = None) -> list[str]:
        """Clusters certainly gone that left resources behind: no live instance, and their
        client detached or gone (its heartbeat says so, or is stale), or, with no heartbeat
        to read, nothing of theirs younger than :data:`REAP_AFTER`. ``keep``: never this one.

        A cluster left running (``shutdown_on_close=False``) keeps its scheduler VM, so it
        is no orphan until that shuts itself down (``idle_timeout``).
        """
        resources, born = await self._inventory()
        now = datetime.datetime.now(datetime.timezone.utc)
        gone = []
        for cluster, kinds in sorted(resources.items()):
            if cluster == keep or kinds.get("instances"):
                continue
            beats = [await self.heartbeat(bucket) for bucket in kinds.get("buckets", [])]
            known = [beat for beat in beats if beat is not None]
            if known:
                detached = any(state == "detached" for state, _ in known)
                last = max(when for _, when in known)
                if detached or (now - last).total_seconds() > HEARTBEAT_STALE:
                    gone.append(cluster)
            elif cluster in born and (now - born[cluster]).total_seconds() > REAP_AFTER:
                gone.append(cluster)
        return gone

    async def reap(self, keep: str | None = None) -> Resources:
        """Remove what :meth:`orphans` finds; return what was removed, by cluster."""
        return {cluster: await self.remove_cluster(cluster) for cluster in await self.orphans(keep)}

    async def heartbeat(self, bucket: str) -> tuple[str, datetime.datetime] | None:
        """A bucket's heartbeat: its client's state ("attached", "detached") and when it was
        written; None when it has none."""
        try:
            head = await self._call(
                self.clients.s3.head_object,
                "HeadObject",
                service="S3",
                Bucket=bucket,
                Key=HEARTBEAT_KEY,
            )
        except ProviderError as e:
            if e.code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
                return None
            raise
        state = head.get("Metadata", {}).get("state", "attached")
        return state, head["LastModified"]

    async def beat(self, bucket: str, state: str = "attached") -> None:
        """Write a bucket's heartbeat (see :data:`HEARTBEAT_KEY`)."""
        await self._call(
            self.clients.s3.put_object,
            "PutObject",
            service="S3",
            Bucket=bucket,
            Key=HEARTBEAT_KEY,
            Body=state.encode(),
            Metadata={"state": state},
        )

    async def buckets(self) -> list[tuple[str, list[dict[str, str]]]]:
        """dask-rawvm's buckets in this region and their tags (an untagged one is not
        provably ours; one of another region is another region's business)."""
        s3 = self.clients.s3
        listing = await self._list(
            s3.list_buckets,
            "ListBuckets",
            "Buckets",
            service="S3",
            token=("ContinuationToken", "ContinuationToken"),
            Prefix=BUCKET_PREFIX,
        )
        result = []
        self._bucket_made.update(
            (b["Name"], b["CreationDate"]) for b in listing if "CreationDate" in b
        )
        for bucket in (b["Name"] for b in listing):
            if not bucket.startswith(BUCKET_PREFIX):
                continue  # an endpoint that ignores Prefix
            try:
                if await self.bucket_region(bucket) != self.clients.region:
                    continue
                tagging = await self._call(
                    s3.get_bucket_tagging, "GetBucketTagging", service="S3", Bucket=bucket
                )
            except ProviderError as e:
                if e.code in ("NoSuchTagSet", "NoSuchBucket"):
                    continue  # untagged (not provably ours), or gone meanwhile
                raise
            result.append((bucket, tagging.get("TagSet", [])))
        return result

    async def bucket_region(self, bucket: str) -> str:
        """The region a bucket is in (S3 names us-east-1 by no constraint, eu-west-1 by "EU")."""
        answer = await self._call(
            self.clients.s3.get_bucket_location, "GetBucketLocation", service="S3", Bucket=bucket
        )
        location = answer.get("LocationConstraint") or "us-east-1"
        return "eu-west-1" if location == "EU" else str(location)

    async def remove_cluster(self, cluster: str) -> dict[str, list[str]]:
        """Terminate and delete everything tagged with ``cluster``; return what was found.

        Every kind is tried even when one fails (the first failure is raised at the end).
        The buckets go last: machines shutting down ship their logs there, and the
        security groups are deleted only once the machines holding them are gone.
        """
        resources = (await self.clusters()).get(cluster, {})
        await self.terminate(resources.get("instances", []))
        ec2, iam = self.clients.ec2, self.clients.iam
        steps: list[Callable[[], Awaitable[Any]]] = [partial(delete_launch_templates, ec2, cluster)]
        steps += [
            partial(delete_cluster_security_group, ec2, group)
            for group in resources.get("security-groups", [])
        ]
        steps += [
            partial(delete_cluster_role, iam, role, self.throttle_timeout)
            for role in resources.get("roles", [])
        ]
        steps += [partial(self.delete_bucket, bucket) for bucket in resources.get("buckets", [])]
        failed: Exception | None = None
        for step in steps:
            try:
                await step()
            except Exception as e:
                failed = failed or e
        if failed is not None:
            raise failed
        return resources

    async def terminate(self, ids: list[str]) -> None:
        """Terminate instances, 1000 per call."""
        for start in range(0, len(ids), MAX_IDS_PER_CALL):
            chunk = ids[start : start + MAX_IDS_PER_CALL]
            await self._call(
                self.clients.ec2.terminate_instances,
                "TerminateInstances",
                settle=SETTLE_TIMEOUT,  # machines just launched may be unknown for a moment
                InstanceIds=chunk,
            )

    async def delete_bucket(self, bucket: str) -> None:
        """Delete a bucket and everything in it (1000 keys a page, a page a call).

        Objects that arrive meanwhile (the logs of machines still shutting down) make S3
        answer ``BucketNotEmpty``: the bucket is emptied again, for up to
        :data:`~.calls.SETTLE_TIMEOUT`.
        """
        deadline = time.monotonic() + SETTLE_TIMEOUT
        delays = THROTTLE_BACKOFF.delays()
        while True:
            await self._empty(bucket)
            try:
                await self._call(
                    self.clients.s3.delete_bucket, "DeleteBucket", service="S3", Bucket=bucket
                )
                return
            except ProviderError as e:
                if e.code != "BucketNotEmpty" or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(next(delays))

    async def _empty(self, bucket: str) -> None:
        """Delete every object of a bucket."""
        s3 = self.clients.s3
        paging: dict[str, Any] = {}
        while True:
            page = await self._call(
                s3.list_objects_v2, "ListObjectsV2", service="S3", Bucket=bucket, **paging
            )
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                answer = await self._call(
                    s3.delete_objects,
                    "DeleteObjects",
                    service="S3",
                    Bucket=bucket,
                    Delete={"Objects": keys},
                )
                # DeleteObjects answers 200 and lists what it could not delete, and why.
                refused = answer.get("Errors") or []
                if refused:
                    first = refused[0]
                    denied = first.get("Code") in DENIED
                    cause = f" -- {denied_message('S3', 'DeleteObject')}" if denied else ""
                    raise ProviderError(
                        f"S3 DeleteObjects in {bucket}: {len(refused)} object(s) not deleted "
                        f"({first.get('Code')}: {first.get('Message')}){cause}",
                        first.get("Code"),
                    )
            if not page.get("IsTruncated"):
                break
            paging = {"ContinuationToken": page["NextContinuationToken"]}

    async def machine_logs(self, cluster: str, name: str | None = None) -> list[MachineLog]:
        """The logs of ``cluster``'s machines: see :func:`cluster_logs`."""
        clients = self.clients
        buckets = [
            bucket
            for bucket, tags in await self.buckets()
            if {t["Key"]: t["Value"] for t in tags}.get(CLUSTER_TAG) == cluster
        ]
        names: dict[str, str] = {}
        shipped: dict[str, str] = {}  # machine id -> the key of the log it shipped
        where: dict[str, str] = {}  # machine id -> the bucket of that key
        for bucket in buckets:
            for prefix in (NAMES_PREFIX, LOG_PREFIX):
                listing = await self._list(
                    clients.s3.list_objects_v2,
                    "ListObjectsV2",
                    "Contents",
                    service="S3",
                    token=("ContinuationToken", "NextContinuationToken"),
                    Bucket=bucket,
                    Prefix=prefix,
                )
                for item in listing:
                    key = item["Key"]
                    if prefix == LOG_PREFIX:
                        machine = key[len(LOG_PREFIX) :].removesuffix(".log")
                        shipped[machine], where[machine] = key, bucket
                        continue
                    for line in (await self._read(bucket, key)).splitlines():
                        parts = line.split()
                        if len(parts) == 2:
                            names[parts[0]] = parts[1]
        reservations = await self._list(
            clients.ec2.describe_instances,
            "DescribeInstances",
            "Reservations",
            Filters=[{"Name": f"tag:{CLUSTER_TAG}", "Values": [cluster]}],
        )
        machines: dict[str, tuple[str, str]] = {}  # id -> (name, state)
        for instance in (i for r in reservations for i in r["Instances"]):
            tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
            machine = instance["InstanceId"]
            label = (
                "scheduler" if tags.get(ROLE_TAG) == "scheduler" else names.get(machine, machine)
            )
            machines[machine] = (label, instance["State"]["Name"])
        for machine in shipped.keys() - machines.keys():  # terminated long ago: EC2 forgot it
            machines[machine] = (names.get(machine, machine), "gone")
        if not machines and not buckets:
            raise ProviderError(
                f"no cluster {cluster!r} in region {clients.region}; `dask-rawvm ls` lists the "
                "clusters there (its bucket, and the logs its VMs shipped, go with `down` or close)"
            )
        wanted = {m: v for m, v in machines.items() if name is None or name in (m, v[0])}
        if not wanted:
            known = ", ".join(sorted({label for label, _ in machines.values()})) or "none"
            raise ProviderError(
                f"cluster {cluster!r} has no machine {name!r}; name one of: {known}"
            )
        logs = []
        order = sorted(wanted.items(), key=lambda kv: (kv[1][0] != "scheduler", kv[1][0]))
        for machine, (label, state) in order:
            if machine in shipped and state not in ("pending", "running"):
                text = await self._read(where[machine], shipped[machine])
                logs.append(MachineLog(label, machine, state, "shipped", text))
                continue
            text = ""
            if state != "gone":
                try:
                    answer = await self._call(
                        clients.ec2.get_console_output,
                        "GetConsoleOutput",
                        InstanceId=machine,
                        Latest=True,
                    )
                    text = str(answer.get("Output") or "")
                except ProviderError as e:
                    text = f"(no console output: {e})"
            logs.append(MachineLog(label, machine, state, "console", text))
        return logs

    async def _read(self, bucket: str, key: str) -> str:
        answer = await self._call(
            self.clients.s3.get_object, "GetObject", service="S3", Bucket=bucket, Key=key
        )
        async with answer["Body"] as body:
            return bytes(await body.read()).decode(errors="replace")

    async def _call(self, method: Any, action: str, service: str = "EC2", **params: Any) -> Any:
        return await ec2_call(
            method, action, throttle_timeout=self.throttle_timeout, service=service, **params
        )

    async def _list(
        self, method: Any, action: str, key: str, service: str = "EC2", **params: Any
    ) -> list[Any]:
        return await paginate(
            method, action, key, throttle_timeout=self.throttle_timeout, service=service, **params
        )


async def list_clusters(
    endpoint_url: str | None = None, region: str | None = None
) -> tuple[Resources, Resources]:
    """The leftovers of gone clusters of the region, removed (:meth:`EC2Account.reap`); then
    each dask-rawvm cluster with resources in the region, and those resources."""
    clients = await EC2Clients.open(region, endpoint_url)
    try:
        account = EC2Account(clients)
        reaped = await account.reap()
        return reaped, await account.clusters()
    finally:
        await clients.close()


async def remove_clusters(
    endpoint_url: str | None = None, region: str | None = None, names: tuple[str, ...] | None = None
) -> Resources:
    """Remove everything of the named clusters (every cluster when ``names`` is None)."""
    clients = await EC2Clients.open(region, endpoint_url)
    try:
        account = EC2Account(clients)
        targets = names if names is not None else tuple(await account.clusters())
        return {name: await account.remove_cluster(name) for name in targets}
    finally:
        await clients.close()


def live_instances_sync(ec2: Any, cluster: str | None = None) -> list[dict[str, Any]]:
    """Instances not terminated (of ``cluster``, by its tag), through a synchronous client.

    For callers without an event loop: the sweep at interpreter exit
    (:meth:`EC2Provider.cleanup_blocking`), the demo's final check and the tests.
    """
    filters = [{"Name": "instance-state-name", "Values": list(LIVE_STATES)}]
    if cluster is not None:
        filters.append({"Name": f"tag:{CLUSTER_TAG}", "Values": [cluster]})
    pages = ec2.get_paginator("describe_instances").paginate(Filters=filters)
    return [i for p in pages for r in p["Reservations"] for i in r["Instances"]]


@dataclass(frozen=True)
class MachineLog:
    """One machine's log, as ``dask-rawvm logs`` shows it."""

    #: ``scheduler``, the worker's name, or the machine id when its name is not known.
    name: str
    machine_id: str
    #: The machine's state (``running``, ``terminated``...); ``gone`` once EC2 forgot it.
    state: str
    #: ``console`` (GetConsoleOutput: the last 64 KiB) or ``shipped`` (what the machine
    #: shipped to the cluster's bucket when it powered off or was terminated).
    source: str
    text: str


async def cluster_logs(
    endpoint_url: str | None, region: str | None, cluster: str, name: str | None = None
) -> list[MachineLog]:
    """The logs of a cluster's machines (of the one named ``name``: ``scheduler``, a
    worker's name or a machine id), running or terminated.

    A running machine's log is its console; a terminated one's is what it shipped to the
    cluster's bucket when it powered off (see :data:`~dask_rawvm.environment.bootstrap.
    LOG_PREFIX`), else what is left of its console. Workers are named by the cluster's
    ``instance-id name`` maps in its bucket.

    Raises
    ------
    ProviderError
        When the region has no such cluster, or it has no machine ``name``.
    """
    clients = await EC2Clients.open(region, endpoint_url)
    try:
        return await EC2Account(clients).machine_logs(cluster, name)
    finally:
        await clients.close()
