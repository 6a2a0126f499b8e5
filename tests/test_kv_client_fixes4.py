"""Fixes from an application developer's KV probe, client side: ``fetch_kv(timeout_s=...)`` was unchecked."""

from __future__ import annotations

import pytest

from tests.test_kv_channel import CHUNK, MODEL, kv_client, make_kv, run, service  # noqa: F401  (the fixture)


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "5", True],
                         ids=["zero", "negative", "nan", "inf", "string", "bool"])
def test_a_bad_timeout_is_refused_before_the_fetch_is_sent(service, bad):  # noqa: F811
    """0 meant no bound (undocumented), -1 sent the fetch and failed it as "timed out" (the server counted it
    abandoned), NaN received every chunk and then failed "(0 decoded)", "5" raised a bare TypeError: each is a
    ValueError naming timeout_s now, raised before anything is sent, and the connection lives on."""
    ids = list(range(CHUNK))
    service.ingest_sync(MODEL, ids, make_kv(CHUNK, 3))

    async def go():
        async with kv_client(service) as (conn, server):
            with pytest.raises(ValueError, match=r"timeout_s must be a positive finite number of seconds, or None"):
                await conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=5000, controller="fixed-L1",
                                    timeout_s=bad)
            result = await conn.fetch_kv(model=MODEL, token_ids=ids, deadline_ms=5000, controller="fixed-L1",
                                         timeout_s=30)
        return result, server

    result, server = run(go())
    assert result.report.levels == ["low"]
    assert server.stats["fetches"] == 1 and server.stats["abandoned"] == 0  # the refused one never left


def test_no_timeout_means_no_fixed_bound():
    from tokenwire.transport.kv_client import _timeout_s

    assert _timeout_s(None) is None and _timeout_s(2) == 2.0 and _timeout_s(0.25) == 0.25
