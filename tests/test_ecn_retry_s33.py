"""A connection whose ECN validation failed tries again later (RFC 9000 §13.4.2), with a doubling back-off: a path
that stopped clearing the codepoint got Not-ECT for the rest of the connection."""
from __future__ import annotations

from tokenwire.transport.ecn_socket import ECT1, NOT_ECT
from tokenwire.transport.marking import ECN_RETRY_MAX_S, ECN_RETRY_S, EcnValidation

from .test_marking_fixes2 import CountingPolicy, MarkedPair, _stream_answer, answer_on


def _fail(v: EcnValidation, first_pn: int) -> int:
    """Ten ECT(1) packets from ``first_pn``, acknowledged with no counts: validation fails."""
    v.on_sent(ECT1, first_pn, first_pn + 10)
    assert v.on_acked(first_pn + 9)
    return first_pn + 10


def test_retries_back_off_and_only_the_first_failure_counts():
    v = EcnValidation()
    pn = _fail(v, 0)
    assert v.state == "failed" and v.failures == 1
    assert not v.retry(100.0)  # the first call after the failure sets the time
    assert not v.retry(100.0 + ECN_RETRY_S - 0.01) and not v.marking_allowed
    assert v.retry(100.0 + ECN_RETRY_S) and v.state == "retesting" and v.marking_allowed
    pn = _fail(v, pn)
    assert v.state == "failed" and v.failures == 1  # a failed retry stopped nothing that was marking
    waits = []
    t = 200.0
    for _ in range(6):
        assert not v.retry(t)
        due = v._retry_at
        assert due is not None
        waits.append(due - t)
        t = due
        assert v.retry(t)
        pn = _fail(v, pn)
    assert waits == [min(ECN_RETRY_S * 2 ** k, ECN_RETRY_MAX_S) for k in range(1, 7)]


def test_a_retry_that_sees_marked_arrivals_marks_again_and_resets_the_back_off():
    v = EcnValidation()
    pn = _fail(v, 0)
    v.retry(0.0)
    assert v.retry(ECN_RETRY_S)
    v.on_sent(ECT1, pn, pn + 3)
    v.on_counts([0, 3, 0, 0])
    assert v.state == "capable" and v.marking_allowed
    assert not v.retry(1e6)  # only a failed connection retries
    pn = _fail(v, pn + 3)  # a later failure from marking counts, and waits the first back-off again
    assert v.failures == 2
    v.retry(5000.0)
    assert v._retry_at == 5000.0 + ECN_RETRY_S


def test_a_session_marks_again_after_the_path_stops_clearing_the_codepoint():
    """The server's packets to a client that reports no counts go Not-ECT; once the client's counts show ECT(1)
    arrivals (the path no longer clears the codepoint), a retry brings the marks back."""
    pair = MarkedPair(CountingPolicy(ECT1), client_reports_ecn=False)
    _stream_answer(pair, 40)
    srv = pair.server
    assert srv is not None and srv.ecn.state == "failed" and srv.ecn.failures == 1
    pair.batches.clear()
    answer_on(pair, "chatterbox", 20)  # within the back-off: still Not-ECT
    assert {cp for cp, _ in pair.batches} == {NOT_ECT}
    pair.now += ECN_RETRY_S
    pair.client.ecn_counts = lambda: list(pair.sent)  # the client's reports show the codepoints now
    pair.batches.clear()
    answer_on(pair, "chatterbox", 30)
    marks = [cp for cp, _ in pair.batches]
    assert srv.ecn.state == "capable" and srv.ecn.failures == 1
    assert marks[-1] == ECT1 and marks.count(ECT1) > 20


def test_a_session_whose_retry_fails_goes_back_to_not_ect():
    pair = MarkedPair(CountingPolicy(ECT1), client_reports_ecn=False)
    _stream_answer(pair, 40)
    srv = pair.server
    assert srv is not None and srv.ecn.state == "failed"
    pair.now += ECN_RETRY_S
    pair.batches.clear()
    answer_on(pair, "chatterbox", 40)
    marks = [cp for cp, _ in pair.batches]
    assert ECT1 in marks and marks[-1] == NOT_ECT  # it tried, and stopped again
    first_plain = marks.index(NOT_ECT, marks.index(ECT1))
    assert set(marks[first_plain:]) == {NOT_ECT}
    assert srv.ecn.state == "failed" and srv.ecn.failures == 1 and srv.ecn.retries == 1


def test_the_back_off_stays_at_its_cap_however_many_retries_failed():
    """2.0 ** 1024 overflows: a connection's 1,024th failed retry (about six days at the cap) raised OverflowError
    in every later send."""
    v = EcnValidation()
    pn = _fail(v, 0)
    t = 0.0
    for _ in range(1100):
        v.retry(t)
        t = v._retry_at or t
        assert v.retry(t)
        pn = _fail(v, pn)
    v.retry(t)
    assert v._retry_at == t + ECN_RETRY_MAX_S and v.retries == 1100
