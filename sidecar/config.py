"""The sidecar's configuration: models, loading, and validation that reports every problem with its path.

Loading never stops at the first problem: the operator gets the whole list (`regions[1].proxy: port 8101
already used by regions[0].proxy`) so one edit fixes everything. Durations accept `ms`, `s` and `m`;
relative paths are resolved against the config file's folder.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
)

DEFAULT_CONFIG = "sidecar.yaml"
CONFIG_ENV = "DDB_SIDECAR_CONFIG"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0}
_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")
_TABLE = re.compile(r"^[A-Za-z0-9_.-]{3,255}$")
_ACCESS_KEY = re.compile(r"^[A-Z0-9]{16,128}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_duration(value: Any) -> float:
    """`800ms`, `1s`, `2m` (or a bare number of seconds) to seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 800ms, 1s or 2m")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.fullmatch(value)):
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    else:
        raise ValueError(f"malformed duration {value!r}: use a number with ms, s or m, such as 800ms, 1s, 2m")
    if seconds <= 0:
        raise ValueError(f"duration {value!r} must be positive")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


@dataclass(frozen=True, order=True)
class Address:
    """A TCP listening address `host:port`."""

    host: str
    port: int

    @classmethod
    def parse(cls, value: Any) -> Address:
        if isinstance(value, Address):
            return value
        if not isinstance(value, str):
            raise ValueError(f"expected host:port, got {value!r}")
        host, sep, port_text = value.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port_text.isdigit():
            raise ValueError(f"expected host:port such as 127.0.0.1:8000, got {value!r}")
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} out of range 1-65535")
        return cls(host, port)

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


AddressField = Annotated[Address, BeforeValidator(Address.parse)]


@dataclass(frozen=True, order=True)
class UnixAddress:
    """A unix socket path, `unix:/run/ddb-sidecar/us-east-1.sock` in the config.

    For the region listeners only: HAProxy reaches them through the file system, which costs less per
    request than loopback TCP and is reachable by nobody without the file's permissions.
    """

    path: Path

    @property
    def is_loopback(self) -> bool:
        return True

    def __str__(self) -> str:
        # HAProxy's spelling of a unix socket server address.
        return f"unix@{self.path}"


def parse_listener(value: Any) -> Address | UnixAddress:
    if isinstance(value, Address | UnixAddress):
        return value
    if isinstance(value, str) and value.startswith("unix:"):
        path = value.removeprefix("unix:")
        if not path:
            raise ValueError("expected unix:PATH, such as unix:run/us-east-1.sock")
        return UnixAddress(Path(path))
    return Address.parse(value)


ListenerField = Annotated[Address | UnixAddress, BeforeValidator(parse_listener)]


def _table_name(value: str) -> str:
    if not _TABLE.fullmatch(value):
        raise ValueError(f"{value!r} is not a DynamoDB table name (3-255 of A-Z a-z 0-9 _ . -)")
    return value


TableName = Annotated[str, AfterValidator(_table_name)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


class Region(_Model):
    name: str
    endpoint: str | None = None
    proxy: ListenerField

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _REGION.fullmatch(v):
            raise ValueError(f"{v!r} is not an AWS region name such as us-east-1")
        return v

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from urllib.parse import urlsplit

        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"endpoint {v!r} must be an http(s) URL such as https://dynamodb.us-east-1.amazonaws.com"
            )
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
            raise ValueError(f"endpoint {v!r} must be scheme://host[:port] with no path, query or user")
        if parts.scheme == "http" and not _is_loopback_host(parts.hostname):
            raise ValueError(
                f"endpoint {v!r} uses plain http to a non-loopback host: requests signed with the sidecar's "
                "credentials would cross the network unencrypted; use https"
            )
        return v.rstrip("/")

    @property
    def url(self) -> str:
        return self.endpoint or f"https://dynamodb.{self.name}.amazonaws.com"


def _is_loopback_host(host: str) -> bool:
    return Address(host, 1).is_loopback


class Health(_Model):
    table: TableName = "ddb-sidecar-health"
    interval: Duration = 1.0
    timeout: Duration = 0.8
    fall: Annotated[int, Field(ge=1, le=100)] = 3
    rise: Annotated[int, Field(ge=1, le=100)] = 3
    slow: Duration = 2.0
    # One probe in this many writes the region's canary item (PutItem), so a region that serves reads but
    # fails writes is seen; 0: read probes only.
    write_every: Annotated[int, Field(ge=0, le=1000)] = 5
    # The active region's heartbeat item is written this often (and read 4 times as often in the others):
    # replication lag is measured from it.
    heartbeat_interval: Duration = 1.0


class Failover(_Model):
    automatic: bool = True
    failback: Literal["manual", "automatic"] = "manual"
    hold_down: Duration = 60.0
    max_lag: Duration = 1.0
    # A switchover holds writes at most this long while replication drains; past it the writes go to the
    # old region and nothing moves.
    switchover_timeout: Duration = 5.0


class HAProxy(_Model):
    manage: bool = True
    binary: str | None = None
    template: Path | None = None
    config: Path = Path("run/haproxy.cfg")
    runtime_socket: Path = Path("run/haproxy.sock")
    master_socket: Path = Path("run/haproxy-master.sock")
    backend: str = "dynamodb"
    stats: AddressField | None = Address("127.0.0.1", 8404)
    maxconn: Annotated[int, Field(ge=1)] = 2000
    timeout_client: Duration = 30.0
    timeout_server: Duration = 30.0
    timeout_connect: Duration = 2.0
    timeout_http_request: Duration = 10.0
    # A free mapping for an operator's template, as `vars` (no control characters; whitespace allowed).
    vars: dict[str, Any] = {}

    @field_validator("backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.:-]+", v):
            raise ValueError("backend name may contain only letters, digits, '_', '.', ':' and '-'")
        return v


class Proxy(_Model):
    """The region listeners' data-path settings."""

    allow_control_plane: bool = False
    max_body_bytes: Annotated[int, Field(ge=1024, le=64 * 1024 * 1024)] = 16 * 1024 * 1024
    connect_timeout: Duration = 2.0
    request_timeout: Duration = 10.0
    max_connections: Annotated[int, Field(ge=1, le=4096)] = 64
    idle_timeout: Duration = 30.0
    # Connections each region listener accepts (HAProxy's, in practice); beyond: 503, not sent.
    max_client_connections: Annotated[int, Field(ge=16, le=1_000_000)] = 1024
    # A connection that sends no byte within this is closed.
    first_byte_timeout: Duration = 5.0
    # Request bytes held in memory at once, every listener together; beyond: 503, not sent.
    max_inflight_bytes: Annotated[int, Field(ge=1024 * 1024)] = 256 * 1024 * 1024


class Client(_Model):
    access_key_id: str
    secret_access_key_env: str

    @field_validator("access_key_id")
    @classmethod
    def _akid(cls, v: str) -> str:
        if not _ACCESS_KEY.fullmatch(v):
            raise ValueError("access_key_id must be 16-128 upper-case letters and digits")
        return v

    @field_validator("secret_access_key_env")
    @classmethod
    def _env(cls, v: str) -> str:
        if not _ENV_NAME.fullmatch(v):
            raise ValueError(
                "secret_access_key_env must be the NAME of an environment variable, not the secret"
            )
        return v


class Replication(_Model):
    mode: Literal["global-tables", "streams", "none"] = "global-tables"
    # `streams` only (the replicator in sidecar/replication/streams.py):
    # how long a shard's reader waits after an empty GetRecords (DynamoDB allows ~5 reads/s per shard,
    # shared by every reader: one per other region).
    poll_interval: Duration = 0.25
    # single: conditional PutItem/DeleteItem per item (about 1 write + 1 read unit per item);
    # transact: TransactWriteItems of up to batch_size items (atomic, fewer requests, 2-4x the units)
    write_mode: Literal["single", "transact"] = "single"
    # items per TransactWriteItems (each item takes two of its 100 actions: the write and its tombstone)
    batch_size: Annotated[int, Field(ge=1, le=50)] = 50
    # requests (single) or transactions (transact) in flight per table and target region; a delivery never
    # holds two writes of one item, so they never race
    max_in_flight: Annotated[int, Field(ge=1, le=64)] = 8
    # how long delete tombstones are kept (DynamoDB TTL on `ddbsc:expires`); above the stream's 24 h
    tombstone_ttl: Duration = 48 * 3600.0

    @field_validator("poll_interval")
    @classmethod
    def _poll_interval(cls, v: float) -> float:
        if not 0.05 <= v <= 60.0:
            raise ValueError("poll_interval must be between 50ms and 60s")
        return v

    @field_validator("tombstone_ttl")
    @classmethod
    def _tombstone_ttl(cls, v: float) -> float:
        if v < 24 * 3600.0:
            raise ValueError(
                "tombstone_ttl must be at least 1440m (24 h, how long a stream keeps records): a tombstone "
                "that expires earlier cannot stop a late, older record from resurrecting a deleted item"
            )
        return v


class Logging(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


# The engine's event kinds a webhook can receive (`notify.kinds`).
NotifyKind = Literal[
    "failover",
    "failback",
    "operator-failover",
    "reconfigure",
    "refused",
    "pause",
    "resume",
    "alert",
    "alert-cleared",
    "weights-reasserted",
]
NOTIFY_KINDS: tuple[NotifyKind, ...] = get_args(NotifyKind)


def webhook_problem(url: str) -> str | None:
    """Why `url` cannot be a webhook (a verb phrase: "uses plain http ..."), or None.

    The message never contains the URL: it may embed a token.
    """
    from urllib.parse import urlsplit

    if not url or any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        return "is not a URL (empty, or contains spaces or control characters)"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return "is not a valid URL (malformed host or port)"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http(s) URL with a host, such as https://hooks.example.com/..."
    if parts.scheme == "http" and not _is_loopback_host(parts.hostname):
        return (
            "uses plain http to a non-loopback host: events and any token in the URL would cross the "
            "network unencrypted; use https"
        )
    return None


def url_origin(url: str) -> str:
    """`scheme://host[:port]` of a URL: the only part of a webhook URL that may be logged."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "(malformed URL)"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")


class Notify(_Model):
    """A webhook that gets a JSON POST per engine event of the listed kinds."""

    # Inputs stay out of pydantic's error text: a webhook URL often embeds a token.
    model_config = ConfigDict(
        extra="forbid", frozen=True, arbitrary_types_allowed=True, hide_input_in_errors=True
    )

    webhook: str | None = Field(default=None, repr=False)
    webhook_env: str | None = None
    kinds: list[NotifyKind] = list(NOTIFY_KINDS)
    timeout: Duration = 2.0
    attempts: Annotated[int, Field(ge=1, le=100)] = 6

    @field_validator("webhook")
    @classmethod
    def _webhook(cls, v: str | None) -> str | None:
        if v is not None and (problem := webhook_problem(v)):
            raise ValueError(f"the webhook URL {problem}")
        return v

    @field_validator("webhook_env")
    @classmethod
    def _webhook_env(cls, v: str | None) -> str | None:
        if v is not None and not _ENV_NAME.fullmatch(v):
            raise ValueError("webhook_env must be the NAME of an environment variable, not the URL")
        return v

    @property
    def enabled(self) -> bool:
        return self.webhook is not None or self.webhook_env is not None

    def url(self) -> str | None:
        """The webhook URL: `webhook`, or the value of the `webhook_env` variable read now (None if unset)."""
        if self.webhook is not None:
            return self.webhook
        if self.webhook_env is not None:
            return os.environ.get(self.webhook_env) or None
        return None


_ETCD_ENDPOINT = re.compile(r"https?://[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}")
_FLEET_PREFIX = re.compile(r"(/[A-Za-z0-9._\-]+)+")
_HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,62}")


class Coordination(_Model):
    """Several hosts (an HAProxy and a sidecar each) serving one app agree on one decision through etcd."""

    backend: Literal["none", "etcd"] = "none"
    endpoints: list[str] = Field(default=["http://127.0.0.1:2379"], min_length=1)
    prefix: str = "/ddb-sidecar/default"
    host: str | None = None
    lease_ttl: Duration = 5.0

    @field_validator("endpoints")
    @classmethod
    def _endpoints(cls, v: list[str]) -> list[str]:
        for e in v:
            if not _ETCD_ENDPOINT.fullmatch(e):
                raise ValueError(f"{e!r} is not an etcd client URL (http://HOST:PORT or https://HOST:PORT)")
        if len(set(v)) != len(v):
            raise ValueError("an endpoint is listed twice")
        return v

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not _FLEET_PREFIX.fullmatch(v):
            raise ValueError("prefix must look like /ddb-sidecar/NAME: '/'-separated letters, digits, . _ -")
        return v

    @field_validator("host")
    @classmethod
    def _host(cls, v: str | None) -> str | None:
        if v is not None and not _HOST_NAME.fullmatch(v):
            raise ValueError(
                "host must be 1-63 letters, digits, . _ - (the name of this sidecar in the fleet)"
            )
        return v

    @field_validator("lease_ttl")
    @classmethod
    def _lease_ttl(cls, v: float) -> float:
        if not 2.0 <= v <= 60.0:
            raise ValueError("lease_ttl must be between 2s and 60s")
        return v

    @property
    def enabled(self) -> bool:
        return self.backend == "etcd"

    def host_name(self) -> str:
        """This sidecar's name in the fleet: `host`, else the machine's hostname."""
        return self.host or socket.gethostname()


class Config(_Model):
    listen: AddressField = Address("127.0.0.1", 8000)
    regions: list[Region] = Field(min_length=1)
    tables: list[TableName] = Field(min_length=1)
    health: Health = Health()
    failover: Failover = Failover()
    haproxy: HAProxy = HAProxy()
    # `admin: ADDRESS` (host:port, or unix:PATH), or `admin: {address: ..., token_file: ...}` (normalized
    # by config_from_data into these two fields).
    admin: ListenerField = Address("127.0.0.1", 8405)
    admin_token_file: Path | None = None
    state_dir: Path = Path("run")
    clients: list[Client] = []
    replication: Replication = Replication()
    proxy: Proxy = Proxy()
    logging: Logging = Logging()
    notify: Notify = Notify()
    coordination: Coordination = Coordination()
    # The AWS account of the tables (12 digits): requests naming a table by ARN must name it. Unset: read
    # from the health table's ARN (DescribeTable) once a region answers.
    account_id: Annotated[str, Field(pattern=r"^[0-9]{12}$")] | None = None
    # The folder relative paths were resolved against (not a YAML key).
    base_dir: Path = Field(default=Path("."), exclude=True)

    @property
    def home(self) -> Region:
        return self.regions[0]

    def region(self, name: str) -> Region:
        for region in self.regions:
            if region.name == name:
                return region
        raise KeyError(name)

    def client_secrets(self) -> dict[str, str]:
        """The configured client keys with their secrets read from the environment now."""
        return {c.access_key_id: os.environ.get(c.secret_access_key_env, "") for c in self.clients}

    def secret_env_names(self) -> tuple[str, ...]:
        """The environment variables this config says hold secrets (kept from child processes)."""
        names = [c.secret_access_key_env for c in self.clients]
        if self.notify.webhook_env is not None:
            names.append(self.notify.webhook_env)
        return tuple(names)


class ConfigError(Exception):
    """Every problem found in a config file, each as `path: message`."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


def _loc(parts: Iterable[Any]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _resolve(base: Path, path: Path) -> Path:
    return path if path.is_absolute() else (base / path)


def resolve_config_path(path: str | os.PathLike[str] | None) -> Path:
    return Path(path or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


def load_config(path: str | os.PathLike[str] | None = None, *, check_environment: bool = True) -> Config:
    """Read, validate and resolve a config file; raise ConfigError listing every problem."""
    file = resolve_config_path(path)
    source = str(file)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, [f"(file): not found; pass -c PATH or set {CONFIG_ENV}"]) from None
    except OSError as exc:
        raise ConfigError(source, [f"(file): cannot read: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(file)"
        raise ConfigError(source, [f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}"]) from None
    return config_from_data(
        data, base_dir=file.resolve().parent, source=source, check_environment=check_environment
    )


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Values rendered into haproxy.cfg (or HAProxy's command line): whitespace there would end the value and
# start another directive, so none is accepted (`haproxy.template` is a path we only read).
_RENDERED_TOP = ("listen", "admin")
_NOT_RENDERED_HAPROXY = frozenset({"template"})


def _unsafe_text_problems(data: Mapping[str, Any]) -> list[str]:
    """No control character anywhere (a newline in a value could add a line to haproxy.cfg), and no
    whitespace in anything rendered into it; each problem with its path."""
    problems: list[str] = []

    def walk(value: Any, path: str) -> None:
        if isinstance(value, str):
            if _CONTROL.search(value):
                problems.append(f"{path}: contains a control character (a newline, tab...); remove it")
        elif isinstance(value, Mapping):
            for key, sub in value.items():
                if isinstance(key, str) and _CONTROL.search(key):
                    problems.append(f"{path or '(top level)'}: a key contains a control character; remove it")
                walk(sub, f"{path}.{key}" if path else str(key))
        elif isinstance(value, list):
            for i, sub in enumerate(value):
                walk(sub, f"{path}[{i}]")

    walk(data, "")
    rendered: list[tuple[str, Any]] = [(key, data.get(key)) for key in _RENDERED_TOP]
    regions = data.get("regions")
    if isinstance(regions, list):
        for i, region in enumerate(regions):
            if isinstance(region, Mapping):
                rendered += [(f"regions[{i}].{k}", region.get(k)) for k in ("name", "proxy")]
    haproxy = data.get("haproxy")
    if isinstance(haproxy, Mapping):
        rendered += [(f"haproxy.{k}", v) for k, v in haproxy.items() if k not in _NOT_RENDERED_HAPROXY]
    for path, value in rendered:
        if isinstance(value, str) and not _CONTROL.search(value) and any(c.isspace() for c in value):
            problems.append(
                f"{path}: contains whitespace; it is written into haproxy.cfg, where it would end the value"
            )
    return problems


_ADMIN_KEYS = frozenset({"address", "token_file"})


def _flat_admin(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """`admin: {address, token_file}` as the model's `admin` and `admin_token_file`."""
    if "admin_token_file" in data:
        return data, ["admin_token_file: unknown key (write admin: {address: ..., token_file: ...})"]
    admin = data.get("admin")
    if not isinstance(admin, dict):
        return data, []
    problems = [
        f"admin.{key}: unknown key (admin takes address and token_file)"
        for key in admin
        if key not in _ADMIN_KEYS
    ]
    flat = {k: v for k, v in data.items() if k != "admin"}
    if "address" in admin:
        flat["admin"] = admin["address"]
    if admin.get("token_file") is not None:
        flat["admin_token_file"] = admin["token_file"]
    return flat, problems


def admin_token(config: Config) -> str | None:
    """The admin API's bearer token, read from `admin.token_file` now (None: no token configured)."""
    if config.admin_token_file is None:
        return None
    return config.admin_token_file.read_text(encoding="utf-8").strip()


def config_from_data(
    data: Any, *, base_dir: Path, source: str = "<config>", check_environment: bool = True
) -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, ["(top level): expected a mapping of keys such as listen, regions, tables"])
    # Cross-field checks run on the raw data too, so one run reports a duplicate port together with a
    # malformed duration elsewhere.
    problems = _raw_problems(data) + _unsafe_text_problems(data)
    data, admin_problems = _flat_admin(data)
    problems += admin_problems
    try:
        config = Config.model_validate({**data, "base_dir": base_dir})
    except ValidationError as exc:
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key (check the spelling against INTERFACE.md)"
            elif err["type"] == "missing":
                msg = "required"
            problems.append(f"{_loc(err['loc'])}: {msg}".replace("admin_token_file", "admin.token_file"))
        # The checks of every section that is valid on its own still run (a missing template shows up
        # together with a malformed duration elsewhere).
        problems += _section_problems(data, base_dir, check_environment=check_environment)
        raise ConfigError(source, sorted(set(problems), key=problems.index)) from None
    config = _with_resolved_paths(config)
    problems += semantic_problems(config, check_environment=check_environment)
    if problems:
        raise ConfigError(source, problems)
    return config


def _resolved_haproxy(base: Path, hp: HAProxy) -> HAProxy:
    return hp.model_copy(
        update={
            "template": _resolve(base, hp.template) if hp.template else None,
            "config": _resolve(base, hp.config),
            "runtime_socket": _resolve(base, hp.runtime_socket),
            "master_socket": _resolve(base, hp.master_socket),
        }
    )


def _with_resolved_paths(config: Config) -> Config:
    base = config.base_dir
    admin = config.admin
    if isinstance(admin, UnixAddress):
        admin = UnixAddress(_resolve(base, admin.path))
    token = _resolve(base, config.admin_token_file) if config.admin_token_file is not None else None
    regions = [
        r.model_copy(update={"proxy": UnixAddress(_resolve(base, r.proxy.path))})
        if isinstance(r.proxy, UnixAddress)
        else r
        for r in config.regions
    ]
    return config.model_copy(
        update={
            "haproxy": _resolved_haproxy(base, config.haproxy),
            "state_dir": _resolve(base, config.state_dir),
            "regions": regions,
            "admin": admin,
            "admin_token_file": token,
        }
    )


def _raw_address(data: Any, *keys: str | int) -> Address | None:
    for key in keys:
        try:
            data = data[key]
        except (KeyError, IndexError, TypeError):
            return None
    try:
        return Address.parse(data)
    except ValueError:
        return None


def _raw_admin_address(data: dict[str, Any]) -> Address | None:
    if "admin" not in data:
        return Address("127.0.0.1", 8405)
    if isinstance(data["admin"], dict):
        return (
            _raw_address(data["admin"], "address")
            if "address" in data["admin"]
            else Address("127.0.0.1", 8405)
        )
    return _raw_address(data, "admin")


def _raw_problems(data: dict[str, Any]) -> list[str]:
    """Duplicates across sections, checked on the raw YAML so they show up with every other problem."""
    problems: list[str] = []
    hp: dict[str, Any] = data["haproxy"] if isinstance(data.get("haproxy"), dict) else {}
    candidates: list[tuple[str, Address | None]] = [
        ("listen", _raw_address(data, "listen") if "listen" in data else Address("127.0.0.1", 8000)),
        ("admin", _raw_admin_address(data)),
        ("haproxy.stats", _raw_address(hp, "stats") if "stats" in hp else Address("127.0.0.1", 8404)),
    ]
    regions: list[Any] = data["regions"] if isinstance(data.get("regions"), list) else []
    candidates += [(f"regions[{i}].proxy", _raw_address(regions, i, "proxy")) for i in range(len(regions))]
    used: dict[tuple[str, int], str] = {}
    for where, addr in candidates:
        if addr is None:
            continue
        for (host, port), first in used.items():
            if port == addr.port and (
                host == addr.host or "0.0.0.0" in (host, addr.host) or "::" in (host, addr.host)
            ):
                problems.append(f"{where}: port {addr.port} already used by {first}")
                break
        else:
            used[(addr.host, addr.port)] = where

    seen_regions: dict[Any, int] = {}
    for i, region in enumerate(regions):
        name = region.get("name") if isinstance(region, dict) else None
        if not isinstance(name, str):
            continue
        if name in seen_regions:
            problems.append(f"regions[{i}].name: {name} already listed as regions[{seen_regions[name]}]")
        else:
            seen_regions[name] = i

    tables: list[Any] = data["tables"] if isinstance(data.get("tables"), list) else []
    seen_tables: set[Any] = set()
    for i, table in enumerate(tables):
        if isinstance(table, str) and table in seen_tables:
            problems.append(f"tables[{i}]: {table} listed twice")
        seen_tables.add(table)
    # Never an open signing proxy: anything that accepts requests and signs them with our credentials
    # stays on loopback unless the operator restricts who may call it.
    for where, addr in candidates:
        if addr is None or addr.is_loopback or where == "haproxy.stats":
            continue
        if where == "admin":
            problems.append(
                f"admin: {addr} is not a loopback address; the admin API moves traffic, keep it on 127.0.0.1"
            )
        elif not data.get("clients"):
            problems.append(
                f"{where}: {addr} is not a loopback address; without `clients` anyone who can reach it "
                "could use the sidecar's AWS credentials. Bind to 127.0.0.1 or configure clients"
            )
    return problems


def semantic_problems(config: Config, *, check_environment: bool = True) -> list[str]:
    """Cross-field checks on a valid model that pydantic cannot express, each as `path: message`."""
    return (
        _health_problems(config.health)
        + _haproxy_problems(config.haproxy)
        + _clients_problems(config.clients, check_environment=check_environment)
        + _unix_listener_problems(config)
        + _admin_problems(config)
        + _notify_problems(config.notify, check_environment=check_environment)
    )


def _admin_problems(config: Config) -> list[str]:
    path = config.admin_token_file
    if path is None:
        return []
    try:
        st = path.stat()
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        return [f"admin.token_file: cannot read {path}: {exc.strerror or exc}"]
    except UnicodeDecodeError:
        return [f"admin.token_file: {path} is not text"]
    problems = []
    if st.st_mode & 0o077:
        problems.append(
            f"admin.token_file: {path} is readable by others (mode {st.st_mode & 0o777:o}); chmod 600 {path}"
        )
    if len(token) < 16:
        problems.append(
            f"admin.token_file: the token in {path} is shorter than 16 characters; "
            "write a long random one (e.g. `openssl rand -hex 32`)"
        )
    return problems


def _unix_listener_problems(config: Config) -> list[str]:
    problems: list[str] = []
    seen: dict[Path, int] = {}
    taken = {
        config.haproxy.runtime_socket: "haproxy.runtime_socket",
        config.haproxy.master_socket: "haproxy.master_socket",
    }
    for i, region in enumerate(config.regions):
        if not isinstance(region.proxy, UnixAddress):
            continue
        path = region.proxy.path
        if path in seen:
            problems.append(f"regions[{i}].proxy: {path} already used by regions[{seen[path]}].proxy")
        elif path in taken:
            problems.append(f"regions[{i}].proxy: {path} already used by {taken[path]}")
        seen.setdefault(path, i)
        if len(os.fsencode(path)) > 100:
            problems.append(
                f"regions[{i}].proxy: path {path} is too long for a unix socket (100 bytes at most)"
            )
    return problems


def _section_problems(data: dict[str, Any], base_dir: Path, *, check_environment: bool) -> list[str]:
    """`semantic_problems` for each section that validates on its own, when the whole config does not."""
    problems: list[str] = []
    try:
        health = Health.model_validate(data.get("health") or {})
    except ValidationError:
        pass
    else:
        problems += _health_problems(health)
    try:
        haproxy = HAProxy.model_validate(data.get("haproxy") or {})
    except ValidationError:
        pass
    else:
        problems += _haproxy_problems(_resolved_haproxy(base_dir, haproxy))
    try:
        clients = TypeAdapter(list[Client]).validate_python(data.get("clients") or [])
    except ValidationError:
        pass
    else:
        problems += _clients_problems(clients, check_environment=check_environment)
    try:
        notify = Notify.model_validate(data.get("notify") or {})
    except ValidationError:
        pass
    else:
        problems += _notify_problems(notify, check_environment=check_environment)
    return problems


def _health_problems(health: Health) -> list[str]:
    if health.timeout >= health.interval * 2:
        return ["health.timeout: must be shorter than twice health.interval, or probes pile up"]
    return []


def _haproxy_problems(hp: HAProxy) -> list[str]:
    """`hp` with its paths already resolved against the config file's folder."""
    problems: list[str] = []
    if hp.template is not None and not hp.template.is_file():
        problems.append(f"haproxy.template: {hp.template} not found")
    if hp.binary is not None and not (Path(hp.binary).is_file() and os.access(hp.binary, os.X_OK)):
        problems.append(f"haproxy.binary: {hp.binary} is not an executable file")
    sockets = {"haproxy.runtime_socket": hp.runtime_socket, "haproxy.master_socket": hp.master_socket}
    for where, sock in sockets.items():
        if len(os.fsencode(sock)) > 100:
            problems.append(f"{where}: path {sock} is too long for a unix socket (100 bytes at most)")
    if hp.runtime_socket == hp.master_socket:
        problems.append("haproxy.master_socket: same path as haproxy.runtime_socket")
    return problems


def _clients_problems(clients: list[Client], *, check_environment: bool) -> list[str]:
    problems: list[str] = []
    seen_keys: set[str] = set()
    for i, client in enumerate(clients):
        if client.access_key_id in seen_keys:
            problems.append(f"clients[{i}].access_key_id: listed twice")
        seen_keys.add(client.access_key_id)
        if check_environment and not os.environ.get(client.secret_access_key_env):
            problems.append(
                f"clients[{i}].secret_access_key_env: environment variable {client.secret_access_key_env} is not set"
            )
    return problems


def _notify_problems(notify: Notify, *, check_environment: bool) -> list[str]:
    """Never with the URL itself in a message: name the key or the variable instead."""
    if notify.webhook is not None and notify.webhook_env is not None:
        return ["notify.webhook_env: set at most one of notify.webhook and notify.webhook_env"]
    if notify.webhook_env is None or not check_environment:
        return []
    value = os.environ.get(notify.webhook_env)
    if not value:
        return [f"notify.webhook_env: environment variable {notify.webhook_env} is not set"]
    if problem := webhook_problem(value):
        return [f"notify.webhook_env: the URL in environment variable {notify.webhook_env} {problem}"]
    return []
