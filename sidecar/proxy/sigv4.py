"""AWS Signature Version 4 for the data path: signing outgoing DynamoDB requests, verifying clients.

The hot path (:meth:`DynamoDBRequestSigner.request_head`) does three SHA-256 passes and one HMAC per
request; everything that depends only on the credentials, the second or the target is computed once and
cached, and botocore is never called. The generic functions (:func:`canonical_request`,
:func:`string_to_sign`, ...) follow the published SigV4 algorithm step by step; they serve the verifier
and the tests against the AWS test suite.
"""

from __future__ import annotations

import calendar
import functools
import hashlib
import hmac
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import NamedTuple
from urllib.parse import quote

ALGORITHM = "AWS4-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
JSON_CONTENT_TYPE = "application/x-amz-json-1.0"
AMZ_DATE_FORMAT = "%Y%m%dT%H%M%SZ"

_sha256 = hashlib.sha256
_hmac_digest = hmac.digest

_AMZ_DATE = re.compile(r"[0-9]{8}T[0-9]{6}Z")
_HEX_SIGNATURE = re.compile(r"[0-9a-f]{64}")
_MAX_TARGETS = 1024


class Credentials(NamedTuple):
    """An access key, its secret and an optional session token (as botocore's frozen credentials)."""

    access_key: str
    secret_key: str
    token: str | None = None

    def __repr__(self) -> str:
        token = "'***'" if self.token else "None"
        return f"Credentials(access_key={self.access_key!r}, secret_key='***', token={token})"


# --- the generic algorithm ---------------------------------------------------------------------------


def _derive(secret: str, datestamp: str, region: str, service: str) -> bytes:
    k = _hmac_digest(("AWS4" + secret).encode("utf-8"), datestamp.encode("utf-8"), "sha256")
    k = _hmac_digest(k, region.encode("utf-8"), "sha256")
    k = _hmac_digest(k, service.encode("utf-8"), "sha256")
    return _hmac_digest(k, b"aws4_request", "sha256")


@functools.lru_cache(maxsize=64)
def derive_signing_key(secret: str, datestamp: str, region: str, service: str) -> bytes:
    """The SigV4 signing key for one (secret, day, region, service); cached, it changes once a day."""
    return _derive(secret, datestamp, region, service)


def credential_scope(datestamp: str, region: str, service: str) -> str:
    """``YYYYMMDD/region/service/aws4_request`` (the Credential value without the access key)."""
    return f"{datestamp}/{region}/{service}/aws4_request"


def amz_date(now: float) -> str:
    """The X-Amz-Date string (``YYYYMMDDTHHMMSSZ``, UTC) for a Unix time."""
    return time.strftime(AMZ_DATE_FORMAT, time.gmtime(int(now)))


def _trimall(value: str) -> str:
    # SigV4 "Trimall": strip, and collapse runs of whitespace to one space (as botocore does).
    return " ".join(value.split())


def canonical_query(query: str) -> str:
    """Sort ``name=value`` pairs of an already percent-encoded query string by name, then value."""
    if not query:
        return ""
    pairs = []
    for part in query.split("&"):
        if part:
            name, _, value = part.partition("=")
            pairs.append((name, value))
    pairs.sort()
    return "&".join(f"{name}={value}" for name, value in pairs)


def _canonical_header_lines(values: Mapping[str, list[str]], signed_headers: Sequence[str]) -> list[str]:
    lines = []
    for name in signed_headers:
        found = values.get(name)
        if found is None:
            raise ValueError(f"signed header {name!r} is not in the request")
        if len(found) == 1:
            lines.append(f"{name}:{' '.join(found[0].split())}")
        else:
            lines.append(f"{name}:{','.join(_trimall(v) for v in found)}")
    return lines


def canonical_request(
    method: str,
    path: str,
    query: str,
    headers: Sequence[tuple[str, str]],
    signed_headers: Sequence[str],
    payload_hash: str,
) -> str:
    """The SigV4 canonical request.

    ``path`` is the canonical URI, used as given; ``query`` is the percent-encoded query string (its pairs
    are sorted here). Header names are lowercased and values trimmed and whitespace-collapsed here;
    repeated headers are joined with commas in the order given. Only ``signed_headers`` (lowercase, in
    the order given, which SigV4 requires to be sorted) are included; a missing one raises ValueError.
    """
    values: dict[str, list[str]] = {}
    for name, value in headers:
        values.setdefault(name.strip().lower(), []).append(value)
    lines = _canonical_header_lines(values, signed_headers)
    return "\n".join(
        [method.upper(), path, canonical_query(query), *lines, "", ";".join(signed_headers), payload_hash]
    )


def string_to_sign(amz_date: str, scope: str, canonical_request: str) -> str:
    """``AWS4-HMAC-SHA256``, the date, the credential scope and the canonical request's SHA-256."""
    digest = _sha256(canonical_request.encode("utf-8")).hexdigest()
    return f"{ALGORITHM}\n{amz_date}\n{scope}\n{digest}"


def signature(key: bytes, string_to_sign: str) -> str:
    """Hex HMAC-SHA256 of the string to sign with the derived signing key."""
    return _hmac_digest(key, string_to_sign.encode("utf-8"), "sha256").hex()


# --- signing outgoing DynamoDB requests --------------------------------------------------------------


def _check_printable(value: str, what: str, *, spaces: bool) -> str:
    """Accept printable ASCII only (no CR/LF/NUL or other controls); optionally no spaces either."""
    if not value or not value.isascii() or not value.isprintable() or (not spaces and " " in value):
        raise ValueError(f"invalid {what}: {value!r}")
    return value


class _SigningState(NamedTuple):
    """Everything that depends only on the credentials and the current second."""

    creq_prefix: str  # canonical request up to "x-amz-target:"
    creq_middle: str  # "\n\n" + signed headers + "\n"
    sts_prefix: str  # string to sign up to the canonical request hash
    key: bytes
    head_middle: bytes  # from the end of the X-Amz-Target line to "Signature="


_PRINTABLE_UA = re.compile(rb"[^\x20-\x7e]")


class DynamoDBRequestSigner:
    """Builds signed HTTP/1.1 request heads for ``POST /`` DynamoDB JSON requests to one endpoint.

    ``host`` is the exact Host header sent and signed (``dynamodb.us-east-1.amazonaws.com``,
    ``127.0.0.1:5001``). Not thread-safe; meant to be used from one event loop.
    """

    def __init__(self, region: str, host: str, service: str = "dynamodb", user_agent: str = "ddb-sidecar"):
        self.user_agent = user_agent.strip().encode("ascii")
        self.region = _check_printable(region, "region", spaces=False)
        self.service = _check_printable(service, "service", spaces=False)
        self.host = _check_printable(host, "host", spaces=False)
        if "/" in region or "/" in service:
            raise ValueError("region and service must not contain '/'")
        user_agent = _check_printable(user_agent.strip(), "user agent", spaces=True)
        self._creq_head = f"POST\n/\n\ncontent-type:{JSON_CONTENT_TYPE}\nhost:{host}\nx-amz-date:"
        self._head_start = (
            f"POST / HTTP/1.1\r\nHost: {host}\r\nContent-Type: {JSON_CONTENT_TYPE}\r\nX-Amz-Target: "
        ).encode("ascii")
        self._head_end = f"\r\nUser-Agent: {user_agent}\r\n\r\n".encode("ascii")
        self._last_app_ua: bytes | None = None
        self._last_ua_end = self._head_end
        self._targets: dict[str, bytes] = {}
        self._state_sec = -1
        self._state_creds: Credentials | None = None
        self._state: _SigningState | None = None

    def __repr__(self) -> str:
        return f"DynamoDBRequestSigner(region={self.region!r}, host={self.host!r}, service={self.service!r})"

    def _prepare(self, creds: Credentials, sec: int) -> _SigningState:
        access_key = _check_printable(creds.access_key, "access key", spaces=False)
        if "," in access_key or "/" in access_key:
            raise ValueError(f"invalid access key: {access_key!r}")
        date = amz_date(sec)
        datestamp = date[:8]
        scope = credential_scope(datestamp, self.region, self.service)
        if creds.token:
            token = _check_printable(creds.token, "session token", spaces=False)
            token_creq = f"x-amz-security-token:{token}\n"
            token_head = f"X-Amz-Security-Token: {token}\r\n"
            signed = "content-type;host;x-amz-date;x-amz-security-token;x-amz-target"
        else:
            token_creq = token_head = ""
            signed = "content-type;host;x-amz-date;x-amz-target"
        state = _SigningState(
            creq_prefix=f"{self._creq_head}{date}\n{token_creq}x-amz-target:",
            creq_middle=f"\n\n{signed}\n",
            sts_prefix=f"{ALGORITHM}\n{date}\n{scope}\n",
            key=derive_signing_key(creds.secret_key, datestamp, self.region, self.service),
            head_middle=(
                f"\r\nX-Amz-Date: {date}\r\n{token_head}Authorization: {ALGORITHM} "
                f"Credential={access_key}/{scope}, SignedHeaders={signed}, Signature="
            ).encode("ascii"),
        )
        self._state, self._state_sec, self._state_creds = state, sec, creds
        return state

    def _add_target(self, target: str) -> bytes:
        encoded = _check_printable(target, "X-Amz-Target", spaces=False).encode("ascii")
        if len(self._targets) >= _MAX_TARGETS:
            self._targets.clear()
        self._targets[target] = encoded
        return encoded

    def request_head(
        self,
        creds: Credentials,
        target: str,
        body: bytes,
        now: float,
        app_user_agent: bytes | None = None,
        payload_sha256: str | None = None,
    ) -> bytes:
        """The complete request head, ending in a blank line; the caller sends ``body`` right after it.

        ``app_user_agent``: the app's own User-Agent, kept (with ours appended) so that CloudTrail and AWS
        support still see the app's SDK and version; only printable ASCII of it, at most 512 bytes.
        ``payload_sha256``: the body's SHA-256 in hex when already known (a gate worker hashed it).

        Raises ValueError for a target, access key or token that is not printable ASCII (header
        injection).
        """
        sec = int(now)
        state = self._state
        if (
            state is None
            or sec != self._state_sec
            or (creds is not self._state_creds and creds != self._state_creds)
        ):
            state = self._prepare(creds, sec)
        encoded_target = self._targets.get(target)
        if encoded_target is None:
            encoded_target = self._add_target(target)
        digest = payload_sha256 if payload_sha256 is not None else _sha256(body).hexdigest()
        creq = state.creq_prefix + target + state.creq_middle + digest
        sts = state.sts_prefix + _sha256(creq.encode()).hexdigest()
        sig = _hmac_digest(state.key, sts.encode(), "sha256").hex().encode()
        head_end = self._head_end
        if app_user_agent:
            # An app sends the same User-Agent on every request: sanitize it once, not per request.
            if app_user_agent != self._last_app_ua:
                kept = _PRINTABLE_UA.sub(b"", app_user_agent)[:512].strip()
                self._last_app_ua = app_user_agent
                self._last_ua_end = (
                    b"\r\nUser-Agent: %b %b\r\n\r\n" % (kept, self.user_agent) if kept else self._head_end
                )
            head_end = self._last_ua_end
        return b"%b%b%b%b\r\nContent-Length: %d%b" % (
            self._head_start,
            encoded_target,
            state.head_middle,
            sig,
            len(body),
            head_end,
        )


# --- verifying clients -------------------------------------------------------------------------------

_MISSING = "MissingAuthenticationTokenException"
_UNRECOGNIZED = "UnrecognizedClientException"
_INVALID = "InvalidSignatureException"
_MISMATCH_MESSAGE = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your AWS Secret Access Key and signing method."
)


@dataclass(frozen=True)
class AuthFailure:
    """Why a client request was refused, as a DynamoDB error ``__type`` and message."""

    code: str
    message: str


def _invalid(message: str) -> AuthFailure:
    return AuthFailure(_INVALID, message)


def _parse_authorization(value: str) -> tuple[str, str, str] | None:
    """(credential, signed headers, signature) from an Authorization header, or None if malformed."""
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != ALGORITHM:
        return None
    fields: dict[str, str] = {}
    for part in rest.split(","):
        name, sep, field = part.strip().partition("=")
        if not sep or name in fields:
            return None
        fields[name] = field.strip()
    if fields.keys() != {"Credential", "SignedHeaders", "Signature"}:
        return None
    return fields["Credential"], fields["SignedHeaders"], fields["Signature"]


_MUST_SIGN = ("content-type", "host", "x-amz-target")


class ClientVerifier:
    """Checks that incoming requests are SigV4-signed with one of the configured client keys.

    Any region and service in the credential scope are accepted (the app signs for whatever region it
    is configured with). The payload hash is always computed from the body; an X-Amz-Content-Sha256
    header must match it.
    """

    def __init__(self, keys: Mapping[str, str], max_skew: float = 300.0):
        self._keys = dict(keys)
        self._max_skew = max_skew
        self._derived: dict[tuple[str, str, str, str], bytes] = {}
        self._last_date: tuple[str, int] | None = None  # (X-Amz-Date, its Unix time)

    def __repr__(self) -> str:
        return f"ClientVerifier(keys={sorted(self._keys)!r}, max_skew={self._max_skew!r})"

    def _signing_key(self, access_key: str, secret: str, datestamp: str, region: str, service: str) -> bytes:
        cache_key = (access_key, datestamp, region, service)
        key = self._derived.get(cache_key)
        if key is None:
            if len(self._derived) >= 256:
                self._derived.clear()
            key = self._derived[cache_key] = _derive(secret, datestamp, region, service)
        return key

    def _epoch(self, date: str) -> int | None:
        last = self._last_date
        if last is not None and last[0] == date:
            return last[1]
        if not _AMZ_DATE.fullmatch(date):
            return None
        try:
            parsed = time.strptime(date, AMZ_DATE_FORMAT)
        except ValueError:
            return None
        epoch = calendar.timegm(parsed)
        self._last_date = (date, epoch)
        return epoch

    def verify(
        self,
        method: str,
        path: str,
        query: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        now: float,
    ) -> AuthFailure | None:
        """None if the request is correctly signed by a known client key, else why not. Never raises."""
        try:
            return self._verify(method, path, query, headers, body, now)
        except (ValueError, TypeError, UnicodeError):
            return _invalid("The request signature could not be checked.")

    def _verify(
        self,
        method: str,
        path: str,
        query: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        now: float,
    ) -> AuthFailure | None:
        # One pass over all names and values at C speed: CR, LF or NUL anywhere means header injection.
        blob = "".join(chain.from_iterable(headers))
        if "\r" in blob or "\n" in blob or "\0" in blob:
            return _invalid("A header contains a CR, LF or NUL character.")
        values: dict[str, list[str]] = {}
        for name, value in headers:
            lname = name.strip().lower()
            found = values.get(lname)
            if found is None:
                values[lname] = [value]
            else:
                found.append(value)

        authorization = values.get("authorization")
        if authorization is None:
            return AuthFailure(_MISSING, "Request is missing Authentication Token")
        parsed = _parse_authorization(authorization[0]) if len(authorization) == 1 else None
        if parsed is None:
            return _invalid(
                "Malformed Authorization header: expected AWS4-HMAC-SHA256 "
                "Credential=..., SignedHeaders=..., Signature=..."
            )
        credential, signed_list, given_signature = parsed

        scope_parts = credential.split("/")
        if len(scope_parts) != 5 or scope_parts[4] != "aws4_request" or not all(scope_parts):
            return _invalid("Malformed Credential: expected ACCESS_KEY/YYYYMMDD/region/service/aws4_request.")
        access_key, datestamp, region, service, _ = scope_parts
        secret = self._keys.get(access_key)
        if secret is None:
            return AuthFailure(_UNRECOGNIZED, "The security token included in the request is invalid.")
        if not _HEX_SIGNATURE.fullmatch(given_signature):
            return _invalid("Malformed Signature: expected 64 lowercase hex digits.")

        dates = values.get("x-amz-date")
        date = dates[0].strip() if dates is not None and len(dates) == 1 else ""
        epoch = self._epoch(date)
        if epoch is None:
            return _invalid("Missing or malformed X-Amz-Date header (expected one YYYYMMDDTHHMMSSZ value).")
        if abs(now - epoch) > self._max_skew:
            return _invalid(
                f"Signature expired: X-Amz-Date {date} is more than {self._max_skew:g} seconds away "
                f"from the server time {amz_date(now)}."
            )
        if datestamp != date[:8]:
            return _invalid("Credential scope date does not match X-Amz-Date.")

        signed = signed_list.split(";")
        if signed != sorted(set(signed)) or not all(signed) or signed_list != signed_list.lower():
            return _invalid("Malformed SignedHeaders: expected unique lowercase names in sorted order.")
        unsigned = [name for name in _MUST_SIGN if name not in signed]
        if unsigned:
            # Unsigned, X-Amz-Target could be changed on a captured request (a GetItem replayed as a
            # DeleteItem), and Content-Type how the body is read.
            return _invalid(
                f"SignedHeaders must include {', '.join(_MUST_SIGN)} (missing: {', '.join(unsigned)})."
            )
        if any(name not in values for name in signed):
            return _invalid("A header listed in SignedHeaders is missing from the request.")

        payload_hash = _sha256(body).hexdigest()
        declared = values.get("x-amz-content-sha256")
        if declared is not None:
            if len(declared) != 1 or declared[0].strip().lower() != payload_hash:
                return _invalid("The X-Amz-Content-Sha256 header does not match the request body.")
            payload_hash = declared[0].strip()

        creq = "\n".join(
            [
                method.upper(),
                "/" if path == "/" else quote(path or "/", safe="/~", errors="surrogateescape"),
                canonical_query(query),
                *_canonical_header_lines(values, signed),
                "",
                signed_list,
                payload_hash,
            ]
        )
        digest = _sha256(creq.encode("utf-8", "surrogateescape")).hexdigest()
        sts = f"{ALGORITHM}\n{date}\n{datestamp}/{region}/{service}/aws4_request\n{digest}"
        key = self._signing_key(access_key, secret, datestamp, region, service)
        expected = _hmac_digest(key, sts.encode("utf-8", "surrogateescape"), "sha256").hex()
        if not hmac.compare_digest(expected.encode("ascii"), given_signature.encode("ascii")):
            return _invalid(_MISMATCH_MESSAGE)
        return None
