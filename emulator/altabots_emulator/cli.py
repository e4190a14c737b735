"""
The ``altabots-emulator`` command: serve the emulated API until stopped.

When it is ready it prints exactly one line to stdout, ``altabots-emulator listening on
http://127.0.0.1:PORT`` (``https`` with TLS), so a script can start it with ``--port 0`` and read
the port from that line. Anything else it says goes to stderr. It stops cleanly on SIGTERM or
SIGINT (Ctrl-C) and exits 0; it exits 1 when it cannot listen and 2 on a bad option.

It does not read its standard input, unless given ``--stop-on-stdin-eof``: then it reads and
discards it, and stops as cleanly (exit status 0) when it reaches end of file. A program that
starts it with a pipe as its stdin and keeps the pipe's write end open thus takes it down with
itself however it ends, SIGKILL included: the system closes that end when the program's
process is gone. (:class:`~altabots_emulator.process.EmulatorProcess` does so.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING

from .emulator import DEFAULT_API_KEY, Emulator
from .errors import ERROR_STYLES
from .workflows import OUTCOMES

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .workflows import RunSeconds

log = logging.getLogger("altabots_emulator")


def parse_run_seconds(text: str) -> RunSeconds:
    """``"2"`` -> 2.0; ``"1-3"`` -> (1.0, 3.0), a range drawn uniformly per run."""
    low_text, sep, high_text = text.partition("-")
    try:
        if not sep:
            value = float(text)
            if value < 0:
                raise ValueError
            return value
        low, high = float(low_text), float(high_text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration or LOW-HIGH range: {text!r}") from None
    if not 0 <= low <= high:
        raise argparse.ArgumentTypeError(f"range must have 0 <= LOW <= HIGH: {text!r}")
    return (low, high)


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command's options."""
    parser = argparse.ArgumentParser(
        prog="altabots-emulator",
        description="Serve a local emulator of the AltaBots/GPTBots workflow API.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765, help="port to listen on; 0 picks a free one")
    parser.add_argument(
        "--api-key",
        action="append",
        dest="api_keys",
        metavar="KEY",
        help=f"an API key to accept (repeatable; default {DEFAULT_API_KEY})",
    )
    parser.add_argument(
        "--run-seconds",
        type=parse_run_seconds,
        default=2.0,
        help="how long a run runs: seconds, or LOW-HIGH drawn per run (default 2)",
    )
    parser.add_argument(
        "--pending-seconds", type=_non_negative, default=0.3, help="time a run stays PENDING (default 0.3)"
    )
    parser.add_argument(
        "--outcome", choices=OUTCOMES, default="succeed", help="how runs end (default succeed)"
    )
    parser.add_argument(
        "--fail-rate",
        type=_non_negative,
        default=0.0,
        help="chance (0..1) that a run fails anyway (default 0)",
    )
    parser.add_argument(
        "--error-style",
        choices=ERROR_STYLES,
        default="gptbots",
        help="shape of error bodies (default gptbots)",
    )
    parser.add_argument("--certfile", help="TLS certificate (PEM); serve HTTPS with --keyfile")
    parser.add_argument("--keyfile", help="TLS private key (PEM)")
    parser.add_argument(
        "--sync-timeout",
        type=_non_negative,
        default=300.0,
        help="longest a synchronous invoke is held before answering the run as it stands (default 300)",
    )
    parser.add_argument("--access-log", action="store_true", help="log every request to stderr (slower)")
    parser.add_argument("--quiet", action="store_true", help="say nothing on stderr but warnings and errors")
    parser.add_argument(
        "--stop-on-stdin-eof",
        action="store_true",
        help="stop cleanly when standard input reaches end of file (read and discarded until then), "
        "e.g. when the process holding the other end of a pipe ends, however it ends",
    )
    return parser


def _stop_at_stdin_eof(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """Read standard input to its end (discarding it), then have ``loop`` set ``stop``.

    Runs in a thread of its own, on the file descriptor (no lock of ``sys.stdin`` held), so that
    it works on every system and with stdin a pipe, a file or a terminal.
    """
    try:
        while os.read(0, 65536):
            pass
    except OSError as exc:
        log.warning("cannot read standard input (%s): stopping", exc)
    else:
        log.info("standard input closed: stopping")
    # The loop is gone when the emulator already stopped otherwise: nothing left to do then.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(stop.set)


async def _serve(emulator: Emulator, *, stop_on_stdin_eof: bool = False) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    try:
        url = await emulator.start_async()
    except OSError as exc:
        print(f"altabots-emulator: cannot listen on {emulator.url}: {exc}", file=sys.stderr)
        return 1
    if stop_on_stdin_eof:
        # A daemon thread: one still blocked in its read does not hold the process's exit.
        threading.Thread(
            target=_stop_at_stdin_eof, args=(loop, stop), name="altabots-emulator-stdin", daemon=True
        ).start()
    print(f"altabots-emulator listening on {url}", flush=True)
    log.info("API keys: %s", ", ".join(emulator.api_keys))
    await stop.wait()
    await emulator.stop_async()
    log.info("stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the emulator from the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.certfile) != bool(args.keyfile):
        parser.error("--certfile and --keyfile go together")
    if args.fail_rate > 1:
        parser.error("--fail-rate must be between 0 and 1")
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="altabots-emulator: %(message)s",
        stream=sys.stderr,
    )
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: the /_emulator/ endpoints have no authentication", args.host)
    try:
        emulator = Emulator(
            host=args.host,
            port=args.port,
            api_keys=args.api_keys or (DEFAULT_API_KEY,),
            run_seconds=args.run_seconds,
            pending_seconds=args.pending_seconds,
            outcome=args.outcome,
            fail_rate=args.fail_rate,
            error_style=args.error_style,
            certfile=args.certfile,
            keyfile=args.keyfile,
            access_log=args.access_log,
            sync_timeout=args.sync_timeout,
        )
    except (OSError, ValueError) as exc:
        print(f"altabots-emulator: {exc}", file=sys.stderr)
        return 1
    try:
        return asyncio.run(_serve(emulator, stop_on_stdin_eof=args.stop_on_stdin_eof))
    except KeyboardInterrupt:
        return 0
