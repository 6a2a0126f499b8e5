"""Per-packet log (CSV) and pcap taps of the emulator.

The CSV log has one row per packet once its fate is final, with virtual times in seconds on the
``time.monotonic()`` clock shared by every process on the host (so rows line up with timestamps taken by
the endpoints)::

    dir,seq,size,arrival,dequeue,departure,delivery,queue,sojourn_ms,latency_ms,ecn_in,ecn_out,fate,
    proto,sport,dport

``fate`` is ``delivered``, ``lost`` (loss model), ``drop_tail`` (queue full), ``drop_aqm`` (PI
drop) or ``drop_step`` (Not-ECT packet over the L step). ``proto``/``sport``/``dport`` identify the flow of
an IPv4 TCP or UDP packet (empty otherwise), so experiments with cross traffic can separate their flows.

The pcap taps write what entered and what left the emulator, stamped with the real (not virtual) read and
write times, as raw IP (LINKTYPE_RAW), using scapy's writer so any pcap tool and scapy itself read them back.

Both reach the disk in whole rows and records only (a live file never ends mid-row or mid-record): they
collect in memory and are written out when enough has gathered, on :meth:`flush` (the emulator calls it
about once a second while anything is pending, so a live ``testbed up --log/--pcap`` is complete up to the
last second even after the traffic stops) and at close.
"""

from __future__ import annotations

import contextlib
import csv
import os
import sys
import time

from .packet import ECN_NAMES
from .queues import Packet

LOG_FIELDS = [
    "dir", "seq", "size", "arrival", "dequeue", "departure", "delivery", "queue",
    "sojourn_ms", "latency_ms", "ecn_in", "ecn_out", "fate", "proto", "sport", "dport",
]  # fmt: skip

FLUSH_EVERY_S = 1.0  # what the log and pcaps hold reaches the disk at least this often (the emulator's timer)
BUFFER_BYTES = 1 << 16  # written out as soon as this much is pending (in whole rows/records)
LINKTYPE_RAW = 101  # DLT_RAW: packets start with the IP header


def _fmt(t: float | None) -> str:
    return "" if t is None else f"{t:.6f}"


def flow_of(data: bytes | None) -> tuple[object, object, object]:
    """(protocol, source port, destination port) of an IPv4 TCP/UDP packet; blanks otherwise."""
    if not data or len(data) < 20 or data[0] >> 4 != 4:
        return "", "", ""
    proto = data[9]
    ihl = (data[0] & 0x0F) * 4
    if proto in (6, 17) and len(data) >= ihl + 4:
        return proto, (data[ihl] << 8) | data[ihl + 1], (data[ihl + 2] << 8) | data[ihl + 3]
    return proto, "", ""


class WholeRecordFile:
    """A file that is written only in whole records: writes gather in memory until :meth:`flush` (or
    :meth:`commit` once ``BUFFER_BYTES`` are pending), which the owner calls between records only. Takes
    ``bytes`` (pcap) or ``str`` (CSV rows, encoded as UTF-8).

    A write that fails (a full disk, a quota) never reaches the emulator's packet path: the file is cut back
    to its last whole batch, one line on stderr says so, :attr:`failed` keeps the reason, and later records
    are dropped (the experiment goes on; the file is complete up to there, never torn)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.name = os.fspath(path)
        self._fd = os.open(self.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._parts: list[bytes] = []
        self.pending = 0
        self._size = 0  # bytes on disk, whole batches only
        self.failed: str | None = None

    def write(self, data: bytes | str) -> int:
        if self.failed is None:
            raw = data.encode() if isinstance(data, str) else bytes(data)
            self._parts.append(raw)
            self.pending += len(raw)
        return len(data)

    def commit(self) -> None:
        """Write out what is pending if ``BUFFER_BYTES`` have gathered (call between records)."""
        if self.pending >= BUFFER_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self._parts:
            return
        data = b"".join(self._parts)
        self._parts.clear()
        self.pending = 0
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            self.failed = exc.strerror or str(exc)
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)  # no torn record at the end
            print(f"tokenwire emulator: writing {self.name} failed ({self.failed}); it holds the records up to "
                  "here and no more are written", file=sys.stderr, flush=True)
            return
        self._size += len(data)

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            self.flush()
        finally:
            os.close(self._fd)
            self._fd = -1


def _check_opened(f: WholeRecordFile) -> None:
    """A file whose header could not be written is an error at start (the run has not begun)."""
    if f.failed is not None:
        f.close()
        raise OSError(f"cannot write {f.name}: {f.failed}")


class CsvPacketLog:
    """Streams packet records to a CSV file (see module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._fh = WholeRecordFile(path)
        self._w = csv.writer(self._fh)
        self._w.writerow(LOG_FIELDS)
        self._fh.flush()
        _check_opened(self._fh)
        self.rows = 0
        self._flushed_at = time.monotonic()

    def record(self, direction: str, pkt: Packet) -> None:
        sojourn = pkt.sojourn
        latency = None if pkt.delivery is None else pkt.delivery - pkt.arrival
        self._w.writerow(
            (
                direction, pkt.seq, pkt.size, _fmt(pkt.arrival), _fmt(pkt.dequeue), _fmt(pkt.departure),
                _fmt(pkt.delivery), pkt.queue,
                "" if sojourn is None else f"{sojourn * 1000:.3f}",
                "" if latency is None else f"{latency * 1000:.3f}",
                ECN_NAMES[pkt.ecn_in], ECN_NAMES[pkt.ecn_out], pkt.fate, *flow_of(pkt.data),
            )
        )  # fmt: skip
        self.rows += 1
        now = time.monotonic()
        if now - self._flushed_at >= FLUSH_EVERY_S:  # while packets flow; the emulator's timer once they stop
            self.flush(now)
        else:
            self._fh.commit()

    @property
    def pending(self) -> bool:
        """Rows not yet on disk."""
        return self._fh.pending > 0

    @property
    def failures(self) -> dict[str, str]:
        """File name -> why writing it stopped."""
        return {self._fh.name: self._fh.failed} if self._fh.failed else {}

    def flush(self, now: float | None = None) -> None:
        self._flushed_at = time.monotonic() if now is None else now
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read_packet_log(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Rows of a CSV packet log as dicts (strings; empty string for times that did not happen)."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


class PcapTap:
    """Writes what enters and leaves one direction of the emulator to ``<prefix>.in.pcap``/``.out.pcap``.

    Timestamps are real times converted from the monotonic clock to the epoch (pcap needs epoch times).
    """

    def __init__(self, prefix: str) -> None:
        from scapy.utils import RawPcapWriter  # heavy import, only when asked for pcaps

        files: list[WholeRecordFile] = []
        try:  # both files or neither: one that failed left the other open
            for suffix in (".in.pcap", ".out.pcap"):
                files.append(WholeRecordFile(prefix + suffix))
            self._files = (files[0], files[1])
            # (scapy's hint says IO[bytes]; it calls write, flush, fileno and close, which WholeRecordFile has)
            self._in = RawPcapWriter(self._files[0], linktype=LINKTYPE_RAW, nano=True)  # type: ignore[arg-type]
            self._out = RawPcapWriter(self._files[1], linktype=LINKTYPE_RAW, nano=True)  # type: ignore[arg-type]
            self._in._write_header(None)  # (scapy flushes after the header: on disk at once)
            self._out._write_header(None)
            for f in self._files:
                _check_opened(f)
        except BaseException:
            for f in files:
                f.close()
            raise
        self._epoch_offset = time.time() - time.monotonic()

    def _write(self, writer: object, data: bytes, t_mono: float) -> None:
        t = t_mono + self._epoch_offset
        sec = int(t)
        nsec = round((t - sec) * 1e9)
        if nsec >= 1_000_000_000:
            sec, nsec = sec + 1, nsec - 1_000_000_000
        writer.write_packet(data, sec=sec, usec=nsec, caplen=len(data), wirelen=len(data))  # type: ignore[attr-defined]
        writer.f.commit()  # type: ignore[attr-defined]  # a whole record is in: write out if enough gathered

    def arrived(self, data: bytes, t_mono: float) -> None:
        self._write(self._in, data, t_mono)

    def delivered(self, data: bytes, t_mono: float) -> None:
        self._write(self._out, data, t_mono)

    @property
    def pending(self) -> bool:
        """Records not yet on disk."""
        return any(f.pending for f in self._files)

    @property
    def failures(self) -> dict[str, str]:
        """File name -> why writing it stopped."""
        return {f.name: f.failed for f in self._files if f.failed}

    def flush(self) -> None:
        for f in self._files:
            f.flush()

    def close(self) -> None:
        self._in.close()
        self._out.close()
