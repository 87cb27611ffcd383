"""The ``dask-rawvm`` command (also ``dask rawvm`` through distributed's ``dask_cli`` entry point).

Thin over the library: each command parses its options and calls one function.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shlex
import signal
import socket
import sys
import threading
import traceback
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any, NoReturn

import botocore.exceptions
import botocore.session
import click
import yaml
from dask.utils import format_bytes
from rich.console import Console
from rich.table import Table

from dask_rawvm.config import resolve_options
from dask_rawvm.demo import run_demo
from dask_rawvm.environment.report import env_command
from dask_rawvm.errors import RawVMError
from dask_rawvm.localcloud import CREDENTIALS, LocalCloud
from dask_rawvm.localcloud.vmimage import IMAGES, ImageName
from dask_rawvm.providers.ec2.account import cluster_logs, list_clusters, remove_clusters
from dask_rawvm.providers.ec2.artifacts import EXPIRY_DAYS, list_artifacts, remove_artifacts
from dask_rawvm.providers.ec2.check import Check, blocked, check_account
from dask_rawvm.providers.ec2.iam import policy_json

#: What the command is called in its messages.
PROG = "dask-rawvm"
#: Exit status of a user error (as click's own for a usage error).
USER_ERROR_STATUS = 2
#: The variables ``dask-rawvm localcloud`` prints and ``ls``/``down``/``logs`` read: the
#: endpoint is botocore's own variable (boto3, the AWS CLI and aiobotocore read it too).
ENDPOINT_VARIABLE = "AWS_ENDPOINT_URL"
REGION_VARIABLE = "AWS_DEFAULT_REGION"
#: How long ``--endpoint-url`` may take to accept a connection before it counts as down:
#: the local cloud accepts in microseconds, and botocore would otherwise retry a refused
#: connection for ~30 s (measured: 5 attempts in standard mode).
ENDPOINT_PROBE_SECONDS = 5.0
_CREDENTIALS_FIX = (
    "set AWS_PROFILE or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or run `aws configure`); "
    "for the local cloud, paste the export lines `dask-rawvm localcloud` prints"
)


class UserError(click.ClickException):
    """Something the user can fix: shown as one line ``dask-rawvm: error: <what>; <fix>``,
    exit status 2, no traceback (the traceback of its cause too with ``--debug``)."""

    exit_code = USER_ERROR_STATUS

    def __init__(self, message: str, cause: BaseException | None = None) -> None:
        super().__init__(" ".join(message.split()))  # one line, whatever the cause said
        self.cause = cause
        self.debug = False

    def show(self, file: Any = None) -> None:
        out = file or sys.stderr
        if self.debug and self.cause is not None:
            traceback.print_exception(self.cause, file=out)
        click.echo(f"{PROG}: error: {self.format_message()}", file=out)


def user_error(error: BaseException) -> UserError | None:
    """The one-line form of an error the user can fix; None for anything unexpected.

    dask-rawvm's own errors (:class:`RawVMError`) name the cause and the fix already;
    botocore's about credentials, regions and endpoints get the fix here. A ProviderError
    whose cause is one of botocore's says that cause's fix.
    """
    cause = error.__cause__ if isinstance(error, RawVMError) else None
    for candidate in (cause, error):
        if isinstance(
            candidate,
            botocore.exceptions.NoCredentialsError | botocore.exceptions.PartialCredentialsError,
        ):
            return UserError(f"no usable AWS credentials ({candidate}); {_CREDENTIALS_FIX}", error)
        if isinstance(candidate, botocore.exceptions.NoRegionError):
            return UserError(f"no AWS region; pass --region or set {REGION_VARIABLE}", error)
        if isinstance(candidate, botocore.exceptions.EndpointConnectionError):
            endpoint = candidate.kwargs.get("endpoint_url", "the endpoint")
            return UserError(_unreachable(str(endpoint), "connection failed"), error)
    if isinstance(error, click.UsageError):
        command = error.ctx.command_path if error.ctx is not None else PROG
        what = error.format_message().rstrip(".")
        return UserError(f"{what}; see `{command} --help`", error)
    if isinstance(error, click.ClickException | RawVMError):
        return UserError(
            str(error.format_message() if isinstance(error, click.ClickException) else error), error
        )
    return None


def _unreachable(endpoint: str, why: str) -> str:
    return (
        f"cannot reach the endpoint {endpoint} ({why}); start it (`dask-rawvm localcloud` "
        f"for the local cloud) or pass the right --endpoint-url (or {ENDPOINT_VARIABLE})"
    )


class _Commands(click.Group):
    """The command group, turning user errors into one line (see :class:`UserError`)."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        debug = "--debug" in args
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.exceptions.Exit:
            raise
        except Exception as e:
            _reraise(e, debug)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.exceptions.Exit:
            raise
        except Exception as e:
            _reraise(e, bool(ctx.params.get("debug")))


def _reraise(error: Exception, debug: bool) -> NoReturn:
    found = error if isinstance(error, UserError) else user_error(error)
    if found is None:
        raise error  # unexpected: its traceback says more than any line could
    found.debug = debug
    raise found from error


@click.group(name="rawvm", cls=_Commands)
@click.option("--debug", is_flag=True, help="Show the traceback of an error, not one line.")
def main(debug: bool) -> None:
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
        click.echo("# in another shell, for dask-rawvm ls/down/logs, boto3 and the AWS CLI:")
        for line in export_lines(cloud.endpoint_url, region):
            click.echo(line)
        click.echo(
            f"use: RawVMCluster(endpoint_url={cloud.endpoint_url!r}, region={region!r})", nl=True
        )
        stop.wait()
    click.echo("local cloud stopped; its VMs are terminated")


def export_lines(endpoint_url: str, region: str) -> list[str]:
    """Shell lines that point another process at a local cloud: its endpoint, region and
    credentials (the local cloud's fixed test keys, no secret)."""
    variables = {
        ENDPOINT_VARIABLE: endpoint_url,
        REGION_VARIABLE: region,
        "AWS_ACCESS_KEY_ID": CREDENTIALS["aws_access_key_id"],
        "AWS_SECRET_ACCESS_KEY": CREDENTIALS["aws_secret_access_key"],
    }
    return [f"export {name}={shlex.quote(value)}" for name, value in variables.items()]


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
            "--endpoint-url",
            default=None,
            envvar=ENDPOINT_VARIABLE,
            help=f"An EC2-compatible endpoint (default: ${ENDPOINT_VARIABLE}); AWS if neither.",
        ),
        click.option(
            "--region",
            default=None,
            envvar=REGION_VARIABLE,
            help=f"AWS region (default: ${REGION_VARIABLE}, then the profile's).",
        ),
    ):
        command = option(command)
    return command


def reachable_cloud(endpoint_url: str | None, region: str | None) -> tuple[str | None, str]:
    """``(endpoint_url, region)`` once a region, credentials and a reachable endpoint are
    there: each missing one is a :class:`UserError` in well under a second, before any call
    botocore would retry (an unreachable endpoint took ~30 s of retries, measured).

    The credentials are found as botocore finds them (variables, profiles, the instance's
    role); the endpoint is ``endpoint_url``, or EC2's of the region when None.
    """
    session = botocore.session.get_session()
    region = region or session.get_config_variable("region")
    if not region:
        raise UserError(
            f"no AWS region; pass --region or set {REGION_VARIABLE} (the local cloud's is in "
            "the export lines `dask-rawvm localcloud` prints)"
        )
    if session.get_credentials() is None:
        raise UserError(f"no AWS credentials found; {_CREDENTIALS_FIX}")
    probe = endpoint_url or f"https://ec2.{region}.amazonaws.com"
    parsed = urllib.parse.urlsplit(probe)
    if not parsed.hostname:
        raise UserError(
            f"--endpoint-url {endpoint_url!r} is not a URL; pass one like http://127.0.0.1:5000"
        )
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    if urllib.request.getproxies().get(parsed.scheme) and not urllib.request.proxy_bypass(
        parsed.hostname
    ):
        return endpoint_url, region  # through a proxy: botocore's first call will tell
    try:
        socket.create_connection((parsed.hostname, port), ENDPOINT_PROBE_SECONDS).close()
    except OSError as e:
        raise UserError(_unreachable(probe, e.strerror or type(e).__name__), e) from e
    return endpoint_url, region


@main.command(name="ls")
@_cloud_options
def ls(endpoint_url: str | None, region: str | None) -> None:
    """List dask-rawvm clusters in a region and the resources each one has.

    What gone clusters left behind (no live machine, their client detached or gone) is
    removed first, and said.
    """
    where = reachable_cloud(endpoint_url, region)
    reaped, clusters = asyncio.run(list_clusters(*where))
    store, artifacts = asyncio.run(list_artifacts(*where))
    for name, resources in sorted(reaped.items()):
        kinds = ", ".join(f"{len(ids)} {kind}" for kind, ids in sorted(resources.items()))
        click.echo(f"{name}: gone; removed its leftovers ({kinds})")
    if not clusters and store is None:
        click.echo("no dask-rawvm resources")
    for name, resources in sorted(clusters.items()):
        kinds = ", ".join(f"{len(ids)} {kind}" for kind, ids in sorted(resources.items()))
        click.echo(f"{name}: {kinds}")
    if store is not None:
        size = format_bytes(sum(a.size for a in artifacts))
        click.echo(
            f"environment artifacts (bucket {store}): {len(artifacts)}, {size}; each expires "
            f"{EXPIRY_DAYS} days after its build, `dask-rawvm down --all` removes them"
        )


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
    where = reachable_cloud(endpoint_url, region)
    removed = asyncio.run(remove_clusters(*where, names or None))
    for name, resources in sorted(removed.items()):
        kinds = ", ".join(f"{len(ids)} {kind}" for kind, ids in sorted(resources.items()))
        click.echo(f"{name}: removed {kinds or 'nothing'}")
    if everything:  # the account's environment artifacts too: nothing of dask-rawvm is left
        store = asyncio.run(remove_artifacts(*where))
        if store is not None:
            click.echo(f"environment artifacts: removed bucket {store}")


@main.command()
@click.argument("name")
@click.argument("machine", required=False)
@_cloud_options
def logs(name: str, machine: str | None, endpoint_url: str | None, region: str | None) -> None:
    """Print the logs of cluster NAME's VMs, running or terminated (or of one: MACHINE is
    `scheduler`, a worker's name or an instance id).

    A running VM's log is its console; a terminated VM's is what it shipped to the
    cluster's bucket when it powered off (its last 1 MiB). Both go with the cluster
    (its close, or `dask-rawvm down`).
    """
    found = asyncio.run(cluster_logs(*reachable_cloud(endpoint_url, region), name, machine))
    for log in found:
        source = "from its console" if log.source == "console" else "shipped when it stopped"
        click.echo(f"===== {log.name} ({log.machine_id}, {log.state}; {source}) =====")
        click.echo(log.text.rstrip("\n") or "(empty)")


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
