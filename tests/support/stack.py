"""The whole product for tests: `ddb-sidecar run` as a real process, with its own supervised HAProxy.

The sidecar gets its AWS credentials the way an operator's would (environment variables of the process),
its regions are moto processes, and the config is a real sidecar.yaml written to a short temporary folder
(unix socket paths have a 100-byte limit).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import boto3
import yaml
from botocore.config import Config as BotoConfig

from sidecar.adminclient import AdminUnavailable, call_at
from sidecar.config import Address, UnixAddress

from .moto_region import ONE_ATTEMPT, MotoRegion
from .ports import free_port
from .processes import ManagedProcess
from .wait import wait_until

SIDECAR = Path(sys.executable).parent / "ddb-sidecar"
HEALTH_TABLE = "ddb-sidecar-health"
# Quick health settings for tests that are not about failover timing (those use the defaults).
DEFAULT_TEST_HEALTH = {"table": HEALTH_TABLE, "interval": "250ms", "timeout": "400ms", "fall": 2, "rise": 2}


def isolated_aws_env(access_key: str, secret: str, region: str = "us-east-1") -> dict[str, str]:
    """Environment for a process that must see only these credentials, not the machine's AWS config."""
    return {
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": region,
        "AWS_REGION": region,
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class SidecarStack:
    """A sidecar process (with HAProxy as its child) in front of the given regions."""

    def __init__(
        self,
        regions: Sequence[MotoRegion],
        tables: Sequence[str],
        log_dir: str | Path,
        *,
        endpoints: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
        haproxy: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """`extra` replaces or adds top-level config keys; `haproxy` is merged into the haproxy section."""
        self.workdir = Path(tempfile.mkdtemp(prefix="sc"))
        self.listen_port = free_port()
        self.admin_port = free_port()
        self.stats_port = free_port()
        self.region_ports = {r.name: free_port() for r in regions}
        self.regions = list(regions)
        endpoints = endpoints or {}
        self.config: dict[str, Any] = {
            "listen": f"127.0.0.1:{self.listen_port}",
            "regions": [
                {
                    "name": r.name,
                    "endpoint": endpoints.get(r.name, r.endpoint),
                    "proxy": f"127.0.0.1:{self.region_ports[r.name]}",
                }
                for r in regions
            ],
            "tables": list(tables),
            "health": dict(DEFAULT_TEST_HEALTH),
            "haproxy": {"manage": True, "stats": f"127.0.0.1:{self.stats_port}"},
            "admin": f"127.0.0.1:{self.admin_port}",
            "state_dir": "run",
            "logging": {"level": "info"},
        }
        self.config["haproxy"].update(haproxy or {})
        for key, value in (extra or {}).items():
            self.config[key] = value
        self.config_path = self.workdir / "sidecar.yaml"
        self.admin_token: str | None = None  # sent with admin calls when the config sets admin.token_file
        self.write_config()
        creds = regions[0].credentials
        self.env = {
            **base_env(),
            **isolated_aws_env(creds.access_key_id, creds.secret_access_key),
            **(env or {}),
        }
        self.process = ManagedProcess(
            f"sidecar-{self.listen_port}",
            [SIDECAR, "run", "-c", self.config_path],
            log_dir,
            env=self.env,
            cwd=self.workdir,
        )

    def write_config(self, **changes: Any) -> None:
        """Replace top-level keys of the config (none: rewrite it as is) and write the file.

        The running daemon sees the change only on SIGHUP (`signal(signal.SIGHUP)`) or a restart.
        """
        self.config.update(changes)
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))

    @property
    def pid(self) -> int | None:
        """The `ddb-sidecar run` process (HAProxy, when managed, is its child: `status()["haproxy"]["pid"]`)."""
        return self.process.pid

    def signal(self, sig: signal.Signals) -> None:
        """Send `sig` to the sidecar process alone, as an operator's `kill` would (not its process group)."""
        if self.process.pid is None:
            raise RuntimeError("the sidecar was never started")
        os.kill(self.process.pid, sig)

    def wait_exit(self, timeout: float) -> int:
        """Poll until the sidecar process has exited; return its exit code."""
        code: int = wait_until(
            lambda: (self.process.returncode,) if self.process.returncode is not None else None,
            timeout,
            interval=0.05,
            message="the sidecar process to exit",
        )[0]
        return code

    def log_text(self) -> str:
        return self.process.log_path.read_text(encoding="utf-8", errors="replace")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"

    def region_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.region_ports[name]}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self, timeout: float = 30.0) -> SidecarStack:
        self.process.start()
        try:
            wait_until(
                self._ready,
                timeout,
                interval=0.05,
                message="sidecar and HAProxy answering",
                ignore=(OSError,),
            )
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        self.process.check_running()
        status = self.status()
        if status.get("haproxy", {}).get("weights_error"):
            return False
        try:
            with urllib.request.urlopen(f"{self.url}/ddb-sidecar/health", timeout=1.0):
                pass
        except urllib.error.HTTPError as err:
            err.close()  # HAProxy answered on the stable address: any status will do here
        return True

    def wait_regions_up(self, timeout: float = 15.0) -> None:
        def all_up() -> bool:
            return all(r["state"] == "up" for r in self.status()["regions"])

        wait_until(all_up, timeout, message="every region up", ignore=(OSError,))

    @property
    def admin_address(self) -> Address | UnixAddress:
        """Where the admin API listens (the config's `admin`, or its `address`)."""
        admin = self.config.get("admin")
        if isinstance(admin, dict):
            admin = admin.get("address")
        if isinstance(admin, str) and admin.startswith("unix:"):
            path = Path(admin.removeprefix("unix:"))
            return UnixAddress(path if path.is_absolute() else self.workdir / path)
        return Address("127.0.0.1", self.admin_port)

    def status(self) -> dict[str, Any]:
        """GET /status, as the CLI does (never through an http_proxy of the test's environment)."""
        try:
            code, data = call_at(self.admin_address, self.admin_token, "GET", "/status", timeout=2.0)
        except AdminUnavailable as exc:
            raise ConnectionError(str(exc)) from None
        if code != 200:
            raise ConnectionError(f"GET /status answered {code}: {data}")
        return dict(data)

    def metrics(self) -> str:
        with _NO_PROXY.open(f"{self.admin_url}/metrics", timeout=2.0) as resp:
            return str(resp.read().decode())

    def cli(
        self, *args: str, env: Mapping[str, str] | None = None, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """`ddb-sidecar ARGS -c <this sidecar's config>`, as an operator on this host would type it."""
        return subprocess.run(
            [str(SIDECAR), *args, "-c", str(self.config_path)],
            capture_output=True, text=True, timeout=timeout, env={**self.env, **(env or {})}, check=False,
        )  # fmt: skip

    def client(self, url: str | None = None, region: str = "us-east-1", **config: Any) -> Any:
        """A boto3 DynamoDB client of the app: any credentials, pointed at the stable address."""
        return boto3.session.Session().client(
            "dynamodb",
            endpoint_url=url or self.url,
            region_name=region,
            aws_access_key_id=config.pop("access_key", "AKIAAPPEXAMPLE000001"),
            aws_secret_access_key=config.pop("secret_key", "app-secret-not-used-upstream"),
            config=BotoConfig(retries=config.pop("retries", ONE_ATTEMPT), **config),
        )

    def stop(self, remove_workdir: bool = True) -> int | None:
        """Stop the sidecar (SIGTERM, SIGKILL after 10 s); return its exit code (None: never started).

        `remove_workdir=False` keeps the config, HAProxy's config and sockets (for an HAProxy that is not
        the sidecar's own and outlives it); remove `workdir` yourself then.
        """
        code = self.process.stop(timeout=10.0)
        if remove_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return code

    def __enter__(self) -> SidecarStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def ensure_table(region: MotoRegion, name: str, sk: str | None = None) -> None:
    """Create `name` (string keys `pk`, optional `sk`) in `region` unless it exists already."""
    if name not in region.client().list_tables()["TableNames"]:
        region.create_table(name, sk=sk)


def new_app_table(regions: Iterable[MotoRegion], prefix: str, sk: str | None = None) -> str:
    """A fresh app table `PREFIX-xxxxxxxx` in every region, and the sidecar's health table beside it."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    for region in regions:
        ensure_table(region, name, sk=sk)
        ensure_table(region, HEALTH_TABLE)
    return name


def pid_alive(pid: int) -> bool:
    """True while `pid` is a live process (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            # pid (comm) state ...; comm may contain spaces and parentheses: the state follows the last ')'.
            state = stat.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def base_env() -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV")
    return {k: v for k, v in os.environ.items() if k in keep}


def raw_post(
    url: str, body: bytes, headers: Mapping[str, str], timeout: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    """POST without any SDK: for malformed requests an SDK would refuse to send."""
    request = urllib.request.Request(url, data=body, method="POST", headers=dict(headers))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.headers, err.read()


def offline_config(tmp_path: Path, **extra: Any) -> Path:
    """A sidecar.yaml for the CLI alone (render, validate): free loopback ports, files under `tmp_path`;
    `extra` replaces top-level keys, or is merged into a section given as a mapping."""
    data: dict[str, Any] = {
        "listen": f"127.0.0.1:{free_port()}",
        "regions": [
            {"name": "us-east-1", "proxy": f"127.0.0.1:{free_port()}"},
            {"name": "eu-west-1", "proxy": f"127.0.0.1:{free_port()}"},
        ],
        "tables": ["orders"],
        "state_dir": str(tmp_path / "state"),
        "haproxy": {"config": str(tmp_path / "haproxy.cfg"), "runtime_socket": str(tmp_path / "rt.sock")},
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def stream_tables(regions: Iterable[MotoRegion], prefix: str) -> tuple[str, str]:
    """A fresh app table and health table, with streams (replication reads them), in every region."""
    suffix = uuid.uuid4().hex[:8]
    app, health = f"{prefix}-app-{suffix}", f"{prefix}-health-{suffix}"
    for region in regions:
        region.create_table(app, stream=True)
        region.create_table(health, stream=True)
    return app, health
