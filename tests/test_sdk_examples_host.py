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


def test_certificate_file_error_comes_from_the_client_module_as_the_other_errors(tmp_path):
    """The README names it among connect's errors; it lived only in transport.tls, outside the client's exports."""
    import asyncio

    import pytest

    from tokenwire.transport.client import CertificateFileError, __all__, connect

    assert "CertificateFileError" in __all__

    async def attempt() -> None:
        async with connect("127.0.0.1", 9, cafile=str(tmp_path / "missing.pem")):
            pass

    with pytest.raises(CertificateFileError, match=r"missing\.pem"):
        asyncio.run(attempt())
