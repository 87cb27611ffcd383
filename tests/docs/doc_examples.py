"""The Python code blocks of the README and the docs, as the examples test runs them.

A block is every ```` ```python ```` fence of a Markdown file and every
``.. code-block:: python`` (or ``.. code::``, ``.. sourcecode::``) of a reStructuredText
file. A block marked ``no-run`` (Markdown: ```` ```python no-run ````; reST: the
``:class: no-run`` option, which the docs' stylesheet shows as "not run by the docs'
test") is listed but not run: for AWS-only or SSH-only snippets. docs/contributing.rst
documents the marker.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NO_RUN = "no-run"

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+|~~~+)\s*(?P<info>[^`]*)$")
_DIRECTIVE = re.compile(r"^(?P<indent> *)\.\. (code-block|code|sourcecode)::\s*(?P<lang>\S*)\s*$")
_OPTION = re.compile(r"^\s+:(?P<name>[\w-]+):\s*(?P<value>.*)$")


@dataclass(frozen=True)
class Block:
    """One code block: where it is (file and first line of code), its code, and its marker."""

    path: Path
    line: int  # 1-based line of the block's first line of code
    source: str
    runs: bool

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def markdown_blocks(path: Path) -> list[Block]:
    """The ```python fences of a Markdown file."""
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        words = opening["info"].split()
        fence, start = opening["fence"], i + 1
        end = start
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        if words and words[0] in {"python", "py", "python3"}:
            source = textwrap.dedent("\n".join(lines[start:end]))
            blocks.append(Block(path, start + 1, source, NO_RUN not in words[1:]))
        i = end + 1
    return blocks


def rst_blocks(path: Path) -> list[Block]:
    """The ``.. code-block:: python`` directives of a reStructuredText file."""
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        directive = _DIRECTIVE.match(lines[i])
        if not directive or directive["lang"] not in {"python", "py", "python3"}:
            i += 1
            continue
        indent = len(directive["indent"])
        classes: list[str] = []
        j = i + 1
        while j < len(lines) and (option := _OPTION.match(lines[j])):
            if option["name"] == "class":
                classes += option["value"].split()
            j += 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        start = j
        while j < len(lines) and (
            not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent
        ):
            j += 1
        while j > start and not lines[j - 1].strip():
            j -= 1
        source = textwrap.dedent("\n".join(lines[start:j]))
        if source.strip():  # (a directive quoted in a literal block has no code)
            blocks.append(Block(path, start + 1, source, NO_RUN not in classes))
        i = j
    return blocks


def pages() -> list[Path]:
    """The README and every page of the docs."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.rst"))]


def blocks_of(path: Path) -> list[Block]:
    return markdown_blocks(path) if path.suffix == ".md" else rst_blocks(path)


#: Runs the blocks of one page, in order, in one namespace; a block's code keeps its own
#: file name and line numbers, so a traceback points into the page.
RUNNER = """
import json, sys
namespace = {"__name__": "__main__"}
for block in json.load(open(sys.argv[1])):
    print(f"--- {block['where']}", flush=True)
    code = "\\n" * (block["line"] - 1) + block["source"]
    exec(compile(code, block["path"], "exec"), namespace)
"""
