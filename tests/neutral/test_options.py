"""One declaration per option: the keywords of RawVMCluster, ClusterOptions' fields, every
section of rawvm.yaml, the numpydoc Parameters and the README's options table are held to
one list (ClusterOptions' fields)."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest
import yaml

import dask_rawvm
from dask_rawvm import RawVMCluster
from dask_rawvm.config import OPTION_NAMES, ClusterOptions, resolve_options, workers_to_wait_for
from dask_rawvm.errors import OptionError

OPTIONS = {f.name for f in dataclasses.fields(ClusterOptions)}
#: Keywords of RawVMCluster that are not options: how many workers, and which section.
NOT_OPTIONS = {"n_workers", "config_name"}
#: SpecCluster's own keywords the README documents too.
SPEC_CLUSTER_KEYWORDS = {"shutdown_on_close"}
PACKAGE = Path(dask_rawvm.__file__).parent


def keywords() -> set[str]:
    parameters = inspect.signature(RawVMCluster).parameters.values()
    return {p.name for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD}


def test_keywords_are_the_options() -> None:
    assert set(OPTION_NAMES) == OPTIONS
    assert keywords() - NOT_OPTIONS == OPTIONS


def test_every_section_of_rawvm_yaml_names_options_and_together_all_of_them() -> None:
    sections = yaml.safe_load((PACKAGE / "rawvm.yaml").read_text())["rawvm"]
    listed: set[str] = set()
    for name, section in sections.items():
        if not isinstance(section, dict):
            continue  # config-name: which section to read
        keys = {key.replace("-", "_") for key in section}
        assert keys <= OPTIONS, f"section {name}: {sorted(keys - OPTIONS)} are not options"
        listed |= keys
    assert listed == OPTIONS, f"in no section: {sorted(OPTIONS - listed)}"


def test_the_docstring_documents_every_keyword() -> None:
    doc = inspect.getdoc(RawVMCluster) or ""
    section = doc.split("Parameters\n----------\n", 1)[1].split("\n\n", 1)[0]
    documented = {
        name.strip()
        for line in section.splitlines()
        if line and not line.startswith(" ")
        for name in line.split(",")
    }
    assert documented == keywords() | {"**kwargs"}


def test_the_readme_table_documents_every_option() -> None:
    readme = (PACKAGE.parent / "README.md").read_text()
    table = readme.split("| option | default | what it does |", 1)[1].split("\n\n", 1)[0]
    documented = {
        name for row in table.splitlines()[2:] for name in re.findall(r"`(\w+)`", row.split("|")[1])
    }
    assert documented == OPTIONS | SPEC_CLUSTER_KEYWORDS


def test_progress_and_launch_window_are_keywords_like_the_rest() -> None:
    # Each is a config key, so each is a keyword (RawVMCluster(progress=False) works).
    assert resolve_options(progress=False, launch_window="20ms").launch_window == 0.02
    assert {"progress", "launch_window"} <= keywords()


def test_wait_for_workers_is_all_none_a_count_or_a_fraction() -> None:
    assert [workers_to_wait_for(v, 10) for v in (True, False, 3, 0.9, 0.05, 1.0)] == [
        10,
        0,
        3,
        9,
        1,
        10,
    ]
    assert resolve_options(wait_for_workers=0.5).wait_for_workers == 0.5
    with pytest.raises(OptionError, match="more than n_workers=2"):
        workers_to_wait_for(3, 2)
    for bad in (-1, 1.5, "all"):
        with pytest.raises(OptionError, match="a count of workers"):
            resolve_options(wait_for_workers=bad)
