"""Rendering haproxy.cfg: a pure function from the config (and the weights) to bytes, then validate and
write atomically.

As in consul-template: the same input always gives the same bytes (no timestamps), the file is validated
with `haproxy -c` before it replaces anything, written to a temp file in the same folder, fsynced and
renamed, and not written at all when nothing changed (so a reload is only needed on a real change).
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.exceptions
import jinja2.sandbox

from sidecar.haproxy.binary import HAProxyNotFound, binary_features, child_environment, find_haproxy

if TYPE_CHECKING:
    from sidecar.config import Config

logger = logging.getLogger(__name__)

TEMPLATE_NAME = "haproxy.cfg.j2"
HOME_WEIGHT = 100
MAX_WEIGHT = 256
CHECK_TIMEOUT = 10.0


class RenderError(Exception):
    """The template could not be rendered, or HAProxy rejected the result (`output` has its words)."""

    def __init__(self, message: str, output: str = "") -> None:
        self.output = output
        super().__init__(f"{message}\n{output}".rstrip() if output else message)


@dataclass(frozen=True)
class RenderResult:
    """`changed`: the file was (or, with check=True, would be) rewritten."""

    changed: bool
    path: Path
    text: str


def builtin_template_path() -> Path:
    """The template shipped with the package: in the wheel (`sidecar/_templates`), else the source tree's."""
    import sidecar

    package = Path(sidecar.__file__).resolve().parent
    for candidate in (package / "_templates" / TEMPLATE_NAME, package.parent / "templates" / TEMPLATE_NAME):
        if candidate.is_file():
            return candidate
    raise RenderError(
        f"built-in template {TEMPLATE_NAME} not found in {package / '_templates'} or "
        f"{package.parent / 'templates'}; reinstall ddb-sidecar or set haproxy.template"
    )


def default_weights(config: Config) -> dict[str, int]:
    """The home region (the first) takes all the traffic, the others none."""
    return {region.name: HOME_WEIGHT if i == 0 else 0 for i, region in enumerate(config.regions)}


def server_weights(config: Config, weights: Mapping[str, int] | None = None) -> dict[str, int]:
    """One weight per region, in the config's order. Regions missing from `weights` get 0."""
    if weights is None:
        return default_weights(config)
    names = [region.name for region in config.regions]
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"weights for unknown regions: {', '.join(unknown)} (regions: {', '.join(names)})")
    out: dict[str, int] = {}
    for name in names:
        weight = weights.get(name, 0)
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= MAX_WEIGHT:
            raise ValueError(f"weight of {name} must be an integer 0-{MAX_WEIGHT}, got {weight!r}")
        out[name] = weight
    return out


def _duration(seconds: float) -> str:
    """Seconds as an HAProxy time: `30s` when whole, else milliseconds (`800ms`)."""
    ms = round(seconds * 1000)
    if ms <= 0:
        raise ValueError(f"duration {seconds!r} s rounds to 0 ms")
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


class _TemplateSandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """Templates are data, not code: Jinja's sandbox (no `__globals__`, no mutation), and no method call
    on anything but plain values (a config object's methods can read the environment: its secrets)."""

    _PLAIN = (str, int, float, bool, list, tuple, dict, type(None))

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if callable(value) and not isinstance(obj, self._PLAIN):
            return False
        return bool(super().is_safe_attribute(obj, attr, value))


def _environment(folder: Path, builtin: Path) -> jinja2.Environment:
    # The template's own folder first, then the built-in one: `{% extends "haproxy.cfg.j2" %}` finds ours
    # (unless the operator's template has that very name, then it is theirs).
    env = _TemplateSandbox(
        loader=jinja2.FileSystemLoader([str(folder), str(builtin)]),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["duration"] = _duration
    return env


def template_path(config: Config) -> Path:
    return config.haproxy.template if config.haproxy.template is not None else builtin_template_path()


def render(
    config: Config, weights: Mapping[str, int] | None = None, features: frozenset[str] = frozenset()
) -> str:
    """haproxy.cfg for `config`, with `weights` per region (default: home 100, others 0), using what the
    HAProxy binary has (`features`, from `binary_features`). Deterministic."""
    path = template_path(config)
    per_server = server_weights(config, weights)
    context: dict[str, Any] = {
        "config": config,
        "haproxy": config.haproxy,
        "health": config.health,
        "regions": config.regions,
        "servers": [
            {"name": region.name, "address": str(region.proxy), "weight": per_server[region.name]}
            for region in config.regions
        ],
        "weights": per_server,
        "prometheus_exporter": "prometheus-exporter" in features,
        "vars": dict(config.haproxy.vars),
    }
    try:
        template = _environment(path.parent, builtin_template_path().parent).get_template(path.name)
        text = template.render(context)
    except jinja2.TemplateSyntaxError as exc:
        raise RenderError(
            f"{exc.filename or path}:{exc.lineno}: template syntax error: {exc.message}"
        ) from exc
    except jinja2.TemplateNotFound as exc:
        raise RenderError(f"template {path} not found") from exc
    except jinja2.exceptions.SecurityError as exc:
        raise RenderError(
            f"template {path}: not allowed in a template: {exc} (templates may read the documented variables, "
            "not call methods or reach Python internals)"
        ) from None
    except (jinja2.UndefinedError, jinja2.TemplateError, ValueError, TypeError) as exc:
        raise RenderError(f"{path}: cannot render: {exc}") from exc
    problems = contract_problems(config, text)
    if problems:
        raise RenderError(
            f"template {path} renders a haproxy.cfg the sidecar cannot drive (nothing written):\n  "
            + "\n  ".join(problems)
        )
    return text


def _sections(text: str) -> list[tuple[str, int, list[tuple[int, str]]]]:
    """(section header, its line number, its lines with numbers), comments and blank lines left out."""
    out: list[tuple[str, int, list[tuple[int, str]]]] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not line.strip():
            continue
        if not line[0].isspace():
            out.append((line.strip(), n, []))
        elif out:
            out[-1][2].append((n, line.strip()))
    return out


def contract_problems(config: Config, text: str) -> list[str]:
    """What the sidecar needs of any haproxy.cfg, each problem with the line to fix (haproxy/README.md):
    the backend `haproxy.backend` with exactly one server per region at its listener address, checked with
    GET /ddb-sidecar/health; the runtime socket at `haproxy.runtime_socket` with level admin; a frontend
    bound on `listen`."""
    problems: list[str] = []
    sections = _sections(text)
    backend = f"backend {config.haproxy.backend}"
    found = [s for s in sections if s[0] == backend]
    if not found:
        problems.append(f"no `{backend}` section: the sidecar sets weights on that backend's servers")
    else:
        _, at, lines = found[0]
        servers = {}
        for n, line in lines:
            words = line.split()
            if words[0] == "server" and len(words) >= 3:
                if words[1] in servers:
                    problems.append(f"line {n}: a second server {words[1]} in `{backend}`")
                servers[words[1]] = (n, words[2])
        for region in config.regions:
            want = str(region.proxy)
            if region.name not in servers:
                problems.append(
                    f"line {at}: `{backend}` has no `server {region.name} {want} ...`; one server per region, "
                    "named after it"
                )
            elif servers[region.name][1] != want:
                n, got = servers[region.name]
                problems.append(f"line {n}: server {region.name} points at {got}; its listener is {want}")
        for extra in sorted(set(servers) - {r.name for r in config.regions}):
            problems.append(f"line {servers[extra][0]}: server {extra} is not a configured region")
        if not any("/ddb-sidecar/health" in line for _, line in lines):
            problems.append(
                f"line {at}: `{backend}` does not check GET /ddb-sidecar/health (http-check send meth GET uri "
                "/ddb-sidecar/health): HAProxy would not see a region the sidecar finds down"
            )
    runtime = str(config.haproxy.runtime_socket)
    sockets = [
        (n, line) for name, _, lines in sections if name == "global" for n, line in lines
        if line.startswith("stats socket ")
    ]  # fmt: skip
    if not any(line.split()[2:3] == [runtime] and "level admin" in line for _, line in sockets):
        problems.append(
            f"global: no `stats socket {runtime} ... level admin`: the sidecar sets weights through it"
        )
    listen = str(config.listen)
    binds = [line for name, _, lines in sections if name.startswith("frontend ") for _, line in lines]
    if not any(line.startswith("bind ") and line.split()[1] == listen for line in binds):
        problems.append(f"no frontend binds {listen} (`listen`): the app's stable address")
    return problems


def check_config(text: str, binary: str, timeout: float = CHECK_TIMEOUT) -> str:
    """Run `haproxy -c` on `text`; return its output (warnings, if any) or raise RenderError.

    `-c` parses everything and resolves server addresses but binds nothing, so socket folders and ports
    need not exist yet.
    """
    with tempfile.TemporaryDirectory(prefix="ddb-sidecar-check-") as folder:
        file = Path(folder) / "haproxy.cfg"
        file.write_text(text, encoding="utf-8")
        try:
            proc = subprocess.run(
                [binary, "-c", "-f", str(file)],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                stdin=subprocess.DEVNULL,
                env=child_environment(),
            )
        except subprocess.TimeoutExpired as exc:
            raise RenderError(f"{binary} -c did not finish within {timeout:g}s") from exc
        except OSError as exc:
            raise RenderError(f"cannot run {binary}: {exc.strerror or exc}") from exc
    output = (proc.stdout + proc.stderr).replace(str(file), "haproxy.cfg").strip()
    if proc.returncode != 0:
        raise RenderError(f"HAProxy ({binary}) rejected the rendered configuration", output)
    return output


def warnings_in(output: str) -> list[str]:
    """The `[WARNING]` lines of HAProxy's output."""
    return [line for line in output.splitlines() if "[WARNING]" in line]


def validate(text: str, binary: str) -> None:
    """Raise RenderError (with HAProxy's output) unless `haproxy -c` accepts `text`; log its warnings."""
    output = check_config(text, binary)
    for line in warnings_in(output):
        logger.warning("haproxy -c: %s", line)


def write_atomic(path: Path, text: str) -> bool:
    """Replace `path` with `text` atomically; False (and no write) when the content is already identical.

    Temp file in the same folder, fsync, rename, fsync the folder: a reader (or HAProxy on reload) sees the
    old file or the new one, never half of one, also after a power cut.
    """
    data = text.encode("utf-8")
    try:
        if path.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o644
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fchmod(out.fileno(), mode)
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return True


def render_to_file(
    config: Config,
    out: Path | None = None,
    weights: Mapping[str, int] | None = None,
    check: bool = False,
    binary: str | None = None,
) -> RenderResult:
    """Render, validate with `haproxy -c`, and write `out` (default `haproxy.config`) when it changed.

    With `check=True` nothing is validated or written: `changed` says whether `out` differs from what
    would be rendered (a drift check for deploy pipelines, which need no HAProxy for it).
    """
    path = out if out is not None else config.haproxy.config
    if binary is None:
        try:
            binary = find_haproxy(config.haproxy.binary)
        except HAProxyNotFound:
            if not check:
                raise
    text = render(config, weights, binary_features(binary) if binary is not None else frozenset())
    if check:
        try:
            current: bytes | None = path.read_bytes()
        except FileNotFoundError:
            current = None
        return RenderResult(changed=current != text.encode("utf-8"), path=path, text=text)
    assert binary is not None
    validate(text, binary)
    return RenderResult(changed=write_atomic(path, text), path=path, text=text)
