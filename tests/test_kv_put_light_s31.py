"""``put_kv_unix``, the engine's client for KV puts, must not import the codec: ``cachegen.rans`` compiles its
``@njit(cache=True)`` kernels at import, which needs a writable numba cache, and an engine running as a user with
no writable home failed at its first put with "cannot cache function '_encode_kernel': no locator available". The
client's checks (cachegen.shapes, shared with stack_kv) must still refuse what ``KVService.ingest`` refuses,
in its words."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tokenwire.daemon.kv_ingest import _check_kv
from tokenwire.daemon.kv_meta import KVIngestError
from tokenwire.transport.cachegen.codec import stack_kv
from tokenwire.transport.cachegen.errors import InvalidInput

CLIENT = textwrap.dedent('''
    import json, os, socket, sys, threading
    import tokenwire.daemon.kv_ingest  # the module alone (and kv_service, kv_meta): no numba either
    light = sorted(m for m in sys.modules if m.startswith("numba") or m.endswith((".codec", ".rans")))
    import torch
    from tokenwire.daemon.kv_ingest import put_kv_unix
    from tokenwire.daemon.kv_meta import KVIngestError

    path = os.path.join(sys.argv[1], "kv.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    got = {}

    def daemon():  # one put: its header line, then the body it declares, then an ok
        conn, _ = listener.accept()
        with conn, conn.makefile("rb") as f:
            head = json.loads(f.readline())
            n = 2
            for d in head["shape"]:
                n *= d
            got["head"], got["body"] = head, len(f.read(n))
            conn.sendall(b'{"ok": true, "hashes": ["h0"]}\\n')

    t = threading.Thread(target=daemon)
    t.start()
    kv = [(torch.zeros(1, 2, 3, 4, dtype=torch.float16), torch.ones(1, 2, 3, 4, dtype=torch.float16))] * 2
    hashes = put_kv_unix(path, "m", [1, 2, 3], kv)
    t.join(10)
    try:
        put_kv_unix(path, "m", [1, 2, 3], [(torch.zeros(2, 2, 3, 4), torch.zeros(2, 2, 3, 4))])
        refused = None
    except KVIngestError as exc:
        refused = str(exc)
    loaded = sorted(m for m in sys.modules if m.startswith("numba") or m.endswith((".codec", ".rans")))
    print(json.dumps({"light": light, "loaded": loaded, "hashes": hashes, "shape": got["head"]["shape"],
                      "body": got["body"], "refused": refused}))
''')


def test_the_put_client_checks_and_sends_without_the_codec(tmp_path):
    """In a fresh process with an unwritable HOME and no NUMBA_CACHE_DIR: importing kv_ingest, a put through
    put_kv_unix (to a stand-in daemon) and a put it refuses load neither the codec nor numba (as root the cache
    would be written anyway, so the modules loaded are what is checked: the codec's import is the failure)."""
    home = tmp_path / "home"
    home.mkdir(mode=0o555)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env["HOME"] = str(home)
    out = subprocess.run([sys.executable, "-c", CLIENT, str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["light"] == [] and result["loaded"] == []
    assert result["hashes"] == ["h0"] and result["shape"] == [2, 2, 2, 3, 4] and result["body"] == 2 * 2 * 2 * 3 * 4 * 2
    assert result["refused"] == "bad KV tensors: batch size must be 1"


def _t(*shape: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    return torch.zeros(*shape, dtype=dtype)


BAD = {
    "no layers": [],
    "not a pair": [(_t(1, 2, 3, 4),)],
    "not a tuple": [_t(1, 2, 3, 4)],
    "int tensor": [(_t(1, 2, 3, 4, dtype=torch.int32), _t(1, 2, 3, 4, dtype=torch.int32))],
    "not a tensor": [([1.0], [1.0])],
    "mixed dtypes": [(_t(1, 2, 3, 4), _t(1, 2, 3, 4, dtype=torch.float32))],
    "later layer dtype": [(_t(2, 3, 4), _t(2, 3, 4)), (_t(2, 3, 4, dtype=torch.bfloat16),) * 2],
    "K and V differ": [(_t(1, 2, 3, 4), _t(1, 2, 3, 5))],
    "batch": [(_t(2, 2, 3, 4), _t(2, 2, 3, 4))],
    "2-D": [(_t(3, 4), _t(3, 4))],
    "5-D": [(_t(1, 1, 2, 3, 4), _t(1, 1, 2, 3, 4))],
    "layers differ": [(_t(1, 2, 3, 4),) * 2, (_t(2, 3, 5),) * 2],
    "no heads": [(_t(1, 0, 3, 4),) * 2],
    "no head dims": [(_t(2, 3, 0),) * 2],
}


@pytest.mark.parametrize("case", BAD)
def test_the_client_refuses_what_stack_kv_refuses_in_its_words(case):
    """Each bad KV: the client's light check (cachegen.shapes) refuses it with the message ingest's stack_kv gives."""
    kv = BAD[case]
    with pytest.raises(InvalidInput) as codec:
        stack_kv(kv, dtype=None)
    with pytest.raises(KVIngestError) as client:
        _check_kv(kv)
    assert str(client.value) == f"bad KV tensors: {codec.value}"


@pytest.mark.parametrize("kv", [[(_t(1, 2, 3, 4),) * 2] * 3, [(_t(2, 0, 4),) * 2],
                                [(_t(2, 3, 4, dtype=torch.bfloat16),) * 2]])
def test_the_client_takes_what_stack_kv_takes(kv):
    """Good KV (a batch of one, no tokens, bf16): both take it."""
    stack_kv(kv, dtype=None)
    _check_kv(kv)
