"""The SDK's smallest server and client (``python -m tokenwire.transport.server`` / ``.client``) take ``--host``:
docs/testbed.md runs them in a testbed's namespaces, whose addresses 127.0.0.1 never reached."""

from __future__ import annotations

import subprocess
import sys

from tokenwire.transport import client


def test_the_example_server_and_client_meet_on_another_address(capsys):
    server = subprocess.Popen([sys.executable, "-m", "tokenwire.transport.server", "--host", "127.0.0.2", "--port",
                               "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert line.startswith("serving the demo answer on udp://127.0.0.2:"), line + server.stderr.read()
        port = line.split("udp://127.0.0.2:")[1].split()[0]
        assert client.main(["hello", "--host", "127.0.0.2", "--port", port]) == 0
    finally:
        server.terminate()
        server.communicate(timeout=30)
    assert "digest verified" in capsys.readouterr().out
