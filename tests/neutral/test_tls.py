"""Per-cluster mutual TLS, and its material fetched by expiring URLs (S3 on the local cloud).

Everything runs against the embedded local cloud over HTTP (EC2 and S3) and real
Dask schedulers and workers, in-process or as ``dask`` subprocesses.
"""

from __future__ import annotations

import asyncio
import datetime
import gc
import ipaddress
import os
import re
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import dask.config
import pytest
from aiobotocore.session import get_session
from botocore.exceptions import ClientError
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from distributed import Client, Scheduler, Worker
from distributed.comm import connect
from distributed.comm.core import CommClosedError
from distributed.security import Security

from dask_rawvm.localcloud.server import LocalCloud
from dask_rawvm.providers.base import CLUSTER_TAG
from dask_rawvm.providers.ec2.material import (
    S3_CONFIG,
    delete_cluster_material,
    delete_vm_material,
    material_key,
    upload_vm_material,
)
from dask_rawvm.tls import (
    CA_FILE,
    CERT_FILE,
    KEY_FILE,
    SECURITY_LOADER,
    ClusterTLS,
    offer_security,
    security_for_address,
    security_from_material,
    unpack_vm_material,
    vm_tls_script,
    withdraw_security,
)

BUCKET = "dask-rawvm-secrets"


@pytest.fixture(scope="module")
def cloud() -> Iterator[LocalCloud]:
    with LocalCloud() as cloud:
        yield cloud


@pytest.fixture
async def ec2(cloud: LocalCloud) -> AsyncIterator[Any]:
    async with get_session().create_client("ec2", **cloud.client_kwargs()) as client:
        yield client


@pytest.fixture
async def s3(cloud: LocalCloud) -> AsyncIterator[Any]:
    async with get_session().create_client(
        "s3", config=S3_CONFIG, **cloud.client_kwargs()
    ) as client:
        try:
            await client.create_bucket(Bucket=BUCKET)
        except ClientError as e:  # the module's cloud keeps the bucket between tests
            if "BucketAlreadyOwnedByYou" not in str(e):
                raise
        yield client


@pytest.fixture(scope="module")
def tls() -> ClusterTLS:
    return ClusterTLS.create("test-cluster")


# -- certificates ---------------------------------------------------------------------------


def test_ca_is_short_lived_p256_and_signs_leaves(tls: ClusterTLS) -> None:
    ca = x509.load_pem_x509_certificate(tls.ca_cert_pem.encode())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    lifetime = ca.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
    assert datetime.timedelta(days=6) < lifetime <= datetime.timedelta(days=7)

    cert_pem, key_pem = tls.issue("scheduler", ["10.0.0.5", "scheduler.example"])
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    cert.verify_directly_issued_by(ca)
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
    assert san.get_values_for_type(x509.DNSName) == ["scheduler.example"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert "PRIVATE KEY" in key_pem
    assert cert.not_valid_after_utc == ca.not_valid_after_utc


def test_material_never_holds_the_ca_key(tls: ClusterTLS) -> None:
    material = tls.vm_material("worker")
    assert set(material) == {CA_FILE, CERT_FILE, KEY_FILE}
    assert material[CA_FILE] == tls.ca_cert_pem
    assert "PRIVATE KEY" not in material[CA_FILE] + material[CERT_FILE]
    assert "_ca_key" not in repr(tls)
    with pytest.raises(ValueError, match="role"):
        tls.vm_material("client")


def test_client_security_is_in_memory_and_requires_encryption(tls: ClusterTLS) -> None:
    security = tls.client_security()
    assert security.require_encryption
    assert "BEGIN CERTIFICATE" in security.get_tls_config_for_role("client")["cert"]
    assert "In-memory" in repr(security) and "PRIVATE" not in repr(security)


# -- mutual TLS between real Dask processes -------------------------------------------------


@asynccontextmanager
async def tls_cluster(tls: ClusterTLS) -> AsyncIterator[Scheduler]:
    """A scheduler and one worker, each with its own VM bundle."""
    scheduler_security = security_from_material(tls.vm_material("scheduler"))
    worker_security = security_from_material(tls.vm_material("worker"))
    async with (
        Scheduler(
            host="127.0.0.1", port=0, dashboard_address=":0", security=scheduler_security
        ) as scheduler,
        Worker(scheduler.address, security=worker_security, nthreads=1),
    ):
        yield scheduler


async def test_scheduler_and_worker_talk_mutual_tls(tls: ClusterTLS) -> None:
    async with tls_cluster(tls) as scheduler:
        assert scheduler.address.startswith("tls://127.0.0.1:")
        assert len(scheduler.workers) == 1
        assert all(w.startswith("tls://") for w in scheduler.workers)
        async with Client(
            scheduler.address, security=tls.client_security(), asynchronous=True
        ) as client:
            assert await client.submit(sum, [1, 2, 3]) == 6


async def test_plain_tcp_is_refused(tls: ClusterTLS) -> None:
    async with tls_cluster(tls) as scheduler:
        plain = scheduler.address.replace("tls://", "tcp://")
        with pytest.raises(CommClosedError):  # dropped during Dask's handshake
            await connect(plain, timeout=5)


async def test_client_of_another_cluster_is_refused(tls: ClusterTLS) -> None:
    other = ClusterTLS.create("other-cluster")
    async with tls_cluster(tls) as scheduler:
        # Its own CA rejects the scheduler...
        with pytest.raises(OSError):
            await Client(
                scheduler.address,
                security=other.client_security(),
                asynchronous=True,
                timeout=5,
            )
        # ...and the scheduler rejects its certificate even when it trusts our CA.
        cert, key = other.issue("client")
        trusting = Security(
            require_encryption=True,
            tls_ca_file=tls.ca_cert_pem,
            tls_client_cert=cert,
            tls_client_key=key,
        )
        with pytest.raises(CommClosedError, match="unknown ca"):
            await connect(scheduler.address, timeout=5, **trusting.get_connection_args("client"))


async def test_client_without_a_certificate_is_refused(tls: ClusterTLS) -> None:
    async with tls_cluster(tls) as scheduler:
        context = ssl.create_default_context(cadata=tls.ca_cert_pem)
        context.check_hostname = False
        with pytest.raises(CommClosedError, match="certificate required"):
            await connect(
                scheduler.address, timeout=5, ssl_context=context, require_encryption=True
            )


# -- shipping material: S3 object + presigned URL + the VM's shell lines ----------------------


async def test_presigned_round_trip_tagged_and_deleted(s3: Any, tls: ClusterTLS) -> None:
    material = tls.vm_material("worker")
    key = material_key("test-cluster", "worker")
    url = await upload_vm_material(s3, BUCKET, key, material, 3600, cluster="test-cluster")
    assert "X-Amz-Expires=3600" in url and "X-Amz-Signature=" in url
    assert "PRIVATE" not in url

    body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read())
    assert unpack_vm_material(body) == material
    tags = (await s3.get_object_tagging(Bucket=BUCKET, Key=key))["TagSet"]
    assert {"Key": CLUSTER_TAG, "Value": "test-cluster"} in tags

    await delete_vm_material(s3, BUCKET, key)
    with pytest.raises(urllib.error.HTTPError, match="404"):
        await asyncio.to_thread(urllib.request.urlopen, url, None, 10)


async def test_sigv2_client_is_refused(cloud: LocalCloud, s3: Any, tls: ClusterTLS) -> None:
    key = material_key("test-cluster", "worker")
    async with get_session().create_client("s3", **cloud.client_kwargs()) as default_s3:
        with pytest.raises(ValueError, match="s3v4"):
            await upload_vm_material(
                default_s3, BUCKET, key, tls.vm_material("worker"), cluster="test-cluster"
            )
    listed = await s3.list_objects_v2(Bucket=BUCKET, Prefix=key)
    assert listed.get("KeyCount", 0) == 0  # nothing left behind


async def test_delete_cluster_material(s3: Any, tls: ClusterTLS) -> None:
    for role in ("scheduler", "worker", "worker"):
        key = material_key("gone-cluster", role)
        await upload_vm_material(s3, BUCKET, key, tls.vm_material(role), cluster="gone-cluster")
    await upload_vm_material(
        s3,
        BUCKET,
        material_key("kept-cluster", "worker"),
        tls.vm_material("worker"),
        cluster="kept-cluster",
    )
    assert await delete_cluster_material(s3, BUCKET, "gone-cluster") == 3
    assert (await s3.list_objects_v2(Bucket=BUCKET, Prefix="dask-rawvm/gone-cluster/")).get(
        "KeyCount"
    ) == 0
    assert (await s3.list_objects_v2(Bucket=BUCKET, Prefix="dask-rawvm/kept-cluster/")).get(
        "KeyCount"
    ) == 1


def test_user_data_snippet_is_small_and_secret_free() -> None:
    script = vm_tls_script("poweroff_vm 1")
    assert len(script.encode()) < 2048
    assert "PRIVATE KEY" not in script and "BEGIN" not in script
    assert "poweroff_vm 1" in script
    assert "DASHBOARD__TLS" not in script
    assert "DASHBOARD__TLS__CERT" in vm_tls_script(dashboard_tls=True)


async def run_sh(script: str, env: dict[str, str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        "sh",
        "-c",
        script,
        env={"PATH": os.environ["PATH"], **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_snippet_fetches_into_private_dir_and_configures_dask(
    s3: Any, tls: ClusterTLS, tmp_path: Any
) -> None:
    material = tls.vm_material("worker")
    key = material_key("test-cluster", "worker")
    url = await upload_vm_material(s3, BUCKET, key, material, cluster="test-cluster")
    check = 'stat -c "%a %n" "$RAWVM_TLS_DIR" "$RAWVM_TLS_DIR"/*; env'
    code, out, err = await run_sh(
        f"set -u\n{vm_tls_script()}\n{check}",
        {"RAWVM_SECRETS_URL": url, "TMPDIR": str(tmp_path)},
    )
    assert code == 0, err
    modes = dict(line.split(" ", 1)[::-1] for line in out.splitlines() if line[:1].isdigit())
    tls_dir = next(path for path, mode in modes.items() if mode == "700")
    assert tls_dir.startswith(str(tmp_path))
    assert {os.path.basename(p): m for p, m in modes.items() if p != tls_dir} == {
        CA_FILE: "600",
        CERT_FILE: "600",
        KEY_FILE: "600",
    }
    with open(os.path.join(tls_dir, KEY_FILE)) as f:
        assert f.read() == material[KEY_FILE]
    env = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert "RAWVM_SECRETS_URL" not in env
    assert env["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"] == "True"
    assert env["DASK_DISTRIBUTED__COMM__DEFAULT_SCHEME"] == "tls"
    assert env["DASK_DISTRIBUTED__COMM__TLS__WORKER__KEY"] == f"{tls_dir}/{KEY_FILE}"


@pytest.mark.parametrize("url", ["", "missing"])
async def test_snippet_fails_without_material(
    cloud: LocalCloud, s3: Any, url: str, tmp_path: Any
) -> None:
    if url:
        url = await s3.generate_presigned_url(
            "get_object", Params={"Bucket": BUCKET, "Key": "dask-rawvm/nothing-here.tar"}
        )
    env = {"TMPDIR": str(tmp_path), **({"RAWVM_SECRETS_URL": url} if url else {})}
    code, out, err = await run_sh(f"set -u\n{vm_tls_script('exit 7')}\necho reached", env)
    assert code == 7
    assert "could not fetch TLS material" in err
    assert "reached" not in out


class DaskProcess:
    """A ``dask scheduler``/``dask worker`` run after the snippet, as on a VM."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []

    @classmethod
    async def start(
        cls, url: str, tmp_path: Any, module: str, *args: str, dashboard_tls: bool = False
    ) -> DaskProcess:
        snippet = vm_tls_script(dashboard_tls=dashboard_tls)
        script = f'set -u\n{snippet}\nexec "$0" -m {module} "$@"'
        env = {**os.environ, "RAWVM_SECRETS_URL": url, "TMPDIR": str(tmp_path)}
        env = {k: v for k, v in env.items() if not k.startswith("DASK_")}
        process = await asyncio.create_subprocess_exec(
            "sh",
            "-c",
            script,
            sys.executable,
            *args,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(process)

    async def wait_for(self, pattern: str) -> re.Match[str]:
        """Read the log until a line matches."""
        assert self.process.stderr is not None
        while True:
            line = (await asyncio.wait_for(self.process.stderr.readline(), 60)).decode()
            self.lines.append(line)
            assert line, "".join(self.lines)
            match = re.search(pattern, line)
            if match:
                return match

    def drain(self) -> None:
        """Keep reading the log in the background, so a full pipe never blocks the process."""
        assert self.process.stderr is not None
        self._drain = asyncio.ensure_future(self.process.stderr.read())

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()
        await self.process.wait()


async def test_dask_cli_scheduler_and_worker_use_the_bundle(
    s3: Any, tls: ClusterTLS, tmp_path: Any
) -> None:
    urls = {}
    for role in ("scheduler", "worker"):
        key = material_key("test-cluster", role)
        material = tls.vm_material(role, hosts=["127.0.0.1"])
        urls[role] = await upload_vm_material(s3, BUCKET, key, material, cluster="test-cluster")
    scheduler = await DaskProcess.start(
        urls["scheduler"],
        tmp_path,
        "distributed.cli.dask_scheduler",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--dashboard-address",
        "127.0.0.1:0",
        dashboard_tls=True,
    )
    worker = None
    try:
        address = (await scheduler.wait_for(r"Scheduler at:\s+(\S+)"))[1]
        assert address.startswith("tls://127.0.0.1:")  # DEFAULT_SCHEME=tls, no --protocol
        dashboard = (await scheduler.wait_for(r"dashboard at:\s+(\S+)/status"))[1]
        scheduler.drain()
        assert dashboard.startswith("https://127.0.0.1:")
        # Verified against the cluster's CA, hostname included (the SAN given above).
        context = ssl.create_default_context(cadata=tls.ca_cert_pem)
        health = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"{dashboard}/health", context=context).read()
        )
        assert health == b"ok"
        worker = await DaskProcess.start(
            urls["worker"],
            tmp_path,
            "distributed.cli.dask_worker",
            address,
            "--host",
            "127.0.0.1",
            "--nthreads",
            "1",
            "--no-dashboard",
        )
        worker.drain()
        async with Client(address, security=tls.client_security(), asynchronous=True) as client:
            await client.wait_for_workers(1, timeout=60)
            info = await client.scheduler.identity()
            assert [w.split(":")[0] for w in info["workers"]] == ["tls"]
            assert await client.submit(pow, 2, 10) == 1024
    finally:
        for process in (worker, scheduler):
            if process is not None:
                await process.stop()


class _Cluster:
    """What offers its security to this process's clients: anything with ``security``."""

    def __init__(self) -> None:
        self.security = ClusterTLS.create("c").client_security()


def test_a_client_of_this_process_gets_the_security_of_the_cluster_at_its_address() -> None:
    address = "tls://10.0.0.1:8786"
    with dask.config.set({"distributed.client.security-loader": None}):
        cluster = _Cluster()
        offer_security(cluster, [address, None])
        assert dask.config.get("distributed.client.security-loader") == SECURITY_LOADER
        assert security_for_address({"address": address}) is cluster.security
        assert security_for_address({"address": "tls://10.0.0.2:8786"}) is None  # not ours
        withdraw_security(cluster)
        assert security_for_address({"address": address}) is None
        offer_security(cluster, [address])
        del cluster  # held weakly: a dropped cluster is forgotten
        gc.collect()
        assert security_for_address({"address": address}) is None
    # A loader of the user's own is left in place.
    with dask.config.set({"distributed.client.security-loader": "their.loader"}):
        offer_security(_Cluster(), [address])
        assert dask.config.get("distributed.client.security-loader") == "their.loader"
