"""Prometheus metrics, built from the data path's plain counters when /metrics is scraped."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from sidecar.engine import Daemon

_STATE = {"up": 1.0, "down": 0.0, "unknown": -1.0}


class DaemonCollector(Collector):
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        regions = self.daemon.regions
        requests = CounterMetricFamily(
            "ddb_sidecar_requests",
            "Client requests by region, operation and HTTP status",
            labels=["region", "operation", "status"],
        )
        refused = CounterMetricFamily(
            "ddb_sidecar_refused_requests",
            "Requests refused by the sidecar before reaching a region",
            labels=["region", "reason"],
        )
        upstream_errors = CounterMetricFamily(
            "ddb_sidecar_upstream_errors",
            "Requests that got no response from the region",
            labels=["region", "kind"],
        )
        latency = HistogramMetricFamily(
            "ddb_sidecar_upstream_latency_seconds",
            "Time from sending a request to the region to its full response",
            labels=["region"],
        )
        in_flight = GaugeMetricFamily(
            "ddb_sidecar_in_flight_requests", "Requests waiting for the region", labels=["region"]
        )
        connections = GaugeMetricFamily(
            "ddb_sidecar_upstream_connections", "Open upstream connections", labels=["region", "state"]
        )
        connects = CounterMetricFamily(
            "ddb_sidecar_upstream_connects", "Upstream connections opened", labels=["region"]
        )
        state = GaugeMetricFamily(
            "ddb_sidecar_region_up", "Region health: 1 up, 0 down, -1 unknown", labels=["region"]
        )
        probe = GaugeMetricFamily(
            "ddb_sidecar_probe_latency_seconds", "Latency of the last health probe", labels=["region"]
        )
        weight = GaugeMetricFamily(
            "ddb_sidecar_desired_weight", "The weight the sidecar wants HAProxy to use", labels=["region"]
        )
        for name, runtime in regions.items():
            stats = runtime.stats
            for (operation, status), n in list(stats.requests.items()):
                requests.add_metric([name, operation, str(status)], n)
            for reason, n in list(stats.refused.items()):
                refused.add_metric([name, reason], n)
            for kind, n in list(stats.upstream_errors.items()):
                upstream_errors.add_metric([name, kind], n)
            hist = stats.upstream_latency
            latency.add_metric([name], hist.cumulative(), hist.total)
            in_flight.add_metric([name], stats.in_flight)
            connections.add_metric([name, "idle"], runtime.pool.idle)
            connections.add_metric([name, "total"], runtime.pool.size)
            connects.add_metric([name], runtime.pool.stats.connects)
            state.add_metric([name], _STATE.get(runtime.health.state, -1.0))
            monitor = self.daemon.monitors.get(name)
            if monitor is not None and monitor.probe_latency is not None:
                probe.add_metric([name], monitor.probe_latency)
            weight.add_metric([name], self.daemon.weights.get(name, 0))
        yield from (
            requests,
            refused,
            upstream_errors,
            latency,
            in_flight,
            connections,
            connects,
            state,
            probe,
            weight,
        )
        yield from self._failover()
        if self.daemon.haproxy is not None:
            restarts = CounterMetricFamily(
                "ddb_sidecar_haproxy_restarts", "Times the supervised HAProxy was restarted"
            )
            restarts.add_metric([], self.daemon.haproxy.restarts)
            yield restarts

    def _failover(self) -> Iterator[Metric]:
        daemon = self.daemon
        observations = CounterMetricFamily(
            "ddb_sidecar_health_observations",
            "Health observations by region, source (probe, write probe, traffic) and cause",
            labels=["region", "source", "cause"],
        )
        suspect = GaugeMetricFamily(
            "ddb_sidecar_region_suspect",
            "1 while a region's last observation was an outage",
            labels=["region"],
        )
        active = GaugeMetricFamily(
            "ddb_sidecar_active_region", "1 for the region the sidecar sends traffic to", labels=["region"]
        )
        observed = GaugeMetricFamily(
            "ddb_sidecar_haproxy_weight", "HAProxy's weight at the last read-back", labels=["region"]
        )
        keeper = daemon.keeper
        seen = keeper.observed or {}
        started = daemon.failover.state is not None
        for name, monitor in daemon.monitors.items():
            for (source, cause), n in list(monitor.outcomes.items()):
                observations.add_metric([name, source, cause], n)
            suspect.add_metric([name], 1.0 if monitor.state.suspect else 0.0)
            if started:
                active.add_metric([name], 1.0 if daemon.failover.active == name else 0.0)
            if name in seen:
                observed.add_metric([name], seen[name])
        moves = CounterMetricFamily("ddb_sidecar_moves", "Traffic moves by kind", labels=["kind"])
        for kind, n in daemon.failover.moves_total.items():
            moves.add_metric([kind], n)
        alerts = CounterMetricFamily("ddb_sidecar_alerts", "Alerts raised by kind", labels=["kind"])
        for kind, n in daemon.failover.alerts_total.items():
            alerts.add_metric([kind], n)
        paused = GaugeMetricFamily("ddb_sidecar_paused", "1 while automatic decisions are paused")
        if started:
            paused.add_metric([], 1.0 if daemon.failover.mode == "paused" else 0.0)
        confirmed = GaugeMetricFamily(
            "ddb_sidecar_weights_confirmed", "1 when HAProxy's read-back weights match the desired ones"
        )
        confirmed.add_metric([], 1.0 if keeper.confirmed else 0.0)
        corrections = CounterMetricFamily(
            "ddb_sidecar_weight_drift_corrections",
            "Times HAProxy's weights drifted (reload, restart, another writer) and were re-asserted",
        )
        corrections.add_metric([], keeper.drift_corrections)
        failed = CounterMetricFamily(
            "ddb_sidecar_weight_failed_attempts", "Runtime API attempts to set or confirm weights that failed"
        )
        failed.add_metric([], keeper.failed_attempts)
        webhook = CounterMetricFamily(
            "ddb_sidecar_webhook_events", "Webhook deliveries by outcome", labels=["outcome"]
        )
        notifier = daemon.notifier
        for outcome in ("sent", "failed", "dropped", "retries"):
            webhook.add_metric([outcome], getattr(notifier, outcome, 0))
        lag = GaugeMetricFamily(
            "ddb_sidecar_replication_lag_seconds",
            "Replication lag from the active region into this one, from heartbeats",
            labels=["region"],
        )
        for name in daemon.monitors:
            value = daemon.lag_ms(name)
            if value is not None:
                lag.add_metric([name], value / 1000)
        yield from self._replicator()
        yield from self._coordination()
        held = GaugeMetricFamily("ddb_sidecar_fence_held_writes", "Writes held by a switchover's fence now")
        held.add_metric([], daemon.fence.held)
        yield from (observations, suspect, active, observed, moves, alerts, paused, confirmed, corrections,
                    failed, webhook, lag, held)  # fmt: skip

    def _coordination(self) -> Iterator[Metric]:
        fleet = self.daemon.fleet
        if fleet is None:
            return
        connected = GaugeMetricFamily(
            "ddb_sidecar_coordination_connected", "1 while etcd is reachable and this member is in the fleet"
        )
        connected.add_metric([], 1.0 if fleet.state == "connected" else 0.0)
        leader = GaugeMetricFamily("ddb_sidecar_coordination_leader", "1 while this member leads the fleet")
        leader.add_metric([], 1.0 if fleet.is_leader else 0.0)
        members = GaugeMetricFamily("ddb_sidecar_coordination_members", "Live members of the fleet")
        members.add_metric([], len(fleet.members))
        epoch = GaugeMetricFamily("ddb_sidecar_coordination_epoch", "The fleet decision epoch applied here")
        epoch.add_metric([], fleet.applied_epoch)
        isolated = GaugeMetricFamily(
            "ddb_sidecar_coordination_isolated", "1 while this host alone sees the active region down"
        )
        isolated.add_metric([], 1.0 if fleet.isolated else 0.0)
        seen = GaugeMetricFamily(
            "ddb_sidecar_fleet_region_members",
            "Members that see a region up or down",
            labels=["region", "state"],
        )
        for name, tally in fleet.vote().tallies.items():
            seen.add_metric([name, "up"], tally.up)
            seen.add_metric([name, "down"], tally.down)
        yield from (connected, leader, members, epoch, isolated, seen)

    def _replicator(self) -> Iterator[Metric]:
        replicator = self.daemon.replicator
        if replicator is None:
            return
        applied = CounterMetricFamily(
            "ddb_sidecar_replication_records",
            "Stream records applied (or found superseded) by the replicator",
        )
        applied.add_metric([], replicator.records_applied)
        rate = GaugeMetricFamily(
            "ddb_sidecar_replication_records_per_second", "Stream records applied per second, last 10 s"
        )
        rate.add_metric([], replicator.records_per_s)
        age = GaugeMetricFamily(
            "ddb_sidecar_replication_iterator_age_seconds", "Age of the last stream record read, worst shard"
        )
        if replicator.iterator_age_s is not None:
            age.add_metric([], replicator.iterator_age_s)
        errors = CounterMetricFamily("ddb_sidecar_replication_errors", "Replicator errors (retried)")
        errors.add_metric([], replicator.errors)
        dead = CounterMetricFamily(
            "ddb_sidecar_replication_dead_letters",
            "Writes the target refused for good: recorded in the dead-letter file and skipped",
        )
        dead.add_metric([], replicator.counters.dead_letters)
        yield from (applied, rate, age, errors, dead)


def metrics_registry(daemon: Daemon) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(daemon))
    return registry


def render_metrics(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
