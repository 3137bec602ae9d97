"""Templates for the deploy pipeline (issue 9, item 2), with the real CLI and a real HAProxy (`haproxy -c`):
an operator's template extends the built-in one through its named blocks and reads `haproxy.vars`;
`render` refuses a template that breaks the contract (with the line to fix) before writing anything;
`render --stdout` prints what it would write."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from tests.support.ports import free_port
from tests.support.stack import SIDECAR, base_env, offline_config


def config(tmp_path: Path, template: Path | None = None, **haproxy: Any) -> Path:
    return offline_config(tmp_path, haproxy={**({"template": str(template)} if template else {}), **haproxy})


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SIDECAR), *args], capture_output=True, text=True, timeout=60, env=base_env(),
                          check=False)  # fmt: skip


def test_a_template_extends_the_builtin_one_and_reads_vars(tmp_path: Path) -> None:
    template = tmp_path / "site.cfg.j2"
    template.write_text(
        '{% extends "haproxy.cfg.j2" %}\n'
        "{% block global_extra %}\n    # site: {{ vars.site }}\n{% endblock %}\n"
        "{% block extra %}\n\nfrontend admin_ping\n    bind 127.0.0.1:{{ vars.ping_port }}\n"
        "    http-request return status 200\n{% endblock %}\n"
    )
    path = config(tmp_path, template, vars={"site": "ovh-gra", "ping_port": free_port()})
    done = cli("render", "-c", str(path))
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "haproxy.cfg").read_text()
    assert "# site: ovh-gra" in text and "frontend admin_ping" in text
    assert "backend dynamodb" in text  # the built-in blocks are all there
    printed = cli("render", "--stdout", "-c", str(path))
    assert printed.returncode == 0 and printed.stdout == text


def test_a_template_that_breaks_the_contract_is_refused_with_the_line_to_fix(tmp_path: Path) -> None:
    template = tmp_path / "renamed.cfg.j2"
    # renders, and passes `haproxy -c`, but the server is not named after its region: every flip would fail
    template.write_text(
        '{% extends "haproxy.cfg.j2" %}\n{% block backend %}\nbackend {{ haproxy.backend }}\n'
        "    option httpchk\n    http-check send meth GET uri /ddb-sidecar/health\n"
        "{% for server in servers %}\n    server dc-{{ loop.index }} {{ server.address }} check weight {{ server.weight }}\n"
        "{% endfor %}\n{% endblock %}\n"
    )
    path = config(tmp_path, template)
    done = cli("render", "-c", str(path))
    assert done.returncode == 1
    assert "has no `server us-east-1" in done.stderr and "line " in done.stderr, done.stderr
    assert "server dc-1 is not a configured region" in done.stderr
    assert not (tmp_path / "haproxy.cfg").exists()
    assert cli("render", "--stdout", "-c", str(path)).returncode == 1
