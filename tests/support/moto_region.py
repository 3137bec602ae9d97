"""A DynamoDB "region" for tests: one `moto_server` process with signature checking on.

moto takes the region of a request from the Host header (`*.REGION.amazonaws.com`) first and from the
SigV4 credential scope second, and one process holds every region's data. So a process is a region only
by convention: the one whose name we sign for. A request signed for another region is accepted and served
from that (empty) region inside the same process: check which data came back, not only the status.

Signing is enforced with INITIAL_NO_AUTH_ACTION_COUNT=3: the first three service calls are free and we
spend them on CreateUser, CreateAccessKey and PutUserPolicy (dynamodb:*). Seeding moto's random generator
with the same value in every process first makes them all create the same key, like global IAM.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import boto3
import botocore.client
from botocore.config import Config
from botocore.exceptions import ClientError

from sidecar.localregion import DEFAULT_SEED, Key, bootstrap_iam, moto_server_command

from .ports import free_port
from .processes import ManagedProcess
from .wait import wait_until

logger = logging.getLogger(__name__)

IAM_USER = "ddb-sidecar-tests"
# One attempt, really: botocore's {"max_attempts": 1} still retries once (see FIELD-NOTES).
ONE_ATTEMPT: dict[str, Any] = {"total_max_attempts": 1, "mode": "standard"}
# The key bootstrap_iam hands out: (access_key_id, secret_access_key).
Credentials = Key


class MotoRegion:
    """One `moto_server -H 127.0.0.1 -p PORT` process standing for the AWS region `name`.

    `start()` only spawns the process; `wait_ready()` polls until it answers and `bootstrap(seed)` creates
    the IAM user and key. `launch()` does all three.
    """

    def __init__(
        self, name: str, log_dir: str | os.PathLike[str], port: int | None = None, free_calls: int = 3
    ) -> None:
        """`free_calls`: unsigned calls moto allows before it checks signatures (3 per IAM user to create)."""
        self.name = name
        self.port = port if port is not None else free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process = ManagedProcess(
            f"moto-{name}",
            [*moto_server_command(), "-H", "127.0.0.1", "-p", str(self.port)],
            log_dir,
            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(free_calls)},
        )
        self._credentials: Credentials | None = None
        self._session = boto3.session.Session()
        self._clients: list[botocore.client.BaseClient] = []

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> MotoRegion:
        self.process.start()
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Poll until the server answers HTTP (a process that exits fails at once, with its log)."""

        def answers() -> bool:
            self.process.check_running()
            with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1.0) as response:
                return bool(response.status == 200)

        wait_until(
            answers,
            timeout,
            interval=0.05,
            message=f"{self.process.name} answering on {self.endpoint}",
            ignore=(OSError,),  # connection refused / reset while it starts; URLError is an OSError
        )

    def bootstrap(self, seed: int = DEFAULT_SEED) -> Credentials:
        """Seed moto, then spend the three unauthenticated calls on a user, its key and a dynamodb:* policy."""
        self._credentials = bootstrap_iam(self.endpoint, self.name, seed, user=IAM_USER)
        return self._credentials

    def launch(self, seed: int = DEFAULT_SEED, timeout: float = 20.0) -> MotoRegion:
        """Start, wait until it answers, bootstrap IAM; stop the process again if any step fails."""
        self.start()
        try:
            self.wait_ready(timeout)
            self.bootstrap(seed)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Close our clients, SIGTERM the process (SIGKILL after `timeout` s)."""
        self._close_clients()
        self.process.stop(timeout)

    def kill(self) -> None:
        """SIGKILL: the region disappears at once, its data with it."""
        self._close_clients()
        self.process.kill()

    def sigstop(self) -> None:
        """Freeze: TCP connections are still accepted (by the kernel) but nothing is answered."""
        self.process.sigstop()

    def sigcont(self) -> None:
        self.process.sigcont()

    @property
    def running(self) -> bool:
        return self.process.running

    def _close_clients(self) -> None:
        clients, self._clients = self._clients, []
        for client in clients:
            client.close()

    def __enter__(self) -> MotoRegion:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<MotoRegion {self.name} {self.endpoint} {'running' if self.running else 'stopped'}>"

    # -- clients -----------------------------------------------------------------------------------------

    @property
    def credentials(self) -> Credentials:
        if self._credentials is None:
            raise RuntimeError(f"{self.name}: not bootstrapped yet")
        return self._credentials

    def env(self) -> dict[str, str]:
        """AWS_* variables for a subprocess (CLI, Perl client) that should talk to this region."""
        return {
            "AWS_ACCESS_KEY_ID": self.credentials.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.credentials.secret_access_key,
            "AWS_REGION": self.name,
            "AWS_DEFAULT_REGION": self.name,
        }

    def client(
        self,
        service: str = "dynamodb",
        *,
        region: str | None = None,
        credentials: Credentials | tuple[str, str] | None = None,
        endpoint: str | None = None,
        retries: dict[str, Any] | None = None,
        connect_timeout: float = 2.0,
        read_timeout: float = 10.0,
    ) -> Any:
        """A boto3 client for this region's endpoint, signed with the real key for this region.

        `region`, `credentials` and `endpoint` override what is signed / where it goes (to provoke wrong
        signatures or cross-region requests). The client is closed by `stop()`.
        """
        access_key, secret = credentials if credentials is not None else self.credentials
        client = self._session.client(
            service,
            endpoint_url=endpoint or self.endpoint,
            region_name=region or self.name,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret,
            config=Config(
                retries=retries if retries is not None else ONE_ATTEMPT,
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
            ),
        )
        self._clients.append(client)
        return client

    def present(self, table: str, keys: list[str], pk: str = "pk") -> set[str]:
        """Which of `keys` (string partition keys) this region's own data holds (consistent reads)."""
        found: set[str] = set()
        client = self.client()
        for i in range(0, len(keys), 100):
            batch = [{pk: {"S": k}} for k in keys[i : i + 100]]
            pending: Any = {table: {"Keys": batch, "ConsistentRead": True}}
            while pending:
                answer = client.batch_get_item(RequestItems=pending)
                found.update(item[pk]["S"] for item in answer["Responses"].get(table, []))
                pending = answer.get("UnprocessedKeys") or None
        return found

    def create_table(
        self, name: str, pk: str = "pk", sk: str | None = None, stream: bool = False, timeout: float = 10.0
    ) -> dict[str, Any]:
        """Create a PAY_PER_REQUEST table with string keys and wait until it is ACTIVE; return its description."""
        ddb = self.client()
        attributes = [{"AttributeName": pk, "AttributeType": "S"}]
        schema = [{"AttributeName": pk, "KeyType": "HASH"}]
        if sk is not None:
            attributes.append({"AttributeName": sk, "AttributeType": "S"})
            schema.append({"AttributeName": sk, "KeyType": "RANGE"})
        kwargs: dict[str, Any] = {
            "TableName": name,
            "AttributeDefinitions": attributes,
            "KeySchema": schema,
            "BillingMode": "PAY_PER_REQUEST",
        }
        if stream:
            kwargs["StreamSpecification"] = {"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"}
        ddb.create_table(**kwargs)

        def active() -> dict[str, Any] | None:
            table: dict[str, Any] = ddb.describe_table(TableName=name)["Table"]
            return table if table["TableStatus"] == "ACTIVE" else None

        # moto creates tables ACTIVE; the poll keeps this honest if that ever changes.
        return wait_until(active, timeout, interval=0.05, message=f"table {name} ACTIVE in {self.name}")


def start_regions(
    names: Iterable[str],
    log_dir: str | os.PathLike[str],
    seed: int = DEFAULT_SEED,
    timeout: float = 30.0,
    verify: bool = True,
) -> list[MotoRegion]:
    """Start one MotoRegion per name, in parallel, bootstrapped with the same seed (so the same key).

    With `verify`, check that they are separate data stores and that a request signed with an unknown key
    is rejected. Everything started is stopped again if any step fails.
    """
    started = time.monotonic()
    regions = [MotoRegion(name, log_dir) for name in names]
    try:
        for region in regions:  # spawn all first: moto takes 1-2 s to import and bind
            region.start()
        for region in regions:
            region.wait_ready(timeout)
        with ThreadPoolExecutor(max_workers=len(regions)) as pool:
            list(pool.map(lambda r: r.bootstrap(seed), regions))
        keys = {r.credentials for r in regions}
        if len(keys) != 1:
            raise AssertionError(f"moto regions produced different keys despite seed {seed}: {keys}")
        if verify:
            verify_regions(regions)
    except BaseException:
        for region in regions:
            region.stop()
        raise
    logger.info(
        "moto regions %s ready in %.2fs",
        ", ".join(f"{r.name}={r.endpoint}" for r in regions),
        time.monotonic() - started,
    )
    return regions


def verify_regions(regions: list[MotoRegion]) -> None:
    """Fail unless each region holds only its own tables and rejects an unknown key with 403."""
    probe = f"probe-{uuid.uuid4().hex[:8]}"
    names = {r.name: f"{probe}-{r.name}" for r in regions}
    for region in regions:
        region.create_table(names[region.name])
    try:
        for region in regions:
            seen = {t for t in region.client().list_tables()["TableNames"] if t.startswith(probe)}
            if seen != {names[region.name]}:
                raise AssertionError(
                    f"{region.name} at {region.endpoint} sees tables {seen}: not a separate store"
                )
            intruder = region.client(credentials=("AKIAUNKNOWNKEY000000", "not-the-secret"))
            try:
                intruder.list_tables()
            except ClientError as exc:
                status = exc.response["ResponseMetadata"]["HTTPStatusCode"]
                if status != 403:
                    raise AssertionError(
                        f"{region.name}: unknown key got HTTP {status}, expected 403"
                    ) from exc
            else:
                raise AssertionError(f"{region.name}: a request with an unknown key was accepted")
    finally:
        for region in regions:
            region.client().delete_table(TableName=names[region.name])
