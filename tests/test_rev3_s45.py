"""Review 3 of bbe559b: the newest `.ended` record survives its own trim; a cut KV body is not copied for its count."""

from __future__ import annotations

import asyncio
import os
import time
import tracemalloc

from tokenwire.daemon.kv_ingest import _read_body
from tokenwire.testbed import netns


def test_the_record_just_written_is_kept_even_when_its_file_time_ties_or_is_older(tmp_path, monkeypatch):
    monkeypatch.setattr(netns, "STATE_DIR", str(tmp_path))
    for i in range(netns.ENDED_KEEP):
        netns.record_ended(f"twf{i:05x}", f"old {i}")
    later = time.time() + 60  # the older records' file times: later than the new one's (a clock stepped back)
    for name in os.listdir(tmp_path):
        os.utime(tmp_path / name, (later, later))
    netns.record_ended("tw000000", "the newest")
    ids = [r.run_id for r in netns.ended_runs()]
    assert "tw000000" in ids and len(ids) == netns.ENDED_KEEP


def test_a_cut_body_is_neither_copied_nor_kept_by_its_exception():
    async def go() -> int:
        reader = asyncio.StreamReader(limit=1 << 30)
        reader.feed_data(b"\0" * (16 << 20))
        reader.feed_eof()
        tracemalloc.start()
        try:
            await _read_body(reader, 32 << 20)
        except asyncio.IncompleteReadError as exc:
            held = tracemalloc.get_traced_memory()[0]
            assert getattr(exc, "got", len(exc.partial)) == 16 << 20
            return held
        finally:
            tracemalloc.stop()
        raise AssertionError("not cut")

    assert asyncio.run(go()) < 1 << 20  # (it held 32 MiB: the buffer, via the traceback, and its copy)
