"""SIGHUP and authorization, as probes found them: a reload adding the first tokens closed the connection that had
sent that very token ("auth token revoked") and told one that never sent a token it was revoked, under a log line
that said "refused" of connections it closed; a reload removing the last token opened the daemon to anyone with an
INFO line; a SIGHUP in the daemon's first ~1.5 s (before its loop's handlers) killed it without a word."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tokenwire.daemon.config import parse_config
from tokenwire.daemon.reload_decisions import NOW_REQUIRED, REVOKED
from tokenwire.daemon.service import Daemon
from tokenwire.transport.client import connect
from tokenwire.transport.errors import ErrorCode, RemoteError

from .daemon_proc import PAIR, DaemonProcess
from .test_loopback import run

ALICE = "alice-token-for-reload-tests"
BASE = '[server]\nlisten = ["127.0.0.1:0"]\n[metrics]\nlisten = ""\n'
WITH_ALICE = BASE + f'[[auth.tokens]]\nname = "alice"\nsha256 = "{hashlib.sha256(ALICE.encode()).hexdigest()}"\n'


@contextlib.asynccontextmanager
async def _daemon(path: Path, text: str) -> AsyncIterator[Daemon]:
    """The daemon in this process, configured by ``text`` written at ``path`` (what its reload reads again)."""
    path.write_text(text)
    import tomllib

    daemon = Daemon(parse_config(tomllib.loads(text), path))
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.stop()


async def _chat(conn) -> str:
    return await conn.chat("hi", max_tokens=3).collect()


def test_a_reload_adding_the_token_a_connection_sent_keeps_it_authorized_as_its_owner(tmp_path, caplog):
    """Started without tokens, A connects with alice's token, B with none; a reload adds alice's token. A was
    closed "auth token revoked" on its next request (its token was thrown away while auth was off, and the SDK
    does not send it again once answered); now it stays authorized, as alice. B, which never sent a token, hears
    that one is now required, not that one was revoked, and the log says its connection is closed."""
    path = tmp_path / "tokenwire.toml"

    async def go():
        async with (_daemon(path, BASE) as d,
                    connect("127.0.0.1", d.addresses[0][1], verify=False, auth_token=ALICE) as a,
                    connect("127.0.0.1", d.addresses[0][1], verify=False) as b):
            assert await _chat(a) and await _chat(b)  # both let in: no tokens configured
            path.write_text(WITH_ALICE)
            assert d.reload()
            after_a = await _chat(a)  # (this request carries no token: the SDK's first was answered)
            with pytest.raises(RemoteError) as refused:
                await _chat(b)
            principals = sorted((p.principal or "", p.authorized, p.revoked or "") for p in d.protocols)
            return after_a, refused.value, principals, b.closed

    with caplog.at_level(logging.INFO, logger="tokenwire.daemon"):
        after_a, refused, principals, b_closed = run(go())
    assert after_a
    assert refused.code == ErrorCode.UNAUTHORIZED and "authentication is now required" in str(refused)
    assert "revoked" not in str(refused) and b_closed
    assert ("alice", True, "") in principals  # A: authorized as the token's owner
    assert "reload: 1 connections lost their authorization (1 let in while no token was required" in caplog.text
    assert "else its connection is closed" in caplog.text
    assert "whose token was removed" not in caplog.text  # nobody's token was removed
    assert "next requests are refused with UNAUTHORIZED" not in caplog.text  # said of connections it closes


def test_a_connection_let_in_without_a_token_streaming_an_answer_is_refused_then_told_why(tmp_path):
    """B has an answer streaming when the reload adds the first token: that answer finishes, its next request is
    refused (the connection stays while it streams) with the same accurate reason."""
    path = tmp_path / "tokenwire.toml"

    async def go():
        async with (_daemon(path, BASE) as d,
                    connect("127.0.0.1", d.addresses[0][1], verify=False) as b):
            running = b.chat("long", max_tokens=300, params={"rate": 100})
            await running.__anext__()
            path.write_text(WITH_ALICE)
            assert d.reload()
            with pytest.raises(RemoteError) as refused:
                await _chat(b)
            return refused.value, await running.collect(), b.closed

    refused, text, closed = run(go())
    assert refused.code == ErrorCode.UNAUTHORIZED and NOW_REQUIRED in str(refused)
    assert "connection closed" not in str(refused) and not closed
    assert text  # the answer that streamed through the reload finished


def test_a_removed_token_still_says_revoked(tmp_path):
    """(The other reason, unchanged: a connection whose token a reload removed hears "auth token revoked".)"""
    path = tmp_path / "tokenwire.toml"
    bob = "bob-token-for-reload-tests"
    only_bob = BASE + f'[[auth.tokens]]\nname = "bob"\nsha256 = "{hashlib.sha256(bob.encode()).hexdigest()}"\n'

    async def go():
        async with (_daemon(path, WITH_ALICE) as d,
                    connect("127.0.0.1", d.addresses[0][1], verify=False, auth_token=ALICE) as a):
            assert await _chat(a)
            path.write_text(only_bob)
            assert d.reload()
            with pytest.raises(RemoteError) as closed:
                await _chat(a)
            return closed.value

    assert f"connection closed: {REVOKED} (code 0x105)" == str(run(go()))


def test_a_reload_removing_the_last_token_warns_that_the_daemon_accepts_clients_without_one(tmp_path, caplog):
    """An operator revoking a leaked token that was the last one switched authentication off, and the only trace
    was "reloaded: 0 auth tokens" at INFO; the connection holding the leaked token went on too."""
    path = tmp_path / "tokenwire.toml"

    async def go():
        async with (_daemon(path, WITH_ALICE) as d,
                    connect("127.0.0.1", d.addresses[0][1], verify=False, auth_token=ALICE) as a):
            assert await _chat(a)
            path.write_text(BASE + "[auth]\ntokens = []\n")  # (said explicitly: a file cut short is refused)
            assert d.reload()
            async with connect("127.0.0.1", d.addresses[0][1], verify=False) as anyone:
                return await _chat(anyone)  # what the warning says: no token needed now

    with caplog.at_level(logging.INFO, logger="tokenwire.daemon"):
        assert run(go())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    opened = [m for m in warnings if "the last auth token was removed" in m]
    assert len(opened) == 1, warnings
    assert "(1 before, none now)" in opened[0] and "accepts any client that reaches it, without a token" in opened[0]
    assert "the 1 open connection that authorized with a removed token stays authorized" in opened[0]


def test_a_reload_that_keeps_a_token_does_not_warn_of_an_open_daemon(tmp_path, caplog):
    path = tmp_path / "tokenwire.toml"

    async def go():
        async with _daemon(path, WITH_ALICE) as d:
            path.write_text(WITH_ALICE.replace('name = "alice"', 'name = "alice-laptop"'))
            assert d.reload()

    with caplog.at_level(logging.INFO, logger="tokenwire.daemon"):
        run(go())
    assert "reloaded: 1 auth tokens" in caplog.text and "the last auth token was removed" not in caplog.text


# ---------------------------------------------------------------------------------- a SIGHUP before the handlers
class _FifoDaemon(DaemonProcess):
    """``tokenwire daemon`` whose --config is a FIFO: its load_config blocks in the FIFO's open until the test
    opens the other end, which pins a signal to that moment (after run_daemon's first line, long before Daemon.run
    installs its loop's handlers) with no sleep and no race. The reload reads the FIFO again."""

    def __init__(self, tmp: Path) -> None:  # (DaemonProcess's setup, less its config file and its wait for READY)
        self.tmp = tmp
        self.cert, self.key = tmp / "cert.pem", tmp / "key.pem"
        PAIR.write(self.cert, self.key)
        self.config_path = tmp / "tokenwire.toml"
        os.mkfifo(self.config_path)
        self._listen_for_notifications()
        self._spawn({})

    def text(self, level: str) -> str:
        return (f'[server]\nlisten = ["127.0.0.1:0"]\ncertificate = "{self.cert}"\nprivate_key = "{self.key}"\n'
                f'[metrics]\nlisten = ""\n[logging]\nlevel = "{level}"\n')

    def open_config(self, timeout: float = 20.0) -> int:
        """The FIFO's write end, opened once the daemon opens it to read its configuration (load_config). An
        AssertionError if it exits first or takes longer than ``timeout``."""
        opened: list[int] = []
        opener = threading.Thread(target=lambda: opened.append(os.open(self.config_path, os.O_WRONLY)), daemon=True)
        opener.start()
        deadline = time.monotonic() + timeout
        while opener.is_alive() and self.proc.poll() is None and time.monotonic() < deadline:
            opener.join(0.1)
        if opener.is_alive():  # unblock it: a reader of our own
            os.close(os.open(self.config_path, os.O_RDONLY | os.O_NONBLOCK))
            opener.join()
            os.close(opened[0])
            raise AssertionError(f"the daemon did not read its configuration (exit {self.proc.poll()}):\n{self.log()}")
        return opened[0]


def _feed(fd: int, text: str) -> None:
    with contextlib.suppress(BrokenPipeError), os.fdopen(fd, "w") as f:  # (an old daemon may be dead already)
        f.write(text)


def test_a_sighup_before_the_daemon_installs_its_handlers_is_a_reload_once_started(tmp_path):
    """`tokenwire daemon & sleep 1; kill -HUP $!` ended it with status 129 and no log line (SIGHUP's default
    action, before Daemon.run's handlers). Now run_daemon records it from its first line, and the daemon reloads
    once started, as for a SIGHUP during its start."""
    d = _FifoDaemon(tmp_path)
    try:
        fd = d.open_config()  # the daemon is in load_config now
        d.signal(signal.SIGHUP)
        _feed(fd, d.text("info"))
        ready = d.wait_for("READY")  # alive, started
        assert "listening on" in ready["STATUS"]
        _feed(d.open_config(), d.text("debug"))  # the reload reads the file again
        d.wait_for("RELOADING")
        reloaded = d.wait_for("READY")
        assert reloaded["STATUS"].startswith("reloaded")
        log = d.log()
        assert "SIGHUP while starting: reloading once started" in log
        assert "reloaded: 0 auth tokens" in log and "logging debug/text" in log
    finally:
        code = d.stop()  # (not asserted here: a failure above is the one to see)
    assert code == 0


def test_the_cli_records_sighups_before_it_builds_its_parser(monkeypatch):
    """Building the parser imports every command's module (~0.3 s): a SIGHUP then still killed the daemon."""
    import signal

    from tokenwire.daemon import cli
    from tokenwire.daemon.daemon_cli import early_sighups

    handlers = []
    real = cli.build_parser

    def build_parser():
        handlers.append(signal.getsignal(signal.SIGHUP))
        return real()

    monkeypatch.setattr(cli, "build_parser", build_parser)
    before = signal.getsignal(signal.SIGHUP)
    with pytest.raises(SystemExit):
        cli.main(["-v", "daemon", "--no-such-option"])  # a usage error: the handler is given back
    assert handlers == [early_sighups._record]
    assert signal.getsignal(signal.SIGHUP) == before
    cli.main(["sim", "--runs", "1", "--tokens", "3"])  # another command: nothing installed
    assert handlers[1] == before
