"""The KV store split into an interface module and one module per backend, and chain_entry's check of token ids.

kv_store.py held the interface and both backends (1,581 lines); now daemon/kv_store.py keeps the interface and
the shared pieces, daemon/kv_store_local.py the directory store, daemon/kv_store_redis.py the Redis store."""

from __future__ import annotations

import subprocess
import sys

import msgpack  # type: ignore[import-untyped]  # msgpack ships no hints
import pytest

from tokenwire.daemon import kv_store, kv_store_local, kv_store_redis
from tokenwire.daemon.kv_store import chain_entry


def _meta(index: object, ids: object) -> bytes:
    return msgpack.packb({"i": index, "ids": ids})


def test_chain_entry_reads_a_chunks_index_and_integer_token_ids():
    assert chain_entry(_meta(3, [1, 2, 70_000])) == (3, [1, 2, 70_000])
    assert chain_entry(_meta(0, [-1, 2**63 - 1])) == (0, [-1, 2**63 - 1])


@pytest.mark.parametrize("ids", [
    [1, "2"],  # a string
    [1.0, 2],  # a float, even a whole one
    [True, 2],  # a bool is an int to isinstance, never a token id
    [1, False],
    [1, None],
    [[1], 2],  # a nested list
    [1, {"x": 1}],
    [1, b"\x02"],
])
def test_chain_entry_refuses_token_ids_that_are_not_integers(ids):
    """A corrupt metadata value was returned as a token id: the float or string failed later in each caller's
    hash of the chain, and a bool hashed as 0 or 1 (a link confirmed from ids no put wrote)."""
    assert chain_entry(_meta(1, ids)) is None


def _imported_after(module: str) -> set[str]:
    """The modules of interest that ``import module`` loads in a fresh interpreter."""
    watched = ("redis", "tokenwire.daemon.kv_store", "tokenwire.daemon.kv_store_local",
               "tokenwire.daemon.kv_store_redis")
    code = f"import sys\nimport {module}\nprint(' '.join(m for m in {watched!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return set(out.stdout.split())


def test_the_interface_module_imports_neither_backend():
    assert _imported_after("tokenwire.daemon.kv_store") == {"tokenwire.daemon.kv_store"}


def test_each_backend_imports_the_interface_and_not_the_other_backend():
    """A daemon with a local store (and ``config check``, the unit's access check) never loads the Redis code, nor
    redis-py; the Redis store imports redis-py only when a store is made."""
    assert _imported_after("tokenwire.daemon.kv_store_local") == {"tokenwire.daemon.kv_store",
                                                                  "tokenwire.daemon.kv_store_local"}
    assert _imported_after("tokenwire.daemon.kv_store_redis") == {"tokenwire.daemon.kv_store",
                                                                  "tokenwire.daemon.kv_store_redis"}


@pytest.mark.parametrize(("module", "names"), [
    (kv_store_local, ["LocalChunkStore", "LOCK_FILE", "check_local_directory", "RECOVER_SEARCH_STEPS",
                      "_read_regular", "_locked", "_discard"]),
    (kv_store_redis, ["RedisChunkStore", "REDIS_REPORT_S", "FULL_HINT", "EVICTING_POLICIES", "_redis_errors",
                      "_auth_refused"]),
])
def test_moved_names_live_only_in_their_backend(module, names):
    """No copy left in kv_store: a test's ``monkeypatch.setattr(kv_store, "RECOVER_SEARCH_STEPS", 0)`` would
    patch a value the local store never reads (a test that tests nothing); without the name it fails loudly."""
    for name in names:
        assert hasattr(module, name), name
        assert not hasattr(kv_store, name), name


def test_the_daemons_kv_start_up_loads_no_redis_code_for_a_local_store() -> None:
    """kv_runtime imported the Redis store at its top: a daemon with a local store loaded it after all."""
    import subprocess
    import sys

    code = ("import sys, tokenwire.daemon.kv_runtime, tokenwire.daemon.service\n"
            "print(sorted(m for m in ('tokenwire.daemon.kv_store_redis', 'redis') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
