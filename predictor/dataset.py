"""Per-packet latency datasets from the DualPI2 emulator core in virtual time (``tokenwire predictor collect``).

One run = one bottleneck :class:`~tokenwire.testbed.link.Link` (trace-driven rate, DualPI2 with the Linux
defaults, one-way delay) driven by :class:`~tokenwire.testbed.vsim.Simulation`, with cross traffic (see
:mod:`.crossspec`) and one **probe** flow, the marked flow whose latency the predictor learns:

* the probe sends packets of ``probe_size`` bytes at Poisson times (mean ``probe_pps``), each either ECT(1)
  (L queue) or ECT(0) (C queue); the choice is a two-state Markov chain that switches with probability
  ``p_switch`` per packet, so the ack history holds runs of both queues, as under a per-packet policy;
* its acks come back ``ack_delay`` after delivery and give the sender what it sees at runtime: latency,
  ack time, size, queue, CE (a lost packet gives no ack);
* **ground truth by shadow packets**: at every probe send the run also enqueues one 1-byte packet into each
  queue (ECT(1) into L, ECT(0) into C), *before* the probe packet. A shadow takes its place in the FIFO of
  its queue, goes through the WRR scheduler and the trace opportunities like any packet, so its one-way
  latency is the latency a packet sent at that moment would see in that queue — for both queues at once,
  the counterfactual one included — while adding one byte per packet to the load. (It excludes the probe
  packet's own serialization beyond the shared delivery opportunity.) A shadow that the AQM drops (C queue
  under overload) leaves NaN; those targets are masked.

The file (``.npz``, :func:`save` / :func:`load`) holds one row per probe packet in send order:

===================  =====================================================================================
``sent_at``          send time, s (virtual)
``ack_at``           time its ack reached the sender, s (NaN when the packet was lost)
``latency_ms``       its one-way latency, ms (NaN when lost)
``size``             bytes
``queue_l``          1 = sent ECT(1) (L queue), 0 = ECT(0) (C queue)
``ce``               1 = arrived CE-marked
``target_l_ms``      ground truth: latency of a packet sent now into L (shadow), ms (NaN if dropped)
``target_c_ms``      same for the C queue
``n_acked``          acks the sender had received at ``sent_at`` (index into the ack log, below)
===================  =====================================================================================

plus ``meta`` (a JSON string: format version, trace, cross spec, seconds, seed, delays, probe settings,
counts). The *ack log* (what a runtime forecaster observes, in arrival order) is the delivered rows sorted by
``ack_at``: :func:`ack_log`.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
import zipfile
import zlib
from array import array
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from .crossspec import DEFAULT_CROSS, parse_cross_spec, plan_flows
from .features import RAW_COLUMNS

FORMAT_VERSION = 1
SHADOW_SIZE = 1
COLUMNS = ("sent_at", "ack_at", "latency_ms", "size", "queue_l", "ce", "target_l_ms", "target_c_ms", "n_acked")


PROGRESS_EVERY_S = 5.0
"""Wall-clock seconds between :func:`collect`'s progress reports (and one at the first probe packet). By time,
not by probe packets: under heavy cross traffic a run made 2000 probe packets (the old step) so slowly that it
showed "0.0%" for 89 s and nothing else."""


class DatasetError(ValueError):
    """A dataset file that is missing, malformed or of an unknown format version."""


class ProbeRateError(ValueError):
    """A probe rate above what the trace's link carries on average (see :func:`max_probe_pps`)."""


def max_probe_pps(mean_bps: float, probe_size: int) -> float:
    """The highest probe rate a run takes: the trace's mean capacity in probe packets, i.e. ``probe_share``
    1, the bound ``--probe-share`` has. Above it the probe alone overloads the link, so the queues only fill
    and drop; and the run's cost grows with the rate, not the trace (``--probe-pps 1e9`` ran for minutes)."""
    return mean_bps / (8 * probe_size)


@dataclass
class CollectConfig:
    down_trace: str
    cross: str = DEFAULT_CROSS
    seconds: float = 60.0
    seed: int = 1
    delay_ms: float = 10.0  # one-way propagation delay of the bottleneck direction
    ack_delay_ms: float = 10.0  # probe's ack return delay
    probe_pps: float | None = None  # None: see probe_share, then 8 % of the trace's 1500-byte opportunities, 5-300/s
    probe_share: float | None = None  # probe rate as a share of the trace's mean capacity in bits (if no probe_pps)
    probe_size: int = 1200
    p_switch: float = 0.08


_STREAMED = ("sent_at", "queue_l", "latency_ms", "ack_at", "ce", "target_l_ms", "target_c_ms")
"""The columns :func:`collect` fills while the run goes (``size`` and ``n_acked`` are derived at the end)."""
_UNKNOWN = (math.nan, math.nan, 0.0, math.nan, math.nan)
"""A new row's ``latency_ms``, ``ack_at``, ``ce``, ``target_l_ms``, ``target_c_ms`` until its packets arrive:
unknown, except ``ce`` (a lost packet reads unmarked)."""


def collect(cfg: CollectConfig, progress: Callable[[float], None] | None = None,
            progress_every_s: float = PROGRESS_EVERY_S) -> dict[str, np.ndarray]:
    """Run one virtual-time session; returns the arrays of the module docstring (``meta`` as a JSON str).

    ``progress`` is told the share of the virtual time done at the first probe packet and then at a probe packet
    at least ``progress_every_s`` wall-clock seconds after the last report (read from the clock only: it changes
    nothing in the run, which stays the same bit for bit)."""
    bad_pps = cfg.probe_pps is not None and not cfg.probe_pps > 0
    bad_share = cfg.probe_share is not None and not 0 < cfg.probe_share <= 1
    if bad_pps or bad_share:  # checked before anything is built: the CLI words the same checks per flag
        raise ValueError(f"probe rate: pps {cfg.probe_pps!r} must be > 0, share {cfg.probe_share!r} in (0, 1]")
    from tokenwire.testbed.link import Link
    from tokenwire.testbed.packet import ECT0, ECT1, NOT_ECT
    from tokenwire.testbed.queues import DualPI2, DualPI2Params, Packet
    from tokenwire.testbed.trace import OPPORTUNITY_BYTES, trace_from_spec
    from tokenwire.testbed.vsim import CbrFlow, Flow, RenoFlow, ScalableFlow, Simulation

    trace = trace_from_spec(cfg.down_trace)
    mean_bps = trace.mean_mbps * 1e6
    check_probe_pps(cfg.probe_pps, cfg.probe_size, mean_bps)
    # the rows, column by column, filled as the run goes: each probe send appends one, each delivered probe or
    # shadow packet fills its cells when the link records it. Nothing else of the run is kept: the simulation
    # used to hold every packet (cross traffic included) until the end, ~2 MB per virtual s at 100 Mbit/s
    rows = {c: array("d") for c in _STREAMED}
    ids = {"probe": -1, "shadow": -1}  # flow ids, known once the flows are added (before any packet is recorded)
    ack_delay = cfg.ack_delay_ms / 1000.0  # the probe's

    def on_record(pkt: Packet) -> None:
        if pkt.fate != "delivered":
            return
        fid, seq, sent = cast("tuple[int, int, float]", pkt.meta)  # (fid, seq, sent at), as collect sends
        lat = (pkt.delivery - sent) * 1000.0  # type: ignore[operator]
        if fid == ids["probe"]:
            rows["latency_ms"][seq] = lat
            rows["ack_at"][seq] = pkt.delivery + ack_delay  # type: ignore[operator]
            rows["ce"][seq] = float(pkt.ecn_out == 3)
        elif fid == ids["shadow"]:
            rows["target_l_ms" if seq % 2 == 0 else "target_c_ms"][seq // 2] = lat

    link = Link(trace, DualPI2(DualPI2Params(seed=cfg.seed)), delay=cfg.delay_ms / 1000.0, on_record=on_record)
    sim = Simulation(link, keep=lambda pkt: False)  # on_record above reads what is needed, as it happens
    items = parse_cross_spec(cfg.cross)
    for plan in plan_flows(items, seconds=cfg.seconds, mean_bps=mean_bps, seed=cfg.seed):
        for start, stop in plan.periods:
            if plan.kind == "reno":
                sim.add(RenoFlow(ack_delay=plan.ack_delay, start=start, stop=stop))
            elif plan.kind == "scalable":
                sim.add(ScalableFlow(ack_delay=plan.ack_delay, start=start, stop=stop))
            else:
                ecn = ECT1 if plan.kind == "cbr-l" else NOT_ECT
                assert plan.rate_bps is not None
                sim.add(CbrFlow(plan.rate_bps, ecn=ecn, ack_delay=plan.ack_delay, start=start, stop=stop))

    pps = cfg.probe_pps
    if pps is None and cfg.probe_share is not None:
        pps = cfg.probe_share * mean_bps / (8 * cfg.probe_size)
    if pps is None:
        pps = min(300.0, max(5.0, 0.08 * mean_bps / (8 * OPPORTUNITY_BYTES)))
    rng = random.Random(f"probe:{cfg.seed}")

    class Shadow(Flow):
        """Owner of the shadow packets: sends nothing by itself, ignores acks."""

        def on_start(self, now: float) -> None:
            pass

        def on_ack(self, seq: int, sent: float, ce: bool, now: float) -> None:
            pass

    class Probe(Flow):
        """Poisson sender, per-packet queue from a switching Markov chain, shadows ahead of each packet."""

        def __init__(self, shadow: Flow) -> None:
            super().__init__(size=cfg.probe_size, ack_delay=ack_delay, name="probe")
            self.shadow = shadow
            self.queue_l = rng.random() < 0.5
            self.reported_at = -math.inf  # wall clock (monotonic) of the last progress report

        def on_start(self, now: float) -> None:
            self._tick(now)

        def _tick(self, now: float) -> None:
            assert self.sim is not None and pps is not None  # (pps: set above; mypy does not narrow it in here)
            if now >= cfg.seconds:
                return
            if rng.random() < cfg.p_switch:
                self.queue_l = not self.queue_l
            seq = len(rows["sent_at"])
            for col, value in zip(_STREAMED, (now, float(self.queue_l), *_UNKNOWN), strict=True):
                rows[col].append(value)  # (before the packets: on_record fills this row's cells)
            sim_ = self.sim
            sim_.send(self.shadow, Packet(SHADOW_SIZE, ECT1, meta=(self.shadow.fid, 2 * seq, now)), now)
            sim_.send(self.shadow, Packet(SHADOW_SIZE, ECT0, meta=(self.shadow.fid, 2 * seq + 1, now)), now)
            sim_.send(self, Packet(self.size, ECT1 if self.queue_l else ECT0, meta=(self.fid, seq, now)), now)
            sim_.call_at(now + rng.expovariate(pps), self._tick)
            if progress is not None:
                wall = time.monotonic()
                if wall - self.reported_at >= progress_every_s:
                    self.reported_at = wall
                    progress(now / cfg.seconds)

        def on_ack(self, seq: int, sent: float, ce: bool, now: float) -> None:
            pass

    shadow = sim.add(Shadow())
    probe = sim.add(Probe(shadow))
    ids.update(probe=probe.fid, shadow=shadow.fid)
    sim.run(cfg.seconds + 5.0)  # let the last packets arrive

    n = len(rows["sent_at"])
    out = {c: np.array(rows[c], dtype=np.float64) if c in rows else np.full(n, np.nan) for c in COLUMNS}
    out["size"][:] = cfg.probe_size
    acks = np.sort(out["ack_at"][~np.isnan(out["ack_at"])])
    out["n_acked"] = np.searchsorted(acks, out["sent_at"], side="right").astype(np.float64)
    q = link.queue
    meta = {
        "format": "tokenwire-latency-dataset",
        "version": FORMAT_VERSION,
        "config": asdict(cfg),
        "trace_name": trace.name,
        "trace_mean_mbps": trace.mean_mbps,
        "probe_pps": pps,
        "shadow_size": SHADOW_SIZE,
        "probe_packets": n,
        "probe_delivered": int(acks.size),
        "cross_flows": len(sim.flows) - 2,
        "dualpi2": {"step_marks": q.step_marks, "pi_marks": q.pi_marks, "aqm_drops": q.aqm_drops,  # type: ignore[attr-defined]
                    "tail_drops": q.tail_drops},  # type: ignore[attr-defined]
        "link": link.stats.to_dict(),
    }
    out_any: dict = dict(out)
    out_any["meta"] = json.dumps(meta)
    return out_any


def file_digest(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes. ``train`` records it for each training file (``train_config.data_files``
    of the checkpoint and the exported model) and ``eval`` warns when a ``--data`` file has one of them: a model
    scored on its own training data reads better than it is."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_probe_pps(pps: float | None, probe_size: int, mean_bps: float) -> None:
    """:class:`ProbeRateError` when an explicit ``pps`` exceeds :func:`max_probe_pps` (None: derived, fits)."""
    most = max_probe_pps(mean_bps, probe_size)
    if pps is not None and pps > most:
        raise ProbeRateError(f"probe rate {pps:g} packets/s is above the {most:.4g} packets/s of {probe_size} "
                             f"bytes that the trace carries on average ({mean_bps / 1e6:.4g} Mbit/s): the probe "
                             "alone would overload the link")


def save(path: str | Path, data: dict) -> None:
    """Write ``data`` (arrays of :data:`COLUMNS` + ``meta`` JSON string) as a compressed ``.npz``.

    Through :func:`tokenwire.daemon.cli.output_file`: a regular file is replaced atomically, so an interrupted
    collect leaves either the old file or none under ``path``, never a truncated one that ``load`` would
    stumble over later; a device, a FIFO or ``-`` (stdout) is written through, a symlink's target replaced.
    """
    from tokenwire.daemon.cli import output_file

    arrays = {c: np.asarray(data[c], dtype=np.float64) for c in COLUMNS}
    arrays["meta"] = np.array(data["meta"])
    with output_file(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)  # type: ignore[arg-type]  # numpy's stub: a key could be allow_pickle


def load(path: str | Path) -> dict:
    """Read a dataset written by :func:`save`; raises :class:`DatasetError` on anything unexpected."""
    try:
        # our own file, closed by the with: np.load(path) left its file open when the archive was truncated or
        # corrupt (numpy 2.4's NpzFile() raises after np.load handed the file over), a ResourceWarning per load
        with open(path, "rb") as fh:
            z = np.load(fh, allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile):  # a .npy file is one array, not an archive of columns
                raise DatasetError(f"{path}: not a latency dataset (one .npy array, not an .npz archive of columns)")
            with z:
                for name in (*COLUMNS, "meta"):
                    _check_member(path, z, name)
                data: dict[str, Any] = {c: np.asarray(z[c], dtype=np.float64) for c in COLUMNS}
                meta = json.loads(str(z["meta"]))
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such dataset") from None
    except DatasetError:  # a ValueError too: not to be wrapped below
        raise
    except RecursionError:  # (a RuntimeError: before that one) json's answer to a meta of "[[[[..."
        raise DatasetError(f"{path}: not a latency dataset (meta is nested too deeply)") from None
    except MemoryError:  # an archive whose sizes lie too (the header check below trusts them)
        raise DatasetError(f"{path}: not a latency dataset (it declares arrays larger than this machine's memory)") \
            from None
    except (KeyError, ValueError, TypeError, RuntimeError, OSError, EOFError, zipfile.BadZipFile, zlib.error,
            NotImplementedError) as exc:
        # BadZipFile: truncated or corrupt archive; zlib.error: corrupt member; NotImplementedError: zipfile's
        # answer to a damaged compression-method field; RuntimeError: its "File 'size.npy' is encrypted, password
        # required" for a flipped flag bit; TypeError: a cast numpy cannot make
        raise DatasetError(f"{path}: not a latency dataset ({_why_not(exc)})") from None
    if not isinstance(meta, dict):
        raise DatasetError(f"{path}: not a latency dataset (meta is a JSON {type(meta).__name__}, not an object)")
    if meta.get("format") != "tokenwire-latency-dataset" or meta.get("version") != FORMAT_VERSION:
        raise DatasetError(f"{path}: unknown format {meta.get('format')!r} version {meta.get('version')!r}")
    if any(data[c].ndim != 1 for c in COLUMNS):
        bad = ", ".join(f"{c} {data[c].shape}" for c in COLUMNS if data[c].ndim != 1)
        raise DatasetError(f"{path}: not a latency dataset (columns must be 1-D arrays: {bad})")
    n = data["sent_at"].shape[0]
    if any(data[c].shape != (n,) for c in COLUMNS):
        raise DatasetError(f"{path}: columns of different lengths")
    acked = data["n_acked"]
    n_acks = int(np.count_nonzero(~np.isnan(data["ack_at"])))
    with np.errstate(invalid="ignore"):
        bad_acked = ~np.isfinite(acked) | (acked < 0) | (acked > n_acks) | (acked != np.round(acked))
    if bad_acked.any():
        i = int(np.flatnonzero(bad_acked)[0])
        raise DatasetError(f"{path}: n_acked[{i}] = {acked[i]:g} is not a count of the {n_acks} acks in the file")
    _check_values(path, data)
    _check_order(path, data)
    _check_ranges(path, data)
    _check_acks_by_send(path, data)
    data["meta"] = meta
    return data


_REAL_KINDS = "biuf"  # numpy dtype kinds a column may hold: bool, signed, unsigned, float (save writes float64)
_KIND_WORDS = {"c": "complex numbers", "V": "structured records", "O": "Python objects", "U": "text", "S": "bytes",
               "M": "dates", "m": "time deltas"}


def _check_member(path: str | Path, z: Any, name: str) -> None:
    """Refuse the archive's member ``name`` from its .npy header, before numpy reads it: numpy allocates the
    declared shape first (a header declaring (10**13,) raised MemoryError from a 2-KB file), a structured dtype
    failed the cast with TypeError, and a complex column loaded with its imaginary part silently dropped. A column
    must hold real numbers, ``meta`` text, and the declared data must fit in what the archive holds for it. A
    member that is missing or no .npy array is left to numpy, which refuses it."""
    fmt = np.lib.format
    names = z.zip.namelist()
    member = name if name in names else f"{name}.npy"  # the names NpzFile tries, in its order
    if member not in names:
        return
    info = z.zip.getinfo(member)
    with z.zip.open(member) as fh:  # (by name: zipfile's errors then name the member, not its ZipInfo)
        try:
            version = fmt.read_magic(fh)
        except ValueError:
            return
        if version not in ((1, 0), (2, 0), (3, 0)):
            return
        read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = read_header(fh)
        data_bytes = info.file_size - fh.tell()
    kinds, want = ("US", "text") if name == "meta" else (_REAL_KINDS, "real numbers")
    if dtype.kind not in kinds:
        held = _KIND_WORDS.get(dtype.kind, f"{dtype!s:.40}")
        raise DatasetError(f"{path}: not a latency dataset ({name} holds {held}, not {want})")
    if math.prod(shape) * dtype.itemsize > data_bytes:
        raise DatasetError(f"{path}: not a latency dataset ({name}: its header declares a {shape!s:.60} array of "
                           f"{dtype!s:.20}, more than the {data_bytes} bytes the archive holds for it)")


def _why_not(exc: Exception) -> str:
    """numpy's reason a file is no dataset, without its advice to load it "unsafely" with ``allow_pickle``
    (a dataset never holds pickled objects: the advice would have users run code from an untrusted file)."""
    text = str(exc)
    if "allow_pickle" in text:
        return ("holds Python objects, not numbers" if text.startswith("Object arrays")
                else "neither an .npz archive nor an .npy array")
    return text


def _check_values(path: str | Path, data: dict) -> None:
    """:class:`DatasetError` naming the column and the first bad row where a value is one that train would
    turn into NaN losses ("training diverged") and eval into nan/inf tables.

    NaN is a value of the format where it means "unknown": ``ack_at`` and ``latency_ms`` of a lost packet
    (no ack), a target whose shadow was dropped. Everything a forecaster reads of a delivered packet (the
    ack log: :data:`~.features.RAW_COLUMNS`) and every send time must be finite; no column may be infinite.
    """
    delivered = ~np.isnan(data["ack_at"])
    everywhere = np.ones_like(delivered)
    rules = [("sent_at", everywhere, "send times must be finite"),
             ("ack_at", everywhere, "an ack time is finite, or NaN for a lost packet"),
             *((c, delivered, "must be finite for a delivered packet (one with an ack_at)")
               for c in RAW_COLUMNS if c not in ("sent_at", "ack_at")),
             ("target_l_ms", everywhere, "a target is a latency in ms, or NaN where the shadow was dropped"),
             ("target_c_ms", everywhere, "a target is a latency in ms, or NaN where the shadow was dropped")]
    for col, rows, why in rules:
        v = data[col]
        bad = rows & (np.isinf(v) if col in ("ack_at", "target_l_ms", "target_c_ms") else ~np.isfinite(v))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DatasetError(f"{path}: {col}[{i}] = {v[i]:g} ({int(bad.sum())} of {v.size} rows): {why}; "
                               "not a usable latency dataset")


_FLAG_COLUMNS = ("queue_l", "ce")
"""0/1 columns: the features read ``queue_l > 0.5`` as the L queue and take ``ce`` as it is, so a 3 or a 0.5 was
read as some queue and some marking, without a word."""
_LATENCY_COLUMNS = ("latency_ms", "target_l_ms", "target_c_ms")
"""One-way latencies in ms: never negative (0 is possible: no propagation delay and a packet sent at a delivery
opportunity). A sign-flipped file was scored like a real one: ``eval`` printed "52.4% lower" for it."""


def _check_ranges(path: str | Path, data: dict) -> None:
    """:class:`DatasetError` naming the column and the first row holding a finite value no run can record: a
    negative latency or target, a flag other than 0 or 1, a packet of no bytes, an ack before its send.
    (After :func:`_check_values` and :func:`_check_order`, whose reasons come first: NaN, the format's "unknown",
    passes here, and a send time out of order is named as such, not as an ack before it.)"""
    with np.errstate(invalid="ignore"):  # NaN compares False: unknown values pass
        rules = [*((c, data[c] < 0, "a latency in ms cannot be negative") for c in _LATENCY_COLUMNS),
                 *((c, (data[c] != 0) & (data[c] != 1) & ~np.isnan(data[c]), "a flag is 0 or 1")
                   for c in _FLAG_COLUMNS),
                 ("size", data["size"] <= 0, "a packet size in bytes is positive"),
                 ("ack_at", data["ack_at"] < data["sent_at"], "an ack cannot reach the sender before its packet "
                  "was sent (sent_at)")]
    for col, bad, why in rules:
        if bad.any():
            v = data[col]
            i = int(np.flatnonzero(bad)[0])
            raise DatasetError(f"{path}: {col}[{i}] = {v[i]:g} ({int(bad.sum())} of {v.size} rows): {why}; "
                               "not a usable latency dataset")


def _check_order(path: str | Path, data: dict) -> None:
    """:class:`DatasetError` naming the first row out of send order: ``sent_at`` going back, or ``n_acked`` (the
    acks received by each send) falling. The harness cuts each point's ack window at ``n_acked`` and splits
    train/validation by row position, so rows out of order were taken as they came and gave windows of
    another moment, without a word. (After :func:`_check_values`: every ``sent_at`` and ``n_acked`` is finite.)
    """
    for col, why in (("sent_at", "rows must be in send order"),
                     ("n_acked", "a later send cannot have received fewer acks")):
        v = data[col]
        back = np.flatnonzero(v[1:] < v[:-1])
        if back.size:
            i = int(back[0]) + 1
            rows = f"{back.size} row{'s' if back.size != 1 else ''} like it"
            raise DatasetError(f"{path}: {col}[{i}] = {v[i]:g} is below {col}[{i - 1}] = {v[i - 1]:g} "
                               f"({rows}): {why}; not a usable latency dataset")


def _check_acks_by_send(path: str | Path, data: dict) -> None:
    """:class:`DatasetError` naming the first row whose ``n_acked`` counts more acks than had reached the sender by
    its send (``ack_at <= sent_at``, as :func:`collect` counts them).

    The harness cuts each point's window at ``n_acked``, so a count that runs ahead (a converter counting acks by
    a later moment, or off by some) put acks of the future in the window, and the target's own packet among them:
    on a held-out file, 2 to 5 acks ahead lowered every model's MAE (EWMA 17.78 -> 16.23 ms) with exit 0. A count
    that lags is allowed: a staler window, not a view of the future. (After :func:`_check_ranges`: an ack before
    its send is named as such first.)"""
    acks = np.sort(data["ack_at"][~np.isnan(data["ack_at"])])
    by_send = np.searchsorted(acks, data["sent_at"], side="right")
    ahead = np.flatnonzero(data["n_acked"] > by_send)
    if ahead.size:
        i = int(ahead[0])
        rows = f"{ahead.size} row{'s' if ahead.size != 1 else ''} like it"
        raise DatasetError(f"{path}: n_acked[{i}] = {data['n_acked'][i]:g} but {int(by_send[i])} acks had reached "
                           f"the sender by sent_at[{i}] = {data['sent_at'][i]:g} ({rows}): n_acked counts the acks "
                           "received by the send (ack_at <= sent_at); more would show the model acks from after it; "
                           "not a usable latency dataset")


def ack_log(data: dict) -> np.ndarray:
    """``(N_acks, 6)`` raw ack rows (:data:`~.features.RAW_COLUMNS`) in arrival order (stable for ties)."""
    ok = ~np.isnan(data["ack_at"])
    order = np.argsort(data["ack_at"][ok], kind="stable")
    cols = [data[c][ok][order] for c in RAW_COLUMNS]
    return np.stack(cols, axis=1)


def summary(data: dict) -> dict:
    """Quick numbers about a dataset: how often and by how much L and C differ (the decision matters)."""
    tl, tc = data["target_l_ms"], data["target_c_ms"]
    ok = ~np.isnan(tl) & ~np.isnan(tc)
    diff = tc[ok] - tl[ok]
    return {
        "packets": int(tl.size),
        "l_mean_ms": _known(tl, np.mean),
        "c_mean_ms": _known(tc, np.mean),
        "l_p99_ms": _known(tl, lambda v: np.percentile(v, 99)),
        "c_p99_ms": _known(tc, lambda v: np.percentile(v, 99)),
        "share_c_faster": float(np.mean(diff < 0)) if diff.size else math.nan,
        "share_differ_5ms": float(np.mean(np.abs(diff) > 5)) if diff.size else math.nan,
        "lost": int(np.isnan(data["ack_at"]).sum()),
    }


def _known(values: np.ndarray, stat: Callable[[np.ndarray], object]) -> float:
    """``stat`` over the non-NaN values, NaN when there are none (numpy's nan* functions warn instead)."""
    v = values[~np.isnan(values)]
    return float(stat(v)) if v.size else math.nan  # type: ignore[arg-type]
