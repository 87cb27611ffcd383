"""What the docs promise to cover, held to the code: every error class has a troubleshooting
entry, every option a description in rawvm.yaml (whence the configuration reference is
generated), every option of RawVMCluster a row there."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import sys
from pathlib import Path

import dask_rawvm
from dask_rawvm.config import OPTION_NAMES
from dask_rawvm.errors import RawVMError

DOCS = Path(__file__).resolve().parents[2] / "docs"
sys.path.insert(0, str(DOCS / "_ext"))

import rawvm_yaml  # noqa: E402  (the docs' own generator, from docs/_ext)


def error_classes() -> set[type[RawVMError]]:
    """Every RawVMError subclass defined in the package (each module imported)."""
    for module in pkgutil.walk_packages(dask_rawvm.__path__, "dask_rawvm."):
        importlib.import_module(module.name)
    found: set[type[RawVMError]] = set()
    pending: list[type[RawVMError]] = [RawVMError]
    while pending:
        cls = pending.pop()
        if cls.__module__.startswith("dask_rawvm") and cls not in found:
            found.add(cls)
            pending.extend(cls.__subclasses__())
    return found


def test_every_error_has_a_troubleshooting_entry() -> None:
    page = (DOCS / "troubleshooting.rst").read_text()
    missing = sorted(
        f"{cls.__module__}.{cls.__qualname__}"
        for cls in error_classes()
        if not re.search(rf"^\.\. autoexception:: [\w.]*\.{cls.__name__}$", page, re.M)
    )
    assert not missing, f"errors with no entry in docs/troubleshooting.rst: {missing}"
    assert all(inspect.getdoc(cls) for cls in error_classes())


def test_every_option_is_described_in_rawvm_yaml() -> None:
    _, sections = rawvm_yaml.read_sections()
    assert [s.name for s in sections] == ["local", "aws", "ssh"]
    for section in sections:
        undocumented = [o.key for o in section.options if not o.doc]
        assert not undocumented, f"rawvm.{section.name}: no comment for {undocumented}"
    keywords = {o.key.replace("-", "_") for s in sections for o in s.options} | {"config_name"}
    assert set(OPTION_NAMES) <= keywords, set(OPTION_NAMES) - keywords


def test_the_reference_renders_every_option() -> None:
    text = "\n".join(rawvm_yaml.render())
    _, sections = rawvm_yaml.read_sections()
    for section in sections:
        assert f"Section ``{section.name}``" in text
        for option in section.options:
            assert f"``{option.key.replace('-', '_')}``" in text
    # A continued description carries the sentence it continues.
    assert "choose the worker type by need at least this much memory" in text
