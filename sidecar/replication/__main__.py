"""`python -m sidecar.replication -c sidecar.yaml [--source REGION]`: the stream replicator on its own.

For running replication without the proxy (a separate host, a one-off catch-up) and for the tests that
SIGKILL it mid-stream. The source defaults to the active region persisted by the daemon in `state_dir`,
else the home region. SIGTERM/SIGINT stop it at a clean point (checkpoints written); exit 0. Every
`--status-every` seconds it logs one line of counters.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys

from sidecar.config import Config, ConfigError, load_config
from sidecar.logs import setup_logging
from sidecar.replication.streams import StreamReplicator

logger = logging.getLogger("sidecar.replication")


def default_source(config: Config) -> str:
    from sidecar.failover import STATE_FILE, load_state

    state, _ = load_state(config.state_dir / STATE_FILE, move_aside=False)
    names = [r.name for r in config.regions]
    return state.active if state is not None and state.active in names else names[0]


async def run(config: Config, source: str, status_every: float) -> None:
    replicator = StreamReplicator(lambda: config, None, config.state_dir, source_region=source)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await replicator.start()
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), status_every)
            except TimeoutError:
                status = replicator.status()
                status.pop("pipelines")
                logger.info("replication status: %s", json.dumps(status))
    finally:
        await replicator.stop()
    logger.info(
        "replication stopped: %s",
        json.dumps({k: v for k, v in replicator.status().items() if k != "pipelines"}),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sidecar.replication", description=__doc__.split("\n")[0])
    parser.add_argument(
        "-c", "--config", default=None, help="sidecar.yaml (default: $DDB_SIDECAR_CONFIG or ./sidecar.yaml)"
    )
    parser.add_argument(
        "--source", default=None, help="the region to read streams from (default: the active one)"
    )
    parser.add_argument("--status-every", type=float, default=10.0, help="seconds between status lines")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, check_environment=False)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{exc.source}: {problem}", file=sys.stderr)
        return 2
    setup_logging(config.logging.level, config.logging.format)
    source = args.source or default_source(config)
    if source not in [r.name for r in config.regions]:
        print(f"--source {source}: not a region of {args.config or 'the config'}", file=sys.stderr)
        return 2
    asyncio.run(run(config, source, args.status_every))
    return 0


if __name__ == "__main__":
    sys.exit(main())
