"""SIGHUP beyond the TOML file: TLS files renewed in place, systemd always told the reload ended, and what a
draining daemon says and does. A probe found the daemon kept serving a renewed certificate's predecessor
until restart (certbot's deploy hook runs `systemctl reload`), an unexpected reload error left systemd
waiting for READY=1, and a drain reported "listening on" 10 s in."""

from __future__ import annotations

import asyncio
import datetime
import logging
import signal

import pytest

from tokenwire.daemon import certificates, service
from tokenwire.daemon.config import parse_config
from tokenwire.transport.client import connect
from tokenwire.transport.errors import ErrorCode, RemoteError
from tokenwire.transport.tls import make_ca, make_client_cert, make_self_signed

from .daemon_proc import DaemonProcess
from .test_loopback import run


async def _served_certificate(d: DaemonProcess):
    """The certificate the daemon hands a new connection (not verified: the test compares it)."""
    async with connect("127.0.0.1", d.port, verify=False, server_name="localhost") as conn:
        await conn.chat("x", max_tokens=2).collect()
        return conn._protocol._quic.tls._peer_certificate


def test_sighup_serves_a_certificate_renewed_in_place_and_keeps_it_when_the_new_files_are_bad(tmp_path):
    d = DaemonProcess(tmp_path)
    try:
        before = run(_served_certificate(d))
        renewed = make_self_signed(("localhost", "127.0.0.1"))
        renewed.write(d.cert, d.key)
        d.signal(signal.SIGHUP)
        ok = d.wait_for("READY")
        assert run(_served_certificate(d)) == renewed.certificate != before
        assert "refused" not in ok["STATUS"] and "serving the new certificate" in d.log()
        # a pair that cannot be used (here a key of another certificate) is refused; the renewed one stays
        make_self_signed(("localhost",)).write(tmp_path / "other.pem", d.key)
        d.signal(signal.SIGHUP)
        refused = d.wait_for("READY")
        assert run(_served_certificate(d)) == renewed.certificate
        assert "TLS files refused" in refused["STATUS"] and "still serving the running certificate" in d.log()
    finally:
        assert d.stop() == 0


def test_sighup_rereads_a_client_ca_bundle_changed_in_place(tmp_path):
    first, second = make_ca("first CA"), make_ca("second CA")
    bundle = tmp_path / "clients.pem"
    bundle.write_bytes(first.cert_pem)
    make_client_cert(second, "dora").write(tmp_path / "dora.pem", tmp_path / "dora.key")
    d = DaemonProcess(tmp_path, server_extra=f'client_ca = "{bundle}"\n')
    try:

        async def attempt():
            try:
                async with connect("127.0.0.1", d.port, certfile=tmp_path / "dora.pem",
                                   keyfile=tmp_path / "dora.key", **d.client_kwargs()) as conn:
                    return await conn.chat("x", max_tokens=3).collect()
            except RemoteError as exc:
                return exc.code

        assert run(attempt()) == ErrorCode.UNAUTHORIZED
        bundle.write_bytes(first.cert_pem + second.cert_pem)  # the operator adds the second CA
        d.signal(signal.SIGHUP)
        d.wait_for("READY")
        assert isinstance(run(attempt()), str)  # an answer now
        assert "checked against the new" in d.log()
    finally:
        assert d.stop() == 0


class _Notes:
    """A Notifier that records what systemd would hear."""

    watchdog_s = 0.03

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    def ready(self, status: str) -> bool:
        self.sent.append(("READY", status))
        return True

    def reloading(self) -> bool:
        self.sent.append(("RELOADING", ""))
        return True

    def status(self, status: str) -> bool:
        self.sent.append(("STATUS", status))
        return True

    def stopping(self, status: str = "draining", extend_s: float | None = None) -> bool:
        self.sent.append(("STOPPING", status))
        return True

    def watchdog(self) -> bool:
        return True


def _daemon(tmp_path) -> tuple[service.Daemon, _Notes]:
    path = tmp_path / "tokenwire.toml"
    path.write_text("")
    cfg = parse_config({}, path)
    notes = _Notes()
    return service.Daemon(cfg, notifier=notes), notes  # type: ignore[arg-type]


def test_a_reload_that_fails_unexpectedly_still_tells_systemd_it_ended(tmp_path, monkeypatch, caplog):
    """Only ConfigError was caught: anything else (a RecursionError from the TOML parser) escaped after
    RELOADING=1 and systemd kept the unit "reloading" until its timeout."""
    d, notes = _daemon(tmp_path)

    def broken(path):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(service, "load_config", broken)
    with caplog.at_level(logging.ERROR, logger="tokenwire.daemon"):
        assert d.reload() is False
    assert [k for k, _ in notes.sent] == ["RELOADING", "READY"] and "reload failed" in notes.sent[1][1]
    assert "reload failed part-way" in caplog.text


def test_a_draining_daemon_ignores_sighup_and_its_status_keeps_saying_draining(tmp_path):
    d, notes = _daemon(tmp_path)
    d.draining = True
    assert d.reload() is False
    assert notes.sent == []  # no RELOADING, and above all no READY=1 after STOPPING=1

    async def one_status() -> None:
        task = asyncio.ensure_future(d._housekeep())
        while not notes.sent:
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(asyncio.wait_for(one_status(), 10))
    assert notes.sent[0] == ("STATUS", "draining 0 answers")


@pytest.mark.parametrize(("days_left", "warned"), [(-1, True), (3, True), (200, False)])
def test_a_server_certificate_near_its_end_is_a_warning(days_left, warned, caplog):
    """The daemon started with an expired certificate without a word (only `config check` said so)."""
    cert = make_self_signed(("localhost",), days=365).certificate
    now = cert.not_valid_after_utc - datetime.timedelta(days=days_left)
    with caplog.at_level(logging.WARNING, logger="tokenwire.daemon"):
        assert certificates.warn_if_expiring(cert, "/etc/tokenwire/cert.pem", now) is warned
    assert ("EXPIRED" in caplog.text) is (days_left < 0) and bool(caplog.text) is warned
    assert (", in 3 days;" in caplog.text) is (days_left == 3)


def test_the_periodic_status_keeps_saying_a_reload_was_refused_until_one_succeeds(tmp_path):
    """READY said "reload refused", then the periodic STATUS 10 s later looked healthy while the daemon ran
    what the files on disk no longer said."""
    d, notes = _daemon(tmp_path)
    path = tmp_path / "tokenwire.toml"
    path.write_text("[limits]\nmax_sesions = 3\n")
    assert d.reload() is False
    assert notes.sent[-1][0] == "READY" and notes.sent[-1][1].startswith("reload refused: ")
    assert d.status_line().startswith("the last reload was refused (see the log); listening on ")
    path.write_text("[limits]\nmax_sessions = 3\n")
    assert d.reload() is True
    assert d.status_line().startswith("listening on ") and d.config.limits.max_sessions == 3


@pytest.mark.parametrize(("before", "after"), [("info", "warning"), ("warning", "info")])
def test_every_applied_reload_is_logged_whichever_way_the_level_moves(tmp_path, before, after, caplog):
    """From "warning" to "info" the "reloaded" line went out while the old level still filtered it."""
    path = tmp_path / "tokenwire.toml"
    path.write_text(f'[logging]\nlevel = "{before}"\n')
    d = service.Daemon(service.load_config(path), notifier=_Notes())  # type: ignore[arg-type]
    root = logging.getLogger()
    saved = root.level
    try:
        service.set_log_level(before)
        path.write_text(f'[logging]\nlevel = "{after}"\n')
        with caplog.at_level(logging.NOTSET):  # the handler takes all; the root logger's level decides
            service.set_log_level(before)
            assert d.reload() is True
            assert "reloaded: " in caplog.text and f"logging {after}/text" in caplog.text
            assert root.level == logging.getLevelName(after.upper())
    finally:
        root.setLevel(saved)


def test_signals_during_a_slow_start_neither_kill_the_daemon_nor_get_lost(tmp_path, monkeypatch, caplog):
    """Handlers were installed at the end of the start, after the KV codec's compile (~10 s cold): a SIGHUP
    then killed the daemon without a word (its default action), a SIGTERM too. Now a SIGHUP reloads once the
    start is done, and a SIGTERM stops the start."""
    import os

    async def logged(text: str) -> None:
        while text not in caplog.text:
            await asyncio.sleep(0.01)

    async def slow_start(self: service.Daemon, sig: int, then: str) -> None:
        os.kill(os.getpid(), sig)
        await asyncio.wait_for(logged(then), 10)  # handled while the start still runs
        if sig == signal.SIGTERM:
            await asyncio.Future()  # a start that would go on: cancelled by the signal
        self._stopped.set()  # run() returns once it has done what was due

    reloads: list[bool] = []
    stops: list[bool] = []
    told: list[list[str]] = []
    for sig, then in ((signal.SIGHUP, "SIGHUP while starting"), (signal.SIGTERM, "stop signal while starting")):
        caplog.clear()
        d, notes = _daemon(tmp_path)
        monkeypatch.setattr(service.Daemon, "_start", lambda self, s=sig, t=then: slow_start(self, s, t))
        monkeypatch.setattr(d, "reload", lambda: reloads.append(True))
        real_stop = d.stop

        async def stop(real_stop=real_stop) -> None:
            stops.append(True)
            os.kill(os.getpid(), signal.SIGTERM)  # a second one, during the cleanup: it must not cut it short
            await asyncio.sleep(0.05)  # (the second signal's handler has its turn meanwhile)
            await real_stop()
            stops.append(True)

        monkeypatch.setattr(d, "stop", stop)
        with caplog.at_level(logging.INFO, logger="tokenwire.daemon"):
            asyncio.run(asyncio.wait_for(d.run(), 20))
        assert "stopped" in caplog.text
        told.append([kind for kind, _ in notes.sent if kind == "STOPPING"])
    assert reloads == [True]  # the SIGHUP's reload, after the start; none for the SIGTERM
    assert stops == [True, True]  # the SIGTERM's start was undone to its end; the SIGHUP's ran on
    assert told[1] == ["STOPPING"]  # systemd heard the stop during the start (it still said "activating")
