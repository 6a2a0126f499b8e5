"""Listening on "[::]" serves IPv4 too on a host with net.ipv6.bindv6only=1 (root: a private network
namespace, where that sysctl is set for it alone)."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a network namespace)"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="no iproute2"),
]

SCRIPT = textwrap.dedent("""
    import asyncio, urllib.request
    from tokenwire.daemon.telemetry import Metrics, serve_metrics
    from tokenwire.transport.client import connect
    from tokenwire.transport.server import serve

    async def source(request):
        yield "over IPv4"

    async def main():
        server = await serve(source, host="::", port=0)
        runner = await serve_metrics(Metrics(), "::", 0, lambda: True)
        port = next(iter(runner.sites))._server.sockets[0].getsockname()[1]
        try:
            async with connect("127.0.0.1", server.port, verify=False, timeout=5) as conn:
                print(await conn.chat("x").collect())
            body = await asyncio.to_thread(
                lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).read())
            print(body.decode().strip())
        finally:
            server.close()
            await runner.cleanup()

    asyncio.run(main())
""")


def test_the_ipv6_wildcard_serves_ipv4_when_the_host_binds_ipv6_only():
    """With bindv6only=1 the QUIC listener on "[::]" answered IPv6 only unless [marking] was on (its ECN socket
    was dual-stack, aioquic's plain one took the kernel default), and metrics on "[::]" never answered IPv4."""
    ns = f"twds{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        run = ["ip", "netns", "exec", ns]
        subprocess.run([*run, "ip", "link", "set", "lo", "up"], check=True)
        subprocess.run([*run, "sysctl", "-qw", "net.ipv6.bindv6only=1"], check=True)
        out = subprocess.run([*run, sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.split("\n")[:2] == ["over IPv4", "ok"], out.stdout
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
