"""``.. rawvm-config::``: the configuration reference, generated from ``rawvm.yaml``
(what it says and how: :mod:`rawvm_yaml`)."""

from __future__ import annotations

from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from rawvm_yaml import RAWVM_YAML, render
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective


class RawVMConfig(SphinxDirective):
    """Render the configuration reference from ``rawvm.yaml``."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        self.env.note_dependency(str(RAWVM_YAML))
        container = nodes.section()
        container.document = self.state.document
        lines = StringList(render(), source=str(RAWVM_YAML))
        self.state.nested_parse(lines, self.content_offset, container, match_titles=True)
        return list(container.children)


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("rawvm-config", RawVMConfig)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
