"""
A hostile stand-in for the AltaBots API on 127.0.0.1, over plain TCP or TLS.

It is hand-written on the standard library (``socket``, ``ssl``, ``threading``) on purpose: a
library HTTP server only ever sends well-formed, complete answers, and the point here is what a
broken network or a broken (or malicious) server sends instead: a TLS record corrupted after the
request was read, a reset, an answer dripped one byte at a time (headers included), a request
that never gets an answer, a gzip bomb, a body too big or nested too deep.

Each connection carries one request. The request is read whole, recorded as a :class:`Seen`,
then answered by an :class:`Act`, scripted per path, and optionally per run id, with
:meth:`HostileServer.on` (a script's last act repeats). Without a script the server plays the
API:

* ``POST /v1/workflow/invoke`` starts run ``run-1``, ``run-2``, ... and answers
  ``{"workflowRunId": ..., "status": "PENDING", ...}``; with ``isAsync`` false, the run's whole
  record with its final status;
* ``POST /v1/workflow/query/result`` answers the run's record: the n-th check of a run gets the
  n-th status of its sequence (:meth:`HostileServer.statuses`; the last one repeats);
* ``GET /v1/api-key/verify`` answers ``{"code": 0, "message": "OK"}``; anything else is a 404.

The acts (:data:`HostileServer.ACTS`), by ``kind``:

===========  =======================================================================
api          the normal answer above
answer       ``status``, ``headers`` and ``body`` as given (``bytes`` go out as they are)
redirect     ``status`` (a 3xx) to ``location``, with a body that looks like a success
corrupt_tls  a garbage TLS application-data record, under the TLS layer (plain TCP: garbage)
reset        a TCP reset (``SO_LINGER`` 0, then close)
close        close the connection without a word
drip         another act's whole answer, one byte every ``every`` seconds; gives up (closes)
             after ``give_up`` seconds, so a client without a total timeout cannot hang a test
hang         nothing at all, until the client leaves or the server stops
gzip_bomb    200 with ``Content-Encoding: gzip`` (or ``deflate``): 128 MiB of zeros compressed
             to about 130 KB
===========  =======================================================================
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import http
import ipaddress
import json
import os
import select
import socket
import ssl
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from tests.fake_api import INVOKE, RESULT, VERIFY, accepted, record

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["INVOKE", "RESULT", "VERIFY", "Act", "Certificates", "HostileServer", "Seen"]

#: Seconds a connection may take to send its request before the server gives up on it.
READ_TIMEOUT = 10.0


# -- what the server does ----------------------------------------------------------------------


@dataclass(frozen=True)
class Act:
    """One way of answering a request; build them with the functions below."""

    kind: str
    args: dict[str, Any] = field(default_factory=dict)


def api() -> Act:
    return Act("api")


def answer(status: int = 200, body: Any = b"", headers: dict[str, str] | None = None) -> Act:
    """``body``: bytes as they are, a str as UTF-8, anything else as JSON."""
    return Act("answer", {"status": status, "body": body, "headers": headers or {}})


def redirect(location: str, status: int = 307) -> Act:
    return Act("redirect", {"location": location, "status": status})


def rate_limited(retry_after: str = "0") -> Act:
    return answer(429, {"code": 42900, "message": "rate limited"}, {"Retry-After": retry_after})


def corrupt_tls() -> Act:
    return Act("corrupt_tls")


def reset() -> Act:
    return Act("reset")


def close() -> Act:
    return Act("close")


def drip(inner: Act | None = None, every: float = 0.5, give_up: float = 7.0) -> Act:
    return Act("drip", {"inner": inner or api(), "every": every, "give_up": give_up})


def hang() -> Act:
    return Act("hang")


def gzip_bomb(encoding: str = "gzip") -> Act:
    return Act("gzip_bomb", {"encoding": encoding})


@functools.cache
def bomb(encoding: str = "gzip", size: int = 128 * 2**20) -> bytes:
    """``size`` zero bytes, gzip- or zlib-compressed a MiB at a time (never whole in memory)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31 if encoding == "gzip" else 15)
    zeros = bytes(2**20)
    parts = [packer.compress(zeros) for _ in range(size // len(zeros))]
    parts.append(packer.flush())
    return b"".join(parts)


# -- what the server saw -----------------------------------------------------------------------


@dataclass
class Seen:
    """One request as the server read it."""

    server: str  # which instance got it
    at: float  # time.monotonic() once it was read whole
    method: str
    path: str  # without the query
    target: str  # as sent, query included
    headers: dict[str, str]  # lower-case names
    body: Any  # parsed JSON, else the raw bytes

    @property
    def run_id(self) -> Any:
        return self.body.get("workflowRunId") if isinstance(self.body, dict) else None


# -- the server --------------------------------------------------------------------------------


class HostileServer:
    """
    One scripted HTTP(S) server on a free port; ``with HostileServer() as server: ...``.

    :param name: recorded with each request, to tell instances apart.
    :param host: the loopback address to listen on.
    :param tls: ``None`` (plain TCP), ``"trusted"`` (a certificate for 127.0.0.1 signed by
        ``certs.ca_file``), ``"wrong_host"`` (signed by that CA, for another host name) or
        ``"untrusted"`` (self-signed).
    """

    def __init__(
        self,
        name: str = "main",
        *,
        host: str = "127.0.0.1",
        tls: str | None = None,
        certs: Certificates | None = None,
    ) -> None:
        self.name = name
        self.host = host
        self.tls = tls
        self.context = certs.server_context(tls) if tls and certs else None
        if tls and self.context is None:
            raise ValueError("a TLS server needs certs")
        self.seen: list[Seen] = []
        self.connections = 0  # accepted TCP connections
        self.handshake_failures = 0
        self.default_statuses: list[str] = ["SUCCEED"]
        self._scripts: dict[tuple[str, str | None], list[Act]] = {}
        self._statuses: dict[str, list[str]] = {}
        self._checks: dict[str, int] = {}
        self._runs = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._open: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server((host, 0), backlog=256)
        self.port: int = self._listener.getsockname()[1]

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    # -- scripting and inspection ---------------------------------------------------------------

    def on(self, path: str, *acts: Act, run_id: str | None = None) -> HostileServer:
        """Answer requests to ``path`` (of run ``run_id`` only, if given) with ``acts`` in turn."""
        with self._lock:
            self._scripts[(path, run_id)] = list(acts)
        return self

    def statuses(self, run_id: str, *statuses: str) -> HostileServer:
        """The statuses the next checks of ``run_id`` report, in turn; the last one repeats."""
        with self._lock:
            self._statuses[run_id] = list(statuses)
            self._checks[run_id] = 0
        return self

    def requests(self, path: str | None = None) -> list[Seen]:
        with self._lock:
            return [seen for seen in self.seen if path is None or seen.path == path]

    def count(self, path: str | None = None) -> int:
        return len(self.requests(path))

    # -- life cycle -------------------------------------------------------------------------------

    def start(self) -> HostileServer:
        self._accepting = threading.Thread(target=self._accept, name=f"hostile-{self.name}", daemon=True)
        self._accepting.start()
        return self

    def stop(self) -> None:
        """Stop accepting, cut every open connection (ending hangs and drips), wait for handlers."""
        self._stop.set()
        self._accepting.join(5)
        self._listener.close()
        with self._lock:
            still_open = list(self._open)
        for sock in still_open:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(5)

    def __enter__(self) -> HostileServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _accept(self) -> None:
        while not self._stop.is_set():
            if not select.select([self._listener], [], [], 0.05)[0]:
                continue
            try:
                conn, _ = self._listener.accept()
            except OSError:
                continue
            with self._lock:
                self.connections += 1
                self._open.add(conn)
            thread = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    # -- one connection ---------------------------------------------------------------------------

    def _handle(self, conn: socket.socket) -> None:
        sock = conn
        try:
            conn.settimeout(READ_TIMEOUT)
            if self.context is not None:
                try:
                    sock = self.context.wrap_socket(conn, server_side=True)
                except OSError:  # ssl.SSLError included: the client refused the certificate
                    with self._lock:
                        self.handshake_failures += 1
                    return
                with self._lock:
                    self._open.discard(conn)
                    self._open.add(sock)
            seen = self._read_request(sock)
            if seen is None:
                return
            with self._lock:
                self.seen.append(seen)
            act = self._choose(seen)
            getattr(self, self.ACTS[act.kind])(sock, seen, act)
        except (OSError, ValueError):
            pass  # the client went away or sent no HTTP, or stop() cut the connection
        finally:
            with self._lock:
                self._open.discard(sock)
                self._open.discard(conn)
            sock.close()

    def _read_request(self, sock: socket.socket) -> Seen | None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk or len(data) > 2**20:
                return None
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        request_line, *lines = head.decode("latin-1").split("\r\n")
        method, target, _ = request_line.split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            headers[name] = f"{headers[name]}, {value.strip()}" if name in headers else value.strip()
        length = int(headers.get("content-length") or 0)
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            body += chunk
        try:
            parsed: Any = json.loads(body) if body else None
        except ValueError:
            parsed = body
        path = target.split("?", 1)[0]
        return Seen(self.name, time.monotonic(), method, path, target, headers, parsed)

    def _choose(self, seen: Seen) -> Act:
        run_id = seen.run_id if isinstance(seen.run_id, str) else None
        with self._lock:
            for key in ((seen.path, run_id), (seen.path, None)):
                script = self._scripts.get(key)
                if script:
                    return script.pop(0) if len(script) > 1 else script[0]
        return api()

    # -- the acts ---------------------------------------------------------------------------------

    def _message(self, act: Act, seen: Seen) -> bytes:
        """The whole HTTP answer of an act that sends one."""
        args = act.args
        headers: dict[str, str] = {}
        if act.kind == "api":
            status, body = self._play_api(seen)
        elif act.kind == "answer":
            status, body, headers = args["status"], args["body"], args["headers"]
        elif act.kind == "redirect":
            status, headers = args["status"], {"Location": args["location"]}
            body = record("SUCCEED", run_id=seen.run_id if isinstance(seen.run_id, str) else "run-1")
        elif act.kind == "gzip_bomb":
            status, body = 200, bomb(args["encoding"])
            headers = {"Content-Encoding": args["encoding"]}
        else:
            raise ValueError(f"act {act.kind!r} sends no HTTP answer")
        return http_answer(status, body, headers)

    def _play_api(self, seen: Seen) -> tuple[int, Any]:
        body = seen.body if isinstance(seen.body, dict) else {}
        if (seen.method, seen.path) == ("POST", INVOKE):
            with self._lock:
                self._runs += 1
                run_id = f"run-{self._runs}"
            if body.get("isAsync") is False:
                sequence = self._statuses.get(run_id, self.default_statuses)
                return 200, record(sequence[-1], run_id=run_id)
            return 200, accepted(run_id)
        if (seen.method, seen.path) == ("POST", RESULT):
            run_id = body.get("workflowRunId")
            if not isinstance(run_id, str):
                return 400, {"code": 40000, "message": "workflowRunId is required"}
            with self._lock:
                sequence = self._statuses.get(run_id, self.default_statuses)
                checks = self._checks.get(run_id, 0)
                self._checks[run_id] = checks + 1
            return 200, record(sequence[min(checks, len(sequence) - 1)], run_id=run_id)
        if (seen.method, seen.path) == ("GET", VERIFY):
            return 200, {"code": 0, "message": "OK", "data": {"valid": True}}
        return 404, {"code": 40400, "message": "not found"}

    def _send_message(self, sock: socket.socket, seen: Seen, act: Act) -> None:
        sock.sendall(self._message(act, seen))

    def _corrupt_tls(self, sock: socket.socket, seen: Seen, act: Act) -> None:
        garbage = b"\x17\x03\x03\x00\x40" + os.urandom(64)  # an application-data record, all noise
        if isinstance(sock, ssl.SSLSocket):
            raw = socket.socket(fileno=os.dup(sock.fileno()))  # under the TLS layer
            try:
                raw.sendall(garbage)
            finally:
                raw.close()
        else:
            sock.sendall(garbage)
        self._wait_for_client(sock, 3.0)

    def _reset(self, sock: socket.socket, seen: Seen, act: Act) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    def _close(self, sock: socket.socket, seen: Seen, act: Act) -> None:
        sock.close()

    def _drip(self, sock: socket.socket, seen: Seen, act: Act) -> None:
        data = self._message(act.args["inner"], seen)
        every, ends = act.args["every"], time.monotonic() + act.args["give_up"]
        for index in range(len(data)):
            if time.monotonic() > ends:
                return
            sock.sendall(data[index : index + 1])
            if self._stop.wait(every):
                return

    def _hang(self, sock: socket.socket, seen: Seen, act: Act) -> None:
        self._wait_for_client(sock, None)

    def _wait_for_client(self, sock: socket.socket, limit: float | None) -> None:
        """Wait until the client closes (or ``limit`` seconds pass, or the server stops)."""
        ends = None if limit is None else time.monotonic() + limit
        while not self._stop.is_set() and (ends is None or time.monotonic() < ends):
            if select.select([sock], [], [], 0.05)[0]:
                try:
                    if not sock.recv(4096):
                        return
                except OSError:
                    return

    #: kind -> the method that plays it.
    ACTS: ClassVar[dict[str, str]] = {
        "api": "_send_message",
        "answer": "_send_message",
        "redirect": "_send_message",
        "gzip_bomb": "_send_message",
        "corrupt_tls": "_corrupt_tls",
        "reset": "_reset",
        "close": "_close",
        "drip": "_drip",
        "hang": "_hang",
    }


def http_answer(status: int, body: Any, headers: dict[str, str]) -> bytes:
    """An HTTP/1.1 answer that closes the connection; a header given as ``""`` is left out."""
    if isinstance(body, str):
        body = body.encode()
    elif not isinstance(body, bytes):
        body = json.dumps(body).encode()
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = "Whatever"
    fields = {
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),
        "Connection": "close",
        **headers,
    }
    head = [f"HTTP/1.1 {status} {reason}"] + [f"{name}: {value}" for name, value in fields.items() if value]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


# -- certificates ------------------------------------------------------------------------------


class Certificates:
    """
    PEM files in ``folder``: a CA (:attr:`ca_file`, what tests trust), a server certificate it
    signed for 127.0.0.1, one it signed for another host name, and a self-signed one.
    """

    def __init__(self, folder: Path) -> None:
        ca_key = _new_key()
        ca_cert = _certificate(ca_key, "Hostile test CA", ca=True)
        self.ca_file = _write(folder / "ca.pem", ca_cert)
        loopback = [x509_ip("127.0.0.1"), x509_dns("localhost")]
        self._files: dict[str, tuple[Path, Path]] = {}
        for kind, names, issuer in (
            ("trusted", loopback, (ca_key, ca_cert)),
            ("wrong_host", [x509_dns("wrong.example")], (ca_key, ca_cert)),
            ("untrusted", loopback, None),
        ):
            key = _new_key()
            cert = _certificate(key, kind, names=names, issuer=issuer)
            self._files[kind] = (_write(folder / f"{kind}.pem", cert), _write(folder / f"{kind}.key", key))

    def server_context(self, kind: str) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*self._files[kind])
        return context


def x509_ip(address: str) -> Any:
    from cryptography import x509

    return x509.IPAddress(ipaddress.ip_address(address))


def x509_dns(name: str) -> Any:
    from cryptography import x509

    return x509.DNSName(name)


def _new_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _certificate(key: Any, common_name: str, *, ca: bool = False, names: Any = (), issuer: Any = None) -> Any:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    issuer_key, issuer_cert = issuer or (key, None)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    )
    if ca:
        usage = dict.fromkeys(
            (
                "content_commitment",
                "key_encipherment",
                "data_encipherment",
                "key_agreement",
                "encipher_only",
                "decipher_only",
            ),
            False,
        )
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, **usage), critical=True
        )
    else:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, item: Any) -> Path:
    from cryptography.hazmat.primitives import serialization

    if hasattr(item, "public_bytes"):
        data = item.public_bytes(serialization.Encoding.PEM)
    else:
        data = item.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    path.write_bytes(data)
    return path
