"""The `ddb-sidecar` command line.

Exit codes (INTERFACE.md): 0 ok, 1 check failed or refused, 2 usage or config error, 3 daemon unreachable.
Commands that change what the daemon does post an intent to its admin API; they never act themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from sidecar.config import CONFIG_ENV, Config, ConfigError, load_config

logger = logging.getLogger("sidecar")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_UNREACHABLE = 0, 1, 2, 3


def config_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "-c",
        "--config",
        "config_path",
        envvar=CONFIG_ENV,
        default="sidecar.yaml",
        show_default=True,
        type=click.Path(dir_okay=False, path_type=Path),
        help=f"Config file (environment {CONFIG_ENV}).",
    )(f)


def _load(path: Path, *, check_environment: bool = True) -> Config:
    try:
        return load_config(path, check_environment=check_environment)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(f"{exc.source}: {problem}", err=True)
        sys.exit(EXIT_CONFIG)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ddb-sidecar")
def main() -> None:
    """Regional failover for DynamoDB clients outside AWS: HAProxy in front, a re-signing sidecar behind."""


@main.command()
@config_option
def validate(config_path: Path) -> None:
    """Check the config; print every problem as `path: message`."""
    config = _load(config_path)
    click.echo(
        f"{config_path}: ok ({len(config.regions)} regions, home {config.home.name}, "
        f"{len(config.tables)} tables, stable address {config.listen})"
    )


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="The report as JSON on stdout.")
def doctor(config_path: Path, as_json: bool) -> None:
    """Preflight this host: config, credentials, clock, tables, permissions, HAProxy, state_dir, etcd."""
    from sidecar.doctor import run_doctor

    report = run_doctor(config_path)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        for line in report.lines():
            click.echo(line)
    sys.exit(1 if report.failed else 0)


@main.command()
@config_option
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Default: haproxy.config."
)
@click.option("--check", is_flag=True, help="Write nothing; exit 1 if the file differs from the rendering.")
@click.option("--stdout", "to_stdout", is_flag=True, help="Validate and print the rendering; write nothing.")
def render(config_path: Path, output: Path | None, check: bool, to_stdout: bool) -> None:
    """Render haproxy.cfg from the template, validate it with `haproxy -c`, write it atomically."""
    from sidecar.engine import active_weights
    from sidecar.haproxy.binary import HAProxyNotFound, binary_features, find_haproxy
    from sidecar.haproxy.render import RenderError, render_to_file, validate
    from sidecar.haproxy.render import render as render_text

    config = _load(config_path, check_environment=False)
    try:
        binary = find_haproxy(config.haproxy.binary)
        if to_stdout:  # for pipelines that diff: the same checks, nothing written
            text = render_text(config, active_weights(config), binary_features(binary))
            validate(text, binary)
            click.echo(text, nl=False)
            return
        result = render_to_file(
            config, out=output, weights=active_weights(config), check=check, binary=binary
        )
    except HAProxyNotFound as exc:
        click.echo(f"render: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    except RenderError as exc:
        click.echo(f"render: the rendered config is invalid, nothing written:\n{exc}", err=True)
        sys.exit(EXIT_FAILED)
    if check:
        if result.changed:
            click.echo(f"{result.path}: differs from the rendering (run `ddb-sidecar render` to update)")
            sys.exit(EXIT_FAILED)
        click.echo(f"{result.path}: up to date")
    else:
        click.echo(f"{result.path}: {'written' if result.changed else 'unchanged'}")


@main.command()
@config_option
def run(config_path: Path) -> None:
    """Run the daemon: region listeners, probes, HAProxy (when managed), the admin API."""
    from sidecar.logs import setup_logging

    config = _load(config_path)
    setup_logging(config.logging.level, config.logging.format)
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.Runner()
    with runner:
        sys.exit(runner.run(_run(config, config_path)))


async def _run(config: Config, config_path: Path) -> int:
    from sidecar.admin import start_admin
    from sidecar.engine import Daemon
    from sidecar.haproxy.binary import HAProxyNotFound
    from sidecar.haproxy.process import HAProxyError
    from sidecar.haproxy.render import RenderError
    from sidecar.proxy.credentials import CredentialsUnavailable

    config.state_dir.mkdir(parents=True, exist_ok=True)
    daemon = Daemon(config, config_path=config_path)
    loop = asyncio.get_running_loop()
    try:
        await daemon.start()
    except (CredentialsUnavailable, HAProxyNotFound) as exc:
        logger.error("cannot start: %s", exc)
        return EXIT_CONFIG
    except RenderError as exc:
        logger.error("cannot start: the rendered HAProxy config is invalid: %s", exc)
        return EXIT_CONFIG
    except HAProxyError as exc:
        logger.error("cannot start: HAProxy did not start: %s", exc)
        return EXIT_FAILED
    except OSError as exc:
        logger.error("cannot start: %s", exc)
        return EXIT_FAILED
    admin = await start_admin(daemon)

    def reload() -> None:
        try:
            daemon.reload_config_file(only_if_changed=False)
        except ConfigError as exc:
            logger.error("SIGHUP: config not reloaded, keeping the running one: %s", "; ".join(exc.problems))

    loop.add_signal_handler(signal.SIGTERM, daemon.request_stop)
    loop.add_signal_handler(signal.SIGINT, daemon.request_stop)
    loop.add_signal_handler(signal.SIGHUP, reload)
    logger.info("ddb-sidecar running: stable address %s, admin %s", config.listen, config.admin)
    await daemon.stopped.wait()
    logger.info("stopping: draining in-flight requests")
    daemon.stopped.clear()
    await admin.cleanup()
    await daemon.stop()
    return EXIT_OK


def _admin_get(config: Config, path: str, timeout: float = 5.0) -> Any:
    from sidecar.adminclient import AdminUnavailable, call

    try:
        status, doc = call(config, "GET", path, timeout=timeout)
    except AdminUnavailable as exc:
        click.echo(str(exc), err=True)
        sys.exit(EXIT_UNREACHABLE)
    if status != 200:
        click.echo(
            f"the admin API answered {status}: {doc.get('error') or doc.get('reason') or doc}", err=True
        )
        sys.exit(EXIT_UNREACHABLE)
    return doc


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="The raw status document.")
def status(config_path: Path, as_json: bool) -> None:
    """Ask the running daemon: active region, health, weights, lag, mode, recent events."""
    config = _load(config_path, check_environment=False)
    doc = _admin_get(config, "/status")
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(f"active region: {doc.get('active_region') or 'NONE'}    mode: {doc.get('mode')}")
    click.echo(f"{'region':<16}{'state':<9}{'weight':>7}{'latency':>10}  cause")
    for r in doc.get("regions", []):
        latency = f"{r['latency_ms']:.1f}ms" if r.get("latency_ms") is not None else "-"
        weight = "?" if r.get("weight") is None else str(r["weight"])
        click.echo(f"{r['name']:<16}{r['state']:<9}{weight:>7}{latency:>10}  {r.get('cause') or ''}")
        if r.get("last_upstream_error"):
            click.echo(
                f"{'':<16}last upstream error at {r.get('last_upstream_error_at')}: {r['last_upstream_error']}"
            )
    _echo_fleet(doc.get("coordination") or {})
    failover = doc.get("failover") or {}
    if failover.get("reason"):
        click.echo(f"decision: {failover['reason']}")
    if failover.get("hold_until"):
        click.echo(f"automatic moves held down until {failover['hold_until']}")
    if failover.get("alerts"):
        click.echo(f"alerts: {', '.join(failover['alerts'])}")
    hp = doc.get("haproxy", {})
    if hp.get("weights_error"):
        click.echo(f"haproxy: {hp['weights_error']}")
    elif hp.get("weights_confirmed") is False:
        click.echo("haproxy: weights not confirmed yet (the sidecar keeps re-asserting them)")
    lag = doc.get("replication", {}).get("lag_ms")
    click.echo(
        f"replication: {doc.get('replication', {}).get('mode')}, lag {'unknown' if lag is None else f'{lag} ms'}"
    )
    events = doc.get("events", [])[:10]
    if events:
        click.echo("recent events:")
        for e in events:
            click.echo(f"  {e['at']}  {e['kind']:<12} {e['reason']}")


def _echo_fleet(fleet: dict[str, Any]) -> None:
    """The fleet in one glance: the connection, the leader, and which host sees which region how."""
    if fleet.get("backend") in (None, "none"):
        return
    lead = fleet.get("leader") or "none"
    click.echo(
        f"fleet: {fleet.get('state')}, host {fleet.get('host')}, leader {lead}, "
        f"{len(fleet.get('members') or [])} member(s), decision epoch {fleet.get('epoch')} "
        f"(applied here: {fleet.get('applied_epoch')})"
    )
    views: dict[str, dict[str, str]] = fleet.get("views") or {}
    regions = sorted({name for v in views.values() for name in v})
    if views and regions:
        click.echo(f"  {'host':<16}" + "".join(f"{name:<14}" for name in regions))
        for host, seen in views.items():
            mark = "*" if host == lead else " "
            click.echo(f" {mark}{host:<16}" + "".join(f"{seen.get(name) or '-':<14}" for name in regions))
    if fleet.get("isolated"):
        click.echo("  this host alone sees the active region down: it does not move (requests fail fast)")
    for refused in fleet.get("refused_members") or []:
        click.echo(f"  not a voter: {refused['host']} ({refused['differs']})")
    if fleet.get("state") == "lost":
        click.echo(f"  etcd unreachable since {fleet.get('lost_since')}: weights held, no automatic move")


def _admin_post(config: Config, path: str, body: dict[str, Any], timeout: float = 15.0) -> tuple[int, Any]:
    from sidecar.adminclient import AdminUnavailable, call

    try:
        return call(config, "POST", path, body, timeout=timeout)
    except AdminUnavailable as exc:
        click.echo(str(exc), err=True)
        sys.exit(EXIT_UNREACHABLE)


def _report_intent(status: int, doc: Any) -> None:
    if status == 200 and doc.get("ok"):
        click.echo(doc.get("reason", "done"))
        click.echo(f"active region: {doc.get('active_region')}    mode: {doc.get('mode')}")
        if doc.get("epoch") is not None:
            click.echo(f"fleet: decision epoch {doc['epoch']} by leader {doc.get('leader')}")
        if doc.get("warning"):
            click.echo(f"warning: {doc['warning']}", err=True)
        if doc.get("unreplicated"):
            click.echo(f"note: {doc['unreplicated']}")
        if not doc.get("weights_confirmed"):
            click.echo(
                "warning: HAProxy has not confirmed the new weights yet "
                f"({doc.get('weights_error') or 'no read-back yet'}); the sidecar keeps retrying",
                err=True,
            )
        return
    click.echo(f"refused: {doc.get('reason') or doc.get('error') or status}", err=True)
    sys.exit(EXIT_FAILED if status in (409, 200) else EXIT_CONFIG)


@main.command()
@config_option
@click.option("--to", "to", required=True, help="The region to move traffic to.")
@click.option(
    "--local",
    is_flag=True,
    help="With coordination: move this host alone (break-glass while etcd is down); the fleet's decision "
    "wins again when etcd is back.",
)
def failover(config_path: Path, to: str, local: bool) -> None:
    """Move traffic to REGION now (for when the active region is gone); says what may be behind. With
    coordination it moves the whole fleet (from any member)."""
    config = _load(config_path, check_environment=False)
    body: dict[str, Any] = {"to": to}
    if local:
        body["local"] = True
    _report_intent(*_admin_post(config, "/failover", body, timeout=30.0))


@main.command()
@config_option
@click.option("--to", "to", required=True, help="The region to move traffic to.")
def switchover(config_path: Path, to: str) -> None:
    """Planned move with no loss: hold writes, wait for replication to reach REGION, flip, release."""
    config = _load(config_path, check_environment=False)
    timeout = config.failover.switchover_timeout + 20.0
    status, doc = _admin_post(config, "/switchover", {"to": to}, timeout=timeout)
    if status == 200 and doc.get("ok"):
        click.echo(doc.get("reason", "done"))
        if doc.get("pause_ms") is not None:
            click.echo(
                f"writes held {doc['pause_ms']:.0f} ms ({doc.get('held_writes', 0)} held, released to {to}); "
                f"replication lag into {to} was "
                + ("unmeasured" if doc.get("lag_ms") is None else f"{doc['lag_ms']:g} ms")
            )
        for host, held in sorted((doc.get("hosts") or {}).items()):  # a fleet: every member's own fence
            pause = held.get("pause_ms")
            click.echo(
                f"  {host}: writes held "
                + ("?" if pause is None else f"{pause:.0f} ms")
                + f" ({held.get('held', 0)} held)"
            )
        if doc.get("not_reported"):
            click.echo(f"  no pause reported by {', '.join(doc['not_reported'])}")
        click.echo(f"active region: {doc.get('active_region')}    mode: {doc.get('mode')}")
        return
    click.echo(f"refused: {doc.get('reason') or doc.get('error') or status}", err=True)
    sys.exit(EXIT_FAILED if status in (409, 200) else EXIT_CONFIG)


@main.command()
@config_option
def pause(config_path: Path) -> None:
    """Stop automatic decisions (maintenance mode); `failover --to` still works."""
    config = _load(config_path, check_environment=False)
    _report_intent(*_admin_post(config, "/pause", {}))


@main.command()
@config_option
def resume(config_path: Path) -> None:
    """Restart automatic decisions; acts at once on the regions' current health."""
    config = _load(config_path, check_environment=False)
    _report_intent(*_admin_post(config, "/resume", {}))


@main.command()
@config_option
@click.option(
    "--from",
    "source",
    metavar="REGION",
    help="The region taken as right (default: the daemon's active region, else the home region).",
)
@click.option(
    "--to",
    "targets",
    metavar="REGION",
    multiple=True,
    help="The region compared and repaired (repeatable; default: every other region).",
)
@click.option("--table", "tables", metavar="TABLE", multiple=True, help="Repeatable; default: all `tables`.")
@click.option(
    "--segments",
    type=click.IntRange(1, 1_000_000),
    default=None,
    help="Parallel-scan segments (default: from DescribeTable, ~10,000 items / 16 MB per segment).",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0),
    default=1000.0,
    show_default=True,
    help="Items read per second per region (repairs count too); 0: unlimited.",
)
@click.option("--workers", type=click.IntRange(1, 64), default=4, show_default=True, help="Segments at once.")
@click.option("--apply", is_flag=True, help="Repair the target towards the source with conditional writes.")
@click.option(
    "--backup",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="With --apply: append every target item overwritten or deleted to this file (JSON lines).",
)
@click.option(
    "--max-keys", type=click.IntRange(min=0), default=1000, show_default=True, help="Keys listed per kind."
)
@click.option("--json", "as_json", is_flag=True, help="The report as JSON on stdout.")
@click.option(
    "--progress/--no-progress", default=None, help="Progress line on stderr (default: when it is a terminal)."
)
def reconcile(
    config_path: Path,
    source: str | None,
    targets: tuple[str, ...],
    tables: tuple[str, ...],
    segments: int | None,
    rate: float,
    workers: int,
    apply: bool,
    backup: Path | None,
    max_keys: int,
    as_json: bool,
    progress: bool | None,
) -> None:
    """Compare tables between two regions item by item; `--apply` repairs towards the source region.

    Exit 0 when the regions are equal (or every difference was repaired), 1 when differences remain, 2 on a
    usage or config problem, 3 when a region cannot be reached.
    """
    from sidecar.reconcile import Progress, ReconcileError, render_text, run_reconcile

    config = _load(config_path, check_environment=False)
    if backup is not None and not apply:
        click.echo("reconcile: --backup only makes sense with --apply", err=True)
        sys.exit(EXIT_CONFIG)
    show = progress if progress is not None else (not as_json and sys.stderr.isatty())
    try:
        doc = run_reconcile(
            config,
            source=source,
            targets=targets,
            tables=tables,
            progress=Progress(sys.stderr, enabled=show),
            apply=apply,
            rate=rate,
            segments=segments,
            workers=workers,
            max_keys=max_keys,
            backup=backup,
        )
    except ReconcileError as exc:
        click.echo(f"reconcile: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("reconcile: interrupted (repairs already made stay made)", err=True)
        sys.exit(130)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        for line in render_text(doc):
            click.echo(line)
    sys.exit(doc["exit_code"])


@main.command()
@click.option(
    "--duration", type=float, default=None, help="Stop after this many seconds (default: until Ctrl-C)."
)
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option(
    "--base-port", type=int, default=18000, show_default=True, help="First of the demo's loopback ports."
)
@click.option(
    "--scenario",
    type=click.Choice(["outage", "replica", "fleet", "drill"]),
    default="outage",
    show_default=True,
    help="outage: the home region goes dark and traffic moves to the other region; "
    "replica: the other region freezes and recovers, unnoticed by the app; "
    "fleet: three hosts on a local etcd, one cut off alone, then the region cut for all; "
    "drill: a full DR drill in streams mode (outage, failover, return, reconcile, switchover home, "
    "check both regions; under a minute, --duration is ignored).",
)
def demo(duration: float | None, workdir: Path | None, base_port: int, scenario: str) -> None:
    """Two local DynamoDB regions, HAProxy, the sidecar and a client, all on loopback, with a scripted outage."""
    with contextlib.suppress(KeyboardInterrupt):
        if scenario == "fleet":
            from sidecar.demo_fleet import run_fleet_demo

            sys.exit(run_fleet_demo(duration, workdir, base_port))
        if scenario == "drill":
            from sidecar.demo_drill import run_drill

            sys.exit(run_drill(workdir, base_port))
        from sidecar.demo import run_demo

        sys.exit(run_demo(duration=duration, workdir=workdir, base_port=base_port, scenario=scenario))
