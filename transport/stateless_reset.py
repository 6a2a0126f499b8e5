"""QUIC Stateless Reset (RFC 9000 10.3), sans I/O: the tokens, the reset datagram, its detection, a send limit.

A client whose server restarted (``systemctl restart`` for an upgrade) kept sending on a connection the new process
does not know, which dropped every packet of it: the client's next request, or the rest of an answer in flight,
waited out the whole QUIC idle timeout (60 s by default) before failing. aioquic (==1.7.2, pinned) neither sends
Stateless Resets nor detects them: it stores the tokens the peer gives and never compares a datagram with them, and
it gives its own connection IDs random tokens that no later process can know. Here:

* a server gives each of its connection IDs the token ``HMAC-SHA256(key, connection ID)[:16]`` (RFC 9000
  10.3.2's "single static key"), the key derived from the TLS private key, the host's name and the listening
  address (:func:`static_key`), so that the same server restarted on the same host with the same key can compute
  the token of a connection it has forgotten;
* it answers a short-header datagram for a connection ID it does not know with a reset (:meth:`Resetter.reply`),
  smaller than the datagram and rate-limited;
* a client compares the last 16 bytes of a short-header datagram with the tokens of the connection IDs it sends
  to (:func:`is_reset`) and ends the connection at once on a match.

The shells are :class:`~.quic_io.ValidatingQuicServer` (every server: the daemon's chat listeners, its KV
endpoint, the SDK's ``serve``) and :class:`~.quic_io.SessionProtocol` (clients).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
from collections.abc import Callable, Iterable

TOKEN_SIZE = 16
"""A stateless reset token's length (RFC 9000 10.3)."""

MIN_RESET_SIZE = 21
"""The smallest datagram that is taken for a Stateless Reset: 5 bytes that look like a short header (the first
byte, 01 then unpredictable bits, and at least 4 unpredictable bytes: 38 unpredictable bits) and the token (RFC
9000 10.3: "endpoints MUST treat ... at least 21 bytes")."""

# What the key derivation mixes in: a fixed label (the key serves no other purpose), then the host name and the
# endpoint
_KEY_LABEL = b"tokenwire stateless reset key v1"

RESET_REASON = "stateless reset (the server lost this connection: restarted?)"
"""The reason of the ConnectionTerminated a client's connection ends with when a Stateless Reset came."""

# The send limit's defaults (a token bucket per listening socket): resets are unauthenticated answers to packets
# anyone can send with a forged source address, so each costs the sender one datagram of its own
RESET_RATE_PER_S = 100.0
RESET_BURST = 200


def static_key(private_key_der: bytes | None, endpoint: str, host_name: str | None = None) -> bytes:
    """The key of the tokens a server hands out at ``endpoint`` (its listening address as configured, e.g.
    ``"::|4433"``) on the host named ``host_name`` (None: this one's, ``socket.gethostname()``): a keyed hash of
    the TLS private key's bytes (PKCS#8 DER) with a fixed label, then of the host name and the endpoint, so that a
    restart on the same host with the same key and address computes the same tokens, with no file or setting of
    its own; ``private_key_der`` None (no key known): a random one, for this process alone (a restart then cannot
    reset its clients' connections).

    The endpoint and the host name are in the key: RFC 9000 21.11 (a stateless reset oracle) has instances that
    share a static key arranged so that a connection's packets reach no other of them, else an attacker who knows
    a live connection's ID sends it to another instance (the KV port, a second listener, another host of a fleet
    with the same key file and the default ``listen``) and gets back the token that ends the connection. A host
    (or a container) keeps its name across restarts; a renamed one gets other tokens from its next start. One HMAC
    of the DER bytes does not reveal the private key, nor anything derived from it for TLS."""
    if private_key_der is None:
        return os.urandom(32)
    if host_name is None:
        host_name = socket.gethostname()
    master = hmac.new(_KEY_LABEL, private_key_der, hashlib.sha256).digest()
    # (a NUL between: no host name has one, so no two (host, endpoint) pairs give the same bytes)
    return hmac.new(master, host_name.encode() + b"\0" + endpoint.encode(), hashlib.sha256).digest()


def private_key_der(private_key: object) -> bytes | None:
    """The PKCS#8 DER bytes of a ``cryptography`` private key (None for anything else, e.g. no key)."""
    from cryptography.hazmat.primitives import serialization

    to_bytes = getattr(private_key, "private_bytes", None)
    if to_bytes is None:
        return None
    try:
        der = to_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    except (TypeError, ValueError):  # (a key that cannot be exported: a hardware token's)
        return None
    return bytes(der)


def reset_token(key: bytes, cid: bytes) -> bytes:
    """The stateless reset token of connection ID ``cid`` under ``key`` (RFC 9000 10.3.2: a keyed PRF of the
    connection ID, truncated to 16 bytes)."""
    return hmac.new(key, cid, hashlib.sha256).digest()[:TOKEN_SIZE]


def min_packet_size(cid_length: int) -> int:
    """The smallest short-header packet an endpoint whose connection IDs are ``cid_length`` bytes can read: the
    first byte, the connection ID, then at least 4 bytes of packet number and payload before the 16-byte sample
    of header protection (RFC 9001 5.4.2). A smaller datagram is none of its packets, so no lost connection's."""
    return 1 + cid_length + 4 + 16


def is_short_header(data: bytes) -> bool:
    """The first bit is 0: a short header (a Stateless Reset looks like one; RFC 9000 17.3)."""
    return bool(data) and not data[0] & 0x80


def is_reset(data: bytes, tokens: Iterable[bytes]) -> bool:
    """``data`` is a Stateless Reset for one of ``tokens`` (RFC 9000 10.3.1): a short-header datagram of at least
    :data:`MIN_RESET_SIZE` bytes whose last 16 bytes equal a token. Every token is compared, in constant time
    (``hmac.compare_digest``): how long the check takes says nothing of how much of a token matched. Empty tokens
    (a connection ID that came without one) never match."""
    if len(data) < MIN_RESET_SIZE or not is_short_header(data):
        return False
    tail = bytes(data[-TOKEN_SIZE:])
    found = False
    for token in tokens:
        if len(token) == TOKEN_SIZE and hmac.compare_digest(tail, token):
            found = True
    return found


def reset_size(trigger_size: int, cid_length: int) -> int | None:
    """How long the reset that answers a ``trigger_size``-byte datagram is, None for no reset.

    RFC 9000 10.3.3: a reset must be smaller than the packet that triggered it (two servers reflecting resets at
    each other then run out of bytes: no loop); 10.3: at least :data:`MIN_RESET_SIZE` bytes. Here it is also
    smaller than :func:`min_packet_size` (28 bytes for 8-byte connection IDs), and a datagram under that size is
    never answered: no server with this connection ID length answers a reset, its own or another's, at all. An
    8-byte connection ID's smallest packet is 29 bytes, so every packet of a lost connection can be answered."""
    floor = max(min_packet_size(cid_length), MIN_RESET_SIZE + 1)
    if trigger_size < floor:
        return None
    return min(trigger_size, floor) - 1


def build_reset(token: bytes, size: int, random: Callable[[int], bytes] = os.urandom) -> bytes:
    """A Stateless Reset of ``size`` bytes (RFC 9000 10.3, figure 10): the first two bits 01 (a short header, fixed
    bit set), unpredictable bits to the token, ``token`` last."""
    if len(token) != TOKEN_SIZE or size < MIN_RESET_SIZE:
        raise ValueError(f"a stateless reset needs a {TOKEN_SIZE}-byte token and {MIN_RESET_SIZE} bytes or more")
    head = bytearray(random(size - TOKEN_SIZE))
    head[0] = 0x40 | (head[0] & 0x3F)
    return bytes(head) + token


class TokenBucket:
    """A send limit: ``rate`` per second, at most ``burst`` at once (``allow`` takes one if one is left).

    RFC 9000 10.3 and 21.11: a Stateless Reset answers a packet anyone can send with a forged source address;
    being smaller than its trigger it amplifies no bytes, and the bucket bounds how many packets a listener
    reflects at a victim (the RFC's 10.3.3 suggests such a limit on resets sent)."""

    def __init__(self, rate: float = RESET_RATE_PER_S, burst: int = RESET_BURST) -> None:
        if not rate > 0 or burst < 1:
            raise ValueError(f"a token bucket needs a positive rate and burst, not {rate!r} / {burst!r}")
        self.rate = rate
        self.burst = burst
        self._level = float(burst)
        self._at: float | None = None

    def allow(self, now: float) -> bool:
        if self._at is not None and now > self._at:
            self._level = min(float(self.burst), self._level + (now - self._at) * self.rate)
        if self._at is None or now > self._at:
            self._at = now
        if self._level < 1.0:
            return False
        self._level -= 1.0
        return True


class Resetter:
    """A server's side: the tokens of its connection IDs and the resets it answers unknown ones with.

    ``key``: :func:`static_key`; ``cid_length``: the length of the server's connection IDs (aioquic's
    ``QuicConfiguration.connection_id_length``: a short header's destination connection ID is read with it).
    ``sent`` and ``limited`` count the resets sent and those the limit held back."""

    def __init__(self, key: bytes, cid_length: int, limit: TokenBucket | None = None,
                 random: Callable[[int], bytes] = os.urandom) -> None:
        self.key = key
        self.cid_length = cid_length
        self.limit = limit if limit is not None else TokenBucket()
        self._random = random
        self.sent = 0
        self.limited = 0

    def token(self, cid: bytes) -> bytes:
        return reset_token(self.key, cid)

    def reply(self, data: bytes, now: float) -> bytes | None:
        """The reset that answers ``data``, a datagram no connection of this server took, or None: only a
        short-header datagram (never a long header: a handshake's or a Version Negotiation's), only one large
        enough (:func:`reset_size`), only within the send limit. The token is the one this server's key gives
        the datagram's destination connection ID: what a connection of a process before it gave out for it."""
        if not is_short_header(data):
            return None
        size = reset_size(len(data), self.cid_length)
        if size is None:
            return None
        if not self.limit.allow(now):
            self.limited += 1
            return None
        self.sent += 1
        return build_reset(self.token(bytes(data[1:1 + self.cid_length])), size, self._random)
