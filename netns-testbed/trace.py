"""Link capacity traces in the mahimahi format: the one trace reader of the project.

A mahimahi trace is a text file with one integer per line: the millisecond timestamp (from the start of the
trace) of one opportunity to deliver a 1500-byte packet. A timestamp repeated n times means n packets may
leave in that millisecond. When the trace ends it repeats, shifted by its last timestamp; a file holding just
``1`` is a 12 Mbit/s link (Netravali et al., "Mahimahi: Accurate Record-and-Replay for HTTP", USENIX ATC '15;
``traces/README`` of ravinet/mahimahi).

A fixed rate is written ``12mbps`` (or ``0.5mbit``, ``800kbps``) wherever a trace path is accepted; it becomes
an equivalent trace whose opportunities are spread as evenly as millisecond timestamps allow: exact whenever
the rate is a whole number of opportunities in at most 20 minutes (every rate written with a few decimal
digits, ``33.3kbps`` included), otherwise within 0.001 %. The smallest rate is 10 bit/s (one opportunity per
20 minutes); a smaller one is refused.

A trace file is read line by line, and each process parses a given file once: the result is kept (a few
files, keyed by path, size and modification time), so validating a spec and then building the link from it
costs one parse, however large the file.

A pipe (a FIFO, bash's ``<(zcat trace.gz)``, which is ``/dev/fd/63``) gives its content once: a command that
checks its traces and then runs on them read an exhausted pipe the second time ("empty trace"). Any file that is
not regular is therefore read once per process as well, kept by device and inode (and modification time, which a
pipe's writer moves: an inode number reused by a later FIFO is not taken for the old one), for the life of the
process (the bound of a few entries is the regular files'). Another process cannot read that pipe again:
:func:`child_readable` writes this process's parse to a regular file for it (the emulator of a namespace run,
worker processes). A library caller that feeds one FIFO again for another run in the same process (a new writer)
calls :func:`forget_trace` first: nothing the reader can see tells that writer apart from none (see there).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import select
import stat
import tempfile
import threading
from array import array
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

OPPORTUNITY_BYTES = 1500
"""Bytes one delivery opportunity can carry (mahimahi's MTU-sized slot; TUN here carries bare IP packets)."""


class TraceError(ValueError):
    """A trace file or rate spec that cannot be used; the message names the file, line and problem."""


@dataclass(frozen=True)
class Trace:
    """Delivery opportunities, repeating with period ``period_ms`` (the last timestamp).

    ``stamps_ms`` is non-decreasing; opportunity ``k`` of the infinite repeated trace happens at
    ``(k // n) * period_ms + stamps_ms[k % n]`` milliseconds.
    """

    stamps_ms: array
    name: str = "trace"

    def __post_init__(self) -> None:
        if len(self.stamps_ms) == 0:
            raise TraceError(f"{self.name}: trace has no delivery opportunities")
        if self.stamps_ms[-1] <= 0:
            raise TraceError(f"{self.name}: the last timestamp must be > 0 (it is the repeat period)")

    @property
    def period_ms(self) -> int:
        return int(self.stamps_ms[-1])

    def __len__(self) -> int:
        return len(self.stamps_ms)

    @property
    def mean_mbps(self) -> float:
        """Mean capacity over one period in Mbit/s."""
        return len(self.stamps_ms) * OPPORTUNITY_BYTES * 8 / (self.period_ms * 1000.0)

    def opportunity_ms(self, k: int) -> int:
        """Time of opportunity ``k`` (0-based) of the repeated trace, in ms."""
        n = len(self.stamps_ms)
        cycle, i = divmod(k, n)
        return cycle * self.period_ms + int(self.stamps_ms[i])

    def first_index_after(self, t_ms: float) -> int:
        """Index of the first opportunity at a time strictly greater than ``t_ms``."""
        if t_ms < 0:
            return 0
        n = len(self.stamps_ms)
        period = self.period_ms
        cycle = int(t_ms // period)
        within = t_ms - cycle * period
        i = bisect_right(self.stamps_ms, within)
        # stamps equal to 0 in the next cycle coincide with period*cycle+period; bisect handles the rest
        return cycle * n + i

    def bytes_between(self, t0_ms: float, t1_ms: float) -> int:
        """Capacity in bytes of the opportunities in ``(t0_ms, t1_ms]``."""
        return (self.first_index_after(t1_ms) - self.first_index_after(t0_ms)) * OPPORTUNITY_BYTES


_NUMBER = r"(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)(?:e[+-]?[0-9]+)?"
"""A rate's number: one way to match each (``[0-9]*\\.?[0-9]+`` had many, and a spec of 5,000 digits not followed by a
unit backtracked through them all: 1 s per regex, quadratic in the digits)."""
_RATE_RE = re.compile(rf"^\s*({_NUMBER})\s*(g|m|k)?(?:bps|bit|bit/s|b/s)\s*$", re.I)
_UNIT = {"g": 1e9, "m": 1e6, "k": 1e3, None: 1.0}
_BAD_RATE_RE = re.compile(
    rf"^\s*[+-]?(?:nan|inf(?:inity)?|{_NUMBER})\s*(?:g|m|k)?(?:bps|bit|bit/s|b/s)\s*$", re.I)
"""What reads as a rate, with the numbers :data:`_RATE_RE` refuses (signed, NaN, infinite): not a file name."""


MAX_RATE_DIGITS = 100
"""The longest number a rate may be written with (digits and point): longer is no rate (Python's int() refuses
4,301 digits and more with a plain ValueError, which reached the commands as a traceback)."""


def parse_rate(text: str) -> float | None:
    """``'12mbps'`` -> 12e6 (bits/s); ``None`` when ``text`` is not a rate (e.g. a file name)."""
    exact = _exact_rate(text)
    return None if exact is None else float(exact)


def _exact_rate(text: str) -> Fraction | None:
    """The bits/s of a rate spec as the exact decimal written (``'33.3kbps'`` -> 33300), else None."""
    m = _RATE_RE.match(text)
    if not m:
        return None
    unit = m.group(2).lower() if m.group(2) else None
    mantissa, _, exponent = m.group(1).lower().partition("e")
    if "." in mantissa:  # (zeros that change nothing do not count: "12.000...0mbps" is 12 Mbit/s, however long)
        mantissa = mantissa.rstrip("0").rstrip(".")
    mantissa = mantissa.lstrip("0") or "0"
    if len(mantissa) > MAX_RATE_DIGITS or len(exponent) > MAX_RATE_DIGITS:
        return None  # (int() of 4,301 digits or more, the exponent's or Fraction's, is a plain ValueError)
    if exponent and abs(int(exponent)) > 30:
        return None  # "1e400", "1e-9999999": Fraction takes them whole (an OverflowError, or minutes of work)
    return Fraction(mantissa + (f"e{exponent}" if exponent else "")) * int(_UNIT[unit])


MAX_RATE_MBPS = 100_000.0  # 100 Gbit/s: far above what a userspace emulator forwards


def generator_bps(text: str) -> float | None:
    """The bits/s of a traffic generator's ``RATE`` (cross traffic, a paced flow), or None unless ``text`` is a
    rate in (0, 100 Gbit/s]: beyond, a virtual run simulated billions of packets and seemed to hang."""
    bps = parse_rate(text)
    return bps if bps is not None and 0 < bps <= MAX_RATE_MBPS * 1e6 else None


MAX_FIXED_PERIOD_MS = 1_200_000
"""Longest period of a fixed-rate trace: 20 minutes. It sets the smallest rate (one opportunity per period)."""
MIN_RATE_BPS = OPPORTUNITY_BYTES * 8 * 1000 / MAX_FIXED_PERIOD_MS
"""10 bit/s: one 1500-byte opportunity per :data:`MAX_FIXED_PERIOD_MS`, the smallest fixed rate."""
MAX_FIXED_OPPORTUNITIES = 100_000
"""Most opportunities one period of a fixed-rate trace holds (100 Gbit/s needs 100 000 per 12 ms)."""
_NEAR_EXACT = 1e-6  # relative error below which a shorter approximation is taken over a longer exact period


def _convergents(x: Fraction) -> list[tuple[int, int]]:
    """The continued-fraction convergents ``(numerator, denominator)`` of ``x`` (the best approximations)."""
    out = []
    h0, h1, k0, k1 = 0, 1, 1, 0
    rest = x
    while True:
        a = math.floor(rest)
        h0, h1 = h1, a * h1 + h0
        k0, k1 = k1, a * k1 + k0
        out.append((h1, k1))
        frac = rest - a
        if frac == 0 or k1 > MAX_FIXED_PERIOD_MS or h1 > MAX_FIXED_OPPORTUNITIES:
            return out
        rest = 1 / frac


def fixed_rate_trace(mbps: float | Fraction) -> Trace:
    """A trace equivalent to a constant ``mbps`` link.

    One opportunity per ms is 12 Mbit/s, so the rate needs ``mbps/12`` opportunities per ms: ``n``
    opportunities in a period of ``P`` ms, spread as evenly as whole milliseconds allow. ``n/P`` is the rate
    itself, reduced, whenever ``P`` stays within :data:`MAX_FIXED_PERIOD_MS` (20 minutes) and ``n`` within
    :data:`MAX_FIXED_OPPORTUNITIES` (the rate is read as the decimal it was written as, so ``0.0333`` is
    exactly 111 opportunities in 40 s); otherwise a continued-fraction approximation within those bounds, within
    0.001 % of the request. Rates below :data:`MIN_RATE_BPS` (10 bit/s) cannot be represented and are refused.
    """
    if not (mbps > 0) or math.isinf(mbps):
        raise TraceError(f"rate must be a positive number of Mbit/s, got {float(mbps):g}")
    if mbps > MAX_RATE_MBPS:  # the trace holds mbps opportunities per 12 ms: 1e9mbps wanted 8 GB and hung
        raise TraceError(f"rate {float(mbps):g} Mbit/s is beyond the emulator's {MAX_RATE_MBPS:g} Mbit/s")
    # the decimal the rate was written as (a float's shortest repr), not its binary approximation
    exact = mbps if isinstance(mbps, Fraction) else Fraction(repr(float(mbps)))
    if exact * 10**6 < Fraction(MIN_RATE_BPS):
        raise TraceError(
            f"rate {float(exact) * 1e6:g} bit/s is below the smallest fixed rate, {MIN_RATE_BPS:g} bit/s (one "
            f"{OPPORTUNITY_BYTES}-byte opportunity per {MAX_FIXED_PERIOD_MS // 60_000} minutes)"
        )
    per_ms = exact / 12
    if per_ms.denominator <= MAX_FIXED_PERIOD_MS and per_ms.numerator <= MAX_FIXED_OPPORTUNITIES:
        n, period = per_ms.numerator, per_ms.denominator
    else:
        fits = [(h, k) for h, k in _convergents(per_ms)
                if 1 <= h <= MAX_FIXED_OPPORTUNITIES and k <= MAX_FIXED_PERIOD_MS]  # fmt: skip
        if not fits:  # cannot happen above MIN_RATE_BPS (1/round(1/x) fits); kept as a clear error
            raise TraceError(f"rate {mbps:g} Mbit/s cannot be represented as a fixed-rate trace")
        close = [(h, k) for h, k in fits if abs(Fraction(h, k) - per_ms) <= _NEAR_EXACT * per_ms]
        n, period = close[0] if close else fits[-1]
    # n opportunities in (0, period]: opportunity j at ceil((j+1) * period / n)
    stamps = array("q", (-((-(j + 1) * period) // n) for j in range(n)))
    return Trace(stamps, name=f"{float(mbps):g}mbps")


MAX_STAMP_MS = 10**12
MAX_LINE_CHARS = 100
"""Longest trace line: one integer timestamp and some blanks. A longer line is refused before it is read whole
(a file without newlines, ``/dev/zero`` say, was read into memory until a MemoryError)."""
_CONTROL_RE = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")  # ASCII, yet binary (NUL bytes); tabs, CR and FF are blanks
# what a block of well-formed lines holds: digits and blanks (int() also took "1_0" as 10 and "+20")
_NOT_DIGITS_RE = re.compile(r"[^0-9\t\n\v\f\r ]")
_READ_CHUNK = 1 << 20  # characters parsed at a time
_CACHE_ENTRIES = 4
_WRITE_LINES = 1 << 16  # timestamps written at a time by :func:`child_readable`
_WAIT_S = 0.25
"""Longest wait on a silent pipe (a FIFO, ``<(zcat trace.gz)``) between returns to the interpreter."""
_cache: OrderedDict[tuple[object, ...], Trace] = OrderedDict()
_cache_lock = threading.Lock()


def load_trace(path: str | os.PathLike[str]) -> Trace:
    """Read a mahimahi trace file; raises :class:`TraceError` on anything malformed.

    The file is streamed, never held as a whole; a regular file already parsed by this process (same path,
    device, inode, size and modification time) is not parsed again (the same :class:`Trace`, which nothing
    modifies, is returned). Nor is a pipe or other non-regular file already read (same device, inode and
    modification time, whatever the path: ``/dev/fd/63`` and ``/proc/self/fd/63`` are one pipe): its content could
    be read only once, and the second look found it empty. The cache holds :data:`_CACHE_ENTRIES` regular files,
    the least recently used going first, and every pipe read, for the life of the process: a pipe dropped could not
    be read again (``predictor collect-many`` with five piped traces lost the first before its run; a FIFO's
    second read waited for a writer that never came). A FIFO fed again by a new writer for another run is read
    again after :func:`forget_trace`.
    """
    name = os.fspath(path)
    try:
        st = os.stat(name)
    except FileNotFoundError:
        raise TraceError(f"{name}: no such trace file") from None
    except OSError as exc:
        raise TraceError(f"{name}: cannot read trace: {exc.strerror}") from None
    regular = stat.S_ISREG(st.st_mode)
    key = _cache_key(name, st)
    with _cache_lock:  # a library caller may load traces from several threads: get-then-move is not atomic
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    trace = _parse_trace_file(name, regular=regular)  # outside the lock: another file's parse need not wait
    if not regular:  # keyed as it is now, its writer done: a write during the parse moved the modification time
        try:
            key = _cache_key(name, os.stat(name))
        except OSError:  # (a FIFO removed meanwhile: nobody can name it again)
            return trace
    with _cache_lock:
        if key[0] == "pipe":  # an earlier parse of the same pipe (its writer's last write is older) is superseded
            for old in [k for k in _cache if k[:3] == key[:3] and k != key]:
                del _cache[old]
        _cache[key] = trace
        files = [k for k in _cache if k[0] != "pipe"]
        for old in files[: max(0, len(files) - _CACHE_ENTRIES)]:  # (oldest first; pipes are never dropped)
            del _cache[old]
    return trace


def forget_trace(path: str | os.PathLike[str]) -> bool:
    """Drop this process's parse of the trace at ``path`` (a pipe's, by its device and inode; a regular file's,
    by its path): the next :func:`load_trace` reads it again. True if there was one.

    For a FIFO fed once per run by a new writer (a library caller running two experiments in one process): the
    second run found the first parse and returned it, and the new writer stayed blocked in its open(2) forever.
    Such a writer is invisible until a reader opens the FIFO, and that open lets it in, whatever the reader then
    does; so a parse kept for the "check the spec, then run on it" reads of one run (where no second writer comes,
    and a second read would wait forever) cannot be told from a stale one by looking. The caller who starts the
    new writer knows: it calls this between the runs."""
    name = os.fspath(path)
    try:
        st = os.stat(name)
    except OSError:
        return False
    key = _cache_key(name, st)
    with _cache_lock:
        same = 3 if key[0] == "pipe" else 1  # a pipe by device and inode, a file by path: whatever its stamps were
        gone = [k for k in _cache if k[:same] == key[:same]]
        for k in gone:
            del _cache[k]
    return bool(gone)


def _cache_key(name: str, st: os.stat_result) -> tuple[object, ...]:
    """A regular file by path, device, inode, size and modification time; anything else by device, inode and
    modification time (a pipe's size says nothing, and its name may be one of several: ``/dev/fd/N``)."""
    if stat.S_ISREG(st.st_mode):
        return (os.path.abspath(name), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    return ("pipe", st.st_dev, st.st_ino, st.st_mtime_ns)


COPIES_PREFIX = "tw-traces-"
"""The name of every folder of copies of read-once traces begins so (``testbed down`` finds them as a run's scratch)."""
_DESCRIPTOR_NAMES = ("/dev/stdin", "/dev/fd/", "/proc/self/fd/", "/proc/thread-self/fd/")


def read_once(spec: str) -> bool:
    """Whether ``spec`` names a trace another process cannot read again: a pipe, or any file that is not regular
    (not a rate, not a regular file, not a missing path), or a regular file named through one of this process's
    descriptors (``/dev/stdin`` redirected from a file: in another process the name is that one's own descriptor,
    ``up --detach``'s child read its /dev/null as an empty trace)."""
    if parse_rate(spec) is not None:
        return False
    try:
        regular = stat.S_ISREG(os.stat(spec).st_mode)
    except OSError:
        return False
    return not regular or os.path.abspath(spec).startswith(_DESCRIPTOR_NAMES)


@contextlib.contextmanager
def copies_folder(*specs: str | None) -> Iterator[str | None]:
    """A private folder for :func:`child_readable`'s copies while the block runs, removed after it; None (and no
    folder) when no spec of ``specs`` is read once."""
    if not any(s is not None and read_once(s) for s in specs):
        yield None
        return
    with tempfile.TemporaryDirectory(prefix=COPIES_PREFIX) as folder:
        yield folder


def child_readable(spec: str, folder: str) -> str:
    """``spec`` as another process can read it: unchanged for a rate or a regular file (or a path that does not
    exist: the child's parse says so); for a pipe, whose content this process has taken, this process's parse
    written as a regular mahimahi file under ``folder``, whose path is returned. The copy keeps the pipe's base
    name (the child's :attr:`Trace.name`), in a folder per pipe, so a spec given twice (down and up) is written
    once. ``folder`` is the caller's to remove, with the copy, once the child has read it."""
    if not read_once(spec):
        return spec
    st = os.stat(spec)
    trace = trace_from_spec(spec)  # (the parse this process already made, from the cache)
    where = os.path.join(folder, f"{st.st_dev}-{st.st_ino}")
    path = os.path.join(where, os.path.basename(spec.rstrip("/")) or "trace")
    if os.path.exists(path):
        return path
    os.makedirs(where, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=where, prefix=".partial-")
    try:
        with open(fd, "w", encoding="ascii") as fh:
            stamps = trace.stamps_ms
            for start in range(0, len(stamps), _WRITE_LINES):  # a block at a time, not one string of GBs
                fh.write("\n".join(map(str, stamps[start : start + _WRITE_LINES])) + "\n")
        os.replace(tmp, path)  # whole or absent: an interrupted write leaves no short trace under the name
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


class _PatientPipe(io.RawIOBase):
    """A pipe's read end that waits for data in slices of :data:`_WAIT_S`. Python runs a signal's handler only
    between bytecodes: a SIGTERM landing after the last check and before a blocking ``read()`` waited for the
    writer's next bytes, forever from a silent one, so ``testbed up --down-trace FIFO`` ignored it."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd
        self._poll = select.poll()  # (not select(): it refuses descriptors from 1024 on, a ValueError)
        self._poll.register(fd, select.POLLIN)

    def fileno(self) -> int:
        return self._fd

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._poll.poll(_WAIT_S * 1000):
            pass  # (back in the interpreter: a pending handler runs here)
        return os.readv(self._fd, [buffer])

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


def _open_text(name: str, regular: bool) -> io.TextIOWrapper:
    """``name`` opened as ASCII text, through :class:`_PatientPipe` unless it is a ``regular`` file (which never
    blocks for long)."""
    if regular:
        return open(name, encoding="ascii")
    # not blocking in open() either: a FIFO's open waits for a writer, and a SIGTERM landing just before it was
    # never handled while none came. Opened at once, the wait is the reader's, in slices (on Linux a FIFO no writer
    # has opened yet is not at its end for poll(); it is once a writer came and went)
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        os.set_blocking(fd, True)  # (poll says when a read returns at once)
        raw = _PatientPipe(fd)
    except BaseException:
        os.close(fd)
        raise
    try:
        return io.TextIOWrapper(io.BufferedReader(raw, 1 << 16), encoding="ascii")
    except BaseException:  # (an interrupt in here: the wrappers made so far may have closed it already)
        raw.close()
        raise


def _parse_trace_file(name: str, regular: bool = True) -> Trace:
    stamps = array("q")
    prev = 0
    lineno = 0
    rest = ""  # the line being read, its newline not seen yet
    try:
        with _open_text(name, regular) as fh:
            while True:
                # a fixed amount at a time, not readlines(): its size hint bounds the lines read, not one line
                chunk = fh.read(_READ_CHUNK)
                data = rest + chunk
                cut = data.rfind("\n") + 1 if chunk else len(data)  # at the end, the last line needs no newline
                block, rest = data[:cut], data[cut:]
                lines = block.split("\n")
                if chunk or not block:
                    lines.pop()  # the empty piece after the block's last newline
                if lines:
                    # fast path: a chunk of well-formed lines, digits and blanks only (int() ignores surrounding
                    # blanks, and refuses the blanks between two numbers on one line)
                    try:
                        values = None if _NOT_DIGITS_RE.search(block) else list(map(int, lines))
                    except ValueError:
                        values = None
                    if (values is not None and prev <= values[0] and values[-1] <= MAX_STAMP_MS
                            and values == sorted(values) and max(map(len, lines)) <= MAX_LINE_CHARS):  # fmt: skip
                        stamps.extend(values)
                        prev = values[-1]
                        lineno += len(lines)
                    else:
                        for line in lines:  # the exact line and problem (or blank lines, which are skipped)
                            lineno += 1
                            prev = _check_line(name, lineno, line, prev, stamps)
                if len(rest) > MAX_LINE_CHARS or _CONTROL_RE.search(rest):  # refused before it grows any further
                    _check_line(name, lineno + 1, rest, prev, stamps)
                if not chunk:
                    break
    except UnicodeDecodeError:
        raise TraceError(f"{name}: not a text trace (non-ASCII bytes)") from None
    except OSError as exc:
        raise TraceError(f"{name}: cannot read trace: {exc.strerror}") from None
    if not stamps:
        raise TraceError(f"{name}: empty trace")
    if stamps[-1] <= 0:  # (Trace says so too, but by its display name: the file's base name)
        raise TraceError(f"{name}: the last timestamp must be > 0 (it is the repeat period)")
    return Trace(stamps, name=os.path.basename(name))


def _check_line(name: str, lineno: int, line: str, prev: int, stamps: array) -> int:
    """Append the timestamp of one line to ``stamps`` (nothing for a blank line); returns the latest one."""
    control = _CONTROL_RE.search(line)
    if control:
        raise TraceError(f"{name}:{lineno}: not a text trace (control character {control.group()!r})")
    if len(line) > MAX_LINE_CHARS:
        raise TraceError(f"{name}:{lineno}: line longer than {MAX_LINE_CHARS} characters (a trace line is one "
                         "integer ms timestamp)")
    text = line.strip()
    if not text:
        return prev
    digits = text.removeprefix("-")  # (a negative one is told as such, below)
    if not (digits.isascii() and digits.isdigit()):  # plain decimal: int() took "1_0" (10) and "+20"
        raise TraceError(f"{name}:{lineno}: expected an integer ms timestamp, got {text!r}")
    if digits != text:
        raise TraceError(f"{name}:{lineno}: negative timestamp {text}")
    value = int(text)
    if value > MAX_STAMP_MS:  # it would overflow the int64 array (an OverflowError traceback)
        raise TraceError(f"{name}:{lineno}: timestamp {value} beyond {MAX_STAMP_MS} ms (about 31 years)")
    if value < prev:
        raise TraceError(f"{name}:{lineno}: timestamps must not decrease ({value} after {prev})")
    stamps.append(value)
    return value


def trace_from_spec(spec: str) -> Trace:
    """A trace from a path or a rate like ``12mbps`` (how every command takes ``--*-trace``)."""
    bps = _exact_rate(spec)
    if bps is not None:
        return fixed_rate_trace(bps / 10**6)
    if _RATE_RE.match(spec) and not os.path.exists(spec):  # "1e400mbps": a rate, not a missing trace file
        raise TraceError(f"rate {spec.strip()} is out of range: a fixed rate is {MIN_RATE_BPS:g} bit/s to "
                         f"{MAX_RATE_MBPS:g} Mbit/s")
    if _BAD_RATE_RE.match(spec) and not os.path.exists(spec):  # "nanmbps", "-5mbps": "no such trace file" misled
        raise TraceError(f"{spec.strip()} is not a valid rate: a fixed rate is a positive finite number with a unit, "
                         "like 12mbps or 800kbps")
    return load_trace(spec)
