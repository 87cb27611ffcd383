"""The configuration reference, generated from ``rawvm.yaml`` (no Sphinx here: the tests
import it; ``rawvm_config`` is the directive that renders it in the docs).

``dask_rawvm/rawvm.yaml`` is the one home of every option's default and its one-line
description (the comment after it). This directive reads that file at build time and
renders one table per section (``local``, ``aws``, ``ssh``): the keyword argument, the
YAML key, the default and the description. A comment line above a section becomes the
section's introduction; a description starting with ``...`` continues the option
above it (``worker-memory: null  # ... at least this much memory``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import dask_rawvm

RAWVM_YAML = Path(dask_rawvm.__file__).parent / "rawvm.yaml"

_SECTION = re.compile(r"^  (?P<key>[a-z0-9-]+):\s*$")
_OPTION = re.compile(r"^    (?P<key>[a-z0-9-]+):(?P<value>[^#]*?)\s*(#\s?(?P<doc>.*))?$")
_TOP = re.compile(r"^  (?P<key>[a-z0-9-]+):(?P<value>[^#]*?)\s*(#\s?(?P<doc>.*))?$")
_COMMENT = re.compile(r"^\s*#\s?(?P<text>.*)$")


@dataclass
class Option:
    key: str
    default: Any
    doc: str


@dataclass
class Section:
    name: str
    intro: str
    options: list[Option] = field(default_factory=list)


def read_sections(path: Path = RAWVM_YAML) -> tuple[list[Option], list[Section]]:
    """The top-level keys of ``rawvm`` and each section, with their comments.

    Defaults come from the YAML itself (``yaml.safe_load``), descriptions from the
    comments: a line's text is never parsed as a value.
    """
    text = path.read_text()
    values = yaml.safe_load(text)["rawvm"]
    top: list[Option] = []
    sections: list[Section] = []
    pending: list[str] = []  # comment lines seen since the last key
    for line in text.splitlines():
        comment = _COMMENT.match(line)
        if comment:
            pending.append(comment["text"].strip())
            continue
        section = _SECTION.match(line)
        if section:
            sections.append(Section(section["key"], " ".join(pending)))
            pending = []
            continue
        option = _OPTION.match(line)
        if option and sections:
            current = sections[-1]
            doc = (option["doc"] or "").strip()
            default = values[current.name][option["key"]]
            current.options.append(Option(option["key"], default, doc))
            pending = []
            continue
        top_level = _TOP.match(line)
        if top_level:
            doc = " ".join([*pending, (top_level["doc"] or "").strip()]).strip()
            top.append(Option(top_level["key"], values[top_level["key"]], doc))
        pending = []
    return top, sections


def _default(value: Any) -> str:
    if value is None:
        return "``None``"
    if isinstance(value, bool):
        return f"``{value}``"
    if isinstance(value, str):
        return f'``"{value}"``'
    return f"``{value!r}``"


def _cell(text: str) -> str:
    return text.replace("|", r"\|") if text else ""


def _example_key(section: Section) -> str:
    keys = [o.key for o in section.options]
    return "worker-vm-type" if "worker-vm-type" in keys else keys[-1]


def render(path: Path = RAWVM_YAML) -> list[str]:
    """The reStructuredText of the reference."""
    top, sections = read_sections(path)
    out: list[str] = []
    for option in top:
        out += [f"``rawvm.{option.key}`` (default {_default(option.default)}): {option.doc}", ""]
    for section in sections:
        title = f"Section ``{section.name}``"
        out += [title, "~" * len(title), "", section.intro, ""]
        out += [
            f'``RawVMCluster(config_name="{section.name}")``, or dask config '
            f"``rawvm.{section.name}.*``; as environment variables "
            f"``DASK_RAWVM__{section.name.upper()}__<KEY>`` "
            f"(e.g. ``DASK_RAWVM__{section.name.upper()}__"
            f"{_example_key(section).upper().replace('-', '_')}``).",
            "",
            ".. list-table::",
            "   :header-rows: 1",
            "   :widths: 22 22 16 40",
            "",
            "   * - keyword",
            "     - YAML key",
            "     - default",
            "     - what it does",
        ]
        last_doc = ""
        for option in section.options:
            doc = option.doc
            if doc.startswith("..."):  # continues the option above's sentence
                doc = f"{last_doc.split(':')[0]} {doc[3:].strip()}".strip()
            else:
                last_doc = doc
            out += [
                f"   * - ``{option.key.replace('-', '_')}``",
                f"     - ``{option.key}``",
                f"     - {_default(option.default)}",
                f"     - {_cell(doc)}",
            ]
        out.append("")
    return out
