"""IP header helpers for the emulator's hot path: read the ECN field, set CE, fix the IPv4 header checksum.

Hand-written with ``struct``-free byte arithmetic because this runs once per packet; scapy is used only for
the optional pcap output and in tests to check these results independently.

ECN codepoints are the two low bits of the IPv4 TOS / IPv6 Traffic Class byte (RFC 3168 §5; L4S meaning per
RFC 9331): 00 Not-ECT, 01 ECT(1) (the L4S identifier), 10 ECT(0), 11 CE.
"""

from __future__ import annotations

NOT_ECT = 0b00
ECT1 = 0b01
ECT0 = 0b10
CE = 0b11
ECN_NAMES = {NOT_ECT: "not-ect", ECT1: "ect1", ECT0: "ect0", CE: "ce"}


def ecn_of(pkt: bytes | bytearray | memoryview) -> int:
    """ECN codepoint of an IPv4 or IPv6 packet (Not-ECT for anything shorter or of another version)."""
    if len(pkt) < 2:
        return NOT_ECT
    version = pkt[0] >> 4
    if version == 4:
        return pkt[1] & 0b11
    if version == 6:
        # Traffic Class straddles bytes 0 and 1: its low two bits are bits 4-5 of byte 1
        return (pkt[1] >> 4) & 0b11
    return NOT_ECT


def ipv4_header_checksum(header: bytes | bytearray | memoryview) -> int:
    """Internet checksum (RFC 1071) of an IPv4 header whose checksum field is included as stored."""
    total = 0
    n = len(header) - (len(header) & 1)
    for i in range(0, n, 2):
        total += (header[i] << 8) | header[i + 1]
    if len(header) & 1:
        total += header[-1] << 8
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return (~total) & 0xFFFF


def set_ce(pkt: bytes | bytearray) -> bytes:
    """Return ``pkt`` with its ECN field set to CE and, for IPv4, the header checksum updated.

    Only ECN-capable packets may be marked (RFC 3168 §5); callers drop Not-ECT packets instead. The IPv4
    checksum is updated incrementally per RFC 1624 eqn. 3 (HC' = ~(~HC + ~m + m')) over the 16-bit word that
    holds the TOS byte; L4 checksums do not cover the TOS byte, so nothing else changes.
    """
    buf = bytearray(pkt)
    if len(buf) < 2:
        return bytes(buf)
    version = buf[0] >> 4
    if version == 4 and len(buf) >= 20:
        old_word = (buf[0] << 8) | buf[1]
        buf[1] |= CE
        new_word = (buf[0] << 8) | buf[1]
        old_sum = (buf[10] << 8) | buf[11]
        s = (~old_sum & 0xFFFF) + (~old_word & 0xFFFF) + new_word
        while s >> 16:
            s = (s & 0xFFFF) + (s >> 16)
        new_sum = ~s & 0xFFFF
        buf[10] = new_sum >> 8
        buf[11] = new_sum & 0xFF
    elif version == 6:
        buf[1] |= CE << 4
    return bytes(buf)


def describe(pkt: bytes | bytearray | memoryview) -> str:
    """Short human description (for logs and errors): version, protocol, length, ECN."""
    if len(pkt) < 20:
        return f"short packet ({len(pkt)} B)"
    version = pkt[0] >> 4
    proto = pkt[9] if version == 4 else pkt[6]
    return f"IPv{version} proto={proto} len={len(pkt)} ecn={ECN_NAMES[ecn_of(pkt)]}"
