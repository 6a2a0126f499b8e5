"""``tokenwire chat`` against a real server: the answer on stdout, and every user mistake one clear line."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator

import pytest

from tokenwire.daemon.cli import main
from tokenwire.transport.server import TokenServer, serve
from tokenwire.transport.tls import CertificateFileError, client_configuration, dev_cert, make_self_signed

from .terminal import default_signals
from .test_loopback import WORDS, word_source


def stop_loop_thread(loop: asyncio.AbstractEventLoop, thread: threading.Thread,
                     close: Callable[[], Awaitable[object]]) -> None:
    """Await ``close()`` on ``loop`` (run by ``thread``), then stop the loop, join the thread and close the loop.

    ``server.close`` and ``loop.stop`` queued back to back ended the loop, when both ran in one turn, before the
    callbacks that close the UDP sockets close() had scheduled, and the loop itself was never closed: the loop,
    its self-pipe (a Unix stream socket pair) and a UDP transport on 127.0.0.1 were left to the garbage collector,
    whose ResourceWarnings then came out in whichever later test it ran in."""
    asyncio.run_coroutine_threadsafe(close(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


async def closed(server: TokenServer) -> None:
    """``server`` (the SDK's) closed, its connections' closing periods over and its UDP socket closed."""
    server.close()
    await server.wait_closed()


@pytest.fixture(scope="module")
def server_port() -> Iterator[int]:
    """A tokenwire server (dev certificate, name ``localhost``) on its own loop in a thread."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict = {}

    async def start() -> None:
        holder["server"] = await serve(word_source, host="127.0.0.1", port=0)
        started.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
    assert started.wait(30)
    yield holder["server"].port
    stop_loop_thread(loop, thread, lambda: closed(holder["server"]))


@pytest.fixture(scope="module")
def cafile(tmp_path_factory):
    path = tmp_path_factory.mktemp("ca") / "dev.pem"
    path.write_bytes(dev_cert().cert_pem)
    return path


def chat(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["chat", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_json_stats_dash_leaves_stdout_to_the_json(server_port, cafile, capsys):
    """`--json-stats -` put the stats JSON on stdout behind the answer: unparseable. As with every `--json -`,
    the answer goes to stderr then."""
    import json

    rc, out, err = chat(capsys, "--port", str(server_port), "--cafile", str(cafile), "--server-name", "localhost",
                        "--max-tokens", "20", "--json-stats", "-", "hello")
    assert rc == 0, err
    assert json.loads(out)["digest_verified"] is True and "".join(WORDS[:20]) in err


def test_answer_streams_to_stdout(server_port, cafile, capsys, tmp_path):
    stats = tmp_path / "stats.json"
    rc, out, err = chat(capsys, "--port", str(server_port), "--cafile", str(cafile), "--server-name", "localhost",
                        "--max-tokens", "20", "--json-stats", str(stats), "hello")
    assert rc == 0, err
    assert out == "".join(WORDS[:20]) + "\n"
    assert '"digest_verified": true' in stats.read_text()


@pytest.mark.parametrize("content", [None, b"not a certificate\n", b""], ids=["missing", "junk", "empty"])
def test_unusable_cafile_is_one_line_before_connecting(content, tmp_path, capsys):
    """aioquic reads the CA file only when the server's certificate arrives; a bad one used to be a traceback
    in the event loop and then a misleading 10 s handshake timeout. No server runs here: the check is local."""
    path = tmp_path / "ca.pem"
    if content is not None:
        path.write_bytes(content)
    rc, _, err = chat(capsys, "--port", "9", "--cafile", str(path), "hi")
    assert rc == 2
    assert str(path) in err and "Traceback" not in err and "handshake" not in err
    assert len(err.strip().splitlines()) == 1


def test_certificate_for_another_name_says_why(server_port, cafile, capsys):
    """A TLS failure used to end as 'error: ' with nothing after it (aioquic's bare ConnectionError)."""
    rc, out, err = chat(capsys, "--port", str(server_port), "--cafile", str(cafile), "--server-name", "other.test",
                        "hi")
    assert rc == 2 and out == ""
    assert err.startswith("tokenwire chat: error: TLS handshake") and len(err.strip().splitlines()) == 1, err
    assert "hostname 'other.test'" in err and "--insecure" in err  # and what to do about it


def test_untrusted_certificate_says_why(server_port, tmp_path, capsys):
    other = tmp_path / "other.pem"
    other.write_bytes(make_self_signed(("localhost",)).cert_pem)
    rc, _, err = chat(capsys, "--port", str(server_port), "--cafile", str(other), "--server-name", "localhost", "hi")
    assert rc == 2
    assert "tokenwire chat: error: TLS handshake with 127.0.0.1" in err and "certificate" in err.lower(), err


@pytest.mark.parametrize(("argv", "message"), [
    (["--attach", "00ff"], "--attach takes the 32-hex-digit request id"),
    (["--attach", "zz"], "--attach takes the 32-hex-digit request id"),
    (["--attach", ""], "--attach takes the 32-hex-digit request id"),  # a TypeError traceback
    (["caf\udce9"], "the prompt is not valid UTF-8 text"),  # undecodable bytes; the error blamed params
    (["--max-tokens", "0", "hi"], "--max-tokens must be at least 1"),
    (["--idle-timeout", "0", "hi"], "--idle-timeout must be > 0"),
    (["--max-time", "0", "hi"], "--max-time must be a number of seconds > 0"),
    (["--token-env", "TOKENWIRE_TEST_UNSET_VARIABLE", "hi"], "TOKENWIRE_TEST_UNSET_VARIABLE is not set"),
    (["--attach", "00" * 16, "a prompt"], "no prompt or --max-tokens with it"),  # were silently ignored
    ([""], "no prompt given (argument or stdin): it is empty"),  # was sent (empty stdin was refused)
    ([" \n\t"], "no prompt given (argument or stdin): it is empty"),
    (["--attach", "00" * 16, "--max-tokens", "5"], "no prompt or --max-tokens with it"),
    (["--host", "no-such-host.invalid", "hi"], "cannot resolve no-such-host.invalid"),  # a gaierror traceback
])
def test_bad_arguments_are_rejected_before_connecting(argv, message, capsys, monkeypatch):
    """Each of these used to reach the server (which closed the connection) or wait for a handshake."""
    monkeypatch.delenv("TOKENWIRE_TEST_UNSET_VARIABLE", raising=False)
    rc, _, err = chat(capsys, "--port", "9", *argv)
    assert rc == 2
    assert message in err, err


def test_max_time_runs_out_before_a_silent_server_is_reached(capsys):
    """A port that takes datagrams and never answers: time runs out before any request went out."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        rc, _, err = chat(capsys, "--host", "127.0.0.1", "--port", str(silent.getsockname()[1]), "--max-time", "0.5",
                          "--idle-timeout", "5", "hi")
    assert rc == 2
    assert ("no whole answer within 0.5 s (--max-time): the server was not reached, nothing was asked of it"
            in err), err


def test_a_port_nobody_listens_on_is_said_at_once(capsys):
    """Linux answers a datagram to a closed port with ICMP port unreachable: said at once, not after --max-time."""
    if sys.platform != "linux":
        pytest.skip("the refusal reaches the client on Linux only")
    rc, _, err = chat(capsys, "--host", "127.0.0.1", "--port", "9", "--max-time", "60", "hi")
    assert rc == 2
    assert "nothing listening at 127.0.0.1:9 (connection refused)" in err, err


def test_request_the_server_would_refuse_is_one_line(server_port, cafile, capsys):
    rc, _, err = chat(capsys, "--port", str(server_port), "--cafile", str(cafile), "--server-name", "localhost",
                      "--model", "m" * 200, "hi")
    assert rc == 2
    # the option's words (model), not the wire's (request.model)
    assert err.startswith("tokenwire chat: error: invalid request: model: ") and "Traceback" not in err, err


@pytest.mark.parametrize("stdin", ["", " \n\n\t"])
def test_an_empty_prompt_on_stdin_is_refused_as_an_empty_argument_is(stdin, capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc, _, err = chat(capsys, "--port", "9")
    assert rc == 2
    assert err == "tokenwire chat: error: no prompt given (argument or stdin): it is empty\n", err


def test_a_prompt_over_the_request_limit_says_so_in_bytes_of_utf8(server_port, cafile, capsys):
    """It said "invalid request: frame of 1200047 bytes exceeds the limit of 1048576" for a prompt of 600,000
    characters, under the 1,048,576 "code points" the protocol document promised."""
    rc, _, err = chat(capsys, "--port", str(server_port), "--cafile", str(cafile), "--server-name", "localhost",
                      "é" * 600_000)
    assert rc == 2
    assert err == ("tokenwire chat: error: prompt too large: its text is 1,200,000 bytes of UTF-8 and the request "
                   "1,200,047 bytes encoded, over the limit of 1,048,576 bytes per request (a daemon's "
                   "limits.max_request_bytes may be lower)\n"), err


def test_a_prompt_over_the_daemons_lower_limit_names_that_setting(tmp_path, capsys):
    """A daemon's limits.max_request_bytes below 1 MiB refuses the request alone; its words ("request too large:
    stream frame of 2047 bytes exceeds the limit of 1024") did not say that the prompt counts in bytes of UTF-8
    nor which setting it is."""
    from .daemon_proc import DaemonProcess

    d = DaemonProcess(tmp_path, "[limits]\nmax_request_bytes = 1024\n")
    try:
        rc, out, err = chat(capsys, "--port", str(d.port), "--cafile", str(d.cert), "--server-name", "localhost",
                            "x" * 2000)
    finally:
        assert d.stop() == 0
    assert rc == 2 and out == "", (out, err)
    line = err.strip()
    assert line.startswith("tokenwire chat: error: ") and "request too large" in line and "\n" not in line, err
    assert line.endswith("; the prompt (its text in bytes of UTF-8, plus some 50 bytes of framing) is over this "
                         "server's limit on a request (the daemon's limits.max_request_bytes)"), err


@pytest.mark.parametrize("port", ["0", "65536", "x"])
def test_port_out_of_range_is_an_argument_error(port, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["chat", "--port", port, "hi"])
    assert exc.value.code == 2
    assert "--port" in capsys.readouterr().err


def test_reader_going_away_is_not_an_error(server_port, cafile):
    """``tokenwire chat ... | head -c 5``: the pipe closes early; no 'Broken pipe' error, no traceback."""
    proc = subprocess.run(
        f"{sys.executable} -m tokenwire.daemon.cli chat --port {server_port} --cafile {cafile} "
        f"--server-name localhost hello | head -c 5",
        shell=True, capture_output=True, timeout=60)
    assert proc.stdout == "".join(WORDS).encode()[:5]
    assert b"Broken pipe" not in proc.stderr and b"Traceback" not in proc.stderr, proc.stderr.decode()


def test_cafile_and_cadata_are_both_trusted(tmp_path):
    """aioquic keeps one of cafile/cadata (each load_verify_locations call replaces both): both must count."""
    a, b = make_self_signed(("a.test",)), make_self_signed(("b.test",))
    path = tmp_path / "a.pem"
    path.write_bytes(a.cert_pem)
    config = client_configuration(cafile=path, cadata=b.cert_pem)
    assert config.cadata is not None and a.cert_pem in config.cadata and b.cert_pem in config.cadata
    with pytest.raises(CertificateFileError, match="cadata"):
        client_configuration(cadata=b"junk")


@contextlib.contextmanager
def _relay_with_outage(port: int, dark: tuple[float, float]) -> Iterator[int]:
    """A UDP relay to ``port`` whose both directions go dead from ``dark[0]`` to ``dark[1]`` seconds after the
    first client packet: its own port."""
    import time

    from tokenwire.testbed.udp_relay import UdpRelay

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    relay = asyncio.run_coroutine_threadsafe(UdpRelay(("127.0.0.1", port)).start(), loop).result(10)
    started: dict = {}

    def through(path):
        decide = path.decide

        def decide_with_outage(elapsed, size):
            start = started.setdefault("t", time.monotonic())
            return None if dark[0] <= time.monotonic() - start < dark[1] else decide(elapsed, size)

        path.decide = decide_with_outage

    through(relay.up)
    through(relay.down)
    try:
        yield relay.port
    finally:
        async def close_relay() -> None:
            relay.close()
            await asyncio.sleep(0)  # (its transports close their sockets on the next loop turn)

        stop_loop_thread(loop, thread, close_relay)


@contextlib.contextmanager
def _daemon_behind_an_outage(tmp_path, dark: tuple[float, float]) -> Iterator[tuple[object, int]]:
    """A daemon (a 120-token answer at 40 tokens/s) behind :func:`_relay_with_outage`: (daemon, relay port)."""
    from .daemon_proc import DaemonProcess

    d = DaemonProcess(tmp_path, upstream_toml='[[upstreams]]\nname = "demo"\ntype = "demo"\nrate = 40\n'
                                             'first_token_ms = 20\nmax_tokens = 120\n')
    try:
        with _relay_with_outage(d.port, dark) as port:
            yield d, port
    finally:
        assert d.stop() == 0


def test_a_lost_connection_mid_answer_resumes_where_it_stopped(tmp_path, capsys):
    """The path goes silent for longer than --idle-timeout mid-answer (a train tunnel): the CLI gave up with
    "QUIC idle timeout" and the answer was lost though the daemon still held it. It now reconnects and
    resumes after the tokens it has, so stdout holds the whole answer exactly once."""
    from tokenwire.daemon.demo_upstream import answer_tokens

    with _daemon_behind_an_outage(tmp_path, (1.0, 3.0)) as (d, port):
        rc, out, err = chat(capsys, "--port", str(port), "--cafile", str(d.cert), "--server-name",
                            "localhost", "--idle-timeout", "0.8", "--stats", "tell me a story")
    # the demo upstream's answer (its max_tokens, 120), as a chat without the outage prints it: that chat, 3 s at
    # 40 tokens/s, was this test's reference
    whole = "".join(answer_tokens(120)) + "\n"
    assert rc == 0 and "QUIC idle timeout" in err and "resuming request" in err and "(1/3)" in err, err
    assert "digest verified" in err and "stall ratio n/a" in err
    assert out == whole and len(out.split()) > 50  # the same answer as without the outage, once


def test_max_time_while_reconnecting_says_the_server_was_not_told(tmp_path, capsys):
    """--max-time said "it was cancelled" when it ran out while the CLI was reconnecting through an outage: no
    cancellation could reach the daemon, which went on generating the answer."""
    with _daemon_behind_an_outage(tmp_path, (1.0, 1e9)) as (d, port):
        rc, _, err = chat(capsys, "--port", str(port), "--cafile", str(d.cert), "--server-name", "localhost",
                          "--idle-timeout", "0.8", "--retries", "9", "--max-time", "5", "tell me a story")
    last = err.strip().splitlines()[-1]
    assert rc == 2 and "resuming request" in err, err
    rid = err.split("resuming request ")[1].split()[0]
    # (--max-time 5: the outage starts 1 s after the first packet, the 0.8-s idle timeout then starts reconnecting)
    assert last == ("tokenwire chat: error: no whole answer within 5 s (--max-time), while reconnecting: the "
                    f"server could not be told to cancel it and may finish request {rid}"), err


def test_a_resume_the_server_cannot_serve_says_the_printed_part_is_all_there_is(capsys):
    """A daemon restarted during the outage (here the SDK's server, which keeps no answers) answered the resume
    with only "unknown or expired request id": nothing said the printed answer was incomplete for good."""
    from .test_loopback import slow_source

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(serve(slow_source, host="127.0.0.1", port=0), loop).result(30)
    try:
        with _relay_with_outage(server.port, (0.5, 2.0)) as port:
            rc, out, err = chat(capsys, "--port", str(port), "--insecure", "--idle-timeout", "0.6", "hello")
    finally:
        stop_loop_thread(loop, thread, lambda: closed(server))
    assert rc == 2 and out.strip() and "resuming request" in err, err
    assert err.strip().splitlines()[-1].endswith("the daemon no longer holds the answer (restarted, or it was "
                                                 "retained for less time than the outage lasted): what was printed "
                                                 "is all of it that came"), err


@pytest.mark.parametrize("how", ["pipe", "ctrl-c", "sigterm", "sighup", "max-time"])
def test_leaving_early_cancels_the_answer_at_the_daemon(tmp_path, how):
    """`tokenwire chat | head -c 5` and Ctrl-C left the daemon generating the answer to max_tokens (the chat
    CLI read with a bare `async for`, so the daemon saw a lost connection, which it keeps answers for).
    `--max-time` gives up the same way (without it, a live server that is slow or stops sending held the
    client for ever). SIGTERM (kill, a timeout) killed the client outright (its default action): it takes
    Ctrl-C's path now, "interrupted" and 130, the partial answer's line ended; so does SIGHUP (the terminal
    closed)."""
    import signal
    import textwrap
    import time

    from .daemon_proc import DaemonProcess
    from .test_daemon import metric_value, metrics

    d = DaemonProcess(tmp_path, upstream_toml=textwrap.dedent("""
        [[upstreams]]
        name = "demo"
        type = "demo"
        rate = 20
        first_token_ms = 20
        """))  # 2000 tokens at 20/s: 100 s of answer
    try:
        cmd = (f"{sys.executable} -m tokenwire.daemon.cli chat --port {d.port} --cafile {d.cert} "
               f"--server-name localhost --max-tokens 2000 hello")
        if how == "pipe":
            subprocess.run(cmd + " | head -c 5", shell=True, capture_output=True, timeout=60, check=True)
        elif how == "max-time":
            t0 = time.monotonic()
            done = subprocess.run([*cmd.split(), "--max-time", "2"], capture_output=True, text=True, timeout=60)
            assert done.returncode == 2 and time.monotonic() - t0 < 15, done
            assert done.stderr.strip().splitlines()[-1] == ("tokenwire chat: error: no whole answer within 2 s "
                                                            "(--max-time); the answer's cancellation was sent to "
                                                            "the server (it does not arrive if the path is down)"
                                                            ), done.stderr
            assert done.stdout.endswith("\n") and len(done.stdout.split()) >= 5  # the part that came, its line ended
        else:
            proc = subprocess.Popen(cmd.split(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    preexec_fn=default_signals)
            try:
                assert proc.stdout is not None
                head = proc.stdout.read(3)  # the answer is streaming
                proc.send_signal({"ctrl-c": signal.SIGINT, "sigterm": signal.SIGTERM, "sighup": signal.SIGHUP}[how])
                out, err = proc.communicate(timeout=30)
            finally:  # a client that did not stop is not left running after the test
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
            assert proc.returncode == 130 and err.decode().strip().splitlines()[-1] == "interrupted", (out, err)
            assert (head + out).endswith(b"\n"), out  # "interrupted" is not glued onto the partial answer
        deadline = time.monotonic() + 10
        while metric_value(metrics(d), "tokenwire_requests_active") != 0:
            assert time.monotonic() < deadline, "the daemon is still generating the abandoned answer"
            time.sleep(0.1)
    finally:
        assert d.stop() == 0


@pytest.mark.parametrize("case", ["no-key", "other-key", "missing"])
def test_an_unusable_client_certificate_is_one_line_before_connecting(tmp_path, capsys, case):
    """A --cert file without its key made the client present no certificate (the daemon then said "pass --cert
    and --key" to someone who had), and a key of another certificate failed as "no reason given"."""
    pair, other = make_self_signed(("carol",)), make_self_signed(("mallory",))
    pair.write(tmp_path / "carol.pem", tmp_path / "carol.key")
    other.write(tmp_path / "mallory.pem", tmp_path / "mallory.key")
    argv = {"no-key": ["--cert", str(tmp_path / "carol.pem")],
            "other-key": ["--cert", str(tmp_path / "carol.pem"), "--key", str(tmp_path / "mallory.key")],
            "missing": ["--cert", str(tmp_path / "nope.pem")]}[case]
    rc, _, err = chat(capsys, "--port", "9", *argv, "hi")
    assert rc == 2, err
    want = {"no-key": "holds no private key", "other-key": "does not belong to the certificate",
            "missing": "nope.pem: cannot read"}[case]
    assert want in err and "Traceback" not in err, err


def test_a_servers_words_reach_the_terminal_escaped_and_on_their_own_line(capsys):
    """An ERROR message with escape sequences cleared the user's screen and set the window title through
    `tokenwire chat`'s error line, a newline in it forged more lines, and the line was glued onto the partial
    answer ("Hello tokenwire chat: error: ...")."""
    from tokenwire.transport.errors import RequestError

    async def source(request):
        yield "Hello "
        raise RequestError("\x1b[2J\x1b]0;pwned\x07fake\nsecond line \u202e")

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(serve(source, host="127.0.0.1", port=0), loop).result(30)
    try:
        rc, out, err = chat(capsys, "--port", str(server.port), "--insecure", "hi")
    finally:
        stop_loop_thread(loop, thread, lambda: closed(server))
    assert rc == 2
    assert out == "Hello \n"
    assert err.count("\n") == 1 and "\x1b" not in err and "\x07" not in err and "\u202e" not in err, repr(err)
    assert "\\x1b[2J" in err and "fake\\nsecond line" in err


def test_printable_leaves_ordinary_text_alone():
    from tokenwire.daemon.cli import printable

    assert printable("zoë says: 2 × 3 = 6 ✓") == "zoë says: 2 × 3 = 6 ✓"
    assert printable("a\tb\x1bc\x9bd") == "a\\tb\\x1bc\\x9bd"


def test_an_answer_the_daemons_stop_ended_gets_no_attach_hint(tmp_path):
    """A SIGTERM drain that closes the connection (SHUTTING_DOWN) ends every answer the daemon held: the CLI still
    printed "tokenwire chat --attach ID", which after the restart said "unknown or expired request id"."""
    from .daemon_proc import DaemonProcess

    d = DaemonProcess(tmp_path, "[limits]\ndrain_timeout_s = 0.5\n",
                      upstream_toml='[[upstreams]]\nname = "demo"\ntype = "demo"\nrate = 20\nfirst_token_ms = 20\n')
    cmd = [sys.executable, "-m", "tokenwire.daemon.cli", "chat", "--port", str(d.port), "--cafile", str(d.cert),
           "--server-name", "localhost", "--max-tokens", "500", "a long story"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_signals)
    try:
        assert proc.stdout is not None
        proc.stdout.read(3)  # the answer is streaming
        d.signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert d.proc.wait(30) == 0  # the drain's end (a second SIGTERM from stop() would cut it)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        d.stop()
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 2 and "server shutting down" in lines[-1], lines
    assert not any("--attach" in line for line in lines), lines
