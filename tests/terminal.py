"""Child processes started as a terminal starts them, whatever started the test run."""

from __future__ import annotations

import signal


def default_signals() -> None:
    """A ``preexec_fn``: SIGINT and SIGHUP back to their default actions in the child. A run launched in the
    background (``make test &``) passes SIGINT down as ignored, ``nohup`` SIGHUP, and an ignored signal stays
    ignored across exec: Python then installs no KeyboardInterrupt handler, ``tokenwire chat`` rightly leaves a
    SIGHUP ignored under nohup, and the tests of Ctrl-C and hangups hung for their timeouts."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
