"""The housekeeping's counter flush at many sessions: each metric counted once a tick, with the sum of what every
connection's counters moved, and a connection that neither sent nor received a datagram since the last tick not
recomputed (it was: totals() and six locked Prometheus inc() calls per connection, 27-148 ms a tick at 3,000 idle
sessions). The metrics' values are what the per-connection flush gave."""

from __future__ import annotations

import os
from typing import Any

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from tokenwire.daemon.config import parse_config
from tokenwire.daemon.connection import DaemonProtocol
from tokenwire.daemon.service import Daemon
from tokenwire.transport.chatterbox import SenderStats
from tokenwire.transport.tls import dev_cert

from .test_loopback import run


def _protocols(daemon: Daemon, n: int, tmp_path: Any) -> list[DaemonProtocol]:
    """``n`` chat connections of ``daemon`` as accepted (a server QuicConnection each, no socket)."""
    pair = dev_cert()
    pair.write(tmp_path / "c.pem", tmp_path / "c.key")
    cfg = QuicConfiguration(is_client=False, alpn_protocols=["tokenwire"])
    cfg.load_cert_chain(tmp_path / "c.pem", tmp_path / "c.key")
    out = []
    for _ in range(n):
        quic = QuicConnection(configuration=cfg, original_destination_connection_id=os.urandom(8))
        proto = DaemonProtocol(quic, daemon=daemon)
        proto._handshake_done()  # (its deadline timer off: nothing runs on the loop)
        out.append(proto)
    return out


def _move(proto: DaemonProtocol, packets: int, redundant: int, repairs: int, piggybacks: int, trimmed: int,
          acks: int, ce: int, failures: int) -> None:
    """What a connection's session counts after sending and receiving (a datagram sent: its counters moved)."""
    sess = proto.server_session
    t = sess.closed_totals
    t.packets += packets
    t.redundant_bytes += redundant
    t.repairs += repairs
    t.piggybacks += piggybacks
    t.repeats_trimmed += trimmed
    sess.acks_received += acks
    sess._last_ecn = [0, 0, 100, (sess.ce_reported + ce)]
    sess.ecn.failures += failures
    sess.datagrams_sent += 1


def _values(daemon: Daemon) -> dict[str, float]:
    value = daemon.metrics.registry.get_sample_value
    return {
        "packets": value("tokenwire_token_packets_total"), "redundant": value("tokenwire_redundant_bytes_total"),
        "repairs": value("tokenwire_repairs_total"), "trimmed": value("tokenwire_repeats_trimmed_total"),
        "acks": value("tokenwire_acks_total"), "ce": daemon.marking.ce._value.get(),
        "unvalidated": daemon.marking.unvalidated._value.get(),
    }  # fmt: skip


def test_the_flush_counts_the_sum_of_the_connections_and_skips_the_quiet_ones(tmp_path):
    daemon = Daemon(parse_config({"server": {"listen": ["127.0.0.1:0"]}, "metrics": {"listen": ""}}))

    async def go() -> tuple[dict[str, float], dict[str, float], list[int], list[int], dict[str, float], list]:
        protos = _protocols(daemon, 5, tmp_path)
        try:
            busy, other = protos[0], protos[1]  # (the other three stay quiet)
            calls = [0] * len(protos)
            for i, proto in enumerate(protos):  # how often each connection's totals are computed
                totals = proto.server_session.totals

                def counted(i: int = i, totals: Any = totals) -> SenderStats:
                    calls[i] += 1
                    return totals()

                proto.server_session.totals = counted  # type: ignore[method-assign]
            daemon._flush_counters()  # (the first tick: every connection counted once, all zero)
            first_calls = list(calls)
            _move(busy, 10, 300, 1, 2, 4, 5, 2, 1)
            _move(other, 7, 100, 0, 3, 1, 2, 1, 0)
            incs: list[float] = []
            real_inc = daemon.metrics.packets.inc
            daemon.metrics.packets.inc = lambda n=1: (incs.append(n), real_inc(n))  # type: ignore[method-assign]
            daemon._flush_counters()
            after_one = _values(daemon)
            _move(busy, 5, 0, 0, 1, 3, 1, 0, 0)
            daemon._flush_counters()
            daemon._flush_counters()  # (nothing moved: nothing more counted)
            after_two = _values(daemon)
            # the per-connection flush at a connection's end counts the same (none left to count here)
            for proto in protos:
                proto.flush_counters()
            return after_one, after_two, calls, first_calls, _values(daemon), incs
        finally:
            daemon.handshake_guard.close()

    after_one, after_two, calls, first_calls, at_end, incs = run(go(), 60)
    assert after_one == {"packets": 17, "redundant": 400, "repairs": 6, "trimmed": 5, "acks": 7, "ce": 3,
                         "unvalidated": 1}
    assert after_two == {"packets": 22, "redundant": 400, "repairs": 7, "trimmed": 8, "acks": 8, "ce": 3,
                         "unvalidated": 1}
    assert at_end == after_two
    assert incs == [17, 5]  # one inc a tick for every connection, none for a tick where nothing moved
    # computed at the first tick, then only at the ticks after a connection moved (busy: 2, other: 1), and at the
    # end's flush: a quiet connection never between
    assert first_calls == [1] * 5
    assert calls == [1 + 2 + 1, 1 + 1 + 1, 1 + 1, 1 + 1, 1 + 1]
