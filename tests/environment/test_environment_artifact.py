"""Environment artifacts at the level of the boot script: the environment part of the real
user-data runs in bash, as on a VM (uv, curl, tar), against the local cloud's S3 through
the presigned URLs the account's artifact store hands out. Each "VM" is a directory of its
own (its RAWVM_HOME); the environment is a tiny one from local wheels, so no index is
needed. The whole path on real VMs of the bare image is in tests/cluster/test_bare_image.py.
"""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

import boto3
import pytest

from dask_rawvm.environment import write_wheel
from dask_rawvm.environment.artifact import ArtifactURLs, artifact_key, artifact_settings
from dask_rawvm.environment.bootstrap import EnvironmentRef, _render
from dask_rawvm.environment.bundle import setup_script
from dask_rawvm.environment.lock import uv_binary
from dask_rawvm.localcloud import CREDENTIALS, LocalCloud
from dask_rawvm.providers.ec2.artifacts import ARTIFACT_OBJECT, CLAIM_OBJECT, ArtifactStore
from dask_rawvm.providers.ec2.clients import EC2Clients

DIGEST = "a" * 64
KEY = artifact_key(DIGEST)

# Once the environment is there: wait for a background publish, prove the venv runs.
BODY = 'wait\n"$PYTHON" -c "import distributed, six; print(\'ready\', distributed.X)"\n'


def make_bundle(root: Path, requirements: str = "distributed==0.0\nsix==1.0\n") -> Path:
    """A bundle archive of a tiny environment: a stand-in ``distributed`` and ``six``."""
    bundle = root / "bundle"
    links = bundle / "links"
    links.mkdir(parents=True)
    write_wheel(links, "distributed", "0.0", {"distributed/__init__.py": b"X = 42\n"})
    write_wheel(links, "six", "1.0", {"six.py": b"VERSION = '1.0'\n"})
    (bundle / "requirements.txt").write_text(requirements)
    (bundle / "python-version").write_text("3.11\n")
    (bundle / "setup.sh").write_text(setup_script())
    archive = root / "bundle.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(bundle.rglob("*")):
            tar.add(path, arcname=path.relative_to(bundle).as_posix(), recursive=False)
    return archive


async def artifact_urls(cloud: LocalCloud, **store: float) -> ArtifactURLs:
    clients = await EC2Clients.open(cloud.region, cloud.endpoint_url, credentials())
    try:
        urls = await ArtifactStore(clients, credentials(), **store).urls(KEY)  # type: ignore[arg-type]
    finally:
        await clients.close()
    assert urls is not None
    return urls


def credentials() -> dict[str, str]:
    return dict(CREDENTIALS)


def s3(cloud: LocalCloud):  # type: ignore[no-untyped-def]
    return boto3.client("s3", **cloud.client_kwargs())


def bucket_of(cloud: LocalCloud) -> str:
    (bucket,) = [
        b["Name"] for b in s3(cloud).list_buckets()["Buckets"] if b["Name"].startswith("dask")
    ]
    return bucket


class VM:
    """The environment part of the boot script, running in bash as on a VM."""

    def __init__(self, root: Path, name: str, bundle: Path, urls: ArtifactURLs | None) -> None:
        self.home = root / name
        self.home.mkdir(parents=True)
        artifact_url = None
        if urls is not None:
            settings = self.home / "artifact.env"
            settings.write_text(artifact_settings(urls))
            artifact_url = settings.as_uri()
        ref = EnvironmentRef(
            DIGEST, bundle.as_uri(), uv_url=Path(uv_binary()).as_uri(), uv_key="test",
            artifact_url=artifact_url,
        )  # fmt: skip
        script = _render({}, BODY, ref)
        self.script = self.home / "user-data"
        self.script.write_text(script)
        self.env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.home),
            "RAWVM_HOME": str(self.home / "dask-rawvm"),
            "RAWVM_INSTANCE_ID": f"i-{name}",
            "RAWVM_ADDRESS": "127.0.0.1",
            "RAWVM_POWEROFF": "no",
            "RAWVM_NO_INDEX": "1",  # the bundle's own wheels only
            "UV_CACHE_DIR": str(self.home / "uv-cache"),
            "UV_PYTHON_DOWNLOADS": "never",
            "RAWVM_ARTIFACT_POLL": "0",
        }
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> VM:
        self.process = subprocess.Popen(
            ["bash", str(self.script)],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        return self

    def finish(self, timeout: float = 120) -> tuple[int, str]:
        assert self.process is not None
        output, _ = self.process.communicate(timeout=timeout)
        return self.process.returncode, output

    def run(self) -> tuple[int, str]:
        return self.start().finish()


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return make_bundle(tmp_path)


async def test_one_vm_builds_and_the_other_unpacks_what_it_published(
    cloud: LocalCloud, bundle: Path, tmp_path: Path
) -> None:
    urls = await artifact_urls(cloud)
    first, second = VM(tmp_path, "one", bundle, urls), VM(tmp_path, "two", bundle, urls)
    outputs = [vm.finish() for vm in (first.start(), second.start())]  # racing for the claim
    for code, output in outputs:
        assert code == 0 and "ready 42" in output, output
    builders = [out for _, out in outputs if "building the environment's artifact" in out]
    waiters = [out for _, out in outputs if "another VM builds the environment" in out]
    assert len(builders) == 1 and len(waiters) == 1, outputs
    assert "published the environment's artifact" in builders[0]
    assert "environment unpacked from its artifact" in waiters[0]
    assert "warning" not in builders[0] + waiters[0]
    # The artifact is what the builder published; a third VM, of a later cluster, takes it.
    head = s3(cloud).head_object(Bucket=bucket_of(cloud), Key=f"{KEY}/{ARTIFACT_OBJECT}")
    assert head["ContentType"] == "application/gzip"
    code, output = VM(tmp_path, "three", bundle, await artifact_urls(cloud)).run()
    assert code == 0 and "environment unpacked from its artifact" in output, output
    assert "building the environment" not in output and "another VM builds" not in output
    # The unpacked venv runs from its own place, with the image's Python.
    venv = tmp_path / "three" / "dask-rawvm" / f"venv-{DIGEST}"
    config = (venv / "pyvenv.cfg").read_text()
    assert "relocatable = true" in config and str(tmp_path / "one") not in config


async def test_a_corrupt_artifact_falls_back_to_an_install_with_a_warning(
    cloud: LocalCloud, bundle: Path, tmp_path: Path
) -> None:
    urls = await artifact_urls(cloud)
    # gzip's magic, then garbage: what a truncated or damaged upload looks like.
    s3(cloud).put_object(
        Bucket=bucket_of(cloud),
        Key=f"{KEY}/{ARTIFACT_OBJECT}",
        Body=b"\x1f\x8b\x08\x00" + os.urandom(4096),
        ContentType="application/gzip",
    )
    code, output = VM(tmp_path, "one", bundle, urls).run()
    assert code == 0 and "ready 42" in output, output
    assert "warning: the environment's artifact is corrupt or truncated" in output
    assert "installing the environment from the package index instead" in output
    assert "environment installed" in output


async def test_a_missing_store_falls_back_to_an_install_with_a_warning(
    bundle: Path, tmp_path: Path
) -> None:
    nowhere = "http://127.0.0.1:9/dask-rawvm-env/v1/x"  # the discard port: refused
    urls = ArtifactURLs(get=nowhere, put=nowhere, claim=nowhere)
    code, output = VM(tmp_path, "one", bundle, urls).run()
    assert code == 0 and "ready 42" in output, output
    assert "warning: no artifact of the environment (HTTP 000" in output
    assert "installing it from the package index" in output


async def test_a_failed_build_lets_the_waiting_vms_install_and_the_next_cluster_rebuild(
    cloud: LocalCloud, tmp_path: Path
) -> None:
    broken = make_bundle(tmp_path / "broken", "distributed==0.0\nnot-there==1.0\n")
    urls = await artifact_urls(cloud)
    # A VM that claimed the build and failed: its note in the artifact's place.
    code, output = VM(tmp_path, "builder", broken, urls).run()
    assert code == 1 and "environment install failed" in output, output
    bucket = bucket_of(cloud)
    note = s3(cloud).get_object(Bucket=bucket, Key=f"{KEY}/{ARTIFACT_OBJECT}")
    assert b"building this environment failed on i-builder" in note["Body"].read()
    # A VM that finds the note says why and installs at once (this one can).
    code, output = VM(tmp_path, "other", make_bundle(tmp_path / "ok"), urls).run()
    assert code == 0 and "ready 42" in output, output
    assert "failed build's note: dask-rawvm: building this environment failed" in output
    # The next cluster clears the note and the claim: its VMs build again.
    await artifact_urls(cloud)
    listed = s3(cloud).list_objects_v2(Bucket=bucket).get("Contents", [])
    assert listed == []


async def test_a_dead_builders_claim_is_cleared_by_the_next_cluster(
    cloud: LocalCloud, bundle: Path, tmp_path: Path
) -> None:
    await artifact_urls(cloud)
    bucket = bucket_of(cloud)
    s3(cloud).put_object(Bucket=bucket, Key=f"{KEY}/{CLAIM_OBJECT}", Body=b"i-dead 0\n")
    # A cluster that finds a fresh claim leaves it (its builder may be at work) ...
    await artifact_urls(cloud)
    assert s3(cloud).list_objects_v2(Bucket=bucket)["KeyCount"] == 1
    # ... and one that finds it older than a build may take clears it, and builds.
    urls = await artifact_urls(cloud, stale_claim_seconds=0)
    assert s3(cloud).list_objects_v2(Bucket=bucket)["KeyCount"] == 0
    code, output = VM(tmp_path, "one", bundle, urls).run()
    assert code == 0 and "building the environment's artifact" in output, output


async def test_the_store_is_one_tagged_bucket_of_the_account_with_an_expiry_rule(
    cloud: LocalCloud,
) -> None:
    await artifact_urls(cloud)
    await artifact_urls(cloud)  # a second cluster: the same bucket
    bucket = bucket_of(cloud)
    assert bucket == f"dask-rawvm-env-{cloud.account_id}-{cloud.region}"
    tags = s3(cloud).get_bucket_tagging(Bucket=bucket)["TagSet"]
    assert {"Key": "dask-rawvm:store", "Value": "environment-artifacts"} in tags
    (rule,) = s3(cloud).get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    assert rule["Status"] == "Enabled" and rule["Expiration"]["Days"] == 30
