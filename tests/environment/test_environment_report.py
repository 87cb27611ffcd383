"""``dask-rawvm env``: inventory, decisions with reasons and the lock, nothing launched."""

from __future__ import annotations

import json
from pathlib import Path

import bokeh
import distributed
from click.testing import CliRunner
from environment_helpers import isolated, pure  # noqa: F401  (isolated is a fixture)
from environment_helpers import make_index as make_test_index

from dask_rawvm.environment.report import env_command


def make_index(root: Path) -> Path:
    """The lock tests' index, plus stand-ins for what every VM gets: distributed, bokeh."""
    index = make_test_index(root)
    pure(index, "distributed", distributed.__version__)
    pure(index, "bokeh", bokeh.__version__)
    return index


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(env_command, list(args))
    return result.exit_code, result.output


def test_env_json_for_gpu_arm(tmp_path: Path, isolated: Path) -> None:  # noqa: F811
    index = make_index(tmp_path)
    args = (
        "--arch",
        "aarch64",
        "--gpu",
        "--json",
        "--environment=--no-index",
        f"--environment=--find-links {index}",
        "--environment",
        "onnxruntime==1.0",
        "--environment",
        "mkl==2024.0",
        "--environment",
        "app==1.0",
    )
    code, out = run(*args)
    assert code == 0, out
    report = json.loads(out)
    assert report["target"]["python_platform"] == "aarch64-manylinux_2_34"
    changes = {d["package"]: d for d in report["decisions"] if d["action"] != "keep"}
    assert changes["onnxruntime"]["after"] == "onnxruntime-gpu==1.0"
    assert changes["mkl"]["after"] is None and "x86_64-only" in changes["mkl"]["reason"]
    assert report["lock"]["pins"] == [
        "app==1.0",
        f"bokeh=={bokeh.__version__}",  # what the VMs run, added
        f"distributed=={distributed.__version__}",
        "fastlib==1.0",
        "onnxruntime-gpu==1.0",
    ]
    assert "dask-rawvm" in report["lock"]["local_wheels"]  # its own code, no dependencies
    assert report["lock"]["from_cache"] is False
    _, again = run(*args)
    assert json.loads(again)["lock"]["from_cache"] is True


def test_env_text_shows_reasons_and_masks_credentials(
    tmp_path: Path,
    isolated: Path,  # noqa: F811
) -> None:
    index = make_index(tmp_path)
    req = tmp_path / "requirements.txt"
    req.write_text(
        "--extra-index-url https://bob:hunter2@private.example/simple\n"
        f"--no-index\n--find-links {index}\ncupy==13.0\nhelper==1.0\n"
    )
    code, out = run("--environment", str(req), "--no-lock")
    assert code == 1  # cupy has no CPU build
    assert "hunter2" not in out and "bob:****@private.example" in out
    assert "cupy needs an NVIDIA GPU" in out and "environment_ignore=['cupy']" in out
    code, out = run("--environment", str(req), "--ignore", "cupy")
    assert code == 0, out
    assert "left out by environment_ignore" in out
    assert "Lock: 3 pins (resolved by uv)" in out and "helper==1.0" in out
