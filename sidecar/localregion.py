"""A local DynamoDB-compatible "region" for the demo and the tests: one `moto_server` process.

Signature checking is on (INITIAL_NO_AUTH_ACTION_COUNT=3): the three free calls create an IAM user, its
key and a `dynamodb:*` policy, and every later call must be signed like at AWS. Seeding moto's random
generator with the same value in every process makes them all produce the same key (IAM is global).
moto is a development dependency (`pip install ddb-sidecar[dev]`); nothing in the daemon imports this.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, NamedTuple

DEFAULT_SEED = 4242
IAM_USER = "ddb-sidecar"
DYNAMODB_POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "dynamodb:*", "Resource": "*"}],
}


class Key(NamedTuple):
    access_key_id: str
    secret_access_key: str


def moto_server_command() -> list[str]:
    """`moto_server` with DynamoDB's transactions made atomic (see sidecar.motoserver), in this Python."""
    if importlib.util.find_spec("moto") is None:
        raise RuntimeError(
            "moto_server not found: install the demo extras (`pip install 'ddb-sidecar[dev]'`)"
        )
    return [sys.executable, "-m", "sidecar.motoserver"]


def bootstrap_iam(
    endpoint: str,
    region: str,
    seed: int = DEFAULT_SEED,
    user: str = IAM_USER,
    policy: dict[str, Any] | None = None,
) -> Key:
    """Create an IAM user allowed `dynamodb:*` in a fresh moto_server; return its access key.

    The server must run with INITIAL_NO_AUTH_ACTION_COUNT=3. Seeds moto's random generator first, so
    every process bootstrapped with the same seed hands out the same key (IAM is global at AWS); then
    spends the three unauthenticated calls on CreateUser, CreateAccessKey and PutUserPolicy (`policy`,
    default `dynamodb:*`). Every later call to that process must be signed with the key.
    """
    import boto3
    from botocore.config import Config

    request = urllib.request.Request(f"{endpoint}/moto-api/seed?a={seed}", method="POST")
    with urllib.request.urlopen(request, timeout=5.0) as response:
        if response.status != 200:
            raise RuntimeError(f"{region}: seeding moto at {endpoint} answered {response.status}")
    iam = boto3.session.Session().client(
        "iam",
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id="bootstrap",
        aws_secret_access_key="bootstrap",
        # One attempt, really: a retried call would spend one of the three free ones.
        config=Config(retries={"total_max_attempts": 1, "mode": "standard"}),
    )
    with contextlib.closing(iam):
        iam.create_user(UserName=user)
        key = iam.create_access_key(UserName=user)["AccessKey"]
        iam.put_user_policy(
            UserName=user, PolicyName="dynamodb", PolicyDocument=json.dumps(policy or DYNAMODB_POLICY)
        )
    return Key(key["AccessKeyId"], key["SecretAccessKey"])


class LocalRegion:
    def __init__(self, name: str, port: int, log_path: Path) -> None:
        self.name = name
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.key: Key | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> LocalRegion:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [*moto_server_command(), "-H", "127.0.0.1", "-p", str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"},
                start_new_session=True,
            )
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"moto_server for {self.name} exited; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1.0):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"moto_server for {self.name} did not answer within {timeout:g}s"
                    ) from None
                time.sleep(0.05)

    def bootstrap(self, seed: int = DEFAULT_SEED) -> Key:
        self.key = bootstrap_iam(self.endpoint, self.name, seed)
        return self.key

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        assert self.key is not None, "bootstrap() first"
        return boto3.session.Session().client(
            "dynamodb",
            endpoint_url=self.endpoint,
            region_name=self.name,
            aws_access_key_id=self.key.access_key_id,
            aws_secret_access_key=self.key.secret_access_key,
            config=Config(retries={"total_max_attempts": 1, "mode": "standard"}),
        )

    def create_table(self, name: str, pk: str = "pk", sk: str | None = None) -> None:
        attributes = [{"AttributeName": pk, "AttributeType": "S"}]
        schema = [{"AttributeName": pk, "KeyType": "HASH"}]
        if sk:
            attributes.append({"AttributeName": sk, "AttributeType": "S"})
            schema.append({"AttributeName": sk, "KeyType": "RANGE"})
        client = self.client()
        with contextlib.closing(client):
            client.create_table(
                TableName=name,
                AttributeDefinitions=attributes,
                KeySchema=schema,
                BillingMode="PAY_PER_REQUEST",
            )

    def signal(self, sig: signal.Signals) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, sig)

    def stop(self, timeout: float = 5.0) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            proc.wait(timeout)
