"""What the environment must be on the target: one rule per known platform difference.

Exact versions never change. What changes is *which distribution* provides a package on the
target (``onnxruntime`` -> ``onnxruntime-gpu``), extras that select a build (``jax[cuda12]``),
build labels that only exist on other indexes (``+cpu``), and packages that cannot exist there
(Windows-only, x86-only). Every change is a :class:`Decision`; everything that cannot be
translated is collected into one :class:`EnvironmentTranslationError`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Literal

from packaging.markers import InvalidMarker, Marker, UndefinedEnvironmentName
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

from dask_rawvm.environment.spec import (
    AGENT,
    EnvironmentSpec,
    IndexConfig,
    LocalCode,
    PackagePin,
    redact_url,
)
from dask_rawvm.environment.target import Target, wheel_fits_target
from dask_rawvm.errors import RawVMError

Action = Literal["keep", "rewrite", "relax", "drop", "add", "note"]


@dataclass(frozen=True)
class Decision:
    """One translation step: ``package`` went from ``before`` to ``after`` because ``reason``.

    ``after`` is None when the package is dropped. ``"relax"``: the same pin, installed only
    where the target's packages need it (a constraint, not a requirement).
    """

    package: str
    action: Action
    before: str | None
    after: str | None
    reason: str

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return asdict(self)


@dataclass(frozen=True)
class Problem:
    """A package that cannot be installed on the target, why, and what the user can do."""

    package: str
    reason: str
    fix: str

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return asdict(self)


class EnvironmentTranslationError(RawVMError, ValueError):
    """The environment cannot be reproduced on the target; raised before any VM launches.

    Attributes
    ----------
    problems : list of Problem
        Each package, why, and the fix.
    target : Target
    """

    def __init__(self, problems: Sequence[Problem], target: Target, detail: str = "") -> None:
        self.problems = list(problems)
        self.target = target
        lines = [f"The environment cannot be installed on {target.describe()} VMs:"]
        for problem in self.problems:
            lines.append(f"  - {problem.package}: {problem.reason}\n    fix: {problem.fix}")
        names = sorted({p.package for p in self.problems if not p.package.startswith("(")})
        if names:
            lines.append(f"To leave them all out: environment_ignore={names!r}.")
        lines.append("Nothing was launched.")
        if detail:
            lines.append(detail)
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class Expected:
    """What a VM should have of one distribution of the source environment.

    Parameters
    ----------
    name, version
        The distribution there (``onnxruntime`` here may be ``onnxruntime-gpu`` there) and
        its version (None: any).
    present
        False for a package left out by design (``reason`` says why).
    ignored
        Left out by the user's ``environment_ignore``.
    optional
        Installed only where a package needs it: its absence is no difference.
    """

    name: str
    version: str | None
    present: bool = True
    reason: str = ""
    ignored: bool = False
    optional: bool = False


@dataclass(frozen=True)
class Translation:
    """The environment as it must be on the target, ready to lock.

    Parameters
    ----------
    spec : EnvironmentSpec
        The source.
    target : Target
    requirements : tuple of str
        PEP 508 requirements installed on the target, markers already evaluated for it: the
        roots, or for an installed environment every distribution (the fidelity rule).
    constraints : tuple of str
        Pins of dependencies: the same version is used where the target needs the package;
        and exclusions (``torch!=2.13.0+cpu``) of builds a translation moved away from.
    dependencies : tuple of str
        Names among ``requirements`` installed here only as another package's dependency:
        the lock leaves such a package to the resolver (same version if the target needs it)
        when it has no wheel for the target, rather than failing.
    local_code : tuple of LocalCode
        Local code to build into wheels.
    index : IndexConfig
    decisions : tuple of Decision
        Every package's fate, changes first.
    problems : tuple of Problem
        Non-empty only with ``strict=False``.
    """

    spec: EnvironmentSpec
    target: Target
    requirements: tuple[str, ...]
    constraints: tuple[str, ...]
    local_code: tuple[LocalCode, ...]
    index: IndexConfig
    decisions: tuple[Decision, ...]
    problems: tuple[Problem, ...] = ()
    dependencies: tuple[str, ...] = ()

    def expected_versions(self) -> dict[str, Expected]:
        """What a VM should have of a distribution where it may differ from the source's.

        A distribution without an entry is expected at the version this process has (the
        fidelity rule). Entries: what a translation rule rewrote (``onnxruntime`` ->
        ``onnxruntime-gpu``, ``torch 2.13.0+cpu`` -> ``2.13.0``), relaxed (there only where
        needed), or left out; and local code, whose wheel version is its own.
        """
        expected: dict[str, Expected] = {}
        local = {code.name: code for code in self.local_code}
        for decision in self.decisions:
            if decision.package in ("python", "index") or decision.package in local:
                continue
            if decision.after is None:
                ignored = decision.reason == IGNORED_REASON
                expected[decision.package] = Expected(
                    decision.package, None, False, decision.reason, ignored
                )
            elif decision.action == "rewrite":
                expected[decision.package] = Expected(*_name_and_version(decision.after))
            elif decision.action == "relax":
                name, version = _name_and_version(decision.after)
                expected[decision.package] = Expected(name, version, optional=True)
        for code in local.values():
            # Loose modules get a content-hash version of their own: only their presence counts.
            version = code.version if code.kind in ("project", "agent") else None
            expected[code.name] = Expected(code.name, version)
        return expected

    def changes(self) -> list[Decision]:
        """Decisions other than "keep"."""
        return [d for d in self.decisions if d.action != "keep"]

    def raise_for_problems(self) -> None:
        """Raise :class:`EnvironmentTranslationError` if anything could not be translated."""
        if self.problems:
            raise EnvironmentTranslationError(self.problems, self.target)


# --------------------------------------------------------------------------------------------
# Tables (why each entry is here is said once, above the table)
# --------------------------------------------------------------------------------------------

#: Packages that exist for one operating system only; on Linux VMs nothing imports them
#: (their users guard the import by platform), so they are dropped.
OS_ONLY: dict[str, str] = {
    "pywin32": "Windows",
    "pywin32-ctypes": "Windows",
    "pywinpty": "Windows",
    "wmi": "Windows",
    "comtypes": "Windows",
    "windows-curses": "Windows",
    "pyreadline3": "Windows",
    "winkerberos": "Windows",
    "pypiwin32": "Windows",
    "appnope": "macOS",
    "macfsevents": "macOS",
}
_OS_ONLY_PREFIXES = {"pyobjc": "macOS"}

#: Intel runtime libraries published for x86_64 only. Nothing imports them directly; the
#: packages that link them (numpy/scipy/torch from PyPI) use other BLAS/threading on aarch64.
X86_ONLY_RUNTIME = frozenset(
    {
        "intel-openmp",
        "tbb",
        "tbb-devel",
        "tcmlib",
        "umf",
        "impi-rt",
        "dpcpp-cpp-rt",
        "intel-cmplr-lib-rt",
        "intel-cmplr-lib-ur",
        "intel-cmplr-lic-rt",
        "intel-sycl-rt",
        "intel-opencl-rt",
        "oneccl-bind-pt",
    }
)
_X86_ONLY_RUNTIME_PREFIXES = ("mkl", "onemkl-")

#: Libraries users import that exist for x86_64 only: dropping them would break their code.
X86_ONLY_LIBRARIES = frozenset(
    {
        "scikit-learn-intelex",
        "daal4py",
        "daal",
        "intel-extension-for-pytorch",
        "intel-extension-for-tensorflow",
        "dpctl",
        "dpnp",
        "numba-dpex",
    }
)

#: CPU distribution -> CUDA distribution of the same project and version.
CPU_TO_CUDA: dict[str, str] = {
    "onnxruntime": "onnxruntime-gpu",
    "tensorflow-cpu": "tensorflow",
    "xgboost-cpu": "xgboost",
    "tensorflow-gpu": "tensorflow",
}
#: CUDA distribution -> CPU distribution, where a CPU build exists.
CUDA_TO_CPU: dict[str, str] = {"onnxruntime-gpu": "onnxruntime", "tensorflow-gpu": "tensorflow"}

#: Local version labels that name a build variant (PyTorch's indexes: +cpu, +cu121, +rocm6.1,
#: +xpu). PyPI has no local versions; its Linux torch wheels are CUDA builds.
_BUILD_LABEL = re.compile(r"^(cpu|cuda\d*|cu\d+|rocm[\d.]*|xpu)$")
_RAPIDS = re.compile(r"^(?P<base>.+)-cu(?P<major>\d+)$")
_CUPY = re.compile(r"^cupy(-cuda(?P<major>\d+)x)?$")
_JAX_PLUGIN = re.compile(r"^jax-cuda(?P<major>\d+)-(?P<kind>plugin|pjrt)$")
_NVIDIA = re.compile(r"^nvidia-.+-cu(?P<major>\d+)$")
#: NVIDIA's CUDA runtime libraries on PyPI (``nvidia-cublas``, ``nvidia-cudnn-cu12``,
#: ``cuda-toolkit``, ``cuda-bindings``...): what a CUDA build of torch or jax pulls in.
_CUDA_RUNTIME = re.compile(r"^(nvidia-.+|cuda-(toolkit|bindings|pathfinder|python|runtime))$")
#: A package index that serves CPU builds only (PyTorch's ``.../whl/cpu``).
_CPU_INDEX = re.compile(r"/cpu/?$")

_IGNORE_FIX = "environment_ignore=[{name!r}] if the workers do not import it"


# --------------------------------------------------------------------------------------------
# Translation
# --------------------------------------------------------------------------------------------


@dataclass
class _Outcome:
    """A rule's verdict: a rewritten pin, a drop, or a problem."""

    pin: PackagePin | None
    reason: str
    problem: Problem | None = None
    relax: bool = False  # install only where the target's packages need it
    exclude: str | None = None  # a build the resolver must not pick instead (``!=X+cpu``)


Rule = Callable[[PackagePin, Target, EnvironmentSpec], "_Outcome | None"]


def translate_environment(
    spec: EnvironmentSpec,
    target: Target,
    *,
    extra: Iterable[PackagePin | LocalCode] = (),
    strict: bool = True,
) -> Translation:
    """Translate ``spec`` for ``target``, recording every decision.

    Parameters
    ----------
    spec : EnvironmentSpec
        From :func:`~dask_rawvm.environment.inventory.resolve_environment_spec`.
    target : Target
        The VMs' platform.
    extra : iterable of PackagePin or LocalCode
        Packages the VM needs whatever the user's environment says (e.g. ``distributed``),
        added (as roots) when ``spec`` does not already have them.
    strict : bool
        Raise :class:`EnvironmentTranslationError` for untranslatable packages (default);
        False returns them in ``Translation.problems`` (for ``dask-rawvm env``).

    Returns
    -------
    Translation
    """
    decisions: list[Decision] = []
    problems: list[Problem] = []
    spec = _with_extra(spec, extra, decisions)
    decisions += [
        Decision(p.name, "drop", p.requirement(), None, CLIENT_SIDE_REASON)
        for p in spec.client_side
    ]
    requirements: list[str] = []
    constraints: list[str] = []
    dependencies: list[str] = []
    for pin in spec.packages:
        translated = _translate_pin(pin, target, spec, decisions, problems)
        if translated is None:
            continue
        result, relax, exclusions = translated
        constraints += exclusions
        text = result.requirement(with_marker=False)
        if relax or not (result.root or spec.complete):
            constraints.append(text)
            continue
        requirements.append(text)
        if not result.root:
            dependencies.append(result.name)
    local = _translate_local(spec, target, decisions, problems)
    _python_decision(spec, target, decisions)
    index = _index_for(spec.index, target, decisions)
    translation = Translation(
        spec=spec,
        target=target,
        requirements=tuple(sorted(set(requirements))),
        constraints=tuple(sorted(set(constraints) - set(requirements))),
        local_code=tuple(local),
        index=index,
        decisions=tuple(sorted(decisions, key=lambda d: (d.action == "keep", d.package))),
        problems=tuple(problems),
        dependencies=tuple(sorted(set(dependencies))),
    )
    if strict:
        translation.raise_for_problems()
    return translation


#: Why a package the user named in ``environment_ignore`` is not shipped.
IGNORED_REASON = "left out by environment_ignore"
#: Why dask-rawvm's client-side dependencies are not shipped.
CLIENT_SIDE_REASON = (
    "installed only for dask-rawvm's client side (the local cloud, the CLI): not needed on VMs"
)


def _with_extra(
    spec: EnvironmentSpec, extra: Iterable[PackagePin | LocalCode], decisions: list[Decision]
) -> EnvironmentSpec:
    # dask-rawvm itself always ships as its agent wheel (no dependencies), whatever form the
    # environment names it in: its dependencies would bring the local cloud to every VM.
    items = list(extra)
    agent = [item for item in items if item.name == AGENT]
    names = spec.names() - {AGENT}
    pins = [p for p in spec.packages if p.name != AGENT]
    local = [c for c in spec.local_code if c.name != AGENT]
    for item in items:
        if item.name in names:
            continue
        if isinstance(item, LocalCode):
            local.append(item)
            after = f"{item.name} (local {item.kind})"
        else:
            pins.append(replace(item, root=True))
            after = item.requirement()
        reason = AGENT_REASON if agent and item is agent[0] else "needed by the Dask worker"
        decisions.append(Decision(item.name, "add", None, after, reason))
    return replace(spec, packages=tuple(pins), local_code=tuple(local))


#: Why dask-rawvm is shipped the way it is.
AGENT_REASON = "dask-rawvm's own code, for the VMs: its package files, without its dependencies"


def _translate_pin(
    pin: PackagePin,
    target: Target,
    spec: EnvironmentSpec,
    decisions: list[Decision],
    problems: list[Problem],
) -> tuple[PackagePin, bool, list[str]] | None:
    """The pin on the target, whether only as a constraint, and builds to exclude."""
    before = pin.requirement()
    current: PackagePin | None = pin
    reasons: list[str] = []
    relax = False
    exclusions: list[str] = []
    for rule in _RULES:
        assert current is not None
        outcome = rule(current, target, spec)
        if outcome is None:
            continue
        reasons.append(outcome.reason)
        if outcome.problem is not None:
            problems.append(outcome.problem)
            decisions.append(Decision(pin.name, "drop", before, None, outcome.reason))
            return None
        current = outcome.pin
        if current is None:
            decisions.append(Decision(pin.name, "drop", before, None, outcome.reason))
            return None
        relax = relax or outcome.relax
        exclusions += [outcome.exclude] if outcome.exclude else []
    assert current is not None
    after = current.requirement()
    if after == before and not reasons:
        decisions.append(Decision(pin.name, "keep", before, after, _keep_reason(pin, spec)))
    else:
        action: Action = "relax" if relax and after == before else "rewrite"
        decisions.append(Decision(pin.name, action, before, after, "; ".join(reasons)))
    return current, relax, exclusions


def _keep_reason(pin: PackagePin, spec: EnvironmentSpec) -> str:
    if pin.root or spec.complete:
        return "same version on the target"
    return "dependency: same version if the target needs it"


def _name_and_version(requirement: str) -> tuple[str, str | None]:
    """``"torch==2.13.0"`` -> ``("torch", "2.13.0")``; ``"x @ url"`` -> ``("x", None)``."""
    try:
        req = Requirement(requirement.split(" (local ")[0])
    except InvalidRequirement:
        return canonicalize_name(requirement.split()[0]), None
    pinned = [s.version for s in req.specifier if s.operator in ("==", "===")]
    return canonicalize_name(req.name), pinned[0] if pinned else None


def _rule_ignore(pin: PackagePin, target: Target, spec: EnvironmentSpec) -> _Outcome | None:
    if pin.name in spec.ignore or (pin.conda_name and pin.conda_name in spec.ignore):
        return _Outcome(None, IGNORED_REASON)
    return None


def _rule_marker(pin: PackagePin, target: Target, spec: EnvironmentSpec) -> _Outcome | None:
    if not pin.marker:
        return None
    try:
        applies = Marker(pin.marker).evaluate({**target.marker_environment(), "extra": ""})
    except (InvalidMarker, UndefinedEnvironmentName):
        return None
    if applies:
        return None  # requirements are written without markers once evaluated
    return _Outcome(None, f"marker `{pin.marker}` is false on {target.describe()}")


def _rule_os_only(pin: PackagePin, target: Target, spec: EnvironmentSpec) -> _Outcome | None:
    system = OS_ONLY.get(pin.name) or next(
        (s for prefix, s in _OS_ONLY_PREFIXES.items() if pin.name.startswith(prefix)), None
    )
    if system is None:
        return None
    return _Outcome(None, f"{system}-only package, not used on Linux VMs")


def _rule_arch(pin: PackagePin, target: Target, spec: EnvironmentSpec) -> _Outcome | None:
    if target.arch == "x86_64":
        return None
    if pin.name in X86_ONLY_RUNTIME or pin.name.startswith(_X86_ONLY_RUNTIME_PREFIXES):
        return _Outcome(
            None,
            f"x86_64-only Intel runtime library; not needed on {target.arch} "
            "(PyPI builds there use OpenBLAS/OpenMP)",
        )
    if pin.name in X86_ONLY_LIBRARIES:
        reason = f"published for x86_64 only; there is no {target.arch} build"
        fix = f"{_IGNORE_FIX.format(name=pin.name)}, or an x86_64 instance type (arm=False)"
        return _Outcome(None, reason, Problem(pin.name, reason, fix))
    return None


def _rule_conda(pin: PackagePin, target: Target, spec: EnvironmentSpec) -> _Outcome | None:
    if pin.source != "conda":
        return None
    if not pin.python:
        # No PyPI counterpart: it leaves the PyPI requirements, and the conda step
        # (dask_rawvm.environment.conda) solves it for the target and installs it on the VMs.
        return _Outcome(
            None,
            f"conda package {pin.conda_name} has no Python code: installed on the VMs from its "
            f"conda channel, solved for {target.describe()} (py-rattler), not from PyPI",
        )
    renamed = f" as {pin.name}" if pin.name != pin.conda_name else ""
    return _Outcome(
        replace(pin, source="index"),
        f"conda package {pin.conda_name} installed from PyPI{renamed}, same version "
        "(conda channels are not used for the VMs)",
    )


def _rule_accelerator(pin: PackagePin, target: Target, spec: EnvironmentSpec) -> _Outcome | None:
    if target.accelerator == "cuda":
        return _to_cuda(pin, target.cuda_major or 12)
    return _to_cpu(pin)


def _to_cuda(pin: PackagePin, major: int) -> _Outcome | None:
    name = pin.name
    if name in CPU_TO_CUDA:
        new = CPU_TO_CUDA[name]
        extras = {"and-cuda"} if new == "tensorflow" else set()
        return _Outcome(
            replace(pin, name=new, extras=tuple(sorted(set(pin.extras) | extras))),
            f"{name} is the CPU build; {new} is the CUDA build of the same version",
        )
    if name == "tensorflow" and "and-cuda" not in pin.extras:
        return _Outcome(
            replace(pin, extras=tuple(sorted({*pin.extras, "and-cuda"}))),
            "tensorflow[and-cuda] brings the CUDA libraries TensorFlow needs on a GPU",
        )
    if name == "jax":
        extras = {e for e in pin.extras if not re.fullmatch(r"cuda\d+(-local)?", e)}
        new_extras = tuple(sorted(extras | {f"cuda{major}"}))
        if new_extras == tuple(sorted(pin.extras)):
            return None
        return _Outcome(
            replace(pin, extras=new_extras), f"jax[cuda{major}] is jax for CUDA {major}"
        )
    return _cuda_major_rename(pin, major)


def _cuda_major_rename(pin: PackagePin, major: int) -> _Outcome | None:
    name = pin.name
    cupy = _CUPY.match(name)
    if cupy:
        new = f"cupy-cuda{major}x"
        if new == name:
            return None
        return _Outcome(replace(pin, name=new), f"{new} is the CuPy wheel for CUDA {major}")
    plugin = _JAX_PLUGIN.match(name)
    nvidia = _NVIDIA.match(name)
    if nvidia and int(nvidia["major"]) != major:
        return _Outcome(None, f"CUDA {nvidia['major']} library; the resolver picks CUDA {major}'s")
    if plugin and int(plugin["major"]) != major:
        new = f"jax-cuda{major}-{plugin['kind']}"
        return _Outcome(replace(pin, name=new), f"{new} is the JAX plugin for CUDA {major}")
    rapids = _RAPIDS.match(name)
    if rapids and not nvidia and int(rapids["major"]) != major:
        new = f"{rapids['base']}-cu{major}"
        return _Outcome(replace(pin, name=new), f"{new} is the CUDA {major} build")
    return None


def _to_cpu(pin: PackagePin) -> _Outcome | None:
    name = pin.name
    if name in CUDA_TO_CPU:
        new = CUDA_TO_CPU[name]
        return _Outcome(replace(pin, name=new), f"{new} is the CPU build of {name}")
    cuda_extras = {e for e in pin.extras if re.fullmatch(r"cuda\d*(-local)?|and-cuda", e)}
    if name in ("jax", "tensorflow") and cuda_extras:
        return _Outcome(
            replace(pin, extras=tuple(sorted(set(pin.extras) - cuda_extras))),
            f"CPU target: {name} without the CUDA extra {sorted(cuda_extras)}",
        )
    if _JAX_PLUGIN.match(name):
        return _Outcome(None, "JAX CUDA plugin, not used on a CPU target")
    if _CUPY.match(name) or (_RAPIDS.match(name) and not _NVIDIA.match(name)):
        reason = f"{name} needs an NVIDIA GPU and has no CPU build"
        fix = f"{_IGNORE_FIX.format(name=name)}, or a GPU instance type (gpu=True)"
        return _Outcome(None, reason, Problem(name, reason, fix))
    if _CUDA_RUNTIME.match(name) and not pin.root:
        return _Outcome(
            pin,
            "CUDA runtime library on a CPU target: same version, where a package needs it",
            relax=True,
        )
    return None


def _rule_local_label(pin: PackagePin, target: Target, spec: EnvironmentSpec) -> _Outcome | None:
    version = pin.version
    if not version or "+" not in version:
        return None
    public, _, label = version.partition("+")
    if not _BUILD_LABEL.match(label):
        return None  # e.g. a company build on a private index: keep as is
    wanted = "cpu" if target.accelerator == "cpu" else f"cu{target.cuda_major}"
    if label.startswith(wanted):
        # The same build: from the user's indexes, or its wheel travels in the bundle (the
        # lock falls back to the public build of this version when neither has it).
        return None
    note = (
        "PyPI's Linux wheels are CUDA builds"
        if target.accelerator == "cuda"
        else "PyPI's build runs on CPU"
    )
    # PEP 440: ``==2.13.0`` matches ``2.13.0+cpu`` too, and a resolver that can see the
    # +cpu wheel (a CPU index, a find-links directory) picks it: exclude that build.
    return _Outcome(
        replace(pin, specifier=f"=={public}"),
        f"local label +{label} names another build; {note}, same version (+{label} excluded)",
        exclude=f"{pin.name}!={version}",
    )


_RULES: tuple[Rule, ...] = (
    _rule_ignore,
    _rule_marker,
    _rule_os_only,
    _rule_arch,
    _rule_conda,
    _rule_accelerator,
    _rule_local_label,
    _rule_ignore,  # again: the user may name the translated package (onnxruntime-gpu)
)


# --------------------------------------------------------------------------------------------
# Local code, Python version, indexes
# --------------------------------------------------------------------------------------------


def _translate_local(
    spec: EnvironmentSpec, target: Target, decisions: list[Decision], problems: list[Problem]
) -> list[LocalCode]:
    kept = []
    for code in spec.local_code:
        label = f"{code.name} ({code.kind} {code.path})"
        if code.name in spec.ignore:
            decisions.append(Decision(code.name, "drop", label, None, IGNORED_REASON))
            continue
        problem = _wheel_problem(code, target) if code.kind == "wheel" else None
        if problem is not None:
            problems.append(problem)
            decisions.append(Decision(code.name, "drop", label, None, problem.reason))
            continue
        reason = {
            "agent": AGENT_REASON,
            "project": "local project: built into a wheel and shipped",
            "modules": f"loose modules {', '.join(code.modules)}: packed into a wheel and shipped",
            "wheel": "local wheel: shipped as is",
        }[code.kind]
        decisions.append(Decision(code.name, "keep", label, label, reason))
        kept.append(code)
    return kept


def _wheel_problem(code: LocalCode, target: Target) -> Problem | None:
    try:
        parse_wheel_filename(code.path.rsplit("/", 1)[-1])
    except ValueError:
        return Problem(code.name, f"{code.path} is not a wheel file name", "rebuild the wheel")
    if wheel_fits_target(code.path, target):
        return None
    return Problem(
        code.name,
        f"the local wheel {code.path} is not built for {target.describe()}",
        f"build it for {target.arch}, {_IGNORE_FIX.format(name=code.name)}, "
        "or use matching instance types",
    )


def _python_decision(spec: EnvironmentSpec, target: Target, decisions: list[Decision]) -> None:
    if spec.python_version and spec.python_version != target.python_version:
        decisions.append(
            Decision(
                "python",
                "rewrite",
                spec.python_version,
                target.python_version,
                "the VMs run another Python; the same pins are resolved for it",
            )
        )


def _index_for(index: IndexConfig, target: Target, decisions: list[Decision]) -> IndexConfig:
    """The index configuration to resolve with, and a note for each setting the VMs get
    differently: paths on this machine, and CPU-only indexes for a CUDA target."""
    for url in index.local_locations():
        decisions.append(
            Decision(
                "index",
                "note",
                redact_url(url),
                None,
                "a path on this machine, which VMs cannot read: packages only it has travel "
                "in the bundle",
            )
        )
    if target.accelerator != "cuda":
        return index
    cpu_only = [u for u in (index.index_url or "", *index.extra_index_urls) if _CPU_INDEX.search(u)]
    for url in cpu_only:
        decisions.append(
            Decision(
                "index",
                "drop",
                redact_url(url),
                None,
                "serves CPU builds only; the CUDA target resolves without it",
            )
        )
    return replace(
        index,
        index_url=None if index.index_url in cpu_only else index.index_url,
        extra_index_urls=tuple(u for u in index.extra_index_urls if u not in cpu_only),
    )


def canonical(names: Iterable[str]) -> tuple[str, ...]:
    """Canonical (PEP 503) forms of package names, sorted and unique."""
    return tuple(sorted({canonicalize_name(n) for n in names}))
