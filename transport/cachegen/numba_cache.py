"""Where numba keeps the codec's compiled kernels when the user has not said (``NUMBA_CACHE_DIR``).

``rans`` and ``tables`` compile with ``@njit(cache=True)``. Left to itself, numba writes that cache beside the
module: into site-packages whenever it is writable (a root install, where ``pip uninstall`` then leaves the
``*.nbi``/``*.nbc`` files and their folders behind), else under ``~/.cache/numba``, else it refuses to import
the module at all ("cannot cache function ...: no locator available", a service user whose HOME is
``/nonexistent``). Both modules import this one before numba, so the variable is set before numba reads its
configuration: a per-user folder (``$XDG_CACHE_HOME/tokenwire/numba``, else ``~/.cache/tokenwire/numba``), or,
when no home folder can be written, a private one under the temporary directory. Nothing changes when
``NUMBA_CACHE_DIR`` is already set (the systemd unit sets it) or numba was imported first (the process's own
numba configuration is not ours to change).
"""

from __future__ import annotations

import os
import stat
import sys
import tempfile
from collections.abc import Mapping

VARIABLE = "NUMBA_CACHE_DIR"


def candidates(environ: Mapping[str, str], home: str, tmp: str, uid: int) -> list[tuple[str, bool]]:
    """The folders to try, best first, each with whether it lies in a shared folder (the temporary one); none
    when the user chose one. A relative ``XDG_CACHE_HOME`` is ignored, as the XDG specification says; ``home``
    is ``~`` unexpanded when there is none."""
    if environ.get(VARIABLE):
        return []
    xdg = environ.get("XDG_CACHE_HOME", "")
    base = xdg if os.path.isabs(xdg) else os.path.join(home, ".cache")
    own = [(os.path.join(base, "tokenwire", "numba"), False)] if os.path.isabs(base) else []
    return [*own, (os.path.join(tmp, f"tokenwire-numba-{uid}"), True)]


def _private(path: str, uid: int) -> bool:
    """``path`` (made 0700 if missing) is a real folder of ``uid``'s that nobody else may write: under a shared
    temporary directory anyone could have made it first, and numba's cache files are pickles it loads."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return False
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == uid and st.st_mode & 0o022 == 0 and os.access(path, os.W_OK)


def _writable(path: str) -> bool:
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def configure() -> str | None:
    """Set ``NUMBA_CACHE_DIR`` for this process (and its children) unless it is set or numba is loaded; returns
    the folder chosen, or None (numba's own choice then stands)."""
    if os.environ.get(VARIABLE) or "numba" in sys.modules:
        return None
    uid = os.geteuid()
    for path, shared in candidates(os.environ, os.path.expanduser("~"), tempfile.gettempdir(), uid):
        if _private(path, uid) if shared else _writable(path):
            os.environ[VARIABLE] = path
            return path
    return None


configure()
