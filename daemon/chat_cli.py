"""``tokenwire chat``: a command-line client. The prompt goes in, the answer streams out."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="ask a tokenwire server and stream the answer to stdout")
    p.add_argument("prompt", nargs="?", help="the prompt (default: read stdin)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=4433)
    p.add_argument("--server-name", help="TLS name to verify (default: --host)")
    p.add_argument("--cafile", type=Path, help="CA or self-signed certificate to trust")
    p.add_argument("--insecure", action="store_true", help="do not verify the server certificate")
    p.add_argument("--token-env", default="TOKENWIRE_TOKEN", help="environment variable with the bearer token")
    p.add_argument("--scheme", choices=("chatterbox", "stream", "duplicate"), default="chatterbox")
    p.add_argument("--model")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--attach", metavar="REQUEST_ID", help="stream an existing answer by its hex id instead")
    p.add_argument("--stats", action="store_true", help="print statistics to stderr at the end")
    p.add_argument("--json-stats", type=Path, help="write the statistics as JSON here")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import asyncio

    from tokenwire.daemon.cli import CLIError
    from tokenwire.transport.client import connect
    from tokenwire.transport.errors import TokenwireError

    prompt = args.prompt
    if prompt is None and args.attach is None:
        prompt = sys.stdin.read().strip()
        if not prompt:
            raise CLIError("no prompt given (argument or stdin)")
    rid = None
    if args.attach:
        try:
            rid = bytes.fromhex(args.attach)
        except ValueError:
            raise CLIError("--attach takes the request id in hex") from None

    async def go():
        async with connect(
            args.host,
            args.port,
            server_name=args.server_name,
            cafile=args.cafile,
            verify=not args.insecure,
            auth_token=os.environ.get(args.token_env) or None,
        ) as conn:
            if rid is not None:
                stream = conn.attach(rid, scheme=args.scheme)
            else:
                stream = conn.chat(prompt, scheme=args.scheme, model=args.model, max_tokens=args.max_tokens)
            async for delta in stream:
                sys.stdout.write(delta)
                sys.stdout.flush()
            sys.stdout.write("\n")
            return stream.stats

    try:
        stats = asyncio.run(go())
    except (TokenwireError, ConnectionError) as exc:
        raise CLIError(str(exc)) from None
    if args.stats and stats is not None:
        print(f"[{stats}; request id {stats.request_id}]", file=sys.stderr)
    if args.json_stats and stats is not None:
        args.json_stats.write_text(json.dumps(stats.to_dict(), indent=2) + "\n")
    return 0
