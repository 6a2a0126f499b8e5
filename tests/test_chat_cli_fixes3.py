"""The end user's command line, third round: `tokenwire chat` (stdin bound, repeated Ctrl-C, an expired server
certificate, an empty --token-env), the demo upstream's answer length and finish reason, `tokenwire demo`'s
progress and --rate-mbps on the relay, and `python -m tokenwire.transport.client | head -1`."""

from __future__ import annotations

import asyncio
import datetime
import functools
import ipaddress
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tokenwire.daemon import chat_cli, demo_cli
from tokenwire.daemon.cli import main
from tokenwire.daemon.demo_upstream import answer_tokens
from tokenwire.daemon.upstreams import DemoUpstream
from tokenwire.transport.errors import RequestError
from tokenwire.transport.server import ChatRequest, serve
from tokenwire.transport.tls import CertPair

from .daemon_proc import DaemonProcess
from .terminal import default_signals
from .test_chat_cli import closed, stop_loop_thread
from .test_loopback import word_source

FAST_DEMO = '[[upstreams]]\nname = "demo"\ntype = "demo"\nrate = 300\nfirst_token_ms = 20\n'


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """The real daemon with the demo upstream at its default max_tokens (a fast rate: 487 tokens in ~2 s)."""
    d = DaemonProcess(tmp_path_factory.mktemp("daemon"), upstream_toml=FAST_DEMO)
    try:
        yield d
    finally:
        d.stop()


def chat_argv(d: DaemonProcess, *argv: str) -> list[str]:
    return ["chat", "--port", str(d.port), "--cafile", str(d.cert), "--server-name", "localhost", *argv]


# ---------------------------------------------------------------------------------- 1. an endless stdin
class _Endless:
    """A stdin that never ends (`yes | tokenwire chat`): reading it to its end is an error here, not 4.5 GB."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def read(self, size: int = -1) -> Any:
        if size is None or size < 0:
            raise AssertionError("stdin read to its end: an endless one never returns")
        self.sizes.append(size)
        return self.chunk * size

    def isatty(self) -> bool:
        return False


class _EndlessBytes(_Endless):
    chunk = b"y"

    @property
    def buffer(self) -> _EndlessBytes:
        return self


class _EndlessText(_Endless):
    chunk = "y"  # (no .buffer: a program's text stream)


@pytest.mark.parametrize("stdin", [_EndlessBytes, _EndlessText])
def test_an_endless_stdin_is_refused_after_one_byte_past_the_limit(stdin, monkeypatch, capsys):
    fake = stdin()
    monkeypatch.setattr(sys, "stdin", fake)
    assert main(["chat", "--insecure", "--port", "9"]) == 2  # refused before connecting: nothing listens there
    err = capsys.readouterr().err
    assert err == ("tokenwire chat: error: prompt too large: its text on stdin is over 1,048,576 bytes of UTF-8 (read "
                   "no further), over the limit of 1,048,576 bytes per request (a daemon's limits.max_request_bytes "
                   "may be lower)\n"), err
    assert fake.sizes == [chat_cli.MAX_STDIN_PROMPT + 1]


def test_the_stdin_bound_is_the_sdks_request_limit():
    from tokenwire.transport.frames import MAX_STREAM_FRAME

    assert chat_cli.MAX_STDIN_PROMPT == MAX_STREAM_FRAME


# ---------------------------------------------------------------------------------- 2. Ctrl-C, many times
def _mid_live_answer(out: Any) -> None:
    """Read the demo's output to 20 bytes into its live answer."""
    while b"(live)" not in out.readline():
        pass
    out.read(20)


def _ctrl_c_five_times(proc: subprocess.Popen, gap: float, ready: Callable[[], object]) -> None:
    """Once ``ready()`` returns (the answer is streaming), five SIGINTs ``gap`` s apart: the process must end
    with the one line "interrupted", exit status 130 (killed if it outlives the check)."""
    import time

    try:
        ready()
        for _ in range(5):
            proc.send_signal(signal.SIGINT)
            time.sleep(gap)  # (0: the sender yields the CPU all the same)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130 and err.decode().strip().splitlines() == ["interrupted"], err.decode()


def test_ctrl_c_pressed_many_times_at_once_is_one_interrupted_line(tmp_path):
    """Five SIGINTs back to back mid-answer: asyncio.run raised KeyboardInterrupt for the second one wherever it
    landed (35-102 lines of tracebacks: aioquic's sendmsg, "Event loop is closed") or hung the client in its
    shutdown, in 6 runs of 6 here. A few ms apart, as a hand presses them: sent all at once, they reached the
    client as one."""

    d = DaemonProcess(tmp_path, upstream_toml='[[upstreams]]\nname = "demo"\ntype = "demo"\nrate = 20\n'
                                              'first_token_ms = 20\n')
    try:
        for gap in (0.0, 0.001, 0.003):
            proc = subprocess.Popen([sys.executable, "-m", "tokenwire.daemon.cli", *chat_argv(d, "a long story")],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_signals)
            assert proc.stdout is not None
            _ctrl_c_five_times(proc, gap, functools.partial(proc.stdout.read, 3))  # (the answer is streaming)
    finally:
        d.stop()


INTERRUPTED_CLEANUP = textwrap.dedent("""
    import asyncio, os, signal
    from tokenwire.daemon.chat_cli import run_interruptible

    async def answer():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            for _ in range(3):  # Ctrl-C again while the cleanup runs
                os.kill(os.getpid(), signal.SIGINT)
            await asyncio.sleep(0.1)  # the cleanup awaits (a connection's close)
            print("cleanup finished", flush=True)
            raise

    try:
        run_interruptible(answer(), exiting=True)  # (the CLI's: the process ends with "interrupted")
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    os.kill(os.getpid(), signal.SIGINT)  # after the interruption too: ignored, the process is ending
    print("exit", signal.getsignal(signal.SIGINT) is signal.SIG_IGN, flush=True)
""")


def test_later_signals_leave_the_first_ones_cleanup_alone():
    proc = subprocess.run([sys.executable, "-c", INTERRUPTED_CLEANUP], capture_output=True, text=True, timeout=60,
                          preexec_fn=default_signals)
    assert (proc.returncode, proc.stdout.splitlines(), proc.stderr) == (
        0, ["cleanup finished", "interrupted", "exit True"], ""), proc.stderr


INTERRUPTED_AND_GOING_ON = textwrap.dedent("""
    import asyncio, os, signal, time
    from tokenwire.daemon.chat_cli import run_interruptible

    def own_term(signum, frame):
        print("own SIGTERM handler", flush=True)

    def state():
        return (signal.getsignal(signal.SIGINT) is signal.default_int_handler,
                signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP))

    async def answer(sig):
        try:
            os.kill(os.getpid(), sig)
            await asyncio.sleep(2)  # (not interrupted: the signal was ignored)
            print("not interrupted by", sig.name, flush=True)
        except asyncio.CancelledError:
            for again in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # while the cleanup runs: ignored
                os.kill(os.getpid(), again)
            await asyncio.sleep(0.05)
            raise

    before = state()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGINT):  # a chatbot's loop, answer after answer
        try:
            run_interruptible(answer(sig))
        except KeyboardInterrupt:
            print("interrupted by", sig.name, state() == before, flush=True)
    try:  # Ctrl-C is Ctrl-C again
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(2)
        print("not interrupted", flush=True)
    except KeyboardInterrupt:
        print("KeyboardInterrupt", flush=True)
    signal.signal(signal.SIGTERM, own_term)  # a program's own SIGTERM handler: given back after an interruption
    try:
        run_interruptible(answer(signal.SIGTERM))
    except KeyboardInterrupt:
        print("own handler back", signal.getsignal(signal.SIGTERM) is own_term, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    print("SIGTERM kills again", flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(2)
    print("still alive", flush=True)
""")


def test_an_interrupted_call_gives_the_signals_back_to_a_program_that_goes_on():
    """A library's: after an interruption SIGINT, SIGTERM and SIGHUP were left ignored for the rest of the
    process, so a program that called it in a loop and went on after the KeyboardInterrupt could no longer be
    stopped by Ctrl-C nor SIGTERM (its own SIGTERM handler was gone too). The CLI's ``exiting`` keeps them
    ignored, above."""
    proc = subprocess.run([sys.executable, "-c", INTERRUPTED_AND_GOING_ON], capture_output=True, text=True,
                          timeout=60, preexec_fn=default_signals)
    assert (proc.returncode, proc.stdout.splitlines(), proc.stderr) == (
        -signal.SIGTERM, ["interrupted by SIGINT True", "interrupted by SIGTERM True", "interrupted by SIGHUP True",
                          "interrupted by SIGINT True", "KeyboardInterrupt", "own handler back True",
                          "own SIGTERM handler", "SIGTERM kills again"], ""), proc.stderr


SIGNALS_GIVEN_BACK = textwrap.dedent("""
    import asyncio, os, signal, threading
    from tokenwire.daemon.chat_cli import run_interruptible

    def state():
        return [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)]

    async def fails():
        await asyncio.sleep(0)
        raise ValueError("boom")

    async def interrupted():
        os.kill(os.getpid(), signal.SIGINT)
        await asyncio.sleep(30)

    async def done():
        return "done"

    before = state()
    for exiting in (False, True):
        try:
            run_interruptible(fails(), exiting=exiting)
        except ValueError:
            print("error", exiting, state() == before, flush=True)
        print("result", run_interruptible(done(), exiting=exiting), state() == before, flush=True)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])  # a mask of the caller's: kept
    try:
        run_interruptible(interrupted())
    except KeyboardInterrupt:
        print("interrupted", state() == before, signal.pthread_sigmask(signal.SIG_BLOCK, []) ==
              mask | {signal.SIGUSR1}, flush=True)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nohup: stays ignored, given back as it was
    try:
        run_interruptible(interrupted(), exiting=True)
    except KeyboardInterrupt:
        print("nohup", signal.getsignal(signal.SIGHUP) is signal.SIG_IGN, flush=True)
""")


def test_the_signals_are_given_back_on_an_error_a_result_and_an_interruption():
    proc = subprocess.run([sys.executable, "-c", SIGNALS_GIVEN_BACK], capture_output=True, text=True, timeout=60,
                          preexec_fn=default_signals)
    assert (proc.returncode, proc.stdout.splitlines(), proc.stderr) == (
        0, ["error False True", "result done True", "error True True", "result done True", "interrupted True True",
            "nohup True"], ""), proc.stderr


CHAT_EXITING = textwrap.dedent("""
    import os, signal, socket, sys, threading
    from tokenwire.daemon.cli import main

    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a server that never answers: chat is connecting
    silent.bind(("127.0.0.1", 0))

    def interrupt():
        silent.recvfrom(65536)  # its first handshake packet
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    rc = main(["chat", "--insecure", "--port", str(silent.getsockname()[1]), "hi"])
    ignored = [signal.getsignal(s) is signal.SIG_IGN for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)]
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # more of them on the way out: ignored
        os.kill(os.getpid(), s)
    print(rc, ignored, flush=True)
    sys.exit(rc)
""")


SIGNAL_WHILE_ANOTHER_THREAD_LIVES = textwrap.dedent("""
    import asyncio, os, signal, threading, time
    from tokenwire.daemon.chat_cli import run_interruptible

    closing = asyncio.BaseEventLoop.close

    def close(self):  # a Ctrl-C while the loop closes, its handlers already removed
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        closing(self)

    asyncio.BaseEventLoop.close = close
    threading.Thread(target=time.sleep, args=(5,), daemon=True).start()  # the signal may reach this one

    async def answer():
        return "result"

    try:
        print("returned", run_interruptible(answer()), flush=True)
    except KeyboardInterrupt:
        print("KeyboardInterrupt", flush=True)
    print("handler back", signal.getsignal(signal.SIGINT) is signal.default_int_handler, flush=True)
""")


def test_a_signal_during_the_cleanup_is_dropped_with_other_threads_alive():
    """Blocked in the calling thread only, a signal in the cleanup reached another thread, and Python ran SIGINT's
    default handler (remove_signal_handler had put it back) in the middle of loop.close: a KeyboardInterrupt out of
    a call whose answer had completed."""
    proc = subprocess.run([sys.executable, "-c", SIGNAL_WHILE_ANOTHER_THREAD_LIVES], capture_output=True, text=True,
                          timeout=60, preexec_fn=default_signals)
    assert proc.stdout.splitlines() == ["returned result", "handler back True"], proc.stderr


def test_chat_itself_keeps_the_signals_ignored_on_its_way_out():
    """The library gives the signals back; ``tokenwire chat`` (``exiting``) keeps them ignored once interrupted, so
    that one more Ctrl-C while it says "interrupted" and exits is no KeyboardInterrupt traceback (and SIGTERM no
    death by the signal): the protection the tests of five Ctrl-C above rely on."""
    proc = subprocess.run([sys.executable, "-c", CHAT_EXITING], capture_output=True, text=True, timeout=60,
                          preexec_fn=default_signals)
    assert (proc.returncode, proc.stdout.splitlines(), proc.stderr) == (
        130, ["130 [True, True, True]"], "interrupted\n"), proc.stderr


LATE_SIGNAL = textwrap.dedent("""
    import asyncio, os, signal, time
    from tokenwire.daemon.chat_cli import run_interruptible

    async def answer():
        async def left():  # a task still running when the answer is done: cancelled in the cleanup
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                os.kill(os.getpid(), signal.SIGTERM)  # a signal during the cleanup, the answer already done
                await asyncio.sleep(0.1)
                raise
        asyncio.ensure_future(left())
        await asyncio.sleep(0)
        return "done"

    print(run_interruptible(answer()), signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, flush=True)

    async def second():
        os.kill(os.getpid(), signal.SIGINT)
        await asyncio.sleep(30)

    started = time.monotonic()
    try:
        run_interruptible(second())
    except KeyboardInterrupt:
        print("second interrupted", time.monotonic() - started < 20, flush=True)
""")


def test_a_signal_after_the_answer_is_done_interrupts_nothing_and_leaves_the_signals_as_they_were():
    """A signal during the cleanup, once main had returned, was recorded as an interruption: the call returned
    normally but left SIGINT, SIGTERM and SIGHUP ignored, so a second call in the process could not be
    interrupted."""
    proc = subprocess.run([sys.executable, "-c", LATE_SIGNAL], capture_output=True, text=True, timeout=60,
                          preexec_fn=default_signals)
    assert (proc.returncode, proc.stdout.splitlines(), proc.stderr) == (
        0, ["done True", "second interrupted True"], ""), proc.stderr


@pytest.mark.timeout(60)
def test_a_task_that_never_ends_does_not_hang_the_client(monkeypatch, caplog):
    """asyncio.run waited for the tasks left at the end without a bound: the hang after a double Ctrl-C. The task
    given up on is dropped without "Task was destroyed but it is pending!"."""
    import gc

    monkeypatch.setattr(chat_cli, "CLEANUP_S", 0.2)
    previous = signal.getsignal(signal.SIGINT)
    held: list[asyncio.Task] = []

    async def stubborn() -> None:
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                continue  # swallows every cancellation

    async def answer() -> str:
        held.append(asyncio.ensure_future(stubborn()))
        await asyncio.sleep(0)
        return "done"

    assert chat_cli.run_interruptible(answer()) == "done"
    assert not held[0].done()
    held.clear()
    gc.collect()
    assert "Task was destroyed" not in caplog.text
    assert signal.getsignal(signal.SIGINT) is previous  # not interrupted: the handler is given back


# ---------------------------------------------------------------------------------- 3. an expired certificate
def _pair(not_before: datetime.datetime, not_after: datetime.datetime) -> CertPair:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    return CertPair(cert, key)


@pytest.fixture(scope="module")
def dated_servers() -> Iterator[dict[str, tuple[int, CertPair]]]:
    """SDK servers whose certificates expired yesterday and start tomorrow: port and pair, by case."""
    now = datetime.datetime.now(datetime.UTC)
    day = datetime.timedelta(days=1)
    pairs = {"expired": _pair(now - 30 * day, now - day), "future": _pair(now + day, now + 30 * day)}
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    servers = {k: asyncio.run_coroutine_threadsafe(serve(word_source, host="127.0.0.1", port=0, cert=p), loop)
               .result(30) for k, p in pairs.items()}
    yield {k: (servers[k].port, pairs[k]) for k in pairs}

    async def close_all() -> None:
        for s in servers.values():
            await closed(s)

    stop_loop_thread(loop, thread, close_all)


@pytest.mark.parametrize(("case", "when"), [("expired", "has expired"), ("future", "is not valid yet")])
@pytest.mark.parametrize("with_cafile", [True, False])
def test_an_out_of_date_server_certificate_says_so_not_to_trust_it(dated_servers, tmp_path, capsys, case, when,
                                                                    with_cafile):
    """It said "the certificate in --cafile ... does not verify this server's (give the CA ...)" with --cafile the
    server's very certificate, and "trust the server's certificate with --cafile" without one."""
    port, pair = dated_servers[case]
    ca = tmp_path / "server.pem"
    ca.write_bytes(pair.cert_pem)
    trust = ["--cafile", str(ca)] if with_cafile else []
    assert main(["chat", "--port", str(port), *trust, "--server-name", "localhost", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert "(TLS alert 45)" in err and "\n" not in err, err
    assert err.endswith(f"; the server's certificate {when} (outside its validity period): it must be renewed on "
                        "the server (the tokenwire daemon takes a renewed one on SIGHUP); if its dates look right, "
                        "check this machine's clock"), err
    assert "--cafile" not in err and "--insecure" not in err, err


# ---------------------------------------------------------------------------------- 4. the demo answer's length
@pytest.fixture
def instant(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every token of the demo upstream due at once (its schedule's pauses took 5 s over 2000 tokens)."""
    monkeypatch.setattr("tokenwire.daemon.upstreams.schedule", lambda n, **kw: [0.0] * n)


def _generate(upstream: DemoUpstream, max_tokens: int | None, params: dict | None = None) -> tuple[list[str], str]:
    got: list[str] = []
    request = ChatRequest(messages=[{"role": "user", "content": "q"}], model=None, max_tokens=max_tokens,
                          params=params or {}, scheme="chatterbox", request_id=b"\0" * 16)
    reason = asyncio.run(upstream.generate(request, got.append))
    return got, reason


@pytest.mark.parametrize(("limit", "asked", "tokens", "reason"), [
    (2000, None, len(answer_tokens()), "stop"),  # the text once, to its end: was 2000 tokens cut mid-sentence, "stop"
    (2000, 600, 600, "length"),  # more asked for: the text repeated
    (2000, 5, 5, "length"),
    (2000, 5000, 2000, "length"),  # the upstream's own limit cut it: was "stop"
    (100, None, 100, "length"),
    (2000, len(answer_tokens()), len(answer_tokens()), "stop"),  # asked for exactly the text: its own end
])
def test_the_demo_answer_is_its_text_once_unless_more_is_asked_for(instant, limit, asked, tokens, reason):
    got, why = _generate(DemoUpstream("demo", max_tokens=limit), asked)
    assert (len(got), why) == (tokens, reason)
    assert got == answer_tokens(tokens)


@pytest.mark.parametrize("seed", ["abc", 1.5, True, None])
def test_a_seed_that_is_no_integer_is_refused(instant, seed):
    """seed=abc and seed=1.5 ran silently as seed 0, where rate=abc was refused."""
    upstream = DemoUpstream("demo")
    why = "params.seed must be an integer (the seed of the demo upstream's token timing)"
    assert upstream.refusal(None, {"seed": seed}) == why
    with pytest.raises(RequestError, match=r"params\.seed must be an integer"):
        _generate(upstream, 3, {"seed": seed})
    assert upstream.refusal(None, {"seed": 7}) is None and upstream.refusal(None, {}) is None


def test_the_quickstart_chat_gets_the_demo_text_once_and_a_bad_seed_is_one_line(daemon, capsys):
    rc = main(chat_argv(daemon, "--stats", "Why do chatbots stall?"))
    out, err = capsys.readouterr()
    assert rc == 0 and out == "".join(answer_tokens()) + "\n"
    assert err.startswith(f"[{len(answer_tokens())} tokens via chatterbox,") and "ended:" not in err, err
    assert main(chat_argv(daemon, "--stats", "--max-tokens", "600", "longer")) == 0
    out, err = capsys.readouterr()
    assert out == "".join(answer_tokens(600)) + "\n" and "[600 tokens" in err and "ended: length," in err, err
    for seed in ("abc", "1.5"):
        assert main(chat_argv(daemon, "--param", f"seed={seed}", "x")) == 2
        assert capsys.readouterr().err == ("tokenwire chat: error: params.seed must be an integer (the seed of the "
                                           "demo upstream's token timing)\n")


# ---------------------------------------------------------------------------------- 5./6. tokenwire demo
QUIET_RELAY = ["demo", "--link", "relay", "--quiet", "--delay-ms", "0", "--rate", "100", "--loss", "none",
               "--schemes", "chatterbox,stream"]


def test_a_quiet_demo_says_how_far_each_scheme_is(monkeypatch, capsys, tmp_path):
    """`--quiet` printed nothing for minutes on long runs; its first scheme streamed "the same answer" as none."""
    monkeypatch.setattr(demo_cli, "PROGRESS_S", 0.05)  # (the first token comes 150 ms after the request)
    out_json = tmp_path / "demo.json"
    assert main([*QUIET_RELAY, "--tokens", "20", "--json", str(out_json)]) == 0
    out, err = capsys.readouterr()
    assert "--- chatterbox: streaming the answer (not rendered) on the lossy link ...\n" in out
    assert "--- stream: streaming the same answer on the same loss pattern ...\n" in out
    progress = [line for line in err.splitlines() if line.endswith(" s elapsed")]
    for scheme in ("chatterbox", "stream"):
        assert any(line.startswith(f"    {scheme}: ") and "/20 tokens received, " in line for line in progress), err
    assert "--rate-mbps" not in err  # not given: nothing to warn about
    schemes = json.loads(out_json.read_text())["schemes"]
    assert [(r["tokens"], r["finish_reason"]) for r in schemes.values()] == [(20, "length")] * 2


def test_a_long_demo_answer_still_streams_every_token(monkeypatch, tmp_path):
    """The demo upstream's answer is its text once unless a request asks for more: the demo asks for --tokens."""
    from tokenwire.daemon import demo_upstream

    monkeypatch.setattr(demo_upstream, "schedule", lambda n, **kw: [0.0] * n)
    monkeypatch.setattr("tokenwire.daemon.upstreams.schedule", lambda n, **kw: [0.0] * n)
    out_json = tmp_path / "demo.json"
    tokens = len(answer_tokens()) + 100
    assert main([*QUIET_RELAY[:-1], "stream", "--tokens", str(tokens), "--json", str(out_json)]) == 0
    assert json.loads(out_json.read_text())["schemes"]["stream"]["tokens"] == tokens


@pytest.mark.parametrize("link", ["relay", "auto"])
def test_rate_mbps_on_the_relay_is_said_to_be_ignored(link, monkeypatch, capsys):
    from tokenwire.testbed import topology

    monkeypatch.setattr(topology, "unavailable_reason", lambda: "not root (a test)")  # auto: the relay
    argv = ["demo", "--link", link, "--quiet", "--delay-ms", "0", "--rate", "10000", "--tokens", "5", "--loss", "none",
            "--schemes", "stream", "--rate-mbps", "0.01"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert ("(--rate-mbps 0.01 is ignored: the loopback relay adds delay and loss but applies no rate limit; the "
            "namespace link applies it, --link netns as root)\n") in err, err


def test_ctrl_c_pressed_many_times_stops_the_relay_demo_cleanly(tmp_path):
    """uvloop.run's Ctrl-C handling, as asyncio.run's: the demo died by the signal (exit status -2) or printed
    tracebacks, 4 runs in 8, and its temporary folder could stay."""

    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    for gap in (0.0, 0.002):
        proc = subprocess.Popen([sys.executable, "-m", "tokenwire.daemon.cli", "demo", "--link", "relay", "--tokens",
                                 "300", "--rate", "30", "--schemes", "chatterbox"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, preexec_fn=default_signals)
        assert proc.stdout is not None
        _ctrl_c_five_times(proc, gap, functools.partial(_mid_live_answer, proc.stdout))
        assert not list(tmp_path.glob("tokenwire-demo-*"))


# ---------------------------------------------------------------------------------- 7. an empty --token-env
def test_an_empty_token_variable_is_said_to_be_empty(monkeypatch, capsys):
    monkeypatch.setenv("TOKENWIRE_TEST_EMPTY_TOKEN", "")
    assert main(["chat", "--insecure", "--port", "9", "--token-env", "TOKENWIRE_TEST_EMPTY_TOKEN", "hi"]) == 2
    assert capsys.readouterr().err == ("tokenwire chat: error: --token-env: the environment variable "
                                       "TOKENWIRE_TEST_EMPTY_TOKEN is empty (set it to the token)\n")
    monkeypatch.delenv("TOKENWIRE_TEST_EMPTY_TOKEN")
    assert main(["chat", "--insecure", "--port", "9", "--token-env", "TOKENWIRE_TEST_EMPTY_TOKEN", "hi"]) == 2
    assert capsys.readouterr().err.endswith("TOKENWIRE_TEST_EMPTY_TOKEN is not set\n")


# ---------------------------------------------------------------------------------- 8. the SDK's client, | head -1
def test_the_sdk_client_stops_quietly_when_its_reader_goes(daemon):
    """`python -m tokenwire.transport.client ... | head -1` printed "error: [Errno 32] Broken pipe"."""
    proc = subprocess.Popen([sys.executable, "-m", "tokenwire.transport.client", "--port", str(daemon.port), "hi"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline()  # the answer's first line: all `head -1` wanted
        proc.stdout.close()
        err = proc.stderr.read()
        assert proc.wait(60) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert err == b"", err


def test_the_readme_says_what_a_reader_going_away_does():
    text = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert ("one whose reader goes away early (`tokenwire chat ... | head -1`, and `python -m "
            "tokenwire.transport.client`) stops quietly, exit status 1") in text
