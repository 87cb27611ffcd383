"""Every Python example of the README and the docs runs, on the local cloud.

The blocks of one page run in order in one fresh Python process (sharing names, as a
reader running them one after the other would), in an empty directory, so that the
cluster's sweep of "loose modules next to your script" finds nothing of the repository.
Blocks marked ``no-run`` are skipped (see :mod:`doc_examples`). A heavy test: run it
under ``flock /tmp/rawvm-heavy.lock``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from doc_examples import NO_RUN, ROOT, RUNNER, blocks_of, markdown_blocks, pages, rst_blocks

RUNNABLE = [p for p in pages() if any(b.runs for b in blocks_of(p))]

#: A page's blocks start a few local-cloud clusters (15-20 s each on 2 busy cores).
PAGE_TIMEOUT = 150
#: Pages run two at a time: much of a cluster's start is waiting on its VMs, so two
#: overlap well on 2 cores (measured: 8 pages, 9 clusters, in 150 s one at a time).
CONCURRENT_PAGES = 2


@dataclass
class PageRun:
    blocks: int
    returncode: int | None  # None: timed out
    stdout: str
    stderr: str
    seconds: float


def run_page(page: Path, tmp_path: Path) -> PageRun:
    """Run the page's runnable blocks in one fresh process, in an empty directory."""
    blocks = [b for b in blocks_of(page) if b.runs]
    listing = tmp_path / "blocks.json"
    listing.write_text(
        json.dumps(
            [
                {"where": b.where, "path": str(b.path), "line": b.line, "source": b.source}
                for b in blocks
            ]
        )
    )
    workdir = tmp_path / "work"
    workdir.mkdir()
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-c", RUNNER, str(listing)],
        cwd=workdir,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=PAGE_TIMEOUT)
        returncode: int | None = process.returncode
    except subprocess.TimeoutExpired:
        # The whole session: the local cloud's VMs are the examples' process group's.
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        returncode = None
    return PageRun(len(blocks), returncode, stdout, stderr, time.monotonic() - started)


@pytest.fixture(scope="module")
def page_runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[Path, Future[PageRun]]]:
    """Every selected page's run, started at once, CONCURRENT_PAGES at a time."""
    selected = [
        item.callspec.params["page"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_the_examples_of_a_page_run"
    ]
    with ThreadPoolExecutor(CONCURRENT_PAGES) as pool:
        yield {
            page: pool.submit(run_page, page, tmp_path_factory.mktemp(page.stem))
            for page in selected
        }


@pytest.mark.timeout(len(RUNNABLE) * PAGE_TIMEOUT)
@pytest.mark.parametrize("page", RUNNABLE, ids=[str(p.relative_to(ROOT)) for p in RUNNABLE])
def test_the_examples_of_a_page_run(page: Path, page_runs: dict[Path, Future[PageRun]]) -> None:
    run = page_runs[page].result()
    where = page.relative_to(ROOT)
    assert run.returncode is not None, (
        f"{where}'s examples took over {PAGE_TIMEOUT} s:\n{run.stdout}\n{run.stderr[-6000:]}"
    )
    assert run.returncode == 0, (
        f"an example of {where} failed (the last '---' line is the block):\n"
        f"{run.stdout[-4000:]}\n{run.stderr[-6000:]}"
    )
    # Every block ran (a block that exits the process early would skip the rest).
    assert run.stdout.count("--- ") == run.blocks, run.stdout
    print(f"{page.name}: {run.blocks} blocks in {run.seconds:.1f} s")


def test_the_examples_runnable_are_most_of_them() -> None:
    """no-run is for AWS- and SSH-only snippets: most examples run."""
    every = [b for p in pages() for b in blocks_of(p)]
    skipped = [b.where for b in every if not b.runs]
    assert len(every) >= 10
    assert len(skipped) <= len(every) // 2, skipped


def test_blocks_are_found_with_their_markers(tmp_path: Path) -> None:
    markdown = tmp_path / "page.md"
    markdown.write_text(
        "text\n\n```python\nx = 1\n```\n\n```python no-run\naws_only()\n```\n\n```bash\nls\n```\n"
    )
    found = markdown_blocks(markdown)
    assert [(b.line, b.source, b.runs) for b in found] == [
        (4, "x = 1", True),
        (8, "aws_only()", False),
    ]
    rst = tmp_path / "page.rst"
    rst.write_text(
        "Title\n=====\n\n.. code-block:: python\n\n   x = 1\n\n   y = x\n\nafter\n\n"
        f".. code-block:: python\n   :class: {NO_RUN}\n\n   aws_only()\n\n"
        ".. code-block:: console\n\n   $ ls\n"
    )
    found = rst_blocks(rst)
    assert [(b.line, b.source, b.runs) for b in found] == [
        (6, "x = 1\n\ny = x", True),
        (15, "aws_only()", False),
    ]
