"""cloud-init for local VMs: #cloud-config translated to a boot script, and run on a VM."""

from __future__ import annotations

import base64
import gzip
import os
import subprocess
from pathlib import Path

import boto3
import pytest
import yaml
from helpers import wait_for

from dask_rawvm.localcloud import LocalCloud
from dask_rawvm.localcloud.cloudinit import boot_script

# Binary content with every byte a printf format could mistake: NUL, %, \, quotes.
BINARY = b"\x00%s\\n'\"\xff\n" + bytes(range(256))


def cloud_config(config: dict) -> str:
    return "#cloud-config\n" + yaml.safe_dump(config)


def run_script(script: str, tmp_path: Path) -> str:
    """Run a translated script as a VM would, with a ``poweroff`` that only records.

    The PATH is explicit so the fake ``poweroff`` is the only one the script can find.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    poweroff = bin_dir / "poweroff"
    poweroff.write_text("#!/bin/sh\necho powered-off\n")
    poweroff.chmod(0o755)
    path = tmp_path / "user-data"
    path.write_text(script)
    result = subprocess.run(
        ["/bin/sh", str(path)],
        cwd=tmp_path,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=30,
        start_new_session=True,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


POWEROFF = {"power_state": {"mode": "poweroff"}}


def test_shell_scripts_run_unchanged_and_other_user_data_has_nothing_to_run() -> None:
    script = "#!/bin/bash\necho hi\n"
    assert boot_script(script) == script
    assert boot_script("") is None
    assert boot_script("#include\nhttp://127.0.0.1/x\n") is None
    assert boot_script('Content-Type: multipart/mixed; boundary="b"\n') is None


def test_runcmd_strings_and_argv_lists_run_after_bootcmd_and_files(tmp_path: Path) -> None:
    root = tmp_path / "root"
    config = {
        "bootcmd": ["echo boot"],
        "write_files": [{"path": "/etc/app.conf", "content": "from-file\n"}],
        "runcmd": [
            "echo one; cat /etc/app.conf 2>/dev/null || cat " + str(root / "etc/app.conf"),
            ["printf", "%s|", "two words", "$HOME", "it's"],
            "echo",
        ],
        **POWEROFF,
    }
    output = run_script(boot_script(cloud_config(config), root=str(root)) or "", tmp_path)
    assert output.splitlines() == [
        "boot",
        "one",
        "from-file",
        "two words|$HOME|it's|",  # argv lists are quoted: no expansion
        "powered-off",
    ]


def test_write_files_encodings_permissions_append_and_defer(tmp_path: Path) -> None:
    root = tmp_path / "root"
    config = {
        "write_files": [
            {"path": "/opt/plain", "content": "a\n"},
            # Like cloud-init, each entry sets its file's mode (0644 unless it says).
            {"path": "/opt/plain", "content": "b\n", "append": True, "permissions": "0600"},
            {"path": "/opt/b64", "content": base64.b64encode(BINARY).decode(), "encoding": "b64"},
            {
                "path": "/opt/gz",
                "content": base64.b64encode(gzip.compress(BINARY)).decode(),
                "encoding": "gz+b64",
                "permissions": 0o755,  # YAML 1.1 reads an unquoted 0755 as this int
            },
            {"path": "/opt/late", "content": "deferred\n", "defer": True},
        ],
        "runcmd": [f"cat {root}/opt/late"],
        **POWEROFF,
    }
    output = run_script(boot_script(cloud_config(config), root=str(root)) or "", tmp_path)
    assert (root / "opt/plain").read_text() == "a\nb\n"
    assert (root / "opt/plain").stat().st_mode & 0o777 == 0o600
    assert (root / "opt/b64").read_bytes() == BINARY
    assert (root / "opt/gz").read_bytes() == BINARY
    assert (root / "opt/gz").stat().st_mode & 0o777 == 0o755
    assert output.splitlines()[0] == "deferred"  # deferred files are there before runcmd
    assert not Path("/opt/late").exists()


def test_packages_and_other_modules_are_noted_not_run(tmp_path: Path) -> None:
    config = {
        "packages": ["curl", ["docker-ce", "5:24.0"]],
        "package_update": True,
        "groups": ["docker"],
        "runcmd": ["echo ran"],
        **POWEROFF,
    }
    output = run_script(boot_script(cloud_config(config), root=str(tmp_path)) or "", tmp_path)
    lines = output.splitlines()
    assert "packages not installed" in lines[0] and "curl docker-ce 5:24.0" in lines[0]
    assert lines[1].endswith("modules not carried out: groups, package_update")
    assert lines[2:] == ["ran", "powered-off"]


def test_runcmd_runs_once_per_instance_and_bootcmd_every_boot(tmp_path: Path) -> None:
    config = {"bootcmd": ["echo boot"], "runcmd": ["echo run"], **POWEROFF}
    script = boot_script(cloud_config(config), root=str(tmp_path / "root")) or ""
    assert run_script(script, tmp_path).split() == ["boot", "run", "powered-off"]
    assert run_script(script, tmp_path).split() == ["boot", "powered-off"]  # a restart


def test_exit_or_syntax_error_in_one_stage_does_not_skip_the_next(tmp_path: Path) -> None:
    config = {
        "bootcmd": ["exit 3", "echo 'unterminated"],
        "runcmd": ["false", "echo still-ran"],
        **POWEROFF,
    }
    output = run_script(boot_script(cloud_config(config), root=str(tmp_path)) or "", tmp_path)
    assert output.split() == ["still-ran", "powered-off"]


def test_without_power_state_the_vm_stays_up() -> None:
    script = boot_script(cloud_config({"runcmd": ["echo x"]})) or ""
    assert script.rstrip().endswith("while :; do sleep 3600; done")


@pytest.mark.parametrize(
    ("user_data", "reason"),
    [
        ("#cloud-config\nruncmd: echo x\n", "runcmd must be a list"),
        ("#cloud-config\nruncmd: [{a: 1}]\n", "entries must be strings or lists"),
        ("#cloud-config\nwrite_files: [{content: x}]\n", "need a path"),
        ("#cloud-config\n- a list\n", "expected a mapping"),
        ("#cloud-config\nruncmd: [\n", "invalid cloud-config"),
    ],
)
def test_a_broken_cloud_config_is_reported_on_the_console(user_data: str, reason: str) -> None:
    script = boot_script(user_data) or ""
    assert script.startswith("#!/bin/sh\necho 'cloud-init (local cloud): invalid cloud-config")
    assert reason in script
    assert "while :" in script  # cloud-init boots on: the VM is up, running nothing


def test_a_cloud_config_vm_runs_its_runcmd_and_stays_up(cloud: LocalCloud) -> None:
    user_data = cloud_config(
        {
            "packages": ["docker-ce"],
            "write_files": [{"path": "/etc/dask-rawvm-test/marker", "content": "written\n"}],
            "runcmd": ["echo runcmd-ran", ["sh", "-c", "echo argv-ran"]],
        }
    )
    ec2 = boto3.client("ec2", **cloud.client_kwargs())
    response = ec2.run_instances(
        ImageId="ami-12c6146b", MinCount=1, MaxCount=1, InstanceType="t3.micro", UserData=user_data
    )
    instance_id = response["Instances"][0]["InstanceId"]
    wait_for(lambda: "argv-ran" in cloud.console_output(instance_id), 30, "runcmd to run")
    output = cloud.console_output(instance_id)
    assert output.index("packages not installed") < output.index("runcmd-ran")
    vm = cloud.runtime.vms[instance_id]  # type: ignore[union-attr]
    assert (vm.directory / "root/etc/dask-rawvm-test/marker").read_text() == "written\n"
    assert not os.path.exists("/etc/dask-rawvm-test")  # not over this machine's /etc
    state = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
    assert state["State"]["Name"] == "running"  # after runcmd, a VM stays up
