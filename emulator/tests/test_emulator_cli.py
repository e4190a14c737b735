"""The emulator's command line, TLS, and HTTP/1.1 plumbing (raw sockets)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from altabots_emulator import Emulator
from altabots_emulator.cli import parse_run_seconds

ROOT = Path(__file__).resolve().parents[2]
KEY = "key-a"
VERIFY = "/v1/api-key/verify"
INVOKE = "/v1/workflow/invoke"


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _start_cli(*args: str, stdin: int | None = None) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "altabots_emulator", "--port", "0", *args],
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_environment(),
    )
    assert process.stdout is not None
    with ThreadPoolExecutor(1) as pool:
        line = pool.submit(process.stdout.readline).result(timeout=60)
    return process, line


def test_cli_prints_the_ready_line_serves_and_stops_on_sigterm() -> None:
    process, line = _start_cli("--api-key", "cli-key", "--run-seconds", "0.1", "--quiet")
    try:
        assert line.endswith("\n")
        prefix = "altabots-emulator listening on http://127.0.0.1:"
        assert line.startswith(prefix)
        port = int(line.strip()[len(prefix) :])
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=10) as http:
            assert http.get(VERIFY, headers={"Authorization": "cli-key"}).status_code == 200
            assert http.get(VERIFY, headers={"Authorization": "emulator-key"}).status_code == 401
            record = http.post(INVOKE, json={"input": {"q": "cli"}}, headers={"Authorization": "cli-key"})
            assert record.json()["status"] == "SUCCEED"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        assert process.stdout is not None
        assert process.stdout.read() == ""  # exactly one line on stdout
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_cli_stops_on_sigint_and_uses_the_default_key() -> None:
    process, line = _start_cli("--quiet", "--error-style", "altabots", "--outcome", "fail")
    try:
        url = line.strip().rsplit(" ", 1)[-1]
        with httpx.Client(base_url=url, timeout=10) as http:
            assert http.get(VERIFY, headers={"Authorization": "Bearer emulator-key"}).status_code == 200
            assert http.get(VERIFY).json()["error"]["code"] == "40127"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _start_with_stdin(*args: str) -> tuple[subprocess.Popen[str], str]:
    """The command with a pipe as its stdin; returns it and the URL it listens on."""
    process, line = _start_cli(*args, stdin=subprocess.PIPE)
    assert line.startswith("altabots-emulator listening on http://127.0.0.1:"), line
    return process, line.strip().rsplit(" ", 1)[-1]


def test_cli_stops_cleanly_when_its_stdin_closes_with_stop_on_stdin_eof() -> None:
    process, url = _start_with_stdin("--stop-on-stdin-eof", "--api-key", "eof-key")
    try:
        assert process.stdin is not None
        process.stdin.write("anything written is ignored\n")
        process.stdin.flush()
        with httpx.Client(base_url=url, timeout=10) as http:
            assert http.get(VERIFY, headers={"Authorization": "eof-key"}).status_code == 200
        process.stdin.close()  # what the parent's death does to the pipe
        assert process.wait(timeout=60) == 0
        assert process.stderr is not None
        said = process.stderr.read()
        assert "standard input closed" in said
        assert "Task was destroyed" not in said
        assert "Traceback" not in said
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_cli_ignores_stdin_without_the_option() -> None:
    process, url = _start_with_stdin("--api-key", "no-eof-key")
    try:
        assert process.stdin is not None
        process.stdin.close()
        with httpx.Client(base_url=url, timeout=10) as http:
            assert http.get(VERIFY, headers={"Authorization": "no-eof-key"}).status_code == 200
        assert process.poll() is None
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_cli_refuses_a_port_in_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "altabots_emulator", "--port", str(port)],
            capture_output=True,
            text=True,
            env=_environment(),
            timeout=30,
            check=False,
        )
    assert result.returncode == 1
    assert "cannot listen" in result.stderr
    assert result.stdout == ""


def test_cli_refuses_bad_options() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "altabots_emulator", "--run-seconds", "3-1"],
        capture_output=True,
        text=True,
        env=_environment(),
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "--run-seconds" in result.stderr


def test_parse_run_seconds() -> None:
    assert parse_run_seconds("2") == 2.0
    assert parse_run_seconds("0.5-1.5") == (0.5, 1.5)


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[str, str]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return str(cert), str(key)


def test_tls(tls_files: tuple[str, str]) -> None:
    cert, key = tls_files
    with Emulator(api_keys=[KEY], certfile=cert, keyfile=key) as emulator:
        assert emulator.url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=cert)
        with httpx.Client(base_url=emulator.url, verify=context) as http:
            assert http.get(VERIFY, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


# --------------------------------------------------------------------------- raw HTTP/1.1


@pytest.fixture
def address() -> Iterator[tuple[str, int]]:
    with Emulator(api_keys=[KEY], run_seconds=0.05, pending_seconds=0) as emulator:
        yield "127.0.0.1", emulator.server.port


def _read_response(sock: socket.socket, buffer: bytearray) -> tuple[int, dict[str, str], bytes]:
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buffer += chunk
    head, _, _ = bytes(buffer).partition(b"\r\n\r\n")
    del buffer[: len(head) + 4]
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(buffer) < length:
        buffer += sock.recv(65536)
    body = bytes(buffer[:length])
    del buffer[:length]
    return status, headers, body


def _request(method: str, path: str, body: bytes = b"", extra: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {KEY}\r\n{extra}"
    if body:
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


def test_pipelined_requests_are_answered_in_order(address: tuple[str, int]) -> None:
    invoke = json.dumps({"input": {"q": "slow first"}}).encode()
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(_request("POST", INVOKE, invoke) + _request("GET", VERIFY) + _request("GET", "/nope"))
        buffer = bytearray()
        first = _read_response(sock, buffer)
        second = _read_response(sock, buffer)
        third = _read_response(sock, buffer)
    assert json.loads(first[2])["status"] == "SUCCEED"
    assert second[0] == 200
    assert third[0] == 404
    assert all(r[1]["content-type"] == "application/json" for r in (first, second, third))


def test_chunked_request_body(address: tuple[str, int]) -> None:
    body = json.dumps({"input": {"q": "chunked"}, "isAsync": True}).encode()
    chunked = (
        b"".join(f"{len(part):x}\r\n".encode() + part + b"\r\n" for part in (body[:10], body[10:]))
        + b"0\r\n\r\n"
    )
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(_request("POST", INVOKE, extra="Transfer-Encoding: chunked\r\n") + chunked)
        status, _, answer = _read_response(sock, bytearray())
    assert status == 200
    assert json.loads(answer)["status"] == "PENDING"


def test_expect_100_continue(address: tuple[str, int]) -> None:
    body = json.dumps({"input": {}, "isAsync": True}).encode()
    head = _request("POST", INVOKE, extra=f"Expect: 100-continue\r\nContent-Length: {len(body)}\r\n")
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(head)
        assert sock.recv(1024).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        status, _, _ = _read_response(sock, bytearray())
    assert status == 200


def test_malformed_request_answers_400_and_closes(address: tuple[str, int]) -> None:
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(b"NONSENSE\r\n\r\n")
        status, headers, body = _read_response(sock, bytearray())
        assert sock.recv(1024) == b""
    assert status == 400
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["code"] == 40000


def test_http_1_0_and_connection_close_end_the_connection(address: tuple[str, int]) -> None:
    for request in (
        f"GET {VERIFY} HTTP/1.0\r\nAuthorization: {KEY}\r\n\r\n".encode(),
        _request("GET", VERIFY, extra="Connection: close\r\n"),
    ):
        with socket.create_connection(address, timeout=5) as sock:
            sock.sendall(request)
            status, _, _ = _read_response(sock, bytearray())
            assert status == 200
            assert sock.recv(1024) == b""


def test_too_large_head_is_refused(address: tuple[str, int]) -> None:
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70_000)
        status, _, _ = _read_response(sock, bytearray())
    assert status == 431


def _wait_until(predicate: Callable[[], Any], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(0.02)


def test_drop_closes_with_no_byte_and_no_error_logged(caplog: pytest.LogCaptureFixture) -> None:
    with Emulator(api_keys=[KEY]) as emulator:
        emulator.set_faults(drop={"count": 1})
        with socket.create_connection(("127.0.0.1", emulator.server.port), timeout=10) as sock:
            sock.sendall(_request("GET", VERIFY))
            assert sock.recv(1024) == b""
        assert [(r["dropped"], r["status"]) for r in emulator.requests()] == [(True, None)]
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_access_log_names_each_request_and_its_answer(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="altabots_emulator.access")
    with (
        Emulator(api_keys=[KEY], access_log=True) as emulator,
        httpx.Client(base_url=emulator.url, timeout=10) as http,
    ):
        http.get(VERIFY, headers={"Authorization": KEY})
        http.get("/nope?x=1")
        emulator.set_faults(drop={"count": 1})
        with pytest.raises(httpx.TransportError):
            http.get(VERIFY, headers={"Authorization": KEY})
    lines = [r.getMessage() for r in caplog.records if r.name == "altabots_emulator.access"]
    assert lines == [f"GET {VERIFY} -> 200", "GET /nope?x=1 -> 404", f"GET {VERIFY} -> dropped"]


def test_no_access_log_by_default(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with Emulator(api_keys=[KEY]) as emulator, httpx.Client(base_url=emulator.url) as http:
        assert http.get(VERIFY, headers={"Authorization": KEY}).status_code == 200
    assert [r for r in caplog.records if r.name.endswith("access")] == []


def test_client_going_away_ends_its_held_sync_invoke() -> None:
    with Emulator(api_keys=[KEY], outcome="never") as emulator:
        invoke = json.dumps({"input": {"q": "held"}}).encode()
        with socket.create_connection(("127.0.0.1", emulator.server.port), timeout=10) as sock:
            sock.sendall(_request("POST", INVOKE, invoke))
            _wait_until(lambda: emulator.stats()["sync_waiting"] == 1)
        _wait_until(lambda: emulator.stats()["sync_waiting"] == 0)
        assert len(emulator.runs()) == 1


def test_body_over_16_mib_answers_413_in_json(address: tuple[str, int]) -> None:
    with httpx.Client(timeout=60) as http:
        answer = http.post(
            f"http://{address[0]}:{address[1]}{INVOKE}",
            content=b" " * (16 * 1024 * 1024 + 1),
            headers={"Authorization": KEY},
        )
    assert answer.status_code == 413
    assert answer.headers["content-type"] == "application/json"
    assert answer.json() == {"code": 41300, "message": "request body too large"}


def test_ipv6_host_is_bracketed_in_url() -> None:
    try:
        with socket.create_server(("::1", 0), family=socket.AF_INET6):
            pass
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with Emulator(host="::1", api_keys=[KEY]) as emulator:
        assert emulator.url == f"http://[::1]:{emulator.server.port}"
        with httpx.Client(base_url=emulator.url, timeout=10) as http:
            assert http.get(VERIFY, headers={"Authorization": KEY}).status_code == 200
