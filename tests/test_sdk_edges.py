"""Edges of the SDK's ``serve()`` and ``connect()``: an async ``authorize``, leaving ``connect`` without waiting
out QUIC's closing period (its socket closed before it returns), the module server's shutdown on a signal, what the
server's own close counts as, and the arguments both sides refuse up front."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import re
import signal
import socket
import sys
import time
import warnings

import pytest

from tokenwire.transport import client as client_module
from tokenwire.transport import server as server_module
from tokenwire.transport.client import chat_sync, connect
from tokenwire.transport.errors import ErrorCode, RemoteError
from tokenwire.transport.server import serve
from tokenwire.transport.session_events import AIOQUIC_IDLE_REASON
from tokenwire.transport.tls import CertificateFileError, dev_cert

from .test_sdk_server import T, client_kwargs, failure, run, served, server_in_thread


async def answer(request):
    yield "answer"


def _on_connection_lost(proto) -> asyncio.Event:
    """An event set once the transport has let go of ``proto`` (its socket is closed right after)."""
    lost = asyncio.Event()
    real = proto.connection_lost

    def connection_lost(exc):
        real(exc)
        lost.set()

    proto.connection_lost = connection_lost
    return lost


def _socket_fds() -> set[str]:
    """This process's open sockets, as /proc names them."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:"):
                out.add(f"{fd}={target}")
    return out


# -- 1. authorize: async checks are awaited; anything but a bool fails closed ----------------------------------
def test_an_async_authorize_is_awaited_and_holds_up_no_other_connection():
    """A coroutine is truthy: ``bool(authorize(token))`` let every token in."""

    async def go():
        release = asyncio.Event()

        async def authorize(token):
            if token == "slow":  # a token service that takes its time
                await release.wait()
            return token in ("good", "slow")

        async with served(answer, authorize=authorize) as server:
            async with connect("127.0.0.1", server.port, auth_token="bad", **client_kwargs()) as conn:
                bad = await failure(conn.chat("x"))
            async with connect("127.0.0.1", server.port, auth_token="slow", **client_kwargs()) as slow_conn:
                slow = slow_conn.chat("x")
                async with connect("127.0.0.1", server.port, auth_token="good", **client_kwargs()) as conn:
                    good = await asyncio.wait_for(conn.chat("x").collect(), T)  # while "slow" is being checked
                waited = slow.text
                release.set()
                slow_text = await asyncio.wait_for(slow.collect(), T)
            return bad, good, waited, slow_text, server.stats

    bad, good, waited, slow_text, stats = run(go())
    assert isinstance(bad, RemoteError) and bad.code == ErrorCode.UNAUTHORIZED
    assert (good, waited, slow_text) == ("answer", "", "answer")
    assert (stats.requests, stats.refused, stats.failed) == (3, 1, 0)


async def _async_one(token):
    return 1


@pytest.mark.parametrize("authorize", [lambda token: 1, lambda token: "yes", lambda token: None, _async_one],
                         ids=["int", "str", "None", "async-int"])
def test_an_authorize_verdict_that_is_not_a_bool_fails_closed_and_is_logged_once(authorize, caplog):
    async def go():
        async with served(answer, authorize=authorize) as server:
            errors = []
            for _ in range(2):
                async with connect("127.0.0.1", server.port, auth_token="anything", **client_kwargs()) as conn:
                    errors.append(await failure(conn.chat("x")))
            return errors, server.stats

    errors, stats = run(go())
    for err in errors:
        assert isinstance(err, RemoteError) and err.code == ErrorCode.INTERNAL, err
    assert (stats.requests, stats.failed, stats.completed, stats.tokens) == (2, 2, 0, 0)
    assert caplog.text.count("not True or False") == 1


# -- 2 and 3. leaving connect(): no wait for the closing period, and the socket closes in every case ------------
def test_leaving_connect_returns_without_the_closing_period_and_has_closed_the_socket():
    """The exit waited out aioquic's closing period (3 PTO: 1.9 s at a 200 ms RTT) after the answer was whole; then
    it returned at once but left the socket to a background task, which a loop closed by its owner never ran
    (test_sdk_fixes2). Now the socket is closed when the exit returns, and the period is not waited out."""

    async def go():
        async with served(answer) as server:
            async with connect("127.0.0.1", server.port, **client_kwargs()) as conn:
                assert await asyncio.wait_for(conn.chat("x").collect(), T) == "answer"
                proto = conn._protocol
                (peer,) = server.protocols
                sock = proto._transport.get_extra_info("socket")
                proto._quic._loss._rtt_smoothed = 60.0  # a closing period of minutes (5 s at most): not waited out
            fileno = sock.fileno()
            await asyncio.wait_for(peer.wait_closed(), T)  # the server had the close at once (no 60 s idle timeout)
            return fileno, proto.terminated, peer.terminated

    fileno, ended, seen = run(go())
    assert fileno == -1, "the socket was still open when `async with connect()` returned"
    assert ended is not None and (ended.error_code, ended.reason_phrase) == (0, "")  # the close's end, not the socket's
    assert seen.error_code == 0 and seen.reason_phrase != AIOQUIC_IDLE_REASON


@pytest.mark.parametrize("ecn", [False, True])
def test_a_cancellation_while_leaving_connect_still_closes_the_socket(ecn):
    """aioquic's connect() skipped ``transport.close()`` when its wait for the closing period was cancelled."""

    async def go():
        async with served(answer) as server:
            leaving = asyncio.Event()
            held = {}

            async def client():
                async with connect("127.0.0.1", server.port, ecn=ecn, **client_kwargs()) as conn:
                    await asyncio.wait_for(conn.chat("x").collect(), T)
                    held["sock"] = conn._protocol._transport.get_extra_info("socket")
                    held["lost"] = _on_connection_lost(conn._protocol)
                    leaving.set()

            task = asyncio.ensure_future(client())
            await asyncio.wait_for(leaving.wait(), T)
            task.cancel()  # lands in the exit's wait for the closing period, where there is one
            await asyncio.gather(task, return_exceptions=True)
            await asyncio.wait_for(held["lost"].wait(), T)
            return held["sock"].fileno()

    assert run(go()) == -1


def test_chat_sync_leaves_no_socket_task_or_resource_warning(caplog):
    """``asyncio.run`` ends right after the exit, while the closing period runs on: its task is cancelled then, and
    that closes the socket."""
    with server_in_thread(answer) as server:
        gc.collect()  # (what earlier tests left is not this test's)
        before = _socket_fds()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            texts = [chat_sync("127.0.0.1", server.port, "x", **client_kwargs()).text for _ in range(3)]
            gc.collect()
        after = _socket_fds()
    assert texts == ["answer"] * 3
    assert after == before
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]
    assert "Task was destroyed" not in caplog.text


def test_a_handshake_timeout_returns_on_time_and_leaves_no_socket(monkeypatch):
    """After a handshake timeout the caller also waited out the closing period (0.6 s by default; 18 s here, with an
    initial RTT of 3 s); asyncio.run's shutdown ends it now, and closes the socket."""
    real = client_module.client_configuration

    def slow_start(**kwargs):
        config = real(**kwargs)
        config.initial_rtt = 3.0  # PTO before any RTT sample: 6 s; closing period: 18 s
        return config

    monkeypatch.setattr(client_module, "client_configuration", slow_start)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # bound, never read: no answer, no ICMP
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]

        async def go():
            start = time.monotonic()
            with pytest.raises(ConnectionError, match=r"within 0\.3 s"):
                async with connect("127.0.0.1", port, timeout=0.3, **client_kwargs()):
                    pass
            return time.monotonic() - start

        gc.collect()
        before = _socket_fds()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            elapsed = run(go())
            gc.collect()
        after = _socket_fds()
    # far from the nominal 0.3 s (a loaded host does not fail it), far below the 18-s closing period it guards
    assert elapsed < 9.0, f"{elapsed:.1f} s for a 0.3 s timeout"
    assert after == before
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]


# -- 4. the module server closes on Ctrl-C and SIGTERM ----------------------------------------------------------
# SIGINT as Python's own handler takes it, even where the test runner's parent ignores it (a background job)
_RUN_SERVER = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
               "runpy.run_module('tokenwire.transport.server', run_name='__main__')")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_the_module_server_closes_its_connections_on_ctrl_c_and_sigterm(sig):
    """Nothing called ``server.close()``: clients waited for their idle timeout (60 s), then read 'no packet from
    the server'."""

    async def go():
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _RUN_SERVER, "--port", "0",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            port = int(re.search(rb"127\.0\.0\.1:(\d+)", line).group(1))
            async with connect("127.0.0.1", port, verify=False) as conn:  # (the subprocess has its own dev pair)
                stream = conn.chat("x")
                await asyncio.wait_for(anext(stream), T)
                proc.send_signal(sig)
                err = await failure(stream)
            _, stderr = await asyncio.wait_for(proc.communicate(), T)
            return err, proc.returncode, stderr
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    err, rc, stderr = run(go(), timeout=60)
    assert isinstance(err, RemoteError) and err.code == ErrorCode.SHUTTING_DOWN, err
    assert rc == 0, stderr.decode()


# -- 5. what the server's own close cuts off is cancelled, not completed --------------------------------------
def test_an_answer_the_servers_close_cuts_off_before_the_client_confirms_counts_as_cancelled():
    async def go():
        deaf = asyncio.Event()
        feeding: dict[str, asyncio.Task] = {}

        async def source(request):
            feeding["task"] = asyncio.current_task()
            yield "a"
            await deaf.wait()
            yield "b"

        server = await serve(source, host="127.0.0.1", port=0)
        try:
            async with connect("127.0.0.1", server.port, **client_kwargs()) as conn:
                stream = conn.chat("x")
                assert await asyncio.wait_for(anext(stream), T) == "a"
                conn._protocol.datagram_received = lambda data, addr: None  # the client hears nothing more
                deaf.set()
                await asyncio.wait_for(asyncio.wait({feeding["task"]}), T)  # the whole answer and FINISHED are out
                server.close()
                await asyncio.wait_for(server.wait_closed(), T)
        finally:
            server.close()
            await server.wait_closed()
        return server.stats

    stats = run(go())
    assert (stats.requests, stats.completed, stats.cancelled, stats.failed) == (1, 0, 1, 0), stats


# -- 6. ports outside 0..65535 ---------------------------------------------------------------------------------
@pytest.mark.parametrize("port", [70000, 65536, -1])
def test_a_port_outside_the_range_is_a_value_error_on_both_sides(port):
    """The socket layer took it modulo 65536: serve(port=70000) listened on 4464, connect(port=70000) called it."""
    with pytest.raises(ValueError, match=rf"port {port}\b"):
        run(serve(answer, host="127.0.0.1", port=port))

    async def go():
        async with connect("127.0.0.1", port, timeout=1.0, **client_kwargs()):
            pass

    with pytest.raises(ValueError, match=rf"port {port}\b"):
        run(go())


def test_connect_refuses_port_0():
    async def go():
        async with connect("127.0.0.1", 0, timeout=1.0, **client_kwargs()):
            pass

    with pytest.raises(ValueError, match="port 0"):
        run(go())


def test_the_module_clis_refuse_a_port_outside_the_range(capsys):
    with pytest.raises(SystemExit) as info:
        client_module.main(["--port", "70000"])
    assert info.value.code == 2 and "port 70000" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        run(server_module._main(["--port", "70000"]), timeout=T)
    assert info.value.code == 2 and "port 70000" in capsys.readouterr().err


# -- 7. timeouts and limits that cannot work ----------------------------------------------------------------
@pytest.mark.parametrize(("name", "value"), [
    ("idle_timeout", -1), ("idle_timeout", 0), ("idle_timeout", float("nan")), ("idle_timeout", float("inf")),
    ("timeout", -1), ("timeout", 0), ("timeout", float("nan")),
])
def test_connect_refuses_a_timeout_that_is_not_a_positive_number_of_seconds(name, value):
    """idle_timeout=-1 raised KeyError from inside aioquic; timeout=nan waited for nothing ("within nan s")."""
    kwargs = {"timeout": 1.0, name: value}

    async def go():
        async with connect("127.0.0.1", 9, **kwargs, **client_kwargs()):
            pass

    with pytest.raises(ValueError, match=rf"^{name} must be"):
        run(go())


@pytest.mark.parametrize("limit", [0, -1, True, 2.5])
def test_serve_refuses_a_max_requests_per_connection_below_one(limit):
    """0 was accepted, then every request was refused."""
    with pytest.raises(ValueError, match="max_requests_per_connection"):
        run(serve(answer, host="127.0.0.1", port=0, max_requests_per_connection=limit))


def test_serve_takes_the_request_timeout_the_daemon_has_as_a_setting():
    """serve() held it at 10 s with no way to change it; the daemon has limits.request_timeout_s."""
    with pytest.raises(ValueError, match="request_timeout"):
        run(serve(answer, host="127.0.0.1", port=0, request_timeout=0))

    async def go():
        server = await serve(answer, host="127.0.0.1", port=0, request_timeout=1.5)
        try:
            async with connect("127.0.0.1", server.port, **client_kwargs()) as conn:
                await asyncio.wait_for(conn.chat("x").collect(), T)  # the connection is up
                proto = next(iter(server.protocols))
                return proto.server_session.request_timeout
        finally:
            server.close()
            await server.wait_closed()

    assert run(go()) == 1.5


# -- 8. keyfile without certfile ----------------------------------------------------------------------------------
def test_a_keyfile_without_a_certfile_is_refused_on_both_sides(tmp_path):
    """It was ignored: the server used its dev certificate, the client presented no certificate."""
    key = tmp_path / "key.pem"
    key.write_bytes(dev_cert().key_pem)
    with pytest.raises(ValueError, match="keyfile needs certfile"):
        run(serve(answer, host="127.0.0.1", port=0, keyfile=key))

    async def go():
        async with served(answer) as server, connect("127.0.0.1", server.port, keyfile=key, **client_kwargs()):
            pass

    with pytest.raises(ValueError, match="keyfile needs certfile"):
        run(go())


# -- 9. cadata as text; the module client's errors -----------------------------------------------------------------
def test_cadata_may_be_pem_text_as_ssl_takes_it():
    """A str raised a bare TypeError from deep inside aioquic."""

    async def go(cadata):
        async with served(answer) as server, connect("127.0.0.1", server.port, cadata=cadata,
                                                     server_name="localhost") as conn:
            return await asyncio.wait_for(conn.chat("x").collect(), T)

    assert run(go(dev_cert().cert_pem.decode())) == "answer"
    with pytest.raises(CertificateFileError, match="cadata"):
        run(go("not a certificate"))
    with pytest.raises(CertificateFileError, match="cadata"):
        run(go("caf\u00e9"))


def test_the_module_client_reports_a_failure_in_one_line(capsys, monkeypatch):
    """A refusal (a RemoteError) or no server (a ConnectionError) was a traceback."""
    with server_in_thread(answer, authorize=lambda token: False) as server:
        rc = client_module.main(["--port", str(server.port), "hi"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "auth token" in err

    @contextlib.asynccontextmanager
    async def no_server(*args, **kwargs):  # what connect raises after its timeout (10 s: not waited for here)
        raise ConnectionError("no QUIC handshake with 127.0.0.1:9 within 10 s")
        yield

    monkeypatch.setattr(client_module, "connect", no_server)
    assert client_module.main(["--port", "9"]) == 1
    assert capsys.readouterr().err == "error: no QUIC handshake with 127.0.0.1:9 within 10 s\n"


def test_a_connection_left_open_when_asyncio_run_ends_closes_its_socket():
    """A client task main() never awaited is cancelled by asyncio.run's last sweep; the closing-period task its
    exit made then was never run: its socket stayed open for the process's life."""

    async def source(request):
        yield "a"
        await asyncio.sleep(3600)

    def sockets() -> set[str]:
        out = set()
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                    out.add(fd)
        return out

    with server_in_thread(source) as server:
        async def main():
            started = asyncio.Event()

            async def client():
                async with connect("127.0.0.1", server.port, verify=False) as conn:
                    stream = conn.chat("x")
                    await anext(stream)
                    started.set()
                    await asyncio.sleep(3600)

            left = asyncio.ensure_future(client())  # left running: main() returns without awaiting it
            await asyncio.wait_for(started.wait(), T)
            assert not left.done()

        gc.collect()
        before = sockets()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            asyncio.run(main())
        gc.collect()
        assert sockets() - before == set()
