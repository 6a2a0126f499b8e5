"""ECN helpers: reading codepoints and CE marking with the IPv4 checksum update (RFC 1624)."""

import random

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from tokenwire.testbed.packet import CE, ECT0, ECT1, NOT_ECT, ecn_of, ipv4_header_checksum, set_ce


def test_ecn_of_ipv4_and_ipv6():
    for ecn in (NOT_ECT, ECT1, ECT0, CE):
        assert ecn_of(bytes(IP(tos=0x28 | ecn) / UDP())) == ecn
        assert ecn_of(bytes(IPv6(tc=0x28 | ecn) / UDP())) == ecn
    assert ecn_of(b"") == NOT_ECT


def test_set_ce_keeps_the_header_checksum_valid_for_random_headers():
    rng = random.Random(1)
    for _ in range(300):
        tos = (rng.randrange(64) << 2) | rng.choice([ECT0, ECT1, CE])
        pkt = (
            IP(
                src=f"10.{rng.randrange(256)}.0.1",
                dst="10.0.0.2",
                tos=tos,
                id=rng.randrange(65536),
                ttl=rng.randrange(1, 256),
                options=b"\x01" * rng.choice([0, 4, 8]),
            )
            / TCP()
        )
        raw = bytes(pkt)
        marked = set_ce(raw)
        ihl = (marked[0] & 0x0F) * 4
        assert ipv4_header_checksum(marked[:ihl]) == 0  # a valid header sums to 0xffff
        ip = IP(marked)
        assert ip.tos == tos | CE and ip.tos >> 2 == tos >> 2
        stored = ip.chksum
        del ip.chksum
        assert IP(bytes(ip)).chksum == stored
        assert marked[ihl:] == raw[ihl:]


def test_set_ce_on_ipv6_touches_only_the_traffic_class():
    raw = bytes(IPv6(tc=0xB8 | ECT1, fl=0xABCDE) / UDP())
    ip = IPv6(set_ce(raw))
    assert ip.tc == 0xB8 | CE and ip.fl == 0xABCDE
