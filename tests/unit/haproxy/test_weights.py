"""WeightKeeper's pure helpers, and its loop against an in-memory HAProxy CLI (real HAProxy: integration).

The fake answers exactly as HAProxy 2.6 and 2.8 do on this machine (replies captured from both): each
command's answer ends with an empty line, and every command of a `;` line runs even after one failed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest

from sidecar.haproxy.runtime import (
    RuntimeAPIError,
    RuntimeClient,
    RuntimeUnavailable,
    parse_servers_state,
    split_replies,
    weight_command,
)
from sidecar.haproxy.weights import (
    ConfigMismatch,
    WeightKeeper,
    apply_commands,
    check_answers,
    check_weights,
    describe,
    differences,
    matches,
    unknown_servers,
)
from tests.support.wait import async_wait_until

B = "dynamodb"
HOME, OTHER = "us-east-1", "eu-west-1"

HEADER = (
    "# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight "
    "srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state "
    "srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port "
    "srv_check_addr srv_agent_addr srv_agent_port"
)
# Captured from HAProxy 2.6.12 and 2.8.25 (identical): `set server B/mars weight 100; set server
# B/us-east-1 weight 7; show servers state B`.
CAPTURED_ERROR_THEN_OK = (
    "No such server.\n\n\n1\n" + HEADER + "\n"
    "3 dynamodb 1 us-east-1 127.0.0.1 0 0 7 100 0 8 2 0 6 0 0 0 - 23518 - 0 0 - - 0\n"
    "3 dynamodb 2 eu-west-1 127.0.0.1 2 0 0 0 0 1 0 1 6 0 0 0 - 31411 - 0 0 - - 0\n\n"
)


# -- pure helpers -------------------------------------------------------------------------------------------


def test_apply_commands_raise_the_new_active_server_before_lowering_the_old() -> None:
    current = {HOME: 100, OTHER: 0}
    assert apply_commands(B, {HOME: 0, OTHER: 100}, current) == [
        f"set server {B}/{OTHER} weight 100",
        f"set server {B}/{HOME} weight 0",
    ]
    # And back: the order follows what goes up, not the names.
    assert apply_commands(B, {HOME: 100, OTHER: 0}, {HOME: 0, OTHER: 100}) == [
        f"set server {B}/{HOME} weight 100",
        f"set server {B}/{OTHER} weight 0",
    ]


def test_apply_commands_write_every_desired_server_weighted_ones_first() -> None:
    # Unchanged servers are written too (the read-back may be stale); zero weights always come last.
    desired = {"a": 0, "b": 50, "c": 100, "d": 0}
    current = {"a": 100, "b": 100, "c": 0, "d": 0}
    assert apply_commands(B, desired, current) == [
        f"set server {B}/c weight 100",  # goes up
        f"set server {B}/b weight 50",  # weighted, goes down
        f"set server {B}/a weight 0",
        f"set server {B}/d weight 0",
    ]
    # With an unreadable/unknown current, every weighted server counts as going up.
    assert apply_commands(B, {HOME: 1, OTHER: 0}, {}) == [
        f"set server {B}/{HOME} weight 1",
        f"set server {B}/{OTHER} weight 0",
    ]
    assert apply_commands(B, {}, {HOME: 100}) == []


@pytest.mark.parametrize(
    "weights",
    [
        {HOME: 257},
        {HOME: -1},
        {HOME: True},
        {HOME: 1.5},
        {"a b": 1},
        {"x;set server": 1},
        {"": 1},
        {"a\n": 0},
    ],
)
def test_bad_weights_are_refused(weights: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        check_weights(weights)
    with pytest.raises(ValueError):
        apply_commands(B, weights, {})


def test_weight_command_checks_names() -> None:
    assert weight_command(B, HOME, 256) == f"set server {B}/{HOME} weight 256"
    with pytest.raises(ValueError):
        weight_command("dyn;amo", HOME, 1)


def test_comparing() -> None:
    desired = {HOME: 0, OTHER: 100}
    assert matches(desired, {HOME: 0, OTHER: 100})
    assert matches(desired, {HOME: 0, OTHER: 100, "extra": 7})  # servers not desired are not ours
    assert not matches(desired, {HOME: 100, OTHER: 100})
    assert not matches(desired, {OTHER: 100})
    assert matches({}, {HOME: 1})
    assert differences(desired, {HOME: 100, OTHER: 100}) == {HOME: (100, 0)}
    assert differences(desired, {OTHER: 100}) == {HOME: (None, 0)}
    assert unknown_servers({**desired, "mars": 1}, {HOME: 0, OTHER: 0}) == ["mars"]
    assert describe({OTHER: 100, HOME: 0}) == "eu-west-1=100 us-east-1=0"
    assert describe(None) == "unknown" and describe({}) == "(no servers)"


def test_split_replies_as_haproxy_answers() -> None:
    assert split_replies("\n\n", 2) == ["", ""]  # two silent successes
    no_such, ok, state = split_replies(CAPTURED_ERROR_THEN_OK, 3)
    assert (no_such, ok) == ("No such server.", "")
    assert parse_servers_state(state)[HOME].weight == 7
    # The last answer may come without its empty line.
    assert split_replies("\nTrailing garbage in weight string\n", 2) == [
        "",
        "Trailing garbage in weight string",
    ]
    assert split_replies("", 0) == []
    with pytest.raises(RuntimeAPIError, match="expected 2 answers"):
        split_replies("\n", 2)
    with pytest.raises(RuntimeAPIError, match="expected 1 answers"):
        split_replies("a\n\nb\n\n", 1)


def test_check_answers() -> None:
    cmds = [weight_command(B, OTHER, 100), weight_command(B, HOME, 0)]
    check_answers(cmds, ["", ""])
    with pytest.raises(ConfigMismatch, match="No such server"):
        check_answers(cmds, ["No such server.", ""])
    with pytest.raises(RuntimeAPIError, match="between 0 and 256") as caught:
        check_answers(cmds, ["", "Absolute weight can only be between 0 and 256 inclusive."])
    assert not isinstance(caught.value, ConfigMismatch)


async def test_commands_refuses_what_haproxy_would_split() -> None:
    client = RuntimeClient("/nonexistent.sock")
    with pytest.raises(ValueError):
        await client.commands(["show info; show stat"])
    with pytest.raises(ValueError):
        await client.commands(["show info", " "])
    assert await client.commands([]) == []
    with pytest.raises(RuntimeUnavailable):
        await client.commands(["show info"])


# -- the keeper against a fake CLI ---------------------------------------------------------------------------


class FakeHAProxy(RuntimeClient):
    """HAProxy's stats socket, in memory: `show info`, `show servers state B`, `set server B/S weight N`."""

    def __init__(self, weights: dict[str, int]) -> None:
        super().__init__("/fake.sock")
        self.weights = dict(weights)
        self.pid = 1000
        self.lines: list[str] = []  # every line received
        self.away = False
        self.answer: Callable[[str], str] | None = None  # replaces the whole answer when set

    def state_text(self) -> str:
        rows = [
            f"3 {B} {i} {name} 127.0.0.1 2 0 {w} {w} 0 1 0 1 6 0 0 0 - {8000 + i} - 0 0 - - 0"
            for i, (name, w) in enumerate(self.weights.items(), 1)
        ]
        return "1\n" + HEADER + "\n" + "".join(r + "\n" for r in rows)

    def run(self, cmd: str) -> str:
        words = cmd.split()
        if cmd == "show info":
            return f"Name: HAProxy\nVersion: 2.8.25\nPid: {self.pid}\n"
        if words[:3] == ["show", "servers", "state"]:
            return self.state_text() if words[3:] == [B] else "Can't find backend.\n"
        if words[:2] == ["set", "server"] and words[3] == "weight":
            backend, _, server = words[2].partition("/")
            if backend != B:
                return "No such backend.\n"
            if server not in self.weights:
                return "No such server.\n"
            self.weights[server] = int(words[4])
            return ""
        return "Unknown command.\n"

    async def command(self, cmd: str) -> str:
        await asyncio.sleep(0)
        if self.away:
            raise RuntimeUnavailable(
                "/fake.sock: No such file or directory (HAProxy not running or reloading)"
            )
        self.lines.append(cmd)
        if self.answer is not None:
            return self.answer(cmd)
        return "".join(self.run(part.strip()) + "\n" for part in cmd.split(";"))

    @property
    def writes(self) -> list[str]:
        return [line for line in self.lines if "set server" in line]


def keeper_for(fake: FakeHAProxy, **kwargs: object) -> WeightKeeper:
    options: dict[str, object] = {"check_interval": 0.05, "backoff_min": 0.01, "backoff_max": 0.08}
    options.update(kwargs)
    return WeightKeeper(fake, B, **options)  # type: ignore[arg-type]


async def test_keeper_flips_on_one_line_and_confirms() -> None:
    fake = FakeHAProxy({HOME: 100, OTHER: 0})
    observed: list[dict[str, int] | None] = []
    applied: list[tuple[dict[str, int], float]] = []
    keeper = keeper_for(fake, on_observed=observed.append, on_applied=lambda w, s: applied.append((w, s)))
    keeper.start()
    try:
        await async_wait_until(lambda: keeper.observed == {HOME: 100, OTHER: 0}, 2, message="first read-back")
        assert not keeper.confirmed and keeper.desired is None and not fake.writes
        keeper.set_desired({HOME: 0, OTHER: 100})
        assert await keeper.wait_confirmed(2)
        assert fake.weights == {HOME: 0, OTHER: 100}
        assert fake.writes == [
            f"set server {B}/{OTHER} weight 100; set server {B}/{HOME} weight 0; show servers state {B}"
        ]
        assert keeper.applied == 1 and keeper.failed_attempts == 0 and keeper.drift_corrections == 0
        assert [w for w, _ in applied] == [{HOME: 0, OTHER: 100}] and applied[0][1] >= 0
        assert observed[-1] == {HOME: 0, OTHER: 100} and keeper.last_error is None
        # The same weights again: nothing to do, nothing written.
        keeper.set_desired({OTHER: 100, HOME: 0})
        n = len(fake.lines)
        await async_wait_until(lambda: len(fake.lines) >= n + 2, 2, message="periodic read-backs")
        assert len(fake.writes) == 1 and keeper.applied == 1
    finally:
        await keeper.stop()
    assert not keeper.running


async def test_keeper_corrects_drift_and_notices_a_new_worker(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeHAProxy({HOME: 100, OTHER: 0})
    keeper = keeper_for(fake)
    keeper.set_desired({HOME: 0, OTHER: 100})
    keeper.start()
    try:
        assert await keeper.wait_confirmed(2)
        caplog.set_level(logging.INFO, logger="sidecar.haproxy.weights")
        fake.weights = {HOME: 100, OTHER: 0}  # a "reload": config weights back, new worker
        fake.pid = 2000
        await async_wait_until(
            lambda: keeper.drift_corrections == 1 and keeper.confirmed, 2, message="corrected"
        )
        assert fake.weights == {HOME: 0, OTHER: 100}
        assert keeper.reloads_detected == 1
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "HAProxy had eu-west-1=0 us-east-1=100" in warnings[0], warnings
        assert any("worker pid 1000 -> 2000" in r.getMessage() for r in caplog.records)
        # Another writer, same worker.
        fake.weights[OTHER] = 3
        await async_wait_until(
            lambda: keeper.drift_corrections == 2 and keeper.confirmed, 2, message="corrected"
        )
        assert keeper.reloads_detected == 1 and fake.weights == {HOME: 0, OTHER: 100}
    finally:
        await keeper.stop()


async def test_keeper_backs_off_logs_once_and_recovers(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.haproxy.weights")
    fake = FakeHAProxy({HOME: 100, OTHER: 0})
    observed: list[dict[str, int] | None] = []
    keeper = keeper_for(
        fake, check_interval=10.0, backoff_min=0.01, backoff_max=0.08, on_observed=observed.append
    )
    fake.away = True
    keeper.start()
    try:
        keeper.set_desired({HOME: 0, OTHER: 100})
        await async_wait_until(lambda: keeper.failed_attempts >= 6, 3, message="retries")
        assert not keeper.confirmed and keeper.observed is None and observed[-1] is None
        assert keeper.last_error is not None and "socket unavailable" in keeper.last_error
        assert not await keeper.wait_confirmed(0.05)
        # 0.01, 0.02, 0.04, 0.08, 0.08...: exponential, capped; not a busy loop.
        loop = asyncio.get_running_loop()
        n, started = keeper.failed_attempts, loop.time()
        await asyncio.sleep(0.4)
        assert keeper.failed_attempts - n <= 0.4 / 0.08 + 2
        fake.away = False
        assert await keeper.wait_confirmed(2)
        assert fake.weights == {HOME: 0, OTHER: 100} and keeper.last_error is None
        assert loop.time() - started < 2
    finally:
        await keeper.stop()
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(messages) == 1 and "socket unavailable" in messages[0], messages
    recovered = [r.getMessage() for r in caplog.records if "confirmed after" in r.getMessage()]
    assert len(recovered) == 1 and f"after {keeper.failed_attempts + 1} attempts" in recovered[0], recovered


async def test_unknown_server_writes_nothing_and_never_crashes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.haproxy.weights")
    fake = FakeHAProxy({HOME: 100, OTHER: 0})
    keeper = keeper_for(fake, backoff_max=0.05)
    keeper.start()
    try:
        # The weighted server does not exist: lowering the others would leave no server weighted.
        keeper.set_desired({"mars-north-1": 100, HOME: 0, OTHER: 0})
        await async_wait_until(lambda: keeper.failed_attempts >= 4, 3, message="retries")
        assert keeper.running and not keeper.confirmed
        assert keeper.last_error is not None and "No such server" in keeper.last_error
        assert "mars-north-1" in keeper.last_error
        assert not fake.writes and fake.weights == {HOME: 100, OTHER: 0}
        assert keeper.observed == {HOME: 100, OTHER: 0}  # HAProxy's weights stay visible
        keeper.set_desired({HOME: 0, OTHER: 100})
        assert await keeper.wait_confirmed(2) and keeper.last_error is None
    finally:
        await keeper.stop()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "mars-north-1" in errors[0], errors


@pytest.mark.parametrize(
    "answer",
    [
        lambda cmd: "",
        lambda cmd: "\n",
        lambda cmd: "garbage\n\n",
        lambda cmd: "x\n\ny\n\nz\n\nw\n\n",
        lambda cmd: "Name: HAProxy\n\n1\n# be_name srv_name\n",
        lambda cmd: "Pid: 1\n\n1\n# be_name srv_name srv_uweight\ndynamodb us-east-1 notanumber\n\n",
        lambda cmd: "\x00\xff" * 100,
        lambda cmd: "\n\n" + "Permission denied\n\n" * 3,
        lambda cmd: "Pid: 1\n\nCan't find backend.\n\n",
    ],
)
async def test_nothing_the_socket_answers_crashes_the_task(answer: Callable[[str], str]) -> None:
    fake = FakeHAProxy({HOME: 100, OTHER: 0})
    fake.answer = answer
    keeper = keeper_for(fake, backoff_max=0.02)
    keeper.set_desired({HOME: 0, OTHER: 100})
    keeper.start()
    try:
        await async_wait_until(lambda: keeper.failed_attempts >= 3, 3, message="failed attempts")
        assert keeper.running and not keeper.confirmed and keeper.last_error
        fake.answer = None
        assert await keeper.wait_confirmed(2)
    finally:
        await keeper.stop()


async def test_kick_reads_back_at_once() -> None:
    fake = FakeHAProxy({HOME: 100, OTHER: 0})
    keeper = keeper_for(fake, check_interval=60.0)
    keeper.set_desired({HOME: 0, OTHER: 100})
    keeper.start()
    try:
        assert await keeper.wait_confirmed(2)
        fake.weights = {HOME: 100, OTHER: 0}
        fake.pid += 1
        assert await keeper.kick(2)  # without the kick, the next check would be a minute away
        assert fake.weights == {HOME: 0, OTHER: 100} and keeper.drift_corrections == 1
        assert keeper.reloads_detected == 1
    finally:
        await keeper.stop()
    assert not await keeper.kick(0.05)  # stopped: nobody reads back


def test_a_raised_server_that_haproxy_has_down_is_forced_up_first() -> None:
    from sidecar.haproxy.weights import apply_commands

    cmds = apply_commands("dynamodb", {"us-east-1": 0, "eu-west-1": 100}, {"us-east-1": 100, "eu-west-1": 0},
                          not_running={"eu-west-1", "us-east-1"})  # fmt: skip
    assert cmds == [
        "set server dynamodb/eu-west-1 health up",
        "set server dynamodb/eu-west-1 weight 100",
        "set server dynamodb/us-east-1 weight 0",
    ]
    # only servers that get traffic are forced; running ones are left to their checks
    assert apply_commands("b", {"a": 100, "c": 0}, {"a": 0, "c": 100}) == [
        "set server b/a weight 100",
        "set server b/c weight 0",
    ]
