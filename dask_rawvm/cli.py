"""The ``dask-rawvm`` command (also ``dask rawvm`` through distributed's ``dask_cli`` entry point).

Thin over the library: each command parses its options and calls one function.
"""

from __future__ import annotations

import signal
import threading

import click

from dask_rawvm.environment.report import env_command
from dask_rawvm.localcloud import CREDENTIALS, LocalCloud


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
    from dask_rawvm.demo import run_demo

    raise SystemExit(run_demo(workers, maximum, scheduler, echo=click.echo))


@main.command()
@click.option("--port", default=0, show_default=True, help="Port on 127.0.0.1; 0 picks a free one.")
@click.option("--region", default="us-east-1", show_default=True)
@click.option("--boot-delay", default=0.0, show_default=True, help="Seconds a VM stays pending.")
def localcloud(port: int, region: str, boot_delay: float) -> None:
    """Serve the embedded local cloud until interrupted, for clients in other processes."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with LocalCloud(region=region, port=port, boot_delay=boot_delay) as cloud:
        click.echo(f"endpoint: {cloud.endpoint_url}")
        click.echo(f"region: {region}")
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
    import dataclasses

    import yaml

    from dask_rawvm.config import resolve_options

    options = resolve_options(config_name)
    values = {
        f.name.replace("_", "-"): getattr(options, f.name) for f in dataclasses.fields(options)
    }
    click.echo(yaml.safe_dump({"rawvm": {config_name or "(default)": values}}, sort_keys=False))


main.add_command(env_command, "env")

if __name__ == "__main__":
    main()
