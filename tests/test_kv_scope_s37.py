"""KV scopes: a put scoped to a principal is a key namespace of its own (the hash chain's root covers the scope), so a
fetch finds its own principal's contexts and the shared ones, never another principal's: not whole, not as a
prefix, not by its chunk hashes, and the answers (NOT_FOUND's words, a prefix's length) are those of an absent
context. An unscoped put keeps the keys it always had."""

from __future__ import annotations

import asyncio
import json
import socket
from types import SimpleNamespace

import pytest

from tests.test_kv_channel import make_kv
from tests.test_kv_store import make_store, redis_url  # noqa: F401  (the fixtures: local and Redis stores)
from tokenwire.daemon.certificates import cert_principal
from tokenwire.daemon.config import AuthConfig, TokenEntry, hash_token
from tokenwire.daemon.kv_ingest import put_kv_unix, serve_kv_ingest
from tokenwire.daemon.kv_meta import KVIngestError
from tokenwire.daemon.kv_service import KVService
from tokenwire.daemon.kv_store import chunk_hashes, object_key
from tokenwire.daemon.kv_store_local import LocalChunkStore
from tokenwire.daemon.service import Daemon
from tokenwire.transport import tls
from tokenwire.transport.errors import ErrorCode, RemoteError
from tokenwire.transport.frames import KvFetch
from tokenwire.transport.kv_channel import KVError, KVNotFound, ServerTuning, connect_kv, serve_kv

MODEL = "tiny-test"
CHUNK = 32
IDS = list(range(100, 100 + 3 * CHUNK))  # three chunks


def _service(make_store) -> KVService:  # noqa: F811  (the fixture, passed on)
    return KVService(make_store(capacity=64 << 20), chunk_tokens=CHUNK)


def _answer(svc: KVService, fetch: KvFetch, principal: str | None) -> tuple:
    """What a fetch gets, as the client would see it: the plan's chunks and missing tokens, or the error."""
    try:
        plan = svc.resolve_sync(fetch, principal=principal)
    except KVError as exc:
        return ("error", exc.code, str(exc))
    return ("plan", list(plan.handle), plan.token_counts, plan.rest_tokens)


def _by_hashes(hashes: list[str], **kw) -> KvFetch:
    return KvFetch(model=MODEL, deadline_ms=5000, hashes=[bytes.fromhex(h) for h in hashes], **kw)


def _fetches(ids: list[int], hashes: list[str]) -> dict[str, KvFetch]:
    return {"whole": KvFetch(model=MODEL, deadline_ms=5000, token_ids=ids),
            "prefix": KvFetch(model=MODEL, deadline_ms=5000, token_ids=ids, prefix=True),
            "hashes": _by_hashes(hashes), "hashes prefix": _by_hashes(hashes, prefix=True),
            "hashes swapped": _by_hashes(hashes[1::-1])}


# ------------------------------------------------------------------------------------------------ the service
def test_a_scoped_context_is_found_by_its_principal_alone_as_if_absent_for_others(make_store):  # noqa: F811
    svc = _service(make_store)
    try:
        svc.ingest_sync(MODEL, IDS[:CHUNK], make_kv(CHUNK, 1))  # a shared first chunk: others' prefix is it
        scoped = chunk_hashes(IDS, model=MODEL, chunk_tokens=CHUNK, scope="alice")
        fetches = _fetches(IDS, scoped)
        others = ("bob", "cert:carol", None)
        before = {(p, k): _answer(svc, f, p) for p in others for k, f in fetches.items()}
        assert svc.ingest_sync(MODEL, IDS, make_kv(len(IDS), 2), scope="alice") == scoped
        after = {(p, k): _answer(svc, f, p) for p in others for k, f in fetches.items()}
        assert after == before  # the same answers as before it was stored, for every other principal
        assert before[("bob", "whole")][:2] == ("error", ErrorCode.NOT_FOUND)
        assert before[("bob", "prefix")][2] == [CHUNK]  # (the shared chunk)
        assert before[("bob", "hashes swapped")][:2] == ("error", ErrorCode.NOT_FOUND)
        mine = {k: _answer(svc, f, "alice") for k, f in fetches.items()}
        assert mine["whole"] == mine["prefix"] == mine["hashes"] == ("plan", scoped, [CHUNK] * 3, 0)
        assert mine["hashes swapped"][:2] == ("error", ErrorCode.BAD_REQUEST)  # its own chain, out of order
        shared = chunk_hashes(IDS, model=MODEL, chunk_tokens=CHUNK)
        assert not set(scoped) & set(shared)
    finally:
        svc.close()


def test_a_shared_context_is_found_by_everyone(make_store):  # noqa: F811
    svc = _service(make_store)
    try:
        hashes = svc.ingest_sync(MODEL, IDS, make_kv(len(IDS), 3))
        for principal in ("alice", "bob", None):
            for kind, fetch in _fetches(IDS, hashes).items():
                if kind != "hashes swapped":
                    assert _answer(svc, fetch, principal) == ("plan", hashes, [CHUNK] * 3, 0), (principal, kind)
    finally:
        svc.close()


def test_a_principal_gets_the_longer_of_its_scope_and_the_shared_space(make_store):  # noqa: F811
    svc = _service(make_store)
    try:
        shared = svc.ingest_sync(MODEL, IDS[:2 * CHUNK], make_kv(2 * CHUNK, 4))
        own = svc.ingest_sync(MODEL, IDS[:CHUNK], make_kv(CHUNK, 5), scope="alice")
        prefix = KvFetch(model=MODEL, deadline_ms=5000, token_ids=IDS, prefix=True)
        assert _answer(svc, prefix, "alice") == ("plan", shared, [CHUNK] * 2, CHUNK)
        whole = KvFetch(model=MODEL, deadline_ms=5000, token_ids=IDS[:CHUNK])
        assert _answer(svc, whole, "alice") == ("plan", own, [CHUNK], 0)  # its own scope's, first
        assert _answer(svc, whole, "bob") == ("plan", shared[:1], [CHUNK], 0)
    finally:
        svc.close()


def test_an_unscoped_put_keeps_the_keys_of_every_earlier_version(make_store):  # noqa: F811
    """Pinned: computed by the chain_root before scopes (blake2b of the model's name), so existing stores work."""
    svc = _service(make_store)
    ids = list(range(100))
    try:
        hashes = svc.ingest_sync(MODEL, ids, make_kv(len(ids), 6))
        assert hashes == ["0ebb05c3f8da998c95f9fc5da543d4a1", "54960518ee834011f3361a2af75930fa",
                          "75ff419320f3140863c4d7ed3b50b1d3", "d4f8742a40148a096420b72cf0fbfcdf"]
        assert all(svc.store.contains(object_key(h, "meta")) for h in hashes)
    finally:
        svc.close()


BAD_SCOPES = ["", "  ", "a\nb", "x" * 129, "\ud800", 5]


@pytest.mark.parametrize("scope", BAD_SCOPES)
def test_an_invalid_scope_is_refused_at_the_put(tmp_path, scope):
    svc = KVService(LocalChunkStore(tmp_path / "kv", 64 << 20), chunk_tokens=CHUNK)
    try:
        with pytest.raises(KVIngestError, match="invalid scope"):
            svc.ingest_sync(MODEL, IDS, make_kv(len(IDS)), scope=scope)
        assert svc.store.stats.puts == 0  # nothing stored
        with pytest.raises(KVIngestError, match="invalid scope"):  # the client's own check, before it connects
            put_kv_unix(tmp_path / "no.sock", MODEL, IDS, make_kv(len(IDS)), scope=scope)
    finally:
        svc.close()


def test_the_daemons_scope_check_refuses_a_principal_no_client_can_have(tmp_path):
    svc = KVService(LocalChunkStore(tmp_path / "kv", 64 << 20), chunk_tokens=CHUNK,
                    check_scope=lambda s: None if s == "alice" else f"{s!r} is not the name of an auth token")
    try:
        with pytest.raises(KVIngestError, match="invalid scope 'bob': 'bob' is not the name of an auth token"):
            svc.ingest_sync(MODEL, IDS, make_kv(len(IDS)), scope="bob")
        assert len(svc.ingest_sync(MODEL, IDS, make_kv(len(IDS)), scope="alice")) == 3
    finally:
        svc.close()


def test_the_daemons_principal_and_scope_rules_are_the_chat_ports():
    tokens = AuthConfig(tokens=(TokenEntry("alice", hash_token("ta")),))
    with_tokens = SimpleNamespace(config=SimpleNamespace(auth=tokens), client_verifier=object())
    assert Daemon._kv_principal(with_tokens, "ta", "carol") == "alice"  # the token's name; the certificate gives way
    assert Daemon._kv_principal(with_tokens, "wrong", "carol") is None
    assert Daemon._kv_scope_problem(with_tokens, "alice") is None
    assert "not the name of an auth token" in Daemon._kv_scope_problem(with_tokens, "bob")
    certs = SimpleNamespace(config=SimpleNamespace(auth=AuthConfig()), client_verifier=object())
    assert Daemon._kv_principal(certs, None, "carol") == "cert:carol" == cert_principal("carol")
    assert Daemon._kv_scope_problem(certs, "cert:carol") is None
    assert Daemon._kv_scope_problem(certs, "alice") is not None
    neither = SimpleNamespace(config=SimpleNamespace(auth=AuthConfig()), client_verifier=None)
    assert Daemon._kv_principal(neither, None, None) is None
    assert "auth is off" in Daemon._kv_scope_problem(neither, "alice")  # no fetch could ever find it


# ------------------------------------------------------------------------------------ the socket and the port
def _raw_put(path, head: dict) -> dict:
    """One put over the ingest socket with a header the SDK would not send; the daemon's answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(path))
        s.sendall(json.dumps(head).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            more = s.recv(65536)
            if not more:
                break
            buf += more
    return json.loads(buf)


def test_the_ingest_socket_refuses_an_invalid_scope_at_the_header(tmp_path):
    svc = KVService(LocalChunkStore(tmp_path / "kv", 64 << 20), chunk_tokens=CHUNK)
    sock = tmp_path / "kv.sock"

    async def go():
        server = await serve_kv_ingest(sock, svc)
        loop = asyncio.get_running_loop()
        try:
            head = {"op": "put", "model": MODEL, "token_ids": IDS, "shape": [4, 2, 2, len(IDS), 16],
                    "dtype": "float16"}
            return [await loop.run_in_executor(None, _raw_put, sock, {**head, "scope": scope})
                    for scope in ("a\nb", 7)]
        finally:
            server.close()

    try:
        answers = asyncio.run(asyncio.wait_for(go(), 60))
    finally:
        svc.close()
    assert [a["ok"] for a in answers] == [False, False]
    assert all("invalid scope" in a["error"] for a in answers), answers
    assert svc.ingest_errors == 2


TOKENS = {"ta": "alice", "tb": "bob"}


def test_end_to_end_a_scoped_put_is_fetched_with_its_principals_token_only(tmp_path):
    svc = KVService(LocalChunkStore(tmp_path / "kv", 64 << 20), chunk_tokens=CHUNK)
    sock = tmp_path / "kv.sock"

    async def fetch(port, token, **kw):
        async with connect_kv("127.0.0.1", port, verify=False, auth_token=token, timeout=10) as conn:
            try:
                res = await conn.fetch_kv(model=MODEL, token_ids=IDS, deadline_ms=5000, controller="fixed-L1", **kw)
            except (KVError, RemoteError) as exc:
                return ("error", exc.code, str(exc))
            return ("ok", res.stored_tokens, len(res.missing_token_ids))

    async def go():
        ingest = await serve_kv_ingest(sock, svc)
        server = await serve_kv(svc, "127.0.0.1", 0, congestion="reno", tuning=ServerTuning(forecaster="ewma"),
                                authorize=lambda t: t in TOKENS, principal=lambda t, cert: TOKENS.get(t))
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, lambda: put_kv_unix(sock, MODEL, IDS[:CHUNK], make_kv(CHUNK, 7)))
            bob_before = [await fetch(server.port, "tb"), await fetch(server.port, "tb", prefix=True)]
            hashes = await loop.run_in_executor(None, lambda: put_kv_unix(sock, MODEL, IDS, make_kv(len(IDS), 8),
                                                                          scope="alice"))
            bob_after = [await fetch(server.port, "tb"), await fetch(server.port, "tb", prefix=True)]
            alice = [await fetch(server.port, "ta"), await fetch(server.port, "ta", prefix=True)]
            anonymous = await fetch(server.port, None)
            return hashes, bob_before, bob_after, alice, anonymous
        finally:
            server.close()
            ingest.close()

    try:
        hashes, bob_before, bob_after, alice, anonymous = asyncio.run(asyncio.wait_for(go(), 120))
    finally:
        svc.close()
    assert hashes == chunk_hashes(IDS, model=MODEL, chunk_tokens=CHUNK, scope="alice")
    assert bob_after == bob_before  # as if alice's context were not stored
    assert bob_before[0][:2] == ("error", ErrorCode.NOT_FOUND) and bob_before[1] == ("ok", CHUNK, 2 * CHUNK)
    assert alice == [("ok", 3 * CHUNK, 0)] * 2
    assert anonymous[:2] == ("error", ErrorCode.UNAUTHORIZED)


def test_end_to_end_a_scope_of_a_client_certificates_principal(tmp_path):
    ca = tls.make_ca()
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    for name in ("carol", "dave"):
        tls.make_client_cert(ca, name).write(tmp_path / f"{name}.pem", tmp_path / f"{name}.key")
    verifier = tls.ClientCertVerifier(tmp_path / "ca.pem")
    svc = KVService(LocalChunkStore(tmp_path / "kv", 64 << 20), chunk_tokens=CHUNK)
    svc.ingest_sync(MODEL, IDS, make_kv(len(IDS), 9), scope="cert:carol")

    async def fetch(port, name):
        async with connect_kv("127.0.0.1", port, verify=False, timeout=10, certfile=tmp_path / f"{name}.pem",
                              keyfile=tmp_path / f"{name}.key") as conn:
            try:
                res = await conn.fetch_kv(model=MODEL, token_ids=IDS, deadline_ms=5000, controller="fixed-L1")
            except KVNotFound as exc:
                return ("not found", str(exc))
            return ("ok", res.stored_tokens)

    async def go():
        server = await serve_kv(svc, "127.0.0.1", 0, congestion="reno", tuning=ServerTuning(forecaster="ewma"),
                                client_verifier=verifier,
                                principal=lambda t, cert: cert_principal(cert) if cert is not None else None)
        try:
            return await fetch(server.port, "carol"), await fetch(server.port, "dave")
        finally:
            server.close()

    try:
        carol, dave = asyncio.run(asyncio.wait_for(go(), 120))
    finally:
        svc.close()
    assert carol == ("ok", 3 * CHUNK)
    assert dave == ("not found", "context not stored: 0 of 3 chunks found")


def test_no_token_may_take_a_certificate_principals_name(tmp_path):
    """A token named ``cert:carol`` had the principal of carol's client certificate: with tokens added to a daemon
    that had used a client CA, its holder fetched carol's scoped KV contexts (and attached to answers opened for
    her), whatever certificate it showed. The ``cert:`` prefix is reserved, in the config and in ``new-token``;
    a scope of that name still passes (a certificate's principal)."""
    from tokenwire.daemon.config import ConfigError, parse_config, token_name_problem
    from tokenwire.daemon.kv_store import scope_problem

    assert token_name_problem("cert:carol") is not None and "reserved" in token_name_problem("cert:carol")
    assert token_name_problem("carol") is None and token_name_problem("certain") is None
    assert scope_problem("cert:carol") is None
    digest = hash_token("secret-token-value")
    with pytest.raises(ConfigError, match=r"auth\.tokens\[0\]\.name: the 'cert:' prefix is reserved"):
        parse_config({"auth": {"tokens": [{"name": "cert:carol", "sha256": digest}]}}, tls_may_be_missing=True)
