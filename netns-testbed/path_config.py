"""What ``testbed compare`` and ``testbed contention`` configure alike: the emulated path (both directions share its
delay and queue) and the bounds of the demo answers they ask for.

Only the standard library at import time (the testbed CLI's rule): the emulator and the daemon's bounds are
imported when asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .emulator import EmulatorConfig

GO_SETTLE_S = 0.5
"""With several chats, seconds between the last handshake's completion and "go" (at least four one-way delays), and
again while a direction of the emulated path still queues: the 30 handshakes of a 1-Mbit/s run left ~300 ms of their
packets queued up, and every request waited behind them (TTFT ~570 ms instead of ~250). ``sim --chats`` and ``testbed
contention`` both wait so (:func:`.contention.settle`): N handshakes at once are not what they measure."""
START_MODES = ("settled", "connected")
"""When the answers of several chats start (``--start`` of ``testbed contention`` and ``sim``): ``settled`` after the
wait above, ``connected`` as soon as every chat is connected, behind the handshakes' packets (a flash crowd)."""


@dataclass
class PathConfig:
    down_trace: str
    up_trace: str
    delay_ms: float = 50.0
    loss: str = "none"
    up_loss: str = "none"
    queue: str = "droptail:packets=1000"

    def emulator_config(self, seed: int, log_path: str | None) -> EmulatorConfig:
        from .emulator import DirectionConfig, EmulatorConfig

        return EmulatorConfig(
            down=DirectionConfig(self.down_trace, self.delay_ms, self.loss, self.queue),
            up=DirectionConfig(self.up_trace, self.delay_ms, self.up_loss, self.queue),
            seed=seed,
            log_path=log_path,
        )

    def validate_path(self) -> None:
        """The delay, then each direction as the emulator checks it (trace, loss and queue specs)."""
        if self.delay_ms < 0:
            raise ValueError("--delay-ms must be >= 0")
        emu = self.emulator_config(0, None)
        emu.down.validate()
        emu.up.validate()


def check_schemes(schemes: list[str], allowed: tuple[str, ...] | list[str]) -> None:
    """``--schemes``: known ones, at least one, none listed twice (the summary is keyed by scheme: a second listing
    ran it again and averaged both runs)."""
    unknown = [s for s in schemes if s not in allowed]
    if unknown or not schemes:
        raise ValueError(f"--schemes: unknown scheme(s) {unknown}; choose from {', '.join(allowed)}")
    from tokenwire.daemon.cli import repeated

    twice = sorted(repeated(schemes))
    if twice:
        raise ValueError(f"--schemes: {', '.join(twice)} listed twice")


def check_answers(tokens: int, runs: int, rate: float) -> None:
    """The demo answers' bounds: at least one token and one run, a rate the demo source takes (--rate 1e308 failed
    in the server child as an escaped traceback), and at most the daemon's bound on an answer (the endpoint builds
    the whole answer first: 2e9 tokens grew ~0.8 GB/s)."""
    from tokenwire.daemon.config import MAX_ANSWER_TOKENS
    from tokenwire.daemon.demo_upstream import rate_problem

    if tokens < 1 or runs < 1:
        raise ValueError("--tokens and --runs must be >= 1")
    problem = rate_problem(rate, f"--rate {rate:g}")
    if problem:
        raise ValueError(problem)
    if tokens > MAX_ANSWER_TOKENS:
        raise ValueError(f"--tokens {tokens}: at most {MAX_ANSWER_TOKENS} (the daemon's bound on an answer)")
