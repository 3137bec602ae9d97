"""Config loading: defaults, durations, relative paths, and every problem reported with its path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sidecar.config import Address, ConfigError, load_config, parse_duration

MINIMAL = {
    "regions": [
        {"name": "us-east-1", "proxy": "127.0.0.1:8101"},
        {"name": "eu-west-1", "proxy": "127.0.0.1:8102"},
    ],
    "tables": ["orders"],
}


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def problems(tmp_path: Path, data: object) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, data))
    return err.value.problems


def test_minimal_config_gets_interface_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    assert config.listen == Address("127.0.0.1", 8000)
    assert config.home.name == "us-east-1"
    assert config.home.url == "https://dynamodb.us-east-1.amazonaws.com"
    assert config.health.interval == 1.0 and config.health.timeout == 0.8
    assert (config.health.fall, config.health.rise) == (3, 3)
    assert config.failover.hold_down == 60.0 and config.failover.failback == "manual"
    assert config.haproxy.manage is True and config.haproxy.backend == "dynamodb"
    assert config.admin == Address("127.0.0.1", 8405)
    assert config.replication.mode == "global-tables"
    assert config.proxy.allow_control_plane is False


def test_relative_paths_resolve_against_config_folder(tmp_path: Path) -> None:
    (tmp_path / "tpl").mkdir()
    (tmp_path / "tpl" / "h.j2").write_text("x")
    config = load_config(
        write(tmp_path, {**MINIMAL, "state_dir": "state", "haproxy": {"template": "tpl/h.j2"}})
    )
    assert config.state_dir == tmp_path / "state"
    assert config.haproxy.template == tmp_path / "tpl" / "h.j2"
    assert config.haproxy.config == tmp_path / "run" / "haproxy.cfg"


@pytest.mark.parametrize(
    ("text", "seconds"), [("800ms", 0.8), ("1s", 1.0), ("2m", 120.0), (3, 3.0), ("1.5s", 1.5)]
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["1x", "fast", "", "-1s", "0s", True, None])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_every_problem_reported_with_its_path(tmp_path: Path) -> None:
    data = {
        "regions": [
            {"name": "us-east-1", "proxy": "127.0.0.1:8101"},
            {"name": "eu-west-1", "proxy": "127.0.0.1:8101"},
            {"name": "us-east-1", "proxy": "127.0.0.1:8103"},
        ],
        "tables": ["orders", "orders", "x"],
        "health": {"interval": "1x", "colour": "red"},
        "haproxy": {"template": "missing.j2"},
        "listen": "127.0.0.1:8405",
    }
    found = problems(tmp_path, data)
    expected = [
        "regions[1].proxy: port 8101 already used by regions[0].proxy",
        "regions[2].name: us-east-1 already listed as regions[0]",
        "tables[1]: orders listed twice",
        "tables[2]:",
        "health.interval: malformed duration",
        "health.colour: unknown key",
        "admin: port 8405 already used by listen",
    ]
    for prefix in expected:
        assert any(p.startswith(prefix) for p in found), (prefix, found)


def test_missing_template_reported(tmp_path: Path) -> None:
    found = problems(tmp_path, {**MINIMAL, "haproxy": {"template": "nope.j2"}})
    assert any(p.startswith("haproxy.template:") and "not found" in p for p in found)


def test_no_open_signing_proxy(tmp_path: Path) -> None:
    found = problems(tmp_path, {**MINIMAL, "listen": "0.0.0.0:8000"})
    assert any(p.startswith("listen:") and "clients" in p for p in found)
    found = problems(tmp_path, {**MINIMAL, "admin": "0.0.0.0:9000"})
    assert any(p.startswith("admin:") for p in found)


def test_plain_http_endpoint_only_on_loopback(tmp_path: Path) -> None:
    data = {
        **MINIMAL,
        "regions": [{"name": "us-east-1", "proxy": "127.0.0.1:8101", "endpoint": "http://example.com"}],
    }
    found = problems(tmp_path, data)
    assert any(p.startswith("regions[0].endpoint:") and "https" in p for p in found)
    ok = {
        **MINIMAL,
        "regions": [{"name": "us-east-1", "proxy": "127.0.0.1:8101", "endpoint": "http://127.0.0.1:5000"}],
    }
    assert load_config(write(tmp_path, ok)).home.url == "http://127.0.0.1:5000"


def test_clients_need_their_secret_in_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = {
        **MINIMAL,
        "clients": [{"access_key_id": "AKIAAPPCLIENT0000001", "secret_access_key_env": "APP_SECRET"}],
    }
    monkeypatch.delenv("APP_SECRET", raising=False)
    found = problems(tmp_path, data)
    assert any(p.startswith("clients[0].secret_access_key_env:") and "APP_SECRET" in p for p in found)
    monkeypatch.setenv("APP_SECRET", "s3cr3t")
    config = load_config(write(tmp_path, data))
    assert config.client_secrets() == {"AKIAAPPCLIENT0000001": "s3cr3t"}


def test_not_yaml_and_missing_file(tmp_path: Path) -> None:
    found = problems(tmp_path, "regions: [\n")
    assert found and "YAML" in found[0]
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "absent.yaml")
    assert "not found" in err.value.problems[0]


def test_required_keys(tmp_path: Path) -> None:
    found = problems(tmp_path, {})
    assert "regions: required" in found and "tables: required" in found


def test_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "sidecar.yaml"
    config = load_config(example)
    assert config.home.name == "us-east-1"


def test_docker_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "docker" / "sidecar.yaml"
    config = load_config(example)
    assert config.haproxy.manage is False
    assert config.haproxy.runtime_socket == Path("/run/ddb-sidecar/haproxy.sock")


def test_unix_socket_listeners(tmp_path: Path) -> None:
    from sidecar.config import UnixAddress

    data = {
        **MINIMAL,
        "regions": [
            {"name": "us-east-1", "proxy": "unix:run/us-east-1.sock"},
            {"name": "eu-west-1", "proxy": "unix:/tmp/abs-eu.sock"},
        ],
    }
    config = load_config(write(tmp_path, data))
    assert config.regions[0].proxy == UnixAddress(tmp_path / "run" / "us-east-1.sock")
    assert config.regions[1].proxy == UnixAddress(Path("/tmp/abs-eu.sock"))
    assert str(config.regions[0].proxy) == f"unix@{tmp_path}/run/us-east-1.sock"


def test_unix_socket_listener_problems(tmp_path: Path) -> None:
    data = {
        **MINIMAL,
        "regions": [
            {"name": "us-east-1", "proxy": "unix:run/x.sock"},
            {"name": "eu-west-1", "proxy": "unix:run/x.sock"},
            {"name": "eu-central-1", "proxy": "unix:run/haproxy.sock"},
            {"name": "ap-south-1", "proxy": "unix:" + "d" * 120 + ".sock"},
            {"name": "sa-east-1", "proxy": "unix:"},
        ],
    }
    found = problems(tmp_path, data)
    assert any(p.startswith("regions[4].proxy:") and "unix:PATH" in p for p in found), found
    data["regions"].pop()
    found = problems(tmp_path, data)
    assert any(p.startswith("regions[1].proxy:") and "regions[0].proxy" in p for p in found), found
    assert any(p.startswith("regions[2].proxy:") and "haproxy.runtime_socket" in p for p in found), found
    assert any(p.startswith("regions[3].proxy:") and "too long" in p for p in found), found


# notify: a webhook URL may embed a token, so no message ever contains it.
SECRET_URL_PART = "T0KEN-s3cr3t"


def test_notify_defaults_off(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    assert config.notify.webhook is None and config.notify.webhook_env is None
    assert not config.notify.enabled and config.notify.url() is None
    assert "failover" in config.notify.kinds and "alert-cleared" in config.notify.kinds
    assert (config.notify.timeout, config.notify.attempts) == (2.0, 6)


def test_notify_https_webhook(tmp_path: Path) -> None:
    url = f"https://hooks.example.com/services/{SECRET_URL_PART}?key=abc"
    data = {**MINIMAL, "notify": {"webhook": url, "kinds": ["failover", "alert"], "timeout": "500ms"}}
    config = load_config(write(tmp_path, data))
    assert config.notify.url() == url and config.notify.enabled
    assert config.notify.kinds == ["failover", "alert"] and config.notify.timeout == 0.5
    assert SECRET_URL_PART not in repr(config)


@pytest.mark.parametrize("url", ["http://127.0.0.1:9000/hook", "http://localhost/hook", "http://[::1]:80/x"])
def test_notify_plain_http_to_loopback_ok(tmp_path: Path, url: str) -> None:
    config = load_config(write(tmp_path, {**MINIMAL, "notify": {"webhook": url}}))
    assert config.notify.webhook == url


@pytest.mark.parametrize(
    "url",
    [
        f"http://hooks.example.com/{SECRET_URL_PART}",
        f"http://10.0.0.5:8080/{SECRET_URL_PART}",
        f"ftp://hooks.example.com/{SECRET_URL_PART}",
        f"https:///{SECRET_URL_PART}",
        f"https://hooks.example.com:99999/{SECRET_URL_PART}",
        f"https://hooks.example.com/{SECRET_URL_PART} x",
    ],
)
def test_notify_bad_webhook_refused_without_echoing_it(tmp_path: Path, url: str) -> None:
    found = problems(tmp_path, {**MINIMAL, "notify": {"webhook": url}})
    assert any(p.startswith("notify.webhook:") for p in found), found
    assert not any(SECRET_URL_PART in p for p in found), found
    if url.startswith("http://"):
        assert any("https" in p for p in found), found


def test_notify_both_webhook_and_env_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_URL", "https://hooks.example.com/x")
    data = {
        **MINIMAL,
        "notify": {"webhook": f"https://hooks.example.com/{SECRET_URL_PART}", "webhook_env": "NOTIFY_URL"},
    }
    found = problems(tmp_path, data)
    assert any(p.startswith("notify.webhook_env:") and "at most one" in p for p in found), found
    assert not any(SECRET_URL_PART in p for p in found), found


def test_notify_webhook_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = {**MINIMAL, "notify": {"webhook_env": "NOTIFY_URL"}}
    monkeypatch.delenv("NOTIFY_URL", raising=False)
    found = problems(tmp_path, data)
    assert any(p.startswith("notify.webhook_env:") and "NOTIFY_URL is not set" in p for p in found)
    # Without the environment check (render, validate elsewhere) the unset variable is not an error.
    assert load_config(write(tmp_path, data), check_environment=False).notify.url() is None

    monkeypatch.setenv("NOTIFY_URL", f"http://hooks.example.com/{SECRET_URL_PART}")
    found = problems(tmp_path, data)
    assert any(p.startswith("notify.webhook_env:") and "NOTIFY_URL" in p and "https" in p for p in found)
    assert not any(SECRET_URL_PART in p for p in found), found

    monkeypatch.setenv("NOTIFY_URL", f"https://hooks.example.com/{SECRET_URL_PART}")
    config = load_config(write(tmp_path, data))
    assert config.notify.url() == f"https://hooks.example.com/{SECRET_URL_PART}"


def test_notify_section_problems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_URL", raising=False)
    found = problems(
        tmp_path, {**MINIMAL, "notify": {"webhook_env": f"https://x/{SECRET_URL_PART}", "kinds": ["nope"]}}
    )
    assert any(p.startswith("notify.webhook_env:") and "NAME" in p for p in found), found
    assert any(p.startswith("notify.kinds[0]:") for p in found), found
    assert not any(SECRET_URL_PART in p for p in found), found
    found = problems(tmp_path, {**MINIMAL, "notify": {"attempts": 0, "timeout": "0s", "colour": 1}})
    for prefix in ("notify.attempts:", "notify.timeout:", "notify.colour: unknown key"):
        assert any(p.startswith(prefix) for p in found), (prefix, found)
    # The environment check still runs when another section is invalid.
    found = problems(
        tmp_path, {**MINIMAL, "health": {"interval": "1x"}, "notify": {"webhook_env": "NOTIFY_URL"}}
    )
    assert any(p.startswith("notify.webhook_env:") and "not set" in p for p in found), found


def test_coordination_defaults_to_none_and_etcd_settings_are_checked(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    assert config.coordination.backend == "none" and not config.coordination.enabled
    fleet = {
        "backend": "etcd",
        "endpoints": ["http://10.0.0.5:2379", "http://10.0.0.6:2379"],
        "prefix": "/ddb-sidecar/orders-prod",
        "host": "web-1",
        "lease_ttl": "5s",
    }
    config = load_config(write(tmp_path, {**MINIMAL, "coordination": fleet}))
    assert config.coordination.enabled and config.coordination.host_name() == "web-1"
    assert config.coordination.lease_ttl == 5.0
    found = problems(
        tmp_path,
        {
            **MINIMAL,
            "coordination": {
                "backend": "etcd",
                "endpoints": ["10.0.0.5:2379"],
                "prefix": "ddb-sidecar/x y",
                "host": "web 1",
                "lease_ttl": "500ms",
            },
        },
    )
    for path in (
        "coordination.endpoints",
        "coordination.prefix",
        "coordination.host",
        "coordination.lease_ttl",
    ):
        assert any(p.startswith(f"{path}") or f": {path}" in p for p in found), (path, found)


def test_coordination_with_streams_replication_is_accepted(tmp_path: Path) -> None:
    # the fleet's leader runs the one replicator (its checkpoints in etcd)
    path = write(
        tmp_path, {**MINIMAL, "coordination": {"backend": "etcd"}, "replication": {"mode": "streams"}}
    )
    config = load_config(path)
    assert config.coordination.enabled and config.replication.mode == "streams"
