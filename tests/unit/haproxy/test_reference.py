"""haproxy/reference/haproxy.cfg is what `render` produces for examples/sidecar.yaml (installed as
/etc/ddb-sidecar/sidecar.yaml, HAProxy with the Prometheus exporter). Regenerate it with
`python -m tests.unit.haproxy.test_reference`."""

from __future__ import annotations

from pathlib import Path

import yaml

from sidecar.config import config_from_data
from sidecar.haproxy.render import render

ROOT = Path(__file__).resolve().parents[3]
REFERENCE = ROOT / "haproxy" / "reference" / "haproxy.cfg"


def rendered() -> str:
    data = yaml.safe_load((ROOT / "examples" / "sidecar.yaml").read_text())
    config = config_from_data(data, base_dir=Path("/etc/ddb-sidecar"), check_environment=False)
    return render(config, features=frozenset({"prometheus-exporter"}))


def test_the_reference_rendering_is_what_render_produces() -> None:
    assert REFERENCE.read_text() == rendered(), (
        "haproxy/reference/haproxy.cfg is stale: python -m tests.unit.haproxy.test_reference"
    )


if __name__ == "__main__":
    REFERENCE.write_text(rendered())
    print(f"wrote {REFERENCE}")
