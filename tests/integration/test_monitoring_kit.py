"""The monitoring kit names only what exists: every metric and label in examples/monitoring's alert rules
and Grafana dashboard is checked against a live scrape of a real sidecar (streams mode, in a one-member
fleet on a real etcd, so that every metric family is exported), and HAProxy's own exporter answers on the
stats listener when the binary has it.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from botocore.exceptions import ClientError

from sidecar.fleet.localetcd import LocalEtcdCluster
from sidecar.haproxy.binary import find_haproxy
from tests.support.moto_region import MotoRegion
from tests.support.stack import SIDECAR, SidecarStack, stream_tables
from tests.support.wait import wait_until

KIT = Path(__file__).resolve().parents[2] / "examples" / "monitoring"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# Names in PromQL that are not metrics: functions, keywords, Prometheus' own series.
_NOT_METRICS = {
    "sum", "max", "min", "avg", "count", "rate", "increase", "irate", "by", "without", "on", "ignoring",
    "histogram_quantile", "and", "or", "unless", "bool", "offset", "up", "le", "instance", "job",
}  # fmt: skip
_SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?")
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def expressions() -> list[tuple[str, str]]:
    rules = yaml.safe_load((KIT / "alerts.yml").read_text())
    out = [(f"alerts.yml {r['alert']}", r["expr"]) for g in rules["groups"] for r in g["rules"]]
    dashboard = json.loads((KIT / "grafana-dashboard.json").read_text())
    out += [(f"dashboard {p['title']!r}", t["expr"]) for p in dashboard["panels"] for t in p["targets"]]
    return out


def scrape(url: str) -> dict[str, set[str]]:
    """Metric name -> the label names seen on its samples."""
    with _NO_PROXY.open(url, timeout=5) as resp:
        text = resp.read().decode()
    found: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):  # a family exists even before its first sample
            name, kind = line.split()[2:4]
            found.setdefault(name + ("_total" if kind == "counter" else ""), set())
            continue
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s", line)
        if m is None:
            continue
        labels = {part.split("=", 1)[0] for part in re.findall(r'(\w+)="', m.group(3) or "")}
        found.setdefault(m.group(1), set()).update(labels)
    return found


@pytest.fixture(scope="module")
def metrics(
    moto_regions: dict[str, MotoRegion], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, set[str]]]:
    work = tmp_path_factory.mktemp("monitoring")
    app, health = stream_tables(moto_regions.values(), "mon")
    with LocalEtcdCluster(1, work / "etcd") as etcd:
        stack = SidecarStack(
            [moto_regions["us-east-1"], moto_regions["eu-west-1"]],
            [app],
            work,
            extra={
                "health": {"table": health},
                "replication": {"mode": "streams"},
                "coordination": {"backend": "etcd", "endpoints": etcd.endpoints, "prefix": f"/{app}"},
            },
        )
        with stack:
            stack.wait_regions_up()
            wait_until(
                lambda: stack.status()["replication"]["replicator"], 30, message="the leader replicates"
            )
            stack.client().put_item(TableName=app, Item={"pk": {"S": "x"}})
            stack.stats_url = f"http://127.0.0.1:{stack.stats_port}/metrics"  # type: ignore[attr-defined]
            # samples for the labelled families that start empty: a move (and back), a refused request
            stack.client().put_item(TableName=app, Item={"pk": {"S": "y"}})
            for to in ("eu-west-1", "us-east-1"):
                moved = subprocess.run(
                    [str(SIDECAR), "failover", "--to", to, "-c", str(stack.config_path)],
                    capture_output=True, text=True, timeout=60, env=stack.env, check=False,
                )  # fmt: skip
                assert moved.returncode == 0, moved.stderr
            with pytest.raises(ClientError):
                stack.client().get_item(TableName="not-served", Key={"pk": {"S": "x"}})
            found = scrape(f"{stack.admin_url}/metrics")
            for name, labels in declared_labels().items():  # families still without a sample
                if not found.get(name):
                    found.setdefault(name, set()).update(labels)
            found["__haproxy__"] = set()
            if _has_exporter():
                haproxy = scrape(stack.stats_url)  # type: ignore[attr-defined]
                found["__haproxy__"] = set(haproxy)
            yield found


def declared_labels() -> dict[str, set[str]]:
    """The label names each family is declared with in sidecar/metrics.py (for families that have no
    sample yet in a scrape: an alert never raised, an upstream error never seen)."""
    source = (Path(__file__).resolve().parents[2] / "sidecar" / "metrics.py").read_text()
    out: dict[str, set[str]] = {}
    for m in re.finditer(
        r'(Counter|Gauge|Histogram)MetricFamily\(\s*"(ddb_sidecar_\w+)"[^)]*?labels=\[([^\]]*)\]', source
    ):
        name = m.group(2) + ("_total" if m.group(1) == "Counter" else "")
        out[name] = set(re.findall(r'"(\w+)"', m.group(3)))
    return out


def _has_exporter() -> bool:
    done = subprocess.run(
        [find_haproxy(None), "-vv"], capture_output=True, text=True, timeout=10, check=False
    )
    return "prometheus-exporter" in done.stdout


def _exists(name: str, metrics: dict[str, set[str]]) -> str | None:
    for candidate in (name, name.removesuffix("_total"), name.removesuffix("_bucket")):
        if candidate in metrics:
            return candidate
    return None


@pytest.mark.parametrize(("where", "expr"), expressions())
def test_every_metric_and_label_the_kit_names_exists(
    where: str, expr: str, metrics: dict[str, set[str]]
) -> None:
    named = [(m.group(1), m.group(2)) for m in _SELECTOR.finditer(re.sub(r'"[^"]*"', '""', expr))]
    used = [(n, sel) for n, sel in named if n not in _NOT_METRICS and not re.fullmatch(r"\d+[smhd]?", n)]
    if not used and re.search(r"\bup\{", expr):
        return  # Prometheus' own `up` series of the scrape job
    assert used, f"{where}: names no metric: {expr}"
    grouping = {
        label.strip() for group in _GROUPING.findall(expr) for label in group.split(",") if label.strip()
    }
    for name, selector in used:
        if name.startswith("ddb_sidecar_") is False and name not in metrics:
            continue  # a label name inside by(...) or a PromQL word this crude parser saw
        real = _exists(name, metrics)
        assert real is not None, f"{where}: metric {name} is not exported (expr: {expr})"
        labels = set(re.findall(r"(\w+)\s*=~?", selector or ""))
        missing = (labels | grouping) - metrics[real] - {"instance", "job", "le"}
        assert not missing, f"{where}: {name} has no label {sorted(missing)} (it has {sorted(metrics[real])})"


def test_haproxys_own_exporter_answers_on_the_stats_listener(metrics: dict[str, set[str]]) -> None:
    if not _has_exporter():
        pytest.skip("this HAProxy binary was built without the Prometheus exporter")
    assert any(name.startswith("haproxy_") for name in metrics["__haproxy__"]), sorted(
        metrics["__haproxy__"]
    )[:10]
