"""``testbed contention`` starts its answers once the path's queues carried the handshakes away, as ``sim --chats``
does (contention.settle): started behind 40 handshakes' packets, every server learned its minimum round trip inside
the queue, and the runs measured that startup burst rather than the link's sharing."""

from __future__ import annotations

from typing import Any

from tokenwire.testbed.contention import SETTLE_MAX_S, settle
from tokenwire.testbed.path_config import GO_SETTLE_S


class _Path:
    """The emulator's ``stats`` on a fake clock: each direction's backlog as a function of the time."""

    def __init__(self, down_until: float, up_until: float = 0.0) -> None:
        self.now = 0.0
        self.down_until, self.up_until = down_until, up_until
        self.asked = 0

    def sleep(self, s: float) -> None:
        self.now += s

    def stats(self) -> dict[str, Any]:
        self.asked += 1
        return {"down": {"backlog": 3 if self.now < self.down_until else 0},
                "up": {"backlog": 2 if self.now < self.up_until else 0}}


def test_an_empty_path_goes_after_the_settling_time() -> None:
    path = _Path(down_until=0.0)
    waited = settle(path.stats, 40.0, cross=False, sleep=path.sleep, clock=lambda: path.now)
    assert waited == GO_SETTLE_S and path.asked == 1


def test_the_answers_wait_while_either_direction_still_queues() -> None:
    path = _Path(down_until=1.2, up_until=2.3)
    waited = settle(path.stats, 40.0, cross=False, sleep=path.sleep, clock=lambda: path.now)
    assert waited is not None and 2.3 <= waited < 2.3 + GO_SETTLE_S + 1e-9
    path = _Path(down_until=0.0, up_until=0.0)  # (a long path settles at least four one-way delays)
    assert settle(path.stats, 300.0, cross=False, sleep=path.sleep, clock=lambda: path.now) == 1.2


def test_a_queue_that_never_empties_starts_anyway_and_says_so() -> None:
    path = _Path(down_until=1e9)
    assert settle(path.stats, 40.0, cross=False, sleep=path.sleep, clock=lambda: path.now) is None
    assert path.now <= SETTLE_MAX_S


def test_cross_traffic_keeps_its_queue_so_only_the_settling_time_counts() -> None:
    path = _Path(down_until=1e9)
    assert settle(path.stats, 40.0, cross=True, sleep=path.sleep, clock=lambda: path.now) == GO_SETTLE_S
    assert path.asked == 0


def test_stats_without_a_backlog_count_as_empty() -> None:
    """The kernel backend's stats carry no backlog: nothing to wait for."""
    now = [0.0]
    assert settle(lambda: {"backend": "kernel"}, 40.0, cross=False, sleep=lambda s: now.__setitem__(0, now[0] + s),
                  clock=lambda: now[0]) == GO_SETTLE_S


def test_start_connected_is_the_flash_crowd_and_an_unknown_start_is_refused() -> None:
    import pytest

    from tokenwire.daemon.cli import build_parser
    from tokenwire.testbed.contention import ContentionConfig, config_from_args

    base = ["testbed", "contention", "--down-trace", "1mbps", "--chats", "3"]
    assert config_from_args(build_parser().parse_args(base)).start == "settled"
    assert config_from_args(build_parser().parse_args([*base, "--start", "connected"])).start == "connected"
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--start", "later"])
    with pytest.raises(ValueError, match="start 'later': one of settled, connected"):
        ContentionConfig(down_trace="1mbps", up_trace="1mbps", start="later").validate()
