"""What is checked before a cluster launches anything: types, images, zones, cost, environment."""

from __future__ import annotations

import logging
import platform

from dask_rawvm.errors import OptionError
from dask_rawvm.machines.limits import Limits
from dask_rawvm.machines.session import ProviderSession
from dask_rawvm.machines.settings import Settings
from dask_rawvm.machines.store import ClusterStore
from dask_rawvm.needs import Needs
from dask_rawvm.providers.base import ImagePythons

logger = logging.getLogger(__name__)


async def preflight(
    session: ProviderSession,
    settings: Settings,
    store: ClusterStore,
    limits: Limits,
    n_workers: int,
) -> None:
    """Raise every problem that can be seen, before any VM is launched.

    Chooses the worker types (:func:`choose_worker_types`), has the provider check each
    role's type, checks the budget for ``n_workers``, and builds and stores each role's
    environment (which may take a resolver run; a second start with the same environment
    reuses the lock).
    """
    await choose_worker_types(session, settings)
    options = settings.options
    roles = {"worker": options.worker_vm_type}
    if options.scheduler == "vm":
        roles["scheduler"] = options.scheduler_vm_type
    provider = session.provider
    await provider.preflight(roles)
    for vm_type in set(roles.values()):
        offered = provider.image_pythons(vm_type)
        if offered is not None and options.environment is not None:
            check_vm_python(platform.python_version(), offered)
    limits.check_budget(n_workers, 0)
    if options.environment is not None:
        targets = {role: provider.target_for(vm_type) for role, vm_type in roles.items()}
        await store.prepare_environments(
            targets,
            options.environment,
            options.environment_ignore,
            options.environment_resolver,
            options.local_code,
        )


def check_vm_python(client: str, offered: ImagePythons) -> None:
    """The VMs' venv needs a Python of this client's minor version (pickled code and Dask
    need it): the image's own or its package repositories', else a download of uv's managed
    Python. Refuse, before launch, an image that can give neither.
    """
    minor = ".".join(client.split(".")[:2])
    if any(v == minor or v.startswith(minor + ".") for v in offered.versions):
        return
    if offered.downloads:
        logger.info(
            "%s has no Python %s: its VMs download uv's managed Python %s (set "
            "UV_PYTHON_INSTALL_MIRROR to serve it from a place of your own)",
            offered.where,
            minor,
            client,
        )
        return
    raise OptionError(
        f"the VMs need Python {minor} (this client runs {client}), but {offered.where} has "
        f"Python {', '.join(offered.versions)} and its VMs cannot download one. Fix: "
        f"{offered.fix or 'use an image with Python ' + minor}, or run the client with "
        f"Python {offered.versions[0]}"
    )


async def choose_worker_types(session: ProviderSession, settings: Settings) -> None:
    """The worker types, best first: named, or the cheapest that meet the needs.

    Every candidate must run the same environment (architecture and accelerator)
    as the first: the workers' environment is built once, for one platform.
    """
    options = settings.options
    provider = session.provider
    needs = (options.worker_cpu, options.worker_memory, options.worker_gpu, options.arm)
    given = Needs.from_options(*needs) if any(need is not None for need in needs) else None
    if options.worker_vm_types:
        # Named types must meet the needs given with them: worker_gpu=1 with types that
        # have no GPU, or arm=True with x86 types, is a contradiction, not a preference.
        candidates = await provider.choose(names=list(options.worker_vm_types), needs=given)
    elif given is not None:
        candidates = await provider.choose(needs=given)
    else:
        return
    target = provider.target_for(candidates[0])
    others = [t for t in candidates if provider.target_for(t) != target]
    if others and options.worker_vm_types:
        raise OptionError(
            f"worker_vm_types mixes platforms: {others} do not run the {target.arch}/"
            f"{target.accelerator} environment of {candidates[0]}; the workers share one "
            "environment, so list types of one architecture (and all GPU or all CPU)"
        )
    candidates = [t for t in candidates if t not in others]
    settings.use_worker_types(candidates)
    logger.info("worker VM types, best first: %s", ", ".join(candidates))
