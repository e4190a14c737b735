from __future__ import annotations

import pytest

from airflow_provider_altabots.exceptions import (
    AltaBotsConfigError,
    AltaBotsRunFailed,
    AltaBotsRunTimeout,
    AltaBotsStatusUnknown,
    AltaBotsTransientError,
)
from airflow_provider_altabots.polling import (
    MIN_POLL_INTERVAL,
    PollPolicy,
    RunWatch,
    call_with_retries,
    deadline_after,
    wait_for_run,
)
from tests.fake_api import record


class Clock:
    """A fake Unix clock that only moves when the code under test sleeps."""

    def __init__(self, now: float = 1_760_000_000.0) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


def server_error() -> AltaBotsTransientError:
    return AltaBotsTransientError("Could not query workflow run r: the API failed (HTTP 503).", run_id="r")


def rate_limited(retry_after: float | None = None) -> AltaBotsTransientError:
    return AltaBotsTransientError("rate limited", run_id="r", retry_after=retry_after, rate_limited=True)


def run(outcomes, policy=None, timeout=None, clock=None):
    """Drive wait_for_run through a scripted list of check outcomes."""
    clock = clock or Clock()
    script = iter(outcomes)

    def check(check_deadline=None):
        outcome = next(script)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    watch = RunWatch("r", policy or PollPolicy(), deadline=deadline_after(timeout, clock.now), clock=clock)
    return wait_for_run(watch, check, sleep=clock.sleep), clock, watch


def test_waits_grow_by_half_up_to_the_maximum():
    outcomes = [record("RUNNING")] * 8 + [record("SUCCEED")]
    result, clock, watch = run(outcomes, PollPolicy(poll_interval=2, max_poll_interval=10))
    assert result["status"] == "SUCCEED"
    assert clock.sleeps == [2, 2, 3, 4.5, 6.75, 10, 10, 10, 10]
    assert watch.checks == 9


def test_a_ten_minute_run_costs_few_checks():
    """The default policy sees a 600 s run with about 17 checks (60 s cap)."""
    clock = Clock()
    start = clock.now
    watch = RunWatch("r", PollPolicy(), clock=clock)

    def check(check_deadline=None):
        return record("SUCCEED" if clock.now - start >= 600 else "RUNNING")

    wait_for_run(watch, check, sleep=clock.sleep)
    assert watch.checks <= 18
    assert clock.now - start - 600 < 60


def test_failed_run_raises_with_run_id_and_api_message():
    with pytest.raises(AltaBotsRunFailed) as caught:
        run([record("RUNNING"), record("FAILED", run_id="r", output={"error": "node 3 broke"})])
    assert caught.value.run_id == "r"
    assert "node 3 broke" in caught.value.message


def test_unknown_status_keeps_waiting_and_warns(caplog):
    result, _, _ = run([record("SUCCED"), record("QUEUED"), record("SUCCEED")])
    assert result["status"] == "SUCCEED"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("'SUCCED'" in w and "not taken for success" in w for w in warnings)


def test_server_errors_are_retried_with_backoff_and_reset_on_success(mocker):
    mocker.patch("random.uniform", return_value=1.0)
    outcomes = [
        server_error(),
        server_error(),
        server_error(),
        record("RUNNING"),
        server_error(),
        record("SUCCEED"),
    ]
    result, clock, _watch = run(outcomes, PollPolicy(poll_interval=2, max_consecutive_failures=4))
    assert result["status"] == "SUCCEED"
    # first wait, then backoff 2, 4, 8, then back to the normal interval; the count restarts.
    assert clock.sleeps == [2, 2, 4, 8, 2, 2]


def test_consecutive_failures_end_as_status_unknown_not_failed():
    with pytest.raises(AltaBotsStatusUnknown) as caught:
        run([server_error()] * 5, PollPolicy(max_consecutive_failures=5))
    assert caught.value.run_id == "r"
    assert "5 checks in a row failed" in caught.value.message
    assert "HTTP 503" in caught.value.message
    assert not isinstance(caught.value, AltaBotsRunFailed)


def test_rate_limits_follow_retry_after_and_do_not_count_as_failures(mocker):
    mocker.patch("random.uniform", return_value=0.5)
    outcomes = [rate_limited(30.0)] * 10 + [record("SUCCEED")]
    result, clock, _ = run(outcomes, PollPolicy(poll_interval=2, max_consecutive_failures=2))
    assert result["status"] == "SUCCEED"
    # 30 s asked + jitter (0.5 x min(poll_interval, 1 s)); once the backoff of a row of 429s
    # outgrows the hint (0.5 x 2 x 2^(n-1) s), the hint is no longer believed.
    assert clock.sleeps[1:] == [30.5] * 5 + [32, 64, 128, 150, 150]


def test_a_retry_after_of_zero_that_keeps_failing_backs_off_and_never_under_the_floor(mocker):
    """``Retry-After: 0`` answered 429 again and again: the checks slow down, never below 1 s apart."""
    mocker.patch("random.uniform", return_value=0.5)
    outcomes = [rate_limited(0.0)] * 8 + [record("SUCCEED")]
    _, clock, _ = run(outcomes, PollPolicy(poll_interval=1, backoff_cap=300))
    waits_after_429 = clock.sleeps[1:]
    assert min(waits_after_429) >= MIN_POLL_INTERVAL
    assert waits_after_429 == [1, 1, 2, 4, 8, 16, 32, 64]
    assert sum(waits_after_429) > 100  # about one request a second would have been 8 s


@pytest.mark.parametrize("interval", [1e-9, 0.5, 0.999])
def test_poll_interval_below_the_floor_is_refused(interval):
    with pytest.raises(AltaBotsConfigError, match=r"at least 1\.0 s"):
        PollPolicy(poll_interval=interval)


def test_a_rate_limit_between_server_errors_ends_the_failure_streak(mocker):
    """503s scattered through a 429 storm are not "consecutive": the API keeps answering."""
    mocker.patch("random.uniform", return_value=1.0)
    outcomes = [server_error(), rate_limited(1.0)] * 6 + [record("SUCCEED")]
    result, clock, _ = run(outcomes, PollPolicy(poll_interval=2, max_consecutive_failures=2))
    assert result["status"] == "SUCCEED"
    assert clock.sleeps[1::2] == [2] * 6  # each 5xx backoff starts again from the first step


def test_rate_limits_without_headers_back_off_exponentially_with_a_cap(mocker):
    mocker.patch("random.uniform", return_value=1.0)
    outcomes = [rate_limited()] * 6 + [record("SUCCEED")]
    _, clock, _ = run(outcomes, PollPolicy(poll_interval=2, backoff_cap=20))
    assert clock.sleeps == [2, 2, 4, 8, 16, 20, 20]


def test_jitter_spreads_backoff_between_half_and_full():
    policy = PollPolicy(poll_interval=4)
    delays = {policy.delay_after_error(server_error(), 3) for _ in range(200)}
    assert min(delays) >= 8
    assert max(delays) <= 16
    assert len(delays) > 100


def test_timeout_checks_once_more_at_the_deadline_then_names_last_status():
    outcomes = [record("RUNNING")] * 20
    with pytest.raises(AltaBotsRunTimeout) as caught:
        run(outcomes, PollPolicy(poll_interval=4, max_poll_interval=100), timeout=30)
    error = caught.value
    assert error.last_status == "RUNNING"
    assert "r" in error.message
    assert "RUNNING" in error.message


def test_timeout_wait_is_cut_to_end_exactly_at_the_deadline():
    clock = Clock()
    start = clock.now
    with pytest.raises(AltaBotsRunTimeout):
        run(
            [record("RUNNING")] * 20,
            PollPolicy(poll_interval=4, max_poll_interval=100),
            timeout=30,
            clock=clock,
        )
    assert clock.now - start == pytest.approx(30)
    assert clock.sleeps[-1] < 9  # the last wait was shortened to land on the deadline


def test_run_ending_at_the_final_check_still_succeeds():
    clock = Clock()
    start = clock.now
    watch = RunWatch(
        "r", PollPolicy(poll_interval=4, max_poll_interval=100), deadline=start + 30, clock=clock
    )

    def check(check_deadline=None):
        return record("SUCCEED" if clock.now - start >= 30 else "RUNNING")

    assert wait_for_run(watch, check, sleep=clock.sleep)["status"] == "SUCCEED"


def test_deadline_already_past_still_makes_one_check():
    clock = Clock()
    watch = RunWatch("r", PollPolicy(), deadline=clock.now - 100, clock=clock)
    assert watch.first_delay() == 0
    assert watch.observe(record("SUCCEED")) is None


def test_failed_status_wins_over_timeout():
    clock = Clock()
    watch = RunWatch("r", PollPolicy(), deadline=clock.now - 1, clock=clock)
    with pytest.raises(AltaBotsRunFailed):
        watch.observe(record("FAILED"))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"poll_interval": 0},
        {"poll_interval": -1},
        {"max_poll_interval": 0},
        {"poll_interval": 10, "max_poll_interval": 5},
        {"max_consecutive_failures": 0},
        {"max_consecutive_failures": 1.5},
        {"poll_interval": True},
        {"growth": 0.5},
    ],
)
def test_bad_policy_is_refused(kwargs):
    with pytest.raises(AltaBotsConfigError):
        PollPolicy(**kwargs)


def test_policy_round_trips_as_plain_numbers():
    policy = PollPolicy(poll_interval=3, max_poll_interval=30, max_consecutive_failures=4)
    kwargs = policy.as_kwargs()
    assert all(isinstance(value, int | float) for value in kwargs.values())
    assert PollPolicy(**kwargs) == policy


class TestCallWithRetries:
    def test_retries_until_success(self, mocker):
        sleep = mocker.Mock()
        calls = iter([server_error(), server_error(), {"ok": True}])

        def call():
            value = next(calls)
            if isinstance(value, Exception):
                raise value
            return value

        assert call_with_retries(call, PollPolicy(), sleep=sleep) == {"ok": True}
        assert sleep.call_count == 2

    def test_gives_up_after_the_limit(self, mocker):
        sleep = mocker.Mock()

        def call():
            raise server_error()

        with pytest.raises(AltaBotsTransientError):
            call_with_retries(call, PollPolicy(max_consecutive_failures=3), sleep=sleep)
        assert sleep.call_count == 2

    def test_refused_by_retry_if_raises_at_once(self, mocker):
        sleep = mocker.Mock()

        def call():
            raise server_error()

        with pytest.raises(AltaBotsTransientError):
            call_with_retries(call, PollPolicy(), retry_if=lambda error: not error.sent, sleep=sleep)
        sleep.assert_not_called()

    def test_rate_limits_and_scattered_5xx_do_not_use_up_the_failure_budget(self, mocker):
        sleep = mocker.Mock()
        calls = iter([rate_limited(1.0), server_error()] * 10 + [{"ok": True}])

        def call():
            value = next(calls)
            if isinstance(value, Exception):
                raise value
            return value

        policy = PollPolicy(max_consecutive_failures=2)
        assert call_with_retries(call, policy, sleep=sleep) == {"ok": True}
        assert sleep.call_count == 20

    def test_rate_limits_are_waited_out_for_at_most_the_patience(self, mocker):
        clock = Clock()

        def call():
            raise rate_limited(100.0)

        policy = PollPolicy(rate_limit_patience=250)
        with pytest.raises(AltaBotsTransientError):
            call_with_retries(call, policy, sleep=clock.sleep, clock=clock)
        assert len(clock.sleeps) == 2  # a third wait of 100 s would pass the 250 s patience
