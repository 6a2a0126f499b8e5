"""daemon/admission.py on its own (no sockets, no daemon): the session slots and the never-authorized connections."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from tokenwire.daemon.admission import Admission
from tokenwire.daemon.config import Limits
from tokenwire.daemon.telemetry import Metrics
from tokenwire.transport.errors import ErrorCode


class _Conn:
    """Stands for a DaemonProtocol: what the admission reads of one and what it calls on it."""

    def __init__(self, peer: str, held: int = 0) -> None:
        self.peer = peer
        self.established = True
        self.closing = False
        self.held = held
        self.closed: tuple[int, str] | None = None
        self.transmits = 0
        self.server_session = SimpleNamespace(max_request_bytes=1000, close=self._close)

    def _close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)
        self.closing = True

    def held_bytes(self) -> int:
        return self.held

    def transmit(self) -> None:
        self.transmits += 1


def _sample(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    return metrics.registry.get_sample_value(name, labels or {}) or 0.0


def _admitted(adm: Admission, conn: _Conn) -> None:
    """What DaemonProtocol._on_handshake does for a connection admitted without authorization."""
    adm.established += 1
    adm.metrics.sessions.inc()
    adm.count_unauthorized(conn)  # type: ignore[arg-type]


def test_eviction_closes_the_oldest_never_authorized_connection_and_frees_its_slot_at_once(caplog):
    caplog.set_level(logging.WARNING, "tokenwire.daemon")
    metrics = Metrics()
    adm = Admission(lambda: Limits(max_sessions=2), metrics)
    old, new = _Conn("10.0.0.1:1"), _Conn("10.0.0.2:2")
    _admitted(adm, old)
    _admitted(adm, new)

    assert adm.evict_unauthorized()
    assert old.closed is not None and old.closed[0] == ErrorCode.LIMIT_EXCEEDED and old.transmits == 1
    assert new.closed is None and old not in adm.unauthorized and new in adm.unauthorized
    assert adm.established == 1 and not old.established and _sample(metrics, "tokenwire_sessions_open") == 1
    assert _sample(metrics, "tokenwire_handshakes_refused_total", {"reason": "evicted"}) == 1
    assert [r.getMessage() for r in caplog.records if "never authorized" in r.getMessage()] == [
        "closing connection from 10.0.0.1:1, never authorized, to admit a new client: 2 sessions open "
        "(limits.max_sessions); more such closes are counted (tokenwire_handshakes_refused_total reason evicted) "
        "and logged at most every 60 s"]

    adm.ended(old)  # its end after the eviction: the slot is not given back twice
    assert adm.established == 1 and _sample(metrics, "tokenwire_sessions_open") == 1
    adm.ended(new)
    assert adm.established == 0 and not adm.unauthorized and not adm.evict_unauthorized()


def test_past_the_memory_budget_the_largest_holder_is_closed_and_counted_under_memory():
    metrics = Metrics()
    adm = Admission(lambda: Limits(unauthorized_memory_mb=1), metrics)
    small, large = _Conn("a:1", held=100), _Conn("b:2", held=(1 << 20) - 50)
    _admitted(adm, small)
    _admitted(adm, large)
    adm.account_unauthorized(small, small.held)  # type: ignore[arg-type]
    assert adm.unauthorized.held == 100 and small.closed is None

    adm.account_unauthorized(large, large.held)  # type: ignore[arg-type]
    assert large.closed is not None and small.closed is None and large not in adm.unauthorized
    assert adm.unauthorized.held == 100 and adm.established == 1
    assert _sample(metrics, "tokenwire_handshakes_refused_total", {"reason": "memory"}) == 1
