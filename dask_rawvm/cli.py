"""The ``dask-rawvm`` command (also ``dask rawvm`` through distributed's ``dask_cli`` entry point).

Thin over the library: each command parses its options and calls one function.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import threading
from collections.abc import Callable

import click
import yaml
from rich.console import Console
from rich.table import Table

from dask_rawvm.config import resolve_options
from dask_rawvm.demo import run_demo
from dask_rawvm.environment.report import env_command
from dask_rawvm.localcloud import CREDENTIALS, LocalCloud
from dask_rawvm.localcloud.vmimage import IMAGES, ImageName
from dask_rawvm.providers.ec2.account import list_clusters, remove_clusters
from dask_rawvm.providers.ec2.check import Check, blocked, check_account
from dask_rawvm.providers.ec2.iam import policy_json


@click.group(name="rawvm")
def main() -> None:
    """Dask clusters on raw VMs: EC2, SSH hosts, or the embedded local cloud."""


@main.command()
@click.option("--workers", default=2, show_default=True, help="Workers to start with.")
@click.option("--maximum", default=5, show_default=True, help="Most workers adapt may reach.")
@click.option(
    "--scheduler",
    type=click.Choice(["vm", "local"]),
    default="vm",
    show_default=True,
    help="Run the scheduler on its own VM or in this process.",
)
def demo(workers: int, maximum: int, scheduler: str) -> None:
    """Run a real cluster on the local cloud: boot, compute, adapt, scale down, tear down."""
    raise SystemExit(run_demo(workers, maximum, scheduler, echo=click.echo))


@main.command()
@click.option("--port", default=0, show_default=True, help="Port on 127.0.0.1; 0 picks a free one.")
@click.option("--region", default="us-east-1", show_default=True)
@click.option("--boot-delay", default=0.0, show_default=True, help="Seconds a VM stays pending.")
@click.option(
    "--image",
    type=click.Choice(IMAGES),
    default="warm",
    show_default=True,
    help="VM image: 'warm' (this machine's environment, fast) or 'bare' (a fresh Amazon Linux).",
)
@click.option(
    "--sized/--unsized",
    default=True,
    show_default=True,
    help="Give each VM its instance type's vCPUs and memory (where cgroups allow).",
)
@click.option(
    "--dense",
    is_flag=True,
    help="Worker VMs as Dask workers in a few host processes: a thousand fit (benchmarks).",
)
@click.option(
    "--dense-hosts",
    type=int,
    default=None,
    help="Host processes of a dense cloud [default: this machine's CPU count].",
)
def localcloud(
    port: int,
    region: str,
    boot_delay: float,
    image: ImageName,
    sized: bool,
    dense: bool,
    dense_hosts: int | None,
) -> None:
    """Serve the embedded local cloud until interrupted, for clients in other processes."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with LocalCloud(
        region=region,
        port=port,
        boot_delay=boot_delay,
        image=image,
        sized=sized,
        dense=dense,
        dense_hosts=dense_hosts,
    ) as cloud:
        click.echo(f"endpoint: {cloud.endpoint_url}")
        click.echo(f"region: {region}")
        isolation = cloud.image.isolation
        click.echo(
            f"image: {image} (python3 {cloud.image.python_version}; "
            f"own view: {'yes' if isolation.own_view else 'no'}; "
            f"sized: {'yes' if isolation.sized else 'no'})"
        )
        for note in isolation.notes:
            click.echo(f"  {note}")
        click.echo(
            f"export AWS_ACCESS_KEY_ID={CREDENTIALS['aws_access_key_id']} "
            f"AWS_SECRET_ACCESS_KEY={CREDENTIALS['aws_secret_access_key']} "
            f"AWS_DEFAULT_REGION={region}"
        )
        click.echo(
            f"use: RawVMCluster(endpoint_url={cloud.endpoint_url!r}, region={region!r})", nl=True
        )
        stop.wait()
    click.echo("local cloud stopped; its VMs are terminated")


@main.command()
@click.option("--config-name", default=None, help="Section of rawvm in dask's config.")
def config(config_name: str | None) -> None:
    """Print the options a RawVMCluster would run with, resolved from dask's config."""
    options = resolve_options(config_name)
    values = {
        f.name.replace("_", "-"): getattr(options, f.name) for f in dataclasses.fields(options)
    }
    click.echo(yaml.safe_dump({"rawvm": {config_name or "(default)": values}}, sort_keys=False))


def _cloud_options(command: Callable[..., None]) -> Callable[..., None]:
    for option in (
        click.option(
            "--endpoint-url", default=None, help="An EC2-compatible endpoint; AWS if not."
        ),
        click.option("--region", default=None, help="AWS region; the default chain's if not."),
    ):
        command = option(command)
    return command


@main.command(name="ls")
@_cloud_options
def ls(endpoint_url: str | None, region: str | None) -> None:
    """List dask-rawvm clusters in a region and the resources each one has.

    What gone clusters left behind (no live machine, their client detached or gone) is
    removed first, and said.
    """
    reaped, clusters = asyncio.run(list_clusters(endpoint_url, region))
    for name, resources in sorted(reaped.items()):
        kinds = ", ".join(f"{len(ids)} {kind}" for kind, ids in sorted(resources.items()))
        click.echo(f"{name}: gone; removed its leftovers ({kinds})")
    if not clusters:
        click.echo("no dask-rawvm resources")
    for name, resources in sorted(clusters.items()):
        kinds = ", ".join(f"{len(ids)} {kind}" for kind, ids in sorted(resources.items()))
        click.echo(f"{name}: {kinds}")


@main.command()
@click.argument("names", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Every dask-rawvm cluster in the region.")
@_cloud_options
def down(
    names: tuple[str, ...], everything: bool, endpoint_url: str | None, region: str | None
) -> None:
    """Terminate and delete everything of the named clusters (even one whose client died)."""
    if not names and not everything:
        raise click.UsageError("name the clusters to take down, or pass --all")
    removed = asyncio.run(remove_clusters(endpoint_url, region, names or None))
    for name, resources in sorted(removed.items()):
        kinds = ", ".join(f"{len(ids)} {kind}" for kind, ids in sorted(resources.items()))
        click.echo(f"{name}: removed {kinds or 'nothing'}")


@main.command(name="iam-policy")
def iam_policy() -> None:
    """Print the IAM policy dask-rawvm needs on EC2 (JSON, for aws iam create-policy)."""
    click.echo(policy_json())


@main.command()
@click.option("--config-name", default="aws", show_default=True, help="Section of rawvm to check.")
@click.option("--workers", default=1, show_default=True, help="Workers the quotas must allow.")
@_cloud_options
def check(config_name: str, workers: int, endpoint_url: str | None, region: str | None) -> None:
    """Check an AWS account before starting a cluster: credentials, region, VPC and subnets,
    vCPU quotas, the spot service-linked role, and a dry-run launch. Exits 1 on a blocker."""
    options = resolve_options(config_name, endpoint_url=endpoint_url, region=region)
    if options.provider != "aws":
        raise click.UsageError(
            f"section rawvm.{config_name} is provider={options.provider!r}: check is for EC2 "
            "(--config-name aws, or a profile of provider aws)"
        )
    rows = asyncio.run(check_account(options, workers))
    _print_checks(rows)
    raise SystemExit(1 if blocked(rows) else 0)


def _print_checks(rows: list[Check]) -> None:
    marks = {"ok": "[green]ok[/]", "warning": "[yellow]warning[/]", "blocker": "[red]blocker[/]"}
    table = Table(title="dask-rawvm check", show_lines=True)
    table.add_column("check", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("what was found, and the fix")
    for row in rows:
        table.add_row(row.name, marks[row.status], row.detail)
    Console(width=max(Console().width, 100)).print(table)


main.add_command(env_command, "env")

if __name__ == "__main__":
    main()
