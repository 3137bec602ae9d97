"""botocore clients for the replicator, signed with the sidecar's current credentials.

The daemon's credentials (`sidecar.proxy.credentials.CredentialSource.current`) are refreshed in the
background; the clients here read them at every request through a credential provider, so a refresh
needs no new client.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

import botocore.session
from botocore.config import Config as BotoConfig
from botocore.credentials import CredentialProvider, CredentialResolver, Credentials, ReadOnlyCredentials


class CredentialsLike(Protocol):
    """`sidecar.proxy.sigv4.Credentials` or botocore's `ReadOnlyCredentials`."""

    @property
    def access_key(self) -> str: ...
    @property
    def secret_key(self) -> str: ...
    @property
    def token(self) -> str | None: ...


# (service, region name, endpoint URL) -> a client; services: "dynamodb", "dynamodbstreams".
ClientFactory = Callable[[str, str, str], Any]


class _LiveCredentials(Credentials):  # type: ignore[misc]
    """Credentials that ask `provider` at every signature (a plain attribute read in the daemon)."""

    def __init__(self, provider: Callable[[], CredentialsLike]) -> None:  # no super(): no static values
        self._provider = provider
        self.method = "ddb-sidecar"

    def get_frozen_credentials(self) -> ReadOnlyCredentials:
        current = self._provider()
        return ReadOnlyCredentials(current.access_key, current.secret_key, current.token)

    @property
    def access_key(self) -> str:
        return self._provider().access_key

    @property
    def secret_key(self) -> str:
        return self._provider().secret_key

    @property
    def token(self) -> str | None:
        return self._provider().token


class _Provider(CredentialProvider):  # type: ignore[misc]
    METHOD = "ddb-sidecar"
    CANONICAL_NAME = "ddb-sidecar"

    def __init__(self, provider: Callable[[], CredentialsLike]) -> None:
        super().__init__()
        self._credentials = _LiveCredentials(provider)

    def load(self) -> Credentials:
        return self._credentials


def client_factory(
    credentials: Callable[[], CredentialsLike] | None = None,
    *,
    connect_timeout: float = 2.0,
    read_timeout: float = 10.0,
    max_pool_connections: int = 32,
    attempts: int = 3,
) -> ClientFactory:
    """A factory of botocore clients; `credentials` None: botocore's own chain (environment, profile, role).

    botocore retries throttling and 5xx answers itself (`attempts` in all, standard mode); a cancelled
    transaction (HTTP 400) is returned to the caller. Clients are thread-safe; creating them is not, hence
    the lock.
    """
    session = botocore.session.Session()
    if credentials is not None:
        session.register_component("credential_provider", CredentialResolver([_Provider(credentials)]))
    config = BotoConfig(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"mode": "standard", "total_max_attempts": attempts},
        max_pool_connections=max_pool_connections,
        user_agent_extra="ddb-sidecar-replicator",
    )
    lock = threading.Lock()

    def make(service: str, region: str, endpoint: str) -> Any:
        with lock:
            return session.create_client(service, region_name=region, endpoint_url=endpoint, config=config)

    return make
