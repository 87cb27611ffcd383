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
import subprocess
import sys
import time
from pathlib import Path

import pytest
from doc_examples import NO_RUN, ROOT, RUNNER, blocks_of, markdown_blocks, pages, rst_blocks

RUNNABLE = [p for p in pages() if any(b.runs for b in blocks_of(p))]

#: A page's blocks start a few local-cloud clusters (5-10 s each on 2 busy cores).
PAGE_TIMEOUT = 150


@pytest.mark.timeout(PAGE_TIMEOUT + 30)
@pytest.mark.parametrize("page", RUNNABLE, ids=[str(p.relative_to(ROOT)) for p in RUNNABLE])
def test_the_examples_of_a_page_run(page: Path, tmp_path: Path) -> None:
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
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, "-c", RUNNER, str(listing)],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=PAGE_TIMEOUT,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{page.name}'s examples took over {PAGE_TIMEOUT} s:\n{e.stdout}\n{e.stderr}")
    took = time.monotonic() - started
    assert done.returncode == 0, (
        f"an example of {page.relative_to(ROOT)} failed (the last '---' line is the block):\n"
        f"{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
    )
    # Every block ran (a block that exits the process early would skip the rest).
    assert done.stdout.count("--- ") == len(blocks), done.stdout
    print(f"{page.name}: {len(blocks)} blocks in {took:.1f} s")


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
