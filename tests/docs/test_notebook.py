"""The cluster in a notebook: a real notebook, executed by a real kernel (nbclient), shows
the cluster's card in distributed's widget, and the widget follows the cluster.

A heavy test (a local-cloud cluster in the kernel): run it under
``flock /tmp/rawvm-heavy.lock``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from xml.etree import ElementTree

import nbformat
import pytest
from nbclient import NotebookClient

from dask_rawvm import LocalCloud, RawVMCluster

CELLS = [
    # distributed refreshes its cluster widget every cluster-repr-interval (500 ms by
    # default); faster here so the test's wait below is short.
    """import dask
from dask_rawvm import RawVMCluster

dask.config.set({"distributed.deploy.cluster-repr-interval": "100ms"})
cluster = RawVMCluster(n_workers=1, max_hourly_cost=5.0)
cluster""",
    """client = cluster.get_client()
cluster.scale(2)
client.wait_for_workers(2, timeout=90)""",
    # The widget shown above is refreshed by distributed's periodic callback on the
    # cluster's event loop: wait (with a deadline) until it shows the second worker.
    """import time

status = cluster._cached_widget.children[0]
deadline = time.monotonic() + 30
while "2 connected" not in status.value and time.monotonic() < deadline:
    time.sleep(0.1)
print("widget shows:", "2 connected" if "2 connected" in status.value else status.value)""",
    "cluster.close()",
]


@pytest.mark.timeout(240)
def test_a_notebook_shows_the_cluster_live(tmp_path: Path, monkeypatch) -> None:
    # A kernel of this very environment, whatever kernels the machine has installed.
    kernels = tmp_path / "jupyter" / "kernels" / "rawvm-test"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "dask-rawvm test",
                "language": "python",
            }
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    workdir = tmp_path / "work"  # next to the notebook: nothing for the local-code sweep
    workdir.mkdir()

    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(source) for source in CELLS]
    client = NotebookClient(
        notebook,
        kernel_name="rawvm-test",
        timeout=150,
        resources={"metadata": {"path": str(workdir)}},
        store_widget_state=True,
    )
    client.execute()
    nbformat.write(notebook, tmp_path / "shown.ipynb")  # to look at when this fails

    first = notebook.cells[0]
    # The cell's outputs: start-up progress while the cluster started, then the cluster.
    shown = [
        o for o in first.outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})
    ]
    # ipywidgets is installed: distributed's widget, with the card as its HTML fallback.
    assert len(shown) == 1, first.outputs
    card = shown[0]["data"]["text/html"]
    assert ElementTree.fromstring(card) is not None  # well-formed, as distributed's card is
    for field in [
        "RawVMCluster",
        "Dashboard:",
        "/status",  # the dashboard link
        "Worker states:</strong> 1 connected",
        "1 x t3.large on-demand in us-east-1",
        "/h now",
        "spent",
        "Spent by market and type:</strong> on-demand t3.large $",  # cost_report()
        "Environment:</strong> scheduler VMs: x86_64 cpu",
        "worker VMs: x86_64 cpu",
        "Workers by state",
        "<td>worker-0</td><td>connected</td><td>t3.large</td><td>on-demand</td>",
    ]:
        assert field in card, f"{field!r} not in the notebook's cluster card:\n{card}"

    # The widget followed the cluster after it was shown: the kernel's model of it (what
    # ipywidgets syncs to the page) has the second worker. (nbclient stores only the
    # first state: later updates come from the cluster's event loop thread, under the
    # first cell's message, which nbclient no longer listens to; Jupyter takes them all.)
    assert "widget shows: 2 connected" in notebook.cells[2].outputs[0]["text"]
    state = notebook.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    values = [m["state"].get("value", "") for m in state.values() if m["model_name"] == "HTMLModel"]
    cards = [v for v in values if "Worker states" in v]
    assert cards and "Worker states:</strong> 1 connected" in cards[0]  # as first shown
    assert "Limits: max_hourly_cost=$5/h" in "".join(values)  # the Scaling tab


def test_the_card_says_where_each_worker_is(quiet_cloud: LocalCloud) -> None:
    """Booting (launched, not connected) and waiting for capacity, on a cloud whose VMs
    never boot and that has capacity for two workers only."""
    quiet_cloud.set_capacity(count=2)
    with RawVMCluster(
        n_workers=2,
        endpoint_url=quiet_cloud.endpoint_url,
        region=quiet_cloud.region,
        scheduler="local",
        wait_for_workers=False,
        capacity_retry_timeout="1 minute",
    ) as cluster:
        cluster.sync(cluster._correct_state)
        cluster.scale(3)
        cluster.sync(cluster._correct_state)
        states = cluster.workers_by_state()
        assert states["booting"] == ["worker-0", "worker-1"]
        assert states["waiting for capacity"] == ["worker-2"]
        assert states["connected"] == []
        card = cluster._repr_html_()
        assert ElementTree.fromstring(card) is not None
        assert "Worker states:</strong> 2 booting, 1 waiting for capacity" in card
        assert "<td>worker-2</td><td>waiting for capacity</td><td></td>" in card
        assert "Environment:</strong> worker VMs: x86_64 cpu, Python" in card
