"""``tokenwire kv ...``: measure the KV codec (eval on the real model, throughput bench, calibration).

Top level imports argparse only; torch, numba and transformers load inside the handlers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .evaluate import Interrupted


def _write_json(path: str | None, doc: dict[str, Any], compact: bool = False) -> None:
    """The result as JSON at ``path``, or on stdout without one (or with ``-``); through the CLI's one writer,
    so ``--json -`` reaches the real stdout (it printed into the stream ``--json -`` sends to stderr)."""
    from tokenwire.daemon.cli import save_json

    save_json(path or "-", doc, indent=None if compact else 2)  # NaN (a metric not measured) as null
    if path and path != "-":
        print(f"wrote {path}", file=sys.stderr)


def _bench_tokens(text: str) -> int:
    """``type=`` of ``kv bench --tokens``: at most the format's chunk (``bitstream.MAX_TOKENS``). Past it the
    encoder refused the chunk only after the quantizer and both coders' phases had run on it (32.7 s and 3.4 GB
    for 2 layers of 32,769 tokens; the default geometry's 10 GB of fp32 first)."""
    from tokenwire.daemon.cli import positive_int

    from .bitstream import MAX_TOKENS

    value = positive_int(text)
    if value > MAX_TOKENS:
        raise argparse.ArgumentTypeError(f"a chunk holds at most {MAX_TOKENS} tokens, got {text!r}")
    return value


def _read_text(path: str) -> str:
    """A text file as UTF-8; an undecodable one is an ``OSError`` naming the byte, like an unreadable one (it
    was a UnicodeDecodeError traceback)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise OSError(f"not UTF-8 text (byte {exc.start})") from None


def _write_partial(path: str | None, exc: Interrupted, what: str, compact: bool = False) -> int:
    """Ctrl-C mid-run (``evaluate.Interrupted``): write what was measured, marked ``"interrupted": true``, and
    exit as an interrupt does (130).

    Called inside both the ``with sigterm_as_ctrl_c()`` and the ``except Interrupted`` block: while an interrupt
    is being handled there, a repeat (``timeout``'s second SIGTERM, the handler's own retry 0.5 s later, a second
    Ctrl-C) is ignored. Called after the ``with``, SIGTERM was back at its default and a second one killed the
    process before or during the write; and the calibration's profile, built after its interrupt was handled,
    was cut by the repeat: no ``.partial`` in 2 of 4 runs under ``timeout -s TERM``."""
    _write_json(path, exc.doc, compact=compact)
    print(f"interrupted: wrote {what} measured so far", file=sys.stderr)
    return 130


def _read_error(path: str, exc: OSError) -> Exception:
    """``--text``'s read error: the system's words alone ("cannot read /x: No such file or directory"); the
    exception's text repeated the path as "[Errno 2] No such file or directory: '/x'"."""
    return _cli_error(f"cannot read {path}: {exc.strerror or exc}")


def _cli_error(msg: str) -> Exception:
    from tokenwire.daemon.cli import CLIError

    return CLIError(msg)


def _score_tokens(text: str) -> int:
    """``type=`` of ``kv eval --score``: perplexity scores tokens 2..n (each predicted by the one before), so
    one scored token gave a NaN perplexity."""
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected at least 2 scored tokens (perplexity needs a token after "
                                         f"the first), got {text!r}")
    return value


def _check_levels(levels: list[str]) -> None:
    """Each ``--levels`` entry parsed as ``run_eval`` will (``get_level``), before the model loads: ``code=64``
    (past the step codes) or ``code=abc`` failed after the load, the prefill and the levels before it, with no
    JSON written."""
    from .errors import InvalidInput
    from .levels import TEXT, get_level

    for name in levels:
        if name == TEXT:
            continue
        try:
            get_level(name)
        except InvalidInput as exc:
            raise _cli_error(f"--levels {name}: {exc}") from None


def _eval(args: argparse.Namespace) -> int:
    from tokenwire.testbed.cli import sigterm_as_ctrl_c

    from .errors import KVCodecError

    try:
        text = _read_text(args.text)
    except OSError as exc:
        raise _read_error(args.text, exc) from exc
    levels = [s for s in args.levels.split(",") if s]
    _check_levels(levels)
    import torch

    from .evaluate import Interrupted, run_eval
    from .smollm import ModelUnavailable

    torch.set_num_threads(args.threads)
    try:
        with sigterm_as_ctrl_c():  # a kill or a CI timeout writes what was measured, as Ctrl-C does
            try:
                doc = run_eval(text, args.prefix, levels, chunk_tokens=args.chunk_tokens, n_score=args.score,
                               backend=args.backend)
            except Interrupted as exc:  # written inside both: see _write_partial
                return _write_partial(args.json, exc, f"the {len(exc.doc['levels'])} of {len(levels)} levels")
    except ModelUnavailable as exc:
        raise _cli_error(str(exc)) from exc
    except (ValueError, KVCodecError) as exc:
        raise _cli_error(str(exc)) from exc
    _write_json(args.json, doc)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import run_bench
    from .errors import InvalidInput, KVCodecError
    from .levels import get_level

    try:  # first: "code=99" was refused after the "[kv bench] synthetic: ..." line (with --text, the model's load)
        get_level(args.level)
    except InvalidInput as exc:
        raise _cli_error(f"--level {args.level}: {exc}") from None
    geometry = {k: v for k, v in (("layers", args.layers), ("heads", args.heads), ("head_dim", args.head_dim))
                if v is not None}
    text = None
    if args.text:
        if geometry:  # they were ignored: the chunk of --text has the model's own geometry
            flags = ", ".join(f"--{k.replace('_', '-')}" for k in geometry)
            raise _cli_error(f"{flags}: the synthetic chunk's geometry; with --text the chunk is SmolLM2's real KV, "
                             "with the model's own layers, heads and head dim")
        try:
            text = _read_text(args.text)
        except OSError as exc:
            raise _read_error(args.text, exc) from exc
    import torch

    from tokenwire.testbed.cli import sigterm_as_ctrl_c

    torch.set_num_threads(args.threads)
    try:
        # SIGTERM or SIGHUP (a kill, a CI timeout, a closed terminal) takes Ctrl-C's path, "interrupted" and exit
        # 130, as the other benches do: it died without a word with 143 (129)
        with sigterm_as_ctrl_c():
            doc = run_bench(device=args.device, tokens=args.tokens, level=args.level, repeats=args.repeats,
                            text=text, **geometry)
    except (RuntimeError, ValueError, KVCodecError) as exc:
        raise _cli_error(str(exc)) from exc
    _write_json(args.json, doc)
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from tokenwire.testbed.cli import sigterm_as_ctrl_c

    from .evaluate import Interrupted, calibrate
    from .quant import MAX_STEP_CODE

    if abs(args.key_bias) > MAX_STEP_CODE:  # every key channel's step code would sit at a bound
        raise _cli_error(f"--key-bias must be within +-{MAX_STEP_CODE} step codes, got {args.key_bias}")
    try:
        text = _read_text(args.text)
    except OSError as exc:
        raise _read_error(args.text, exc) from exc
    import torch

    torch.set_num_threads(args.threads)
    from .smollm import ModelUnavailable

    try:
        with sigterm_as_ctrl_c():  # a kill or a CI timeout writes the .partial profile, as Ctrl-C does
            try:
                doc = calibrate(text, args.prefix, n_score=args.score, samples=args.samples,
                                key_bias=args.key_bias, with_sensitivity=args.with_sensitivity)
            except Interrupted as exc:  # written inside both: see _write_partial
                # next to --json, not over it: the command in docs/kv_codec.md writes the shipped profile
                used = exc.doc["calibration"]["fisher_samples"]
                path = f"{args.json}.partial" if args.json and args.json != "-" else args.json
                return _write_partial(path, exc, f"a profile from the {used} of {args.samples} samples",
                                      compact=True)
    except (ModelUnavailable, ValueError) as exc:  # e.g. a text shorter than --prefix + --score
        raise _cli_error(str(exc)) from exc
    _write_json(args.json, doc, compact=True)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    # counts are checked by argparse, before torch or the model loads: torch's own message for --threads 0 was
    # a traceback, --repeats 0 ended in "no median for empty data", calibrate --samples 0 wrote NaN offsets
    from tokenwire.daemon.cli import positive_int

    parser = sub.add_parser(
        "kv", help="KV-cache codec: quality eval, throughput bench, calibration",
        description="Measure the KV-cache codec (docs/kv_codec.md): its size and quality on the real SmolLM2-135M, "
        "its entropy coder's throughput, and the per-model step profile it quantizes with. Needs the ml extras; "
        "eval and calibrate also the kv-eval extras and the model.",
    )
    kv_sub = parser.add_subparsers(dest="kv_command", metavar="KV_COMMAND")
    kv_sub.required = True

    ev = kv_sub.add_parser(
        "eval", help="size and quality of each level on the real SmolLM2-135M",
        description="Computes the KV of a text's first --prefix tokens, replaces it by its encoded-then-decoded "
        "version at each level, and scores the next --score tokens against the exact KV: bits per element, top-1 "
        "agreement, KL divergence and perplexity, with fp16, int8 and LMCache's default configuration as "
        "baselines in the same run. The report is JSON; Ctrl-C writes the levels measured so far.",
    )
    ev.add_argument("--text", required=True, help="plain-text file (ordinary English)")
    ev.add_argument("--prefix", type=positive_int, default=1024, help="tokens whose KV is encoded (default: 1024)")
    ev.add_argument("--score", type=_score_tokens, default=256,
                    help="tokens scored after the prefix, at least 2 (default: 256)")
    ev.add_argument("--levels", default="low,medium,high",
                    help="comma list: ladder names, code=N (custom step code), or text (the fallback)")
    ev.add_argument("--chunk-tokens", type=positive_int, default=256, help="tokens per chunk (default: 256)")
    ev.add_argument("--backend", choices=("auto", "numba", "torch"), default="auto",
                    help="the entropy coder's implementation: numba (the CPU coder) or torch (the same bytes in torch "
                    "ops); auto takes numba here, as the KV is on the CPU")
    ev.add_argument("--threads", type=positive_int, default=2, help="torch threads (default: 2)")
    ev.add_argument("--json", help="write the report here (default: stdout)")
    ev.set_defaults(handler=_eval)

    be = kv_sub.add_parser(
        "bench", help="entropy-coder throughput vs zstd-1 on the same symbols",
        description="Times the codec's rANS entropy coder against zstd-1 on the same quantized symbols, encode and "
        "decode in MB/s, and the whole chunk pipeline (quantize + code, and back) in elements per second, on a "
        "synthetic chunk (a Llama-3-8B 256-token chunk by default) or SmolLM2's real KV of a text. Medians of "
        "--repeats in one process; the JSON keeps every run and the host's load.",
    )
    be.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the codec runs")
    # no defaults here: given with --text, which has a geometry of its own, they are refused (run_bench's: 32 x 8 x 128)
    be.add_argument("--layers", type=positive_int,
                    help="layers of the synthetic chunk (default: 32, a Llama-3-8B 256-token chunk)")
    be.add_argument("--heads", type=positive_int, help="KV heads of the synthetic chunk (default: 8)")
    be.add_argument("--head-dim", type=positive_int, help="channels per head of the synthetic chunk (default: 128)")
    be.add_argument("--tokens", type=_bench_tokens, default=256, help="tokens in the chunk (at most 32768)")
    be.add_argument("--level", default="medium", help="the quality level encoded (a ladder name, or code=N)")
    be.add_argument("--repeats", type=positive_int, default=7, help="timed runs (the median is reported)")
    be.add_argument("--text", help="use SmolLM2's real KV of this text instead of a synthetic chunk")
    be.add_argument("--threads", type=positive_int, default=2, help="torch threads (default: 2)")
    be.add_argument("--json", help="write the report here (default: stdout)")
    be.set_defaults(handler=_bench)

    ca = kv_sub.add_parser(
        "calibrate", help="measure per-head sensitivity and write a step profile",
        description="Estimates how much each KV channel of SmolLM2-135M matters (Fisher sensitivity over "
        "--samples backward passes on a text) and writes the step profile the encoder quantizes with: per-channel "
        "step-code offsets, finer steps where the model is sensitive. Decoders never need it. Takes minutes; "
        "Ctrl-C after the first sample writes a profile of the samples taken, to FILE.partial beside --json FILE.",
    )
    ca.add_argument("--text", required=True, help="plain-text file (ordinary English)")
    ca.add_argument("--prefix", type=positive_int, default=1024, help="tokens whose KV is measured")
    ca.add_argument("--score", type=positive_int, default=256, help="tokens scored after the prefix")
    ca.add_argument("--samples", type=positive_int, default=64, help="Fisher label samples (backward passes)")
    ca.add_argument("--threads", type=positive_int, default=2, help="torch threads")
    ca.add_argument("--key-bias", type=int, default=3, help="step codes added to key channels (default: 3)")
    ca.add_argument("--with-sensitivity", action="store_true", help="also write the raw sensitivities")
    ca.add_argument("--json", help="write the profile here (default: stdout)")
    ca.set_defaults(handler=_calibrate)
