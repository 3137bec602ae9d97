"""`ddb-sidecar demo --scenario drill`: a whole disaster-recovery cycle on loopback, in streams mode.

Two moto_server regions (signature checking on), the sidecar with its HAProxy, replicating with its own
stream replicator (`replication.mode: streams`), and an application writing orders at a steady pace through
the stable address. Each step is printed as it happens, with a live line every second, and summarised:

1. steady writes into the home region, us-east-1; the replication lag into eu-west-1, live;
2. us-east-1 goes dark (SIGSTOP of its moto_server): the sidecar fails over to eu-west-1 by itself; how long
   writes failed, and the replication lag at the move;
3. us-east-1 returns (SIGCONT); the replicator, now eu-west-1 -> us-east-1, catches up;
4. `ddb-sidecar reconcile` lists what did not replicate: writes us-east-1 took just before it went dark
   (and writes that failed at the app but were applied when it woke) that never reached eu-west-1;
5. `ddb-sidecar switchover --to us-east-1`: writes held until replication has caught up, then home;
6. `ddb-sidecar reconcile --apply`, from the active region (us-east-1 again), copies them into eu-west-1;
7. writes stop; both regions, read directly, hold the same items, and every acknowledged write.

The repair comes after the switchover on purpose. `reconcile --apply` repairs towards the active region: run
while eu-west-1 is active, it would make us-east-1 like eu-west-1 and delete the writes that did not
replicate (acknowledged writes, kept only in `--backup`); run the other way (`--from us-east-1`) while the
app writes into eu-west-1, it would delete from eu-west-1 any fresh write its replicator had not copied yet.
Once home, every eu-west-1 write is in us-east-1 (the switchover waited for it), and the default direction
only adds what is missing.

The commands run as an operator would type them (`python -m sidecar reconcile|switchover -c sidecar.yaml`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sidecar.demo import (
    CLIENT_TIMEOUT,
    HEALTH_TABLE,
    HOME,
    OTHER,
    TABLE,
    _new_events,
    _status,
    _Writer,
    demo_ports,
    sidecar_env,
    start_regions,
    start_sidecar,
    stop_sidecar,
    valid_base_port,
    wait_sidecar_up,
)
from sidecar.localregion import LocalRegion

RATE = 15.0  # the app's writes per second (open loop: a stuck write never delays the next one)
STEADY = 5.0  # seconds of steady writes before the outage
DARK_AFTER_MOVE = CLIENT_TIMEOUT + 1.5  # eu-west-1 serves this long while us-east-1 is still dark
MOVE_TIMEOUT = 20.0
RETURN_TIMEOUT = 30.0
COMMAND_TIMEOUT = 60.0
SETTLE_TIMEOUT = 20.0
LISTED_KEYS = 8  # keys printed per kind of difference (the counts are exact)
LAG_MS = re.compile(r"replication lag to \S+ (\d+(?:\.\d+)?) ms")
HELD = re.compile(r"writes held (\d+) ms \((\d+) held")


class DrillFailed(Exception):
    """A step did not do what the drill expects; the message says which and why."""


@dataclass
class Step:
    number: int
    title: str
    started: float
    ended: float | None = None
    notes: list[str] = field(default_factory=list)


class _Ticker:
    """Drives the open-loop writer from a thread of its own, so no wait of the drill delays a write."""

    def __init__(self, writer: _Writer) -> None:
        self.writer = writer
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="drill-ticker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.writer.tick(time.monotonic())

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)


class Drill:
    """The script, and what it saw; `run()` returns the exit code."""

    def __init__(self, work: Path, base_port: int) -> None:
        self.work = work
        self.ports = demo_ports(base_port)
        self.admin = f"127.0.0.1:{self.ports['admin']}"
        self.stable = f"http://127.0.0.1:{self.ports['listen']}"
        self.regions = [
            LocalRegion(name, self.ports[f"moto-{name}"], work / "logs" / f"moto-{name}.log")
            for name in (HOME, OTHER)
        ]
        self.home, self.other = self.regions
        self.env: dict[str, str] = {}
        self.sidecar: subprocess.Popen[bytes] | None = None
        self.writer: _Writer | None = None
        self.ticker: _Ticker | None = None
        self.haproxy_pid: int | None = None
        self.t0 = time.monotonic()
        self.steps: list[Step] = []
        self.last: dict[str, Any] | None = None
        self.seen_events: set[tuple[str, str, str]] = set()
        self.next_line = 0.0
        self.lags: list[float] = []
        self.facts: dict[str, Any] = {}

    # -- printing ---------------------------------------------------------------------------------------

    def stamp(self) -> str:
        now = time.time()
        clock = time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now * 10) % 10}"
        return f"{clock} +{time.monotonic() - self.t0:5.1f}s"

    def say(self, text: str) -> None:
        print(f"{self.stamp()}  {text}", flush=True)

    def step(self, title: str) -> Step:
        if self.steps and self.steps[-1].ended is None:
            self.steps[-1].ended = time.monotonic()
        step = Step(len(self.steps) + 1, title, time.monotonic())
        self.steps.append(step)
        print(flush=True)
        self.say(f"drill: step {step.number}/7: {title}")
        return step

    def note(self, text: str) -> None:
        """A result of the current step: printed now, and repeated in the summary."""
        self.steps[-1].notes.append(text)
        self.say(f"  => {text}")

    def _live(self, status: dict[str, Any] | None) -> None:
        ok, failed = self.writer.counts() if self.writer is not None else (0, 0)
        if status is None:
            self.say(f"  sidecar not answering   writes ok {ok} failed {failed}")
            return
        regions = "  ".join(
            f"{r['name']} {r['state']:<4} w={'?' if r['weight'] is None else r['weight']:>3}"
            for r in status["regions"]
        )
        replication = status.get("replication") or {}
        replicator = replication.get("replicator") or {}
        lag = replication.get("lag_ms")
        source = replicator.get("source") or "?"
        target = OTHER if source == HOME else HOME
        self.say(
            f"  active {status.get('active_region') or 'NONE':<9}  {regions}  replication {source}->{target} "
            f"lag {'?' if lag is None else f'{lag:.0f} ms':>7}, {replicator.get('records_applied', 0)} applied"
            f"   writes ok {ok} failed {failed}"
        )

    # -- watching the sidecar ---------------------------------------------------------------------------

    def poll(self) -> dict[str, Any] | None:
        """One look at the sidecar: new events printed, a live line once a second."""
        status = _status(self.admin)
        if status is not None:
            self.last = status
            for event in _new_events(status, self.seen_events):
                self.say(f"  event {event['kind']}: {event['reason']}")
            lag = (status.get("replication") or {}).get("lag_ms")
            if lag is not None and status.get("active_region") == HOME:
                self.lags.append(float(lag))
        now = time.monotonic()
        if now >= self.next_line:
            self.next_line = now + 1.0
            self._live(status)
        return status

    def wait(
        self, until: Callable[[dict[str, Any]], bool] | None, timeout: float, every: float = 0.2
    ) -> dict[str, Any] | None:
        """Poll until `until(status)` holds (the status), or `timeout` s pass (None; `until` None: just watch)."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.poll()
            if until is not None and status is not None and until(status):
                return status
            if time.monotonic() >= deadline:
                return None
            if self.sidecar is not None and self.sidecar.poll() is not None:
                raise DrillFailed(
                    f"the sidecar exited ({self.sidecar.returncode}); see {self._log('sidecar')}"
                )
            time.sleep(every)

    def command(self, name: str, *args: str) -> tuple[int, str, str]:
        """`ddb-sidecar ARGS -c sidecar.yaml`, run as an operator would, watched live while it runs."""
        shown = " ".join(["ddb-sidecar", *args])
        self.say(f"  $ {shown}")
        out_path, err_path = self.work / "logs" / f"{name}.out", self.work / "logs" / f"{name}.err"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "sidecar", *args, "-c", str(self.work / "sidecar.yaml")],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=self.env,
                cwd=self.work,
            )
            try:
                deadline = time.monotonic() + COMMAND_TIMEOUT
                while proc.poll() is None:
                    if time.monotonic() > deadline:
                        raise DrillFailed(f"`{shown}` did not finish within {COMMAND_TIMEOUT:g} s")
                    self.poll()
                    time.sleep(0.1)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        return proc.returncode, out_path.read_text(), err_path.read_text()

    def _log(self, name: str) -> Path:
        return self.work / "logs" / f"{name}.log"

    def _region(self, status: dict[str, Any], name: str) -> dict[str, Any]:
        return next(r for r in status["regions"] if r["name"] == name)

    # -- the script ---------------------------------------------------------------------------------------

    def run(self) -> int:
        print(f"demo: scenario drill, working in {self.work}", flush=True)
        try:
            self._start()
            self._steady()
            self._dark()
            self._return()
            stranded = self._list()
            self._switchover()
            self._repair(stranded)
            good = self._check()
        except DrillFailed as exc:
            self.facts["failure"] = str(exc)
            good = False
        if self.steps and self.steps[-1].ended is None:
            self.steps[-1].ended = time.monotonic()
        self._summary(good)
        return 0 if good else 1

    def _start(self) -> None:
        self.say("drill: starting two local DynamoDB regions (moto_server, signature checking on) ...")
        key = start_regions(self.regions)
        for region in self.regions:
            _enable_streams(region)
            self.say(f"  {region.name:<10} {region.endpoint}  tables {TABLE}, {HEALTH_TABLE}, streams on")
        config: dict[str, Any] = {
            "listen": f"127.0.0.1:{self.ports['listen']}",
            "regions": [
                {"name": r.name, "endpoint": r.endpoint, "proxy": f"127.0.0.1:{self.ports[r.name]}"}
                for r in self.regions
            ],
            "tables": [TABLE],
            # Fast probes, so the drill fits in a minute: down after 2 x 500 ms without an answer.
            "health": {"table": HEALTH_TABLE, "interval": "500ms", "timeout": "400ms", "fall": 2, "rise": 2},
            "failover": {"automatic": True, "failback": "manual", "switchover_timeout": "10s"},
            "replication": {"mode": "streams", "poll_interval": "100ms"},
            "haproxy": {"manage": True, "stats": f"127.0.0.1:{self.ports['stats']}"},
            "admin": self.admin,
            "state_dir": "run",
        }
        self.env = sidecar_env(key)
        self.say("drill: starting the sidecar (streams mode: its own replicator) and its HAProxy ...")
        self.sidecar = start_sidecar(self.work, config, self.env)
        status = wait_sidecar_up(self.admin, self.sidecar)
        if status is None:
            raise DrillFailed(f"the sidecar did not come up; see {self._log('sidecar')}")
        self.seen_events = {(e["at"], e["kind"], e["reason"]) for e in status["events"]}
        self.haproxy_pid = (status.get("haproxy") or {}).get("pid")
        if status.get("active_region") != HOME:
            raise DrillFailed(f"the sidecar started on {status.get('active_region')}, not {HOME}")
        if self.wait(lambda s: s["replication"]["lag_ms"] is not None, 30) is None:
            raise DrillFailed("the replicator never measured a lag (has it read every shard?)")
        self.say(
            f"drill: stable address {self.stable}   admin http://{self.admin}/status   "
            f"config {self.work / 'sidecar.yaml'}"
        )

    def _steady(self) -> None:
        self.step(
            f"steady writes: the app writes {RATE:g} orders a second through the stable address; {HOME} serves, "
            f"the sidecar's replicator copies its stream into {OTHER}"
        )
        self.writer = _Writer(self.stable, RATE)  # its schedule starts once its clients are made
        self.ticker = _Ticker(self.writer)
        self.ticker.start()
        self.lags = []
        self.next_line = 0.0
        self.wait(None, STEADY)
        ok, failed = self.writer.counts()
        lags = sorted(self.lags) or [float("nan")]
        self.note(
            f"{ok} writes acknowledged, {failed} failed; replication lag into {OTHER}: median "
            f"{lags[len(lags) // 2]:.0f} ms, max {lags[-1]:.0f} ms ({len(self.lags)} samples)"
        )

    def _dark(self) -> None:
        assert self.writer is not None
        self.step(
            f"the home region {HOME} goes dark (SIGSTOP of its moto_server: connections accepted, nothing "
            "answered)"
        )
        lag_before = ((self.last or {}).get("replication") or {}).get("lag_ms")
        self.home.signal(signal.SIGSTOP)
        cut = time.monotonic()
        self.facts["cut"] = cut
        moved = self.wait(lambda s: s.get("active_region") == OTHER, MOVE_TIMEOUT, every=0.1)
        if moved is None:
            raise DrillFailed(f"no failover to {OTHER} within {MOVE_TIMEOUT:g} s of the cut")
        move_at = time.monotonic()
        self.facts["move_after"] = move_at - cut
        event = next((e for e in moved["events"] if e["kind"] == "failover"), None)
        reason = event["reason"] if event else "(no failover event)"
        lag = LAG_MS.search(reason)
        measured = f"{float(lag[1]):g} ms" if lag else "unmeasured"
        self.facts["lag_at_move"] = measured
        why = reason.split(";")[0]
        self.note(
            f"the sidecar failed over to {OTHER} by itself {move_at - cut:.1f} s after the cut "
            f"({why[:100] + '...' if len(why) > 100 else why})"
        )
        self.wait(None, DARK_AFTER_MOVE)  # eu-west-1 serves; every write sent to us-east-1 has timed out
        writes = list(self.writer.writes)
        after = [w for w in writes if w.ended >= cut]
        first = min((w.ended for w in after if w.error is None and w.started >= cut), default=None)
        failures = Counter(w.error for w in after if w.error is not None)
        detail = ", ".join(f"{kind} x{n}" for kind, n in failures.most_common())
        if first is None:
            raise DrillFailed(f"no write was acknowledged after the cut ({detail or 'no failure either'})")
        self.facts["gap"] = first - cut
        self.facts["failed_in_outage"] = sum(failures.values())
        self.note(
            f"writes failed for {first - cut:.2f} s (from the cut to the first write acknowledged by "
            f"{OTHER}); {sum(failures.values())} failed" + (f" ({detail})" if detail else "")
        )
        self.note(
            f"replication lag into {OTHER}: {'?' if lag_before is None else f'{lag_before:.0f} ms'} just "
            f"before the cut, {measured} at the move (as the sidecar measured it; step 4 counts what did "
            "not make it)"
        )

    def _return(self) -> None:
        self.step(f"{HOME} returns (SIGCONT of its moto_server)")
        self.home.signal(signal.SIGCONT)
        back = time.monotonic()
        up = self.wait(
            lambda s: self._region(s, HOME)["state"] == "up" and not self._region(s, HOME)["cause"],
            RETURN_TIMEOUT,
        )
        if up is None:
            raise DrillFailed(f"{HOME} was not seen up again within {RETURN_TIMEOUT:g} s")
        self.note(f"{HOME} is up again {time.monotonic() - back:.1f} s after it resumed")
        caught = self.wait(
            lambda s: (
                (s["replication"].get("replicator") or {}).get("source") == OTHER
                and s["replication"]["lag_ms"] is not None
                and s["replication"]["lag_ms"] < 1000
            ),
            RETURN_TIMEOUT,
        )
        if caught is None:
            raise DrillFailed(f"replication {OTHER} -> {HOME} did not catch up within {RETURN_TIMEOUT:g} s")
        self.note(
            f"replication {OTHER} -> {HOME} caught up {time.monotonic() - back:.1f} s after it resumed "
            f"(lag {caught['replication']['lag_ms']:.0f} ms): the writes {OTHER} took meanwhile are in {HOME}"
        )

    def _reconcile(self, name: str, *args: str) -> dict[str, Any]:
        code, out, err = self.command(name, "reconcile", "--json", "--no-progress", *args)
        if code not in (0, 1):
            raise DrillFailed(f"reconcile exited {code}: {err.strip() or out.strip()}")
        try:
            doc: dict[str, Any] = json.loads(out)
        except ValueError:
            raise DrillFailed(f"reconcile printed no JSON report: {out[:200]!r} {err[:200]!r}") from None
        _print_report(doc)
        return doc

    def _list(self) -> set[str]:
        """Step 4: what did not replicate; returns the orders only in us-east-1."""
        assert self.writer is not None
        self.step(
            f"reconcile: what did not replicate ({OTHER} is active: it is the source of the comparison)"
        )
        doc = self._reconcile("reconcile-list")
        c = doc["comparisons"][0]
        stranded = {_order(e) for e in c["extra"]["keys"]}
        in_flight = c["missing"]["count"]
        if c["keys_truncated"]:
            raise DrillFailed("reconcile listed more keys than --max-keys; cannot account for them")
        acked = {w.order for w in self.writer.writes if w.error is None}
        failed = {w.order for w in self.writer.writes if w.error is not None}
        stranded_acked = stranded & acked
        cut = self.facts["cut"]
        oldest = min((w.ended for w in self.writer.writes if w.order in stranded_acked), default=cut)
        window = (
            f", acknowledged in the last {max(cut - oldest, 0.0) * 1000:.0f} ms before it"
            if stranded_acked
            else ""
        )
        self.facts["stranded"] = len(stranded)
        self.facts["stranded_acked"] = f"{len(stranded_acked)}{window}"
        self.note(
            f"only in {HOME}, never replicated: {len(stranded)} orders: {len(stranded_acked)} acknowledged "
            f"before the cut (the real replication lag at the move{window}), {len(stranded & failed)} that "
            f"failed at the app during the cut and were applied when {HOME} woke; {in_flight} written in "
            f"{OTHER} still on their way to {HOME}; {c['different']['count']} different"
        )
        if c["different"]["count"] or len(stranded) != len(stranded_acked) + len(stranded & failed):
            raise DrillFailed("reconcile found differences the drill cannot explain; see above")
        return stranded

    def _switchover(self) -> None:
        assert self.writer is not None
        self.step(f"switchover home: {OTHER} -> {HOME}, writes held until replication has caught up")
        started = time.monotonic()
        code, out, err = self.command("switchover", "switchover", "--to", HOME)
        ended = time.monotonic()
        for line in (out + err).splitlines():
            self.say(f"    {line}")
        if code != 0:
            raise DrillFailed(f"switchover refused (exit {code}): {err.strip()}")
        home = self.wait(lambda s: s.get("active_region") == HOME, 10)
        if home is None:
            raise DrillFailed(f"the switchover answered ok but {HOME} is not active")
        held = HELD.search(out)
        self.facts["pause_ms"] = float(held[1]) if held else None
        self.wait(None, CLIENT_TIMEOUT + 0.5)  # every write sent during the switchover has ended
        during = [w for w in self.writer.writes if started <= w.started <= ended]
        failed = [w for w in during if w.error is not None]
        slowest = max((w.ended - w.started for w in during if w.error is None), default=0.0)
        self.facts["switchover_failed"] = len(failed)
        self.note(
            f"on {HOME} after {ended - started:.1f} s (the command, start to end); writes held "
            f"{held[1] if held else '?'} ms ({held[2] if held else '?'} held); the app's slowest write meanwhile "
            f"{slowest * 1000:.0f} ms; {len(failed)} failed"
        )
        if failed:
            raise DrillFailed(f"{len(failed)} writes failed during the switchover: {failed[0].error}")

    def _repair(self, stranded: set[str]) -> None:
        self.step(
            f"reconcile --apply: from the active region ({HOME} again) into {OTHER}, what did not replicate"
        )
        backup = self.work / "reconcile-backup.jsonl"
        doc = self._reconcile("reconcile-apply", "--apply", "--backup", str(backup))
        c = doc["comparisons"][0]
        repaired = {_order(e) for e in c["missing"]["keys"] if e.get("repair") == "applied"}
        repairs = c.get("repairs") or {}
        self.facts["repaired"] = len(repaired & stranded)
        self.note(
            f"{len(repaired & stranded)} of the {len(stranded)} orders from step 4 copied into {OTHER}; "
            f"{len(repaired - stranded)} fresh writes copied ahead of the replicator (harmless: it finds them "
            f"there); {c['extra']['count']} extra, {c['different']['count']} different; repairs: "
            f"{repairs.get('applied', 0)} applied, {repairs.get('conflict', 0)} conflicts, "
            f"{repairs.get('failed', 0)} failed"
        )
        if c["extra"]["count"] or c["different"]["count"]:
            raise DrillFailed(f"{OTHER} held items {HOME} did not (or different ones): see the report above")
        if stranded - repaired:
            # Already there (copied by something else meanwhile) is fine: the final check reads both regions.
            self.say(
                f"  ({len(stranded - repaired)} of them were not repaired here; the final check decides)"
            )

    def _check(self) -> bool:
        assert self.writer is not None and self.ticker is not None
        self.step("writes stop; final check: both regions, read directly")
        self.ticker.stop()
        self.writer.close()
        writes = list(self.writer.writes)
        acked = {w.order for w in writes if w.error is None}
        failed = {w.order for w in writes if w.error is not None}
        self.facts["written"] = (len(writes), len(acked), len(failed))
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while True:  # the last writes reach eu-west-1 through the replicator
            self.poll()
            home, other = _scan(self.home), _scan(self.other)
            if (home == other and acked <= home.keys()) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        only_home, only_other = home.keys() - other.keys(), other.keys() - home.keys()
        different = [k for k in home.keys() & other.keys() if home[k] != other[k]]
        lost = acked - (home.keys() & other.keys())
        landed = failed & home.keys() & other.keys()
        identical = not only_home and not only_other and not different
        self.facts["final"] = (len(home), len(other), identical, len(lost), len(landed))
        self.note(
            f"{HOME} holds {len(home)} orders, {OTHER} {len(other)}: "
            + (
                "identical"
                if identical
                else f"NOT identical ({len(only_home)} only in {HOME}, {len(only_other)} only in {OTHER}, "
                f"{len(different)} different)"
            )
        )
        self.note(
            f"{len(writes)} writes sent: {len(acked)} acknowledged, every one in both regions"
            if not lost
            else f"{len(lost)} of {len(acked)} acknowledged writes are missing from a region: "
            + ", ".join(sorted(lost)[:5])
        )
        if failed:
            self.note(
                f"{len(failed)} writes failed at the app; {len(landed)} of them were applied anyway (a write "
                "that reached a region and failed is an unknown outcome, never a 'not written') and are in both "
                "regions"
            )
        return identical and not lost

    def _summary(self, good: bool) -> None:
        print(flush=True)
        self.say("drill: summary")
        for step in self.steps:
            took = (step.ended or time.monotonic()) - step.started
            print(f"  {step.number}. {step.title}  [{took:.1f} s]")
            for text in step.notes:
                print(f"       {text}")
        final = self.facts.get("final")
        print(
            f"  failover {self.facts['move_after']:.1f} s after the cut; writes failed for "
            f"{self.facts['gap']:.2f} s; replication lag at the move {self.facts['lag_at_move']} (sidecar), "
            f"acknowledged writes stranded in {HOME}: {self.facts['stranded_acked']}"
            if "stranded_acked" in self.facts
            else "  (the drill stopped before the reconcile)"
        )
        if self.facts.get("pause_ms") is not None:
            print(
                f"  switchover home: writes held {self.facts['pause_ms']:.0f} ms, "
                f"{self.facts.get('switchover_failed', '?')} failed"
            )
        if final is not None:
            sent, acked, failed = self.facts["written"]
            home, other, identical, lost, landed = final
            print(
                f"  writes: {sent} sent, {acked} acknowledged, {failed} failed ({landed} of them applied "
                f"anyway); lost writes: {lost}"
            )
            print(f"  both regions identical: {'yes' if identical else 'NO'} ({home} and {other} orders)")
        print(f"  total: {time.monotonic() - self.t0:.1f} s")
        if good:
            self.say("drill: PASSED: zero acknowledged writes lost, both regions hold the same items")
        else:
            why = self.facts.get("failure") or "the final check failed (see above)"
            self.say(f"drill: FAILED: {why}")
            print(f"  logs: {self.work / 'logs'}", flush=True)

    def close(self) -> None:
        """Stop everything the drill started, whatever state it is in."""
        if self.ticker is not None:
            self.ticker.stop()
        if self.writer is not None:
            self.writer.close()
        # Thaw first: the sidecar's replicator finishes its writes before it stops (up to 30 s into a frozen
        # region), and HAProxy, in a process group of its own, stops after it.
        for region in self.regions:
            region.signal(signal.SIGCONT)
        if self.sidecar is not None:
            stop_sidecar(self.sidecar)
            if self.haproxy_pid is not None:
                _stop_orphan(self.haproxy_pid, self.work)
        for region in self.regions:
            region.stop()


def _enable_streams(region: LocalRegion) -> None:
    """The replicator reads NEW_AND_OLD_IMAGES streams, in every region (each is a source in its turn)."""
    client = region.client()
    with contextlib.closing(client):
        for table in (TABLE, HEALTH_TABLE):
            client.update_table(
                TableName=table,
                StreamSpecification={"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"},
            )
            if not client.describe_table(TableName=table)["Table"].get("LatestStreamArn"):
                raise DrillFailed(f"{region.name}: {table} has no stream after UpdateTable")


def _stop_orphan(pid: int, work: Path) -> None:
    """The sidecar's HAProxy, if it outlived the sidecar (a SIGKILL does not reach its process group):
    stopped too, once its command line shows it is this drill's."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return  # gone, as it should be
    if str(work).encode() not in cmdline:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not Path(f"/proc/{pid}").exists():
            return


def _scan(region: LocalRegion) -> dict[str, str]:
    """Every order in `region`'s own data (its moto_server, read directly): sort key -> the item's attributes
    as JSON, without the replicator's bookkeeping (`ddbsc:*`)."""
    items: dict[str, str] = {}
    client = region.client()
    with contextlib.closing(client):
        kwargs: dict[str, Any] = {"TableName": TABLE, "ConsistentRead": True}
        while True:
            page = client.scan(**kwargs)
            for item in page.get("Items", []):
                kept = {k: v for k, v in item.items() if not k.startswith("ddbsc:")}
                items[item["sk"]["S"]] = json.dumps(kept, sort_keys=True)
            if not page.get("LastEvaluatedKey"):
                return items
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def _order(entry: dict[str, Any]) -> str:
    order: str = entry["key"]["sk"]["S"]
    return order


def _print_report(doc: dict[str, Any]) -> None:
    """reconcile's own text report, with the key lists shortened."""
    from sidecar.reconcile import render_text

    shown: Counter[str] = Counter()
    hidden: Counter[str] = Counter()

    def more() -> None:
        for kind, n in hidden.items():
            print(f"          ... and {n} more {kind}", flush=True)
        hidden.clear()

    for line in render_text(doc):
        kind = line.split()[0] if line.startswith("    ") else ""
        if kind in ("missing", "extra", "different"):
            shown[kind] += 1
            if shown[kind] > LISTED_KEYS:
                hidden[kind] += 1
                continue
        more()
        print(f"      {line}", flush=True)
    more()


def run_drill(workdir: Path | None, base_port: int) -> int:
    """The drill; 0 when every acknowledged write is in both regions and they hold the same items."""
    if not valid_base_port(base_port):
        return 2
    own_workdir = workdir is None
    work = workdir or Path(tempfile.mkdtemp(prefix="ddbdrill"))
    (work / "logs").mkdir(parents=True, exist_ok=True)

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # unwinds through the finally below, which stops every process

    previous = signal.signal(signal.SIGTERM, interrupted)
    drill = Drill(work, base_port)
    code = 1
    try:
        code = drill.run()
    except KeyboardInterrupt:
        print("\ndrill: interrupted; stopping everything it started", flush=True)
        code = 130
    finally:
        try:
            drill.close()
        finally:
            signal.signal(signal.SIGTERM, previous)
            if own_workdir and code == 0:
                shutil.rmtree(work, ignore_errors=True)
    return code


__all__ = ["Drill", "DrillFailed", "run_drill"]
