"""Session 41's user-facing polish: the certificate's names in plain text, aioquic's INFO lines out of `-v chat`,
`predictor eval`'s point and target counts that agree, `bench predictor`'s min-max label."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

import pytest
from aioquic.quic import events as qe

from tokenwire.daemon.cli import main
from tokenwire.transport.quic_io import _handshake_failure

from .test_chat_cli import cafile, chat, server_port  # noqa: F401  (module-scoped fixtures, shared)

# aioquic 1.7.2's wording (aioquic/tls.py verify_certificate), service_identity's reprs in it
AIOQUIC_TWO = ("hostname 'other.test' doesn't match either of DNSPattern(pattern=b'localhost'), "
               "IPAddressPattern(pattern=IPv4Address('127.0.0.1'))")
AIOQUIC_ONE = "hostname 'other.test' doesn't match DNSPattern(pattern=b'*.example.com')"


def test_name_mismatch_lists_the_certificates_names_plainly():
    """It printed `DNSPattern(pattern=b'localhost')` to the user (chat's error line, the SDK's HandshakeError)."""
    from tokenwire.transport.quic_io import plain_certificate_names

    ended = qe.ConnectionTerminated(error_code=0x12A, frame_type=0x6, reason_phrase=AIOQUIC_TWO)
    err = _handshake_failure("127.0.0.1", 4433, ended)
    assert err.tls_alert == 42
    assert str(err) == ("TLS handshake with 127.0.0.1:4433 failed (TLS alert 42): hostname 'other.test' doesn't "
                        "match the certificate's names: localhost, 127.0.0.1")
    assert plain_certificate_names(AIOQUIC_ONE) == ("hostname 'other.test' doesn't match the certificate's name: "
                                                    "*.example.com")
    ipv6 = "hostname 'x' doesn't match IPAddressPattern(pattern=IPv6Address('::1'))"
    assert plain_certificate_names(ipv6) == "hostname 'x' doesn't match the certificate's name: ::1"
    # anything else, and a pattern form it does not know, is left as it came
    assert plain_certificate_names("self-signed certificate") == "self-signed certificate"
    odd = "hostname 'x' doesn't match FuturePattern(pattern=b'y')"
    assert plain_certificate_names(odd) == odd


def test_chat_name_mismatch_end_to_end(server_port, cafile, capsys):  # noqa: F811
    rc, _, err = chat(capsys, "--port", str(server_port), "--cafile", str(cafile), "--server-name", "other.test",
                      "hi")
    assert rc == 2
    assert "Pattern(" not in err and "b'" not in err, err
    assert "doesn't match the certificate's name" in err and "localhost" in err and "--server-name" in err, err


@pytest.fixture
def quic_level() -> Iterator[None]:
    """aioquic's logger level as it was (chat sets it), and from NOTSET for the test."""
    quic = logging.getLogger("quic")
    before = quic.level
    quic.setLevel(logging.NOTSET)
    yield
    quic.setLevel(before)


@pytest.mark.parametrize("flags", [["-v"], ["-vv"]])
def test_verbose_chat_keeps_aioquic_info_for_vv(flags, server_port, cafile, capsys, caplog, quic_level):  # noqa: F811
    """`tokenwire -v chat` mixed aioquic's INFO lines ("Negotiated protocol version") in with the request id."""
    caplog.set_level(logging.DEBUG)
    rc = main([*flags, "chat", "--port", str(server_port), "--cafile", str(cafile), "--max-tokens", "3", "hi"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "request id" in err or "--attach" in err, err  # -v's own line is still there
    quiet = [r for r in caplog.records if r.name.split(".")[0] == "quic" and r.levelno < logging.WARNING]
    if flags == ["-v"]:
        assert not quiet, [r.getMessage() for r in quiet]
    else:  # -vv: debug, aioquic's too
        assert quiet


def test_predictor_eval_counts_agree(small, capsys):
    """stderr said "337 prediction points", the table's n was 601 (targets of both queues)."""
    assert main(["predictor", "eval", "--data", str(small)]) == 0
    out, err = capsys.readouterr()
    said = re.search(r"(\d+) prediction points \((\d+) known targets over the L and C queues\)", err)
    assert said, err
    points, targets = int(said.group(1)), int(said.group(2))
    assert points < targets <= 2 * points
    header = next(ln for ln in out.splitlines() if ln.startswith("model "))
    assert "n (L+C)" in header, header
    row = next(ln for ln in out.splitlines() if ln.startswith("ewma "))
    assert int(row.split()[-2]) == targets, (row, out)


def test_bench_predictor_labels_the_range(capsys):
    """`(runs 340-359)` was a min-max over the repeats of µs/call, not run numbers."""
    assert main(["bench", "predictor", "--calls", "5", "--repeats", "2"]) == 0
    out = capsys.readouterr()
    text = out.out + out.err
    assert "(runs " not in text, text
    assert re.search(r"\(min-max over repeats [\d.,]+-[\d.,]+\)", text), text
