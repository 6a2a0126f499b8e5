"""``tokenwire chat``: a command-line client. The prompt goes in, the answer streams out."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

# --retries' schedule and bookkeeping are the SDK's (ResumingChat, Reconnecting; the module loads no aioquic): read
# from here at each run, so that a test can shorten them
from tokenwire.transport.resuming import RECONNECT_S, RETRY_CAP_S, RETRY_FIRST_S, Reconnecting

if TYPE_CHECKING:
    import asyncio

T = TypeVar("T")

DEFAULT_TOKEN_ENV = "TOKENWIRE_TOKEN"
CERTIFICATE_ALERTS = {42, 43, 44, 45, 46, 48}  # TLS alerts about the server's certificate (RFC 8446, 6)
CERTIFICATE_EXPIRED = 45  # certificate_expired: outside its validity period, whoever issued it (not a trust problem)
MAX_STDIN_PROMPT = 1 << 20
"""Bytes of a prompt on stdin read at most (the SDK's limit on a whole request, MAX_STREAM_FRAME): beyond it the
request is refused anyway, and an endless stdin (`yes | tokenwire chat`) was read whole first (4.5 GB in 8 s)."""
RETRY_BUSY_S = 30.0
"""--retry-busy's default: how long a chat waits in all for a busy server (a person at a terminal would rather wait
some seconds than be told to run the command again; a script that would rather fail gives 0)."""
CLEANUP_S = 5.0
"""How long the tasks still running when the answer's task has ended (aioquic's, a closing connection's) get to end
before the event loop closes anyway: asyncio.run waited for them without a bound, and a double Ctrl-C hung the
client there (1 run in 12)."""


def _port(text: str) -> int:
    """``--port``: the SDK's check (imported here: aioquic is not loaded for every command's --help)."""
    from tokenwire.transport.quic_io import port_argument

    return port_argument(text)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "chat", help="ask a tokenwire server and stream the answer to stdout",
        description="Sends one prompt to a tokenwire daemon over QUIC and writes the answer to stdout as its "
        "tokens arrive; a connection lost mid-answer is resumed where it stopped (--retries). Use it to try a "
        "daemon, or to measure a path (--stats, --json-stats: TTFT, stall ratio, token delay).",
    )
    p.add_argument("prompt", nargs="?", help="the prompt (default: read stdin)")
    p.add_argument("--host", default="127.0.0.1", help="the server's address or name")
    p.add_argument("--port", type=_port, default=4433, help="the server's UDP port")
    p.add_argument("--server-name", help="TLS name to verify (default: --host)")
    p.add_argument("--cafile", type=Path, help="CA or self-signed certificate to trust (default: the system's CAs)")
    p.add_argument("--insecure", action="store_true", help="do not verify the server certificate (not with --cafile)")
    p.add_argument("--cert", type=Path, help="client certificate (PEM), for daemons with server.client_ca")
    p.add_argument("--key", type=Path, help="its private key (PEM; default: in --cert)")
    p.add_argument("--token-env", help="environment variable with the bearer token (set and not empty when named; "
                   f"default: {DEFAULT_TOKEN_ENV} if set, else no token)")
    p.add_argument("--scheme", choices=("chatterbox", "stream", "duplicate"), default="chatterbox",
                   help="how the answer's tokens are sent")
    p.add_argument("--model", help="the model to ask for (default: the server's routing decides)")
    p.add_argument("--max-tokens", type=int, help="the longest answer wanted (default: the server's limit)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a request parameter for the upstream (repeatable; VALUE a JSON number, true/false or "
                   "null when it parses as one, else a string: --param temperature=0.2, --param seed=3)")
    p.add_argument("--attach", metavar="REQUEST_ID",
                   help="stream an existing answer by its hex id instead (an application's, or one a chat left: "
                   "`tokenwire -v chat` prints an answer's id as it starts; a chat whose connection was lost "
                   "mid-answer prints it too, and --stats at the end)")
    p.add_argument("--idle-timeout", type=float, default=60.0, metavar="S",
                   help="give up after S seconds without a packet from the server (default: 60): how soon a dead "
                   "server is noticed; a live one answers keepalive pings while its model thinks")
    p.add_argument("--retries", type=int, default=3, metavar="N",
                   help="when the connection is lost mid-answer (the path went silent for --idle-timeout), "
                   "reconnect and resume the answer where it stopped, up to N times (default: 3; 0: give up); "
                   f"attempts that find no server back off ({RETRY_FIRST_S:g} s doubling to {RETRY_CAP_S:g} s "
                   f"apart) and go on for {RECONNECT_S:g} s after each loss")
    p.add_argument("--retry-busy", type=float, default=RETRY_BUSY_S, metavar="S",
                   help="when the server refuses the request as busy (its error names a Retry-After: the daemon's "
                   "limits.max_live_answers, an upstream's HTTP 429, 503 or a 5xx naming a time), wait as it asks "
                   f"and send it again, waiting S seconds in all at most (default: {RETRY_BUSY_S:g}; 0: fail at once; "
                   "a wait asked for longer than S: fail at once too); a line on stderr says each wait")
    p.add_argument("--max-time", type=float, metavar="S",
                   help="give up when the whole answer has not come within S seconds, retries included, and "
                   "cancel it at the server (default: no limit; a live server that stops sending holds the "
                   "client until it is reached)")
    p.add_argument("--stats", action="store_true", help="print statistics to stderr at the end")
    p.add_argument("--json-stats", type=Path, help="write the statistics as JSON here")
    p.set_defaults(handler=run)


def _params(items: list[str]) -> dict[str, Any]:
    """``--param KEY=VALUE`` items as a request's ``params``: VALUE as JSON when it parses (numbers, true, null;
    a list or object parses too, and the request check then refuses it: the protocol carries scalars only), else
    the string itself; a key given twice or an item without ``=`` is an error naming it."""
    import json

    from tokenwire.daemon.cli import CLIError

    out: dict[str, Any] = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key:
            raise CLIError(f"--param takes KEY=VALUE, not {item!r}")
        if key in out:
            raise CLIError(f"--param {key} given twice")
        try:
            out[key] = json.loads(text)
        except ValueError:
            out[key] = text
    return out


def _read_stdin_prompt() -> str:
    """The prompt from stdin, read as UTF-8 bytes whatever the locale says: under a C locale without UTF-8 mode
    Python decodes stdin as ASCII, and a UTF-8 prompt was refused as "not valid UTF-8"."""
    from tokenwire.daemon.cli import CLIError

    if sys.stdin is None:  # `<&-`
        raise CLIError("no prompt given: no argument, and stdin is closed")
    if sys.stdin.isatty():
        print("type the prompt, then Ctrl-D", file=sys.stderr)
    raw = getattr(sys.stdin, "buffer", None)
    # at most one byte (or character, which is at least one byte) past the limit: enough to know that it is over
    if raw is None:  # a text stream without bytes under it (a program's StringIO): already text
        text = sys.stdin.read(MAX_STDIN_PROMPT + 1)
        if len(text) > MAX_STDIN_PROMPT:
            raise CLIError(_stdin_too_large())
        return text.strip()
    data = raw.read(MAX_STDIN_PROMPT + 1)
    if len(data) > MAX_STDIN_PROMPT:
        raise CLIError(_stdin_too_large())
    try:
        return data.decode("utf-8").removeprefix("\ufeff").strip()  # (a byte-order mark is no prompt)
    except UnicodeDecodeError as exc:
        raise CLIError(f"the prompt on stdin is not valid UTF-8 text (byte {exc.start})") from None


def _stdin_too_large() -> str:
    """The SDK's "prompt too large" (:class:`~tokenwire.transport.client.PromptTooLarge`) for a stdin that was not
    read to its end: its size is unknown, only that it is over the limit."""
    return (f"prompt too large: its text on stdin is over {MAX_STDIN_PROMPT:,} bytes of UTF-8 (read no further), "
            f"over the limit of {MAX_STDIN_PROMPT:,} bytes per request (a daemon's limits.max_request_bytes may be "
            "lower)")


def _utf8_argument(prompt: str) -> str:
    """``prompt`` (the argument) as the UTF-8 text it was typed as. Python decodes arguments with the locale's
    encoding and keeps the bytes it cannot decode as surrogates: under a C locale a UTF-8 argument arrived as
    such and was refused; its bytes, decoded as UTF-8, are the prompt."""
    from tokenwire.daemon.cli import CLIError

    try:
        prompt.encode("utf-8")
        return prompt
    except UnicodeEncodeError:
        pass
    try:
        return os.fsencode(prompt).decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):  # bytes that are not UTF-8, or a lone surrogate typed in
        raise CLIError("the prompt is not valid UTF-8 text") from None


def _encodable(encoding: str | None) -> Callable[[str], str]:
    """A function giving text that stdout's ``encoding`` can write: what it cannot encode as backslash escapes
    (``\\u4e16``). Under PYTHONIOENCODING=ascii (or a C locale) the first such character was an error mid-answer,
    and the rest of the answer was lost."""
    import codecs

    try:
        name = codecs.lookup(encoding or "utf-8").name
    except LookupError:
        name = "utf-8"
    if name == "utf-8":
        return lambda text: text

    def shown(text: str) -> str:
        return text.encode(name, "backslashreplace").decode(name)

    return shown


def attach_hint(request_id: bytes) -> str:
    """The line on stderr that gives an answer's id, in a form to paste: a client killed or cut off mid-answer
    left the daemon generating it, and nothing had said its id (only --stats did, after a successful end)."""
    return f"[request id {request_id.hex()} (tokenwire chat --attach {request_id.hex()})]"


def run_interruptible(main: Coroutine[Any, Any, T],
                      loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None, *,
                      exiting: bool = False) -> T:
    """Run ``main`` on an event loop of its own (``loop_factory``'s: ``uvloop.new_event_loop`` for the demo), as
    ``asyncio.run`` does, with Ctrl-C (SIGINT), SIGTERM and SIGHUP (the terminal closed) cancelling it: leaving the
    stream's ``async with`` cancels the answer at the server. Then ``KeyboardInterrupt``, for the CLI's
    "interrupted" and exit status 130.

    The first signal cancels ``main`` once; later ones are ignored, its cleanup under way. asyncio.run's own Ctrl-C
    handling raised KeyboardInterrupt at the second one wherever Python was (in aioquic's sendmsg, closing async
    generators, in the loop's shutdown): 35 to 102 lines of tracebacks, or a client hung in its shutdown. By
    default SIGTERM and SIGHUP killed the client outright, and no cancellation went out: the daemon generated the
    abandoned answer to max_tokens. Not ``sigterm_as_ctrl_c`` either: its KeyboardInterrupt lands anywhere too.
    The tasks left when ``main`` ends get :data:`CLEANUP_S` to end (asyncio.run waited for them for ever).

    Signals already ignored stay so (``nohup``, a background job's SIGINT), and a SIGINT handler of a program's own
    is left to it; off the main thread (chat called from a worker thread) only the main thread may handle signals.
    Whichever way the call ends (a result, an error, an interruption) the handlers it took are given back as they
    were: a program that calls it in a loop and goes on after a KeyboardInterrupt can be interrupted again, and
    killed by SIGTERM (they were left ignored for the rest of the process after the first interruption). A signal
    that comes while they are given back is dropped, as during the cleanup.

    ``exiting``: the caller is a command that ends once interrupted (``tokenwire chat``, ``tokenwire demo``): after
    an interruption the signals taken are left ignored, not given back, so that one more Ctrl-C while it says
    "interrupted" and exits is not a KeyboardInterrupt traceback in that very path (nor SIGTERM its death by the
    signal). Given back on a result or an error all the same."""
    import asyncio
    import signal
    import threading

    loop = (loop_factory or asyncio.new_event_loop)()
    taken: list[tuple[signal.Signals, Any]] = []
    interrupted: list[int] = []
    raising: list[bool] = []  # KeyboardInterrupt is on its way out of an interruption
    try:
        asyncio.set_event_loop(loop)
        task = loop.create_task(main)

        def on_signal(signum: int) -> None:
            # (once main is done, a signal during the cleanup interrupts nothing: the call returns main's result,
            # and the signals are restored; recorded, it left them ignored for the rest of the process)
            if not interrupted and not task.done():
                interrupted.append(signum)
                task.cancel()

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                previous = signal.getsignal(sig)
                # (None: a handler installed outside Python, which could not be given back: left to its owner)
                if (previous is None or previous is signal.SIG_IGN
                        or (sig == signal.SIGINT and previous is not signal.default_int_handler)):
                    continue
                loop.add_signal_handler(sig, on_signal, sig)
                taken.append((sig, previous))
        try:
            return loop.run_until_complete(task)
        except asyncio.CancelledError:
            if not interrupted:
                raise
            raising.append(True)
            raise KeyboardInterrupt from None
        finally:
            _finish_loop(loop)
    finally:
        # the signals go from the loop's handler back to the previous ones with them blocked: remove_signal_handler
        # (and loop.close) puts SIGINT's default handler and SIG_DFL in first, and another Ctrl-C in between was a
        # KeyboardInterrupt out of this cleanup (the client killed by SIGINT, 1 run in a few under load), a
        # SIGTERM death. One pending meanwhile is dropped (SIG_IGN discards it) before the previous handler is in
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {sig for sig, _ in taken}) if taken else None
        try:
            try:
                for sig, _ in taken:
                    loop.remove_signal_handler(sig)
                    # at once: blocked here, a signal still reaches another thread of the process, and Python runs
                    # the handler in place when this one next checks (SIGINT's default: a KeyboardInterrupt out of
                    # loop.close, a review's repro with one more thread alive)
                    signal.signal(sig, signal.SIG_IGN)
                asyncio.set_event_loop(None)
                loop.close()
            finally:
                for sig, previous in taken:
                    signal.signal(sig, signal.SIG_IGN)
                    if not (raising and exiting):
                        signal.signal(sig, previous)
        finally:
            if mask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _finish_loop(loop: asyncio.AbstractEventLoop) -> None:
    """asyncio.run's shutdown of ``loop`` (the tasks left cancelled, async generators closed, the default executor
    shut down), each step bounded by :data:`CLEANUP_S`: a task that never ended hung the client at exit. Tasks still
    running then are dropped without asyncio's "Task was destroyed but it is pending!" for each."""
    import asyncio

    left = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for t in left:
        t.cancel()
    if left:
        loop.run_until_complete(asyncio.wait(left, timeout=CLEANUP_S))
    for shutdown in (loop.shutdown_asyncgens, loop.shutdown_default_executor):
        try:
            loop.run_until_complete(asyncio.wait_for(shutdown(), CLEANUP_S))
        except TimeoutError:
            pass
    abandoned = {t for t in left if not t.done()}
    for t in left:
        if t.done() and not t.cancelled() and t.exception() is not None:  # as asyncio.run: reported, not raised
            loop.call_exception_handler({"message": "unhandled exception during chat shutdown",
                                         "exception": t.exception(), "task": t})
    if abandoned:
        default = loop.get_exception_handler()

        def quiet(lp: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            if context.get("task") in abandoned:
                return
            if default is not None:
                default(lp, context)
            else:
                lp.default_exception_handler(context)

        loop.set_exception_handler(quiet)


def run(args: argparse.Namespace) -> int:
    import asyncio
    import contextlib

    from tokenwire.daemon.cli import CLIError, printable, save_json
    from tokenwire.transport.client import HandshakeError, connect
    from tokenwire.transport.errors import ErrorCode, RemoteError, TokenwireError
    from tokenwire.transport.frames import REQUEST_ID_BYTES
    from tokenwire.transport.resuming import Reconnect, ResumingChat

    prompt = args.prompt
    if args.attach is not None and (prompt is not None or args.max_tokens is not None):
        raise CLIError("--attach streams an existing answer as it is: no prompt or --max-tokens with it")
    if args.insecure and args.cafile is not None:  # --insecure silently ignored the CA file the user named
        raise CLIError("--insecure skips the certificate check that --cafile is for: give one of them")
    if prompt is None and args.attach is None:
        prompt = _read_stdin_prompt()
    if prompt is not None and not prompt.strip():  # `chat ""` sent an empty message, while empty stdin was refused
        raise CLIError("no prompt given (argument or stdin): it is empty")
    if prompt is not None:
        prompt = _utf8_argument(prompt)
    rid = None
    if args.attach is not None:
        try:
            rid = bytes.fromhex(args.attach)
        except ValueError:
            rid = b""
        if len(rid) != REQUEST_ID_BYTES:
            raise CLIError(f"--attach takes the {2 * REQUEST_ID_BYTES}-hex-digit request id "
                           f"(`tokenwire -v chat` prints it as an answer starts), not {args.attach!r}")
    if args.key is not None and args.cert is None:
        raise CLIError("--key needs --cert")
    params = _params(args.param)
    if params and args.attach is not None:
        raise CLIError("--attach streams an existing answer as it is: no --param with it")
    if not args.idle_timeout > 0:
        raise CLIError("--idle-timeout must be > 0")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise CLIError("--max-tokens must be at least 1")
    if args.retries < 0:
        raise CLIError("--retries must be 0 or more")
    if not 0 <= args.retry_busy < float("inf"):  # (NaN fails the comparison)
        raise CLIError("--retry-busy must be a number of seconds >= 0")
    if args.max_time is not None and args.max_time <= 0:  # NaN and inf: the CLI's float type refuses them
        raise CLIError("--max-time must be a number of seconds > 0")
    if args.token_env is not None:
        token = os.environ.get(args.token_env)
        if token is None:
            raise CLIError(f"--token-env: the environment variable {args.token_env} is not set")
        if not token:  # `MYTOK= tokenwire chat --token-env MYTOK` was told "not set", which it was
            raise CLIError(f"--token-env: the environment variable {args.token_env} is empty (set it to the token)")
    else:
        token = os.environ.get(DEFAULT_TOKEN_ENV) or None
    # aioquic's logger: without -v, ERROR (it logs a failed handshake as a warning; the error line below says it
    # once); -v is for tokenwire's own lines (the request id), aioquic's INFO lines ("Negotiated protocol version",
    # per connection) held back at WARNING; -vv (debug) lets aioquic's through as well. Set each time: an earlier
    # run in the same process left its level behind
    logging.getLogger("quic").setLevel(logging.ERROR if not args.verbose else
                                       logging.WARNING if args.verbose < 2 else logging.NOTSET)

    shown = _encodable(getattr(sys.stdout, "encoding", None))
    midline = [False]  # part of an answer is on stdout without its newline
    # the answer's id once it started, and the ResumingChat (its stream, whether it is detached: its connection
    # lost, the server not told to cancel it): what --max-time, Ctrl-C and an error can say when it ends
    where: dict[str, Any] = {"started": None, "chat": None}

    def whole_answer() -> Any:
        """The statistics of an answer whose text came whole and digest-checked before --max-time or Ctrl-C ended
        the wait for its generation times (GEN_TIMES, a round trip after the last text): it is a whole answer,
        exit status 0, statistics without a stall ratio (leaving its ``async with`` ended it so). None otherwise:
        the answer was cut short."""
        from tokenwire.transport.chat_stats import stats_from_outcome

        chat = where["chat"]
        stream = chat.stream if chat is not None else None
        if stream is None or not stream.answered or stream.outcome is None or not stream.outcome.digest_ok:
            return None
        # the text not read yet: the ResumingChat's reader waits on a step of its own, and a Ctrl-C right after the
        # answer came whole interrupts that wait with the last delta in the step (the whole answer then lacked it)
        whole, read = stream.text, chat.text
        rest = whole[len(read):] if whole.startswith(read) else ""
        with contextlib.suppress(OSError):  # the answer's last line, as a whole answer ends
            sys.stdout.write(shown(rest) + "\n")
            sys.stdout.flush()
        midline[0] = False
        return stream.stats if stream.stats is not None else stats_from_outcome(stream.outcome)

    def started(request_id: bytes) -> None:
        """STARTED: the answer has its id; -v says it at once (once: a resume starts the same answer again)."""
        first = where["started"] != request_id  # (a busy refusal after STARTED: the retry is a new answer, new id)
        where["started"] = request_id
        if first and args.verbose:
            with contextlib.suppress(OSError):  # (in the connection's event handling: a closed stderr must not
                print(attach_hint(request_id), file=sys.stderr, flush=True)  # break the answer)

    async def go() -> Any:
        reconnecting = Reconnecting(args.retries, first_s=RETRY_FIRST_S, cap_s=RETRY_CAP_S, window_s=RECONNECT_S)

        def reconnect(r: Reconnect) -> None:
            """A line on stderr before each reconnect attempt (the SDK's ResumingChat does the rest)."""
            at = f"request {r.request_id.hex()} after token {r.tokens_held}"
            if r.attempt == 1:  # a connection that was up is lost: a retry, its first attempt at once
                print(f"\n[{printable(str(r.error))}; resuming {at} ({r.retries_used}/{r.retries})]",
                      file=sys.stderr, flush=True)
            else:  # no server reached (the path still dark, the network gone): a wait, longer each time
                print(f"[{printable(str(r.error))}; resuming {at} ({r.retries_used}/{r.retries}): attempt "
                      f"{r.attempt} in {r.wait_s:.1f} s, {r.since_loss_s:.0f} s after the loss]", file=sys.stderr,
                      flush=True)

        def busy(error: RemoteError, wait: float) -> None:
            """A line on stderr before each wait for a busy server (--retry-busy)."""
            end = "\n" if midline[0] else ""  # (never mid-answer: a refusal comes before its first token)
            print(f"{end}[{printable(str(error))}; retrying in {wait:.1f} s (Ctrl-C to stop)]",
                  file=sys.stderr, flush=True)

        chat = ResumingChat(
            lambda: connect(
                args.host,
                args.port,
                server_name=args.server_name,
                cafile=args.cafile,
                verify=not args.insecure,
                auth_token=token,
                idle_timeout=args.idle_timeout,
                certfile=args.cert,
                keyfile=args.key,
            ),
            prompt, attach=rid, scheme=args.scheme, model=args.model, max_tokens=args.max_tokens,
            params=params or None, retries=reconnecting, on_reconnect=reconnect, retry_busy_s=args.retry_busy,
            on_busy=busy)
        chat.on_started(started)  # (the first delta may come much later: a model that thinks)
        where["chat"] = chat
        try:
            # in `async with`: leaving early (Ctrl-C, --max-time, a closed stdout) cancels the answer, so the
            # server stops generating it; a bare `async for` left it generating to max_tokens
            async with chat:
                async for delta in chat:
                    sys.stdout.write(shown(delta))
                    sys.stdout.flush()
                    midline[0] = not delta.endswith("\n")
        except (RemoteError, ConnectionError) as exc:
            if chat.gave_up == "retries":
                given = ("not reconnecting (--retries 0)" if not args.retries else
                         f"gave up: the connection was lost {args.retries + 1} times, --retries "
                         f"{args.retries} used up")
                raise CLIError(f"{printable(str(exc))}; {given}") from exc
            if chat.gave_up == "window":
                raise CLIError(
                    f"{printable(str(exc))}; gave up reconnecting: no server reached in "
                    f"{reconnecting.reconnecting_for():.0f} s and {reconnecting.attempts} attempts since the "
                    f"connection was lost (--retries reconnects for at most {RECONNECT_S:g} s)") from exc
            raise
        sys.stdout.write("\n")
        midline[0] = False
        return chat.stats

    async def bounded():
        if args.max_time is None:
            return await go()
        # leaving go() by cancellation leaves the stream's `async with`: the server stops generating the answer
        limit = asyncio.timeout(args.max_time)
        try:
            async with limit:
                return await go()
        except TimeoutError:
            if not limit.expired():
                raise
            whole = whole_answer()
            if whole is not None:
                return whole
            head = f"no whole answer within {args.max_time:g} s (--max-time)"
            chat = where["chat"]
            if chat is None or chat.stream is None:  # timed out connecting: no request went out
                raise CLIError(f"{head}: the server was not reached, nothing was asked of it") from None
            if not chat.detached:  # its stream's end went out; a path that is down does not carry it
                raise CLIError(f"{head}; the answer's cancellation was sent to the server (it does not arrive if "
                               "the path is down)") from None
            point = chat.resume_point()
            ident = f" request {point[0].hex()}" if point is not None else " the answer"
            raise CLIError(f"{head}, while reconnecting: the server could not be told to cancel it and may finish"
                           f"{ident}") from None

    try:
        try:
            stats = run_interruptible(bounded(), exiting=True)
        except (Exception, KeyboardInterrupt) as exc:
            # (Ctrl-C between the answer's last text and its statistics: a whole answer, see whole_answer)
            stats = whole_answer() if isinstance(exc, KeyboardInterrupt) else None
            if stats is None:
                if midline[0]:  # end the partial answer's line: the error line (or "interrupted") was glued onto it
                    with contextlib.suppress(OSError):
                        sys.stdout.write("\n")
                        sys.stdout.flush()
                # a started answer whose connection was lost (retries spent, or --max-time or Ctrl-C while
                # reconnecting) may still be generating at the daemon (for its orphan timeout): its id, to attach to
                # it, before the error line. Not when its stream was still open (leaving it sent the cancellation:
                # an attach then got "the server cancelled this answer"), nor after the daemon's own ERROR for it,
                # nor a local error
                if (where["started"] is not None and where["chat"] is not None and where["chat"].detached
                        and isinstance(exc, KeyboardInterrupt | CLIError | TokenwireError)):
                    with contextlib.suppress(OSError):
                        print(attach_hint(where["started"]), file=sys.stderr, flush=True)
                raise
    except BrokenPipeError:  # the reader went away (`| head`): not an error of ours; a ConnectionError, though
        raise
    except HandshakeError as exc:
        hint = ""
        if exc.tls_alert == CERTIFICATE_EXPIRED:
            # (--cafile or not: whoever issued it, it is out of date) it advised a --cafile that was the very
            # certificate; aioquic says which end ("no longer valid", "not valid yet")
            when = "is not valid yet" if "not valid yet" in str(exc) else "has expired"
            hint = (f"; the server's certificate {when} (outside its validity period): it must be renewed on the "
                    "server (the tokenwire daemon takes a renewed one on SIGHUP); if its dates look right, check "
                    "this machine's clock")
        elif exc.tls_alert in CERTIFICATE_ALERTS and args.cafile is None:
            hint = ("; trust the server's certificate with --cafile (and --server-name if it names another host), "
                    "or skip the check with --insecure")
        elif exc.tls_alert in CERTIFICATE_ALERTS and "hostname" in str(exc):  # verified, but issued for other names
            hint = ("; pass --server-name with a name the certificate holds, or skip the check with --insecure "
                    "(instead of --cafile)")
        elif exc.tls_alert in CERTIFICATE_ALERTS:  # it advised --cafile to a user who had given one
            hint = (f"; the certificate in --cafile {args.cafile} does not verify this server's (give the CA that "
                    "issued it, or the server's own self-signed certificate), or skip the check with --insecure "
                    "(instead of --cafile)")
        raise CLIError(f"{exc}{hint}") from None
    except TokenwireError as exc:
        hint = ""
        if exc.code == ErrorCode.UNAUTHORIZED:
            hint = (" (pass --cert and --key)" if "certificate required" in str(exc) else
                    " (the daemon does not accept this certificate: it takes those its server.client_ca issued "
                    "for client authentication, unexpired)" if "certificate rejected" in str(exc) else
                    f" (the token comes from ${args.token_env or DEFAULT_TOKEN_ENV}; `tokenwire config new-token` "
                    "makes one)")
        elif exc.code == ErrorCode.LIMIT_EXCEEDED and str(exc).startswith("request too large"):
            # the daemon's limits.max_request_bytes, below the 1 MiB the client checks: say which limit, and that
            # the prompt counts in bytes of UTF-8
            hint = ("; the prompt (its text in bytes of UTF-8, plus some 50 bytes of framing) is over this "
                    "server's limit on a request (the daemon's limits.max_request_bytes)")
        elif isinstance(exc, RemoteError) and exc.retry_after is not None and where["chat"] is not None:
            waits = where["chat"].busy.waits  # (busy: a refusal that names a Retry-After)
            if args.retry_busy and exc.retry_after > args.retry_busy:  # it asked for more than the whole budget
                hint = (f"; not retried: it asks for {exc.retry_after:g} s, more than --retry-busy "
                        f"{args.retry_busy:g}" + (f" (after {waits} wait{'s' if waits > 1 else ''}, "
                                                  f"{where['chat'].busy.waited_s:.1f} s)" if waits else ""))
            elif waits:
                hint = (f"; still busy after waiting {where['chat'].busy.waited_s:.1f} s ({waits} "
                        f"wait{'s' if waits > 1 else ''}; --retry-busy {args.retry_busy:g})")
            elif not args.retry_busy:
                hint = "; not retried (--retry-busy 0)"
        elif (exc.code == ErrorCode.NOT_FOUND and where["chat"] is not None
              and where["chat"].reconnecting.used):  # a resume after a lost connection
            hint = ("; the daemon no longer holds the answer (restarted, or it was retained for less time than "
                    "the outage lasted): what was printed is all of it that came")
        raise CLIError(f"{exc}{hint}") from None
    except (ConnectionError, ValueError) as exc:  # ValueError: a CA file, a request field
        raise CLIError(str(exc)) from None
    if args.stats and stats is not None:
        # printable: the finish reason is the server's (an ingest application's) words, escapes and line breaks too
        print(f"[{printable(str(stats))}; request id {stats.request_id}]", file=sys.stderr)
    if args.json_stats and stats is not None:
        save_json(args.json_stats, stats.to_dict())
    if stats is not None and stats.finish_reason == "cancelled":  # it read as a whole answer, exit status 0
        raise CLIError("the server cancelled this answer before its end (nobody was attached to it for the "
                       "daemon's orphan timeout, or it was stopped): what was printed is all there is")
    return 0
