"""A data scientist's first workload, from a fresh venv: ``dask[dataframe]``, pyarrow, s3fs,
an editable package and a loose module next to the notebook, on a default cluster.

The venv is built by the test (uv, from the package index: marked ``network``); the client
runs in it, as a user's notebook would, against the embedded local cloud.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from environment_helpers import needs_pypi, network
from uv import find_uv_bin

REPO = Path(__file__).resolve().parents[2]

CLIENT = textwrap.dedent(
    """
    import json, sys
    import dask
    import pyarrow, s3fs  # imported here: the fidelity check must find them on the VMs
    import rawvm_ds_probe, probe_local
    from dask_rawvm import RawVMCluster
    from dask_rawvm.environment.fidelity import installed_versions

    out = {}
    with RawVMCluster(n_workers=2, death_timeout=30) as cluster:
        client = cluster.get_client()
        client.wait_for_workers(2, timeout=300)
        df = dask.datasets.timeseries(start="2000-01-01", end="2000-01-05", freq="60s")
        by_name = df.groupby("name").x.mean().compute()
        indexed = df.set_index("id").x.sum().compute()
        out["groupby"] = len(by_name)
        out["groupby_here"] = len(df.groupby("name").x.mean().compute(scheduler="sync"))
        out["set_index"] = bool(abs(indexed - df.x.sum().compute(scheduler="sync")) < 1e-6)
        out["local"] = sorted(
            set(client.run(lambda: (__import__("probe_local").VALUE,
                                    __import__("rawvm_ds_probe").VALUE)).values())
        )
        out["workers"] = list(client.run(installed_versions).values())
        out["scheduler"] = client.run_on_scheduler(installed_versions)
    out["here"] = installed_versions()
    try:
        RawVMCluster(n_workers=1, environment_ignore=["pyarrow"], death_timeout=30).close()
        out["ignored"] = "started"
    except Exception as error:
        out["ignored"] = f"{type(error).__name__}: {error}"
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def datascience_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ds")
    venv = root / "venv"
    uv = find_uv_bin()
    subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(venv)], check=True)
    probe = root / "rawvm_ds_probe"
    (probe / "rawvm_ds_probe").mkdir(parents=True)
    (probe / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=64"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "rawvm-ds-probe"\nversion = "0.3"\n'
    )
    (probe / "rawvm_ds_probe" / "__init__.py").write_text('VALUE = "editable"\n')
    install = [uv, "pip", "install", "-q", "--python", str(venv / "bin" / "python")]
    subprocess.run(
        [*install, "-e", str(REPO), "dask[dataframe]", "pyarrow", "s3fs", "-e", str(probe)],
        check=True,
        timeout=900,
    )
    return venv


@network
@needs_pypi
def test_a_dataframe_workload_from_a_fresh_venv(datascience_venv: Path, tmp_path: Path) -> None:
    notebook = tmp_path / "notebook"
    notebook.mkdir()
    (notebook / "probe_local.py").write_text('VALUE = "loose"\n')
    done = subprocess.run(
        [str(datascience_venv / "bin" / "python"), "-c", CLIENT],
        cwd=notebook,
        capture_output=True,
        text=True,
        timeout=900,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-5000:]
    out = json.loads(lines[0].removeprefix("RESULT "))
    assert out["groupby"] == out["groupby_here"] > 0 and out["set_index"]
    assert out["local"] == [["loose", "editable"]]
    here = out["here"]
    for there in [*out["workers"], out["scheduler"]]:
        # Every distribution that has no translation is there at this process's version...
        same = {n: v for n, v in here.items() if there.get(n) == v}
        missing = sorted(set(here) - set(same))
        assert {"pandas", "pyarrow", "s3fs", "dask", "distributed", "rawvm-ds-probe"} <= set(same)
        # ...but dask-rawvm's client side (the local cloud's moto tree), by design.
        assert "moto" in missing and "pandas" not in missing
    # The same venv with pyarrow (imported by the client) left out: the start error names it.
    assert "pyarrow" in out["ignored"] and "environment_check" in out["ignored"], out["ignored"]
