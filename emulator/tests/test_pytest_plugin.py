"""The pytest plugin, run as a user's test session would run it; the client and the process launcher."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

import httpx
import pytest
from altabots_emulator.client import EmulatorClient, EmulatorError
from altabots_emulator.process import EmulatorProcess

pytest_plugins = ["pytester"]

USER_TESTS = """
import json
import os

import httpx

CONN = "AIRFLOW_CONN_MY_ALTABOTS"


def invoke(url, key):
    return httpx.post(
        url + "/v1/workflow/invoke",
        headers={"Authorization": "Bearer " + key},
        json={"input": {"topic": "x"}, "isAsync": True},
        trust_env=False,
    )


def test_the_connection_points_at_the_emulator(altabots_emulator):
    conn = json.loads(os.environ[CONN])
    assert conn == {"conn_type": "altabots", "host": altabots_emulator.url, "password": "key-from-ini"}
    assert altabots_emulator.api_key == "key-from-ini"
    assert invoke(conn["host"], "key-from-ini").status_code == 200
    (logged,) = altabots_emulator.invokes()
    assert logged["body"]["input"] == {"topic": "x"}
    with open("url.txt", "w") as out:
        out.write(altabots_emulator.url)


def test_each_test_starts_from_a_reset_emulator(altabots_emulator):
    assert altabots_emulator.invokes() == []
    assert altabots_emulator.url == open("url.txt").read()  # one process for the session
    # The ini's --run-seconds reached the command line.
    (workflow,) = altabots_emulator.workflows()
    assert workflow["run_seconds"] == 0.25


def test_use_points_the_connection_at_another_key_with_extras(altabots_emulator):
    altabots_emulator.set_workflow("other-key", outcome="fail")
    altabots_emulator.use("other-key", timeout=5)
    conn = json.loads(os.environ[CONN])
    assert (conn["password"], conn["extra"]) == ("other-key", {"timeout": 5})
    assert invoke(altabots_emulator.url, "other-key").status_code == 200


def test_faults_reach_the_api(altabots_emulator):
    altabots_emulator.set_faults(server_errors={"count": 1, "status": 503})
    assert invoke(altabots_emulator.url, "key-from-ini").status_code == 503
    assert invoke(altabots_emulator.url, "key-from-ini").status_code == 200


def test_the_connection_is_gone_after_a_test():
    assert CONN not in os.environ
"""


def test_the_fixtures_in_a_users_test_session(pytester: pytest.Pytester) -> None:
    pytester.makeini(
        """
        [pytest]
        altabots_emulator_api_key = key-from-ini
        altabots_emulator_args = --run-seconds 0.25 --pending-seconds 0
        altabots_emulator_conn_id = my_altabots
        """
    )
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=300)
    result.assert_outcomes(passed=5)
    # The session's emulator stopped with the session: nothing listens on its port any more.
    url = urlsplit((pytester.path / "url.txt").read_text())
    with pytest.raises(ConnectionRefusedError), socket.create_connection((url.hostname, url.port), timeout=5):
        pass


def test_the_process_says_why_it_did_not_start() -> None:
    with pytest.raises(RuntimeError, match=r"did not start .*exit status 2"):
        EmulatorProcess(["--outcome", "maybe"], start_timeout=120)


def test_the_client_names_what_the_emulator_refused() -> None:
    with EmulatorProcess(["--api-key", "k"], start_timeout=120) as emulator:
        with pytest.raises(EmulatorError, match=r"POST /_emulator/faults with 400: .*drop"):
            emulator.client.set_faults(drop={"count": -1})
        with pytest.raises(EmulatorError, match=r"GET /_emulator/runs/nope with 404"):
            emulator.client.run("nope")
        run_id = httpx.post(
            f"{emulator.url}/v1/workflow/invoke",
            headers={"Authorization": "Bearer k"},
            json={"input": {}, "isAsync": True},
            trust_env=False,
        ).json()["workflowRunId"]
        ended = emulator.client.end_run(run_id, "fail")
        assert ended["status"] == "FAILED"
        with EmulatorClient(emulator.url) as other:  # a second client sees the same emulator
            assert [run["run_id"] for run in other.runs("FAILED")] == [run_id]
    assert emulator.process.returncode == 0  # SIGTERM ends it cleanly
