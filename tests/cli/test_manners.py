"""``dask-rawvm`` as a user meets it: every mistake is one line (what is wrong; the fix) and
exit status 2, a traceback only with ``--debug``; ``localcloud`` prints the variables another
shell needs, and ``ls`` reads them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import run_cli

#: Variables that would let a command find a region, credentials or an endpoint.
_CLOUD_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
)


def bare_environment(tmp_path: Path, **variables: str) -> dict[str, str]:
    """This environment without any AWS settings: no profile files, no instance role (the
    instance metadata service is never asked: no traffic off this machine)."""
    env = {k: v for k, v in os.environ.items() if k not in _CLOUD_VARIABLES}
    env.update(
        HOME=str(tmp_path),
        AWS_CONFIG_FILE=str(tmp_path / "no-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
        COLUMNS="300",
    )
    env.update(variables)
    return env


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env=env)


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port bound but not listening: connecting to it is refused at once."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield held.getsockname()[1]


KEYS = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}
CASES = {
    "unknown config section": (["config", "--config-name", "nosuch"], {}, "'rawvm.nosuch'"),
    "ls without a region": (["ls"], KEYS, "no AWS region; pass --region or set"),
    "down --all without credentials": (
        ["down", "--all", "--region", "us-east-1"],
        {},
        "no AWS credentials found; set AWS_PROFILE",
    ),
    "unreachable endpoint": (
        ["ls", "--region", "us-east-1", "--endpoint-url", "http://127.0.0.1:{port}"],
        KEYS,
        "cannot reach the endpoint http://127.0.0.1:{port} (Connection refused); start it",
    ),
    "unknown option": (["ls", "--bogus"], {}, "No such option '--bogus'; see `"),
    "unknown command": (["nosuch"], {}, "No such command 'nosuch'; see `"),
    "down without names": (["down"], KEYS, "name the clusters to take down, or pass --all;"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_user_error_is_one_line_and_status_2(case: str, tmp_path, refused_port) -> None:
    args, variables, expected = CASES[case]
    args = [a.format(port=refused_port) for a in args]
    started = time.monotonic()
    result = run(*args, env=bare_environment(tmp_path, **variables))
    took = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dask-rawvm: error: "), lines[0]
    assert expected.format(port=refused_port) in lines[0]
    assert "; " in lines[0]  # what is wrong; the fix
    # No retries of a call that cannot succeed (down --all without credentials tried AWS
    # for 22 s): the import alone takes ~3 s on a loaded 2-core machine.
    assert took < 30, f"{case} took {took:.0f} s"


def test_debug_shows_the_traceback_then_the_line(tmp_path) -> None:
    result = run("--debug", "config", "--config-name", "nosuch", env=bare_environment(tmp_path))
    assert result.returncode == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert "OptionError" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("dask-rawvm: error: no configuration")


def test_localcloud_prints_exports_that_ls_and_down_read(tmp_path) -> None:
    """The export lines, pasted into another shell, are all ``ls`` and ``down`` need."""
    server = subprocess.Popen(
        [sys.executable, "-m", "dask_rawvm.cli", "localcloud", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert server.stdout is not None
        printed = []
        for line in server.stdout:
            printed.append(line.rstrip("\n"))
            if line.startswith("use: "):
                break
        exports = [line for line in printed if line.startswith("export ")]
        names = [line.split()[1].split("=")[0] for line in exports]
        assert names == [
            "AWS_ENDPOINT_URL",
            "AWS_DEFAULT_REGION",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
        ]
        endpoint = printed[0].split("endpoint: ")[1]
        assert f"export AWS_ENDPOINT_URL={endpoint}" in exports
        # What a shell makes of the pasted lines.
        shell = subprocess.run(
            ["bash", "-c", "\n".join([*exports, "env"])],
            env=bare_environment(tmp_path),
            capture_output=True,
            text=True,
            check=True,
        )
        pasted = dict(line.split("=", 1) for line in shell.stdout.splitlines() if "=" in line)
        listing = run("ls", env=pasted)
        assert listing.returncode == 0, listing.stderr
        assert listing.stdout.strip() == "no dask-rawvm resources"
        removed = run("down", "--all", env=pasted)
        assert removed.returncode == 0, removed.stderr
        missing = run("logs", "nosuch", env=pasted)
        assert missing.returncode == 2
        assert missing.stderr.startswith(
            "dask-rawvm: error: no cluster 'nosuch' in region us-east-1; "
        )
        assert len(missing.stderr.splitlines()) == 1
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        assert server.wait(timeout=30) == 0, "the local cloud did not stop cleanly"
