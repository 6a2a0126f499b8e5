"""Where in a TOML file a setting is written, so that a validation error can name the line.

tomllib returns plain dicts without positions, and config.py validates those: an error named the setting
(``upstreams[2].base_url``) but not its line, which in a long file with several ``[[upstreams]]`` tables left the
operator counting tables. No maintained TOML library reports positions (tomlkit keeps the text for round trips, not
line numbers), so this module scans the text itself: table headers and key assignments at the start of a statement,
with strings, comments and multi-line arrays skipped. It runs only on text tomllib has already accepted, so it can
assume valid TOML; anything it cannot place gets no line rather than a wrong one.
"""
from __future__ import annotations

import re
import tomllib

__all__ = ["error_line", "setting_lines"]

Key = tuple[str | int, ...]
_BARE = re.compile(r"[A-Za-z0-9_-]+")
# the setting a config.py message starts with: "limits.x: ...", "auth.tokens[3].sha256: ...", "upstreams[0]: ..."
_ERROR_KEY = re.compile(r"([A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+|\[\d+\])*): ")


class _Scanner:
    """A cursor over the text that skips what a statement's start cannot be: strings, comments, values."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.i = 0
        self.line = 1

    def peek(self, k: int = 1) -> str:
        return self.text[self.i:self.i + k]

    def skip_blank(self) -> None:
        """Spaces and tabs only: a newline ends a statement."""
        while self.peek() in (" ", "\t"):
            self.i += 1

    def skip_to_line_end(self) -> None:
        end = self.text.find("\n", self.i)
        self.i = len(self.text) if end < 0 else end

    def skip_string(self) -> str:
        """Past one string at the cursor; returns its raw text (quotes included) for tomllib to decode."""
        start, q = self.i, self.peek()
        if self.peek(3) == q * 3:  # multi-line: ends at the last three of a run of 3-5 quotes
            self.i += 3
            while self.i < len(self.text):
                c = self.text[self.i]
                if c == "\\" and q == '"':
                    self.i += 2
                    continue
                if self.peek(3) == q * 3:
                    run = 3
                    while run < 5 and self.text[self.i + run:self.i + run + 1] == q:
                        run += 1
                    self.i += run
                    break
                self.i += 1
        else:
            self.i += 1
            while self.i < len(self.text) and self.text[self.i] not in (q, "\n"):
                self.i += 2 if self.text[self.i] == "\\" and q == '"' else 1
            self.i += 1
        raw = self.text[start:self.i]
        self.line += raw.count("\n")
        return raw

    def read_key(self) -> list[str] | None:
        """A dotted key (bare or quoted parts) at the cursor, or None if there is none."""
        parts: list[str] = []
        while True:
            self.skip_blank()
            c = self.peek()
            if c in ('"', "'"):
                raw = self.skip_string()
                try:
                    parts.append(tomllib.loads(f"k = {raw}")["k"])
                except tomllib.TOMLDecodeError:
                    return None
            else:
                m = _BARE.match(self.text, self.i)
                if m is None:
                    return None
                parts.append(m.group())
                self.i = m.end()
            self.skip_blank()
            if self.peek() != ".":
                return parts
            self.i += 1

    def skip_value(self) -> None:
        """Past a value up to the end of its statement: arrays may span lines, strings may hold brackets."""
        depth = 0
        while self.i < len(self.text):
            c = self.text[self.i]
            if c in ('"', "'"):
                self.skip_string()
                continue
            if c == "#":
                self.skip_to_line_end()
                continue
            if c == "\n":
                if depth == 0:
                    return
                self.line += 1
            elif c in "[{":
                depth += 1
            elif c in "]}":
                depth -= 1
            self.i += 1


def setting_lines(text: str) -> dict[Key, int]:
    """Each table and key the file writes, as a path (``("upstreams", 1, "models")`` for ``[upstreams.models]``
    under the second ``[[upstreams]]``), mapped to the 1-based line where it is first written."""
    lines: dict[Key, int] = {}
    arrays: dict[Key, int] = {}  # arrays of tables: how many [[...]] entries so far
    table: Key = ()
    s = _Scanner(text)

    def resolve(parts: list[str]) -> Key:
        """A header's parts with the index of the newest entry after each array of tables on the way."""
        path: Key = ()
        for part in parts:
            path += (part,)
            if path in arrays:
                path += (arrays[path] - 1,)
        return path

    while s.i < len(s.text):
        s.skip_blank()
        c = s.peek()
        if c == "\n":
            s.i += 1
            s.line += 1
            continue
        if c == "#" or c == "\r":
            s.skip_to_line_end()
            continue
        if c == "[":
            double = s.peek(2) == "[["
            s.i += 2 if double else 1
            parts = s.read_key()
            if parts is None:
                return lines  # not the TOML this expects: stop rather than guess
            if double:
                parent = (*resolve(parts[:-1]), parts[-1])
                arrays[parent] = arrays.get(parent, 0) + 1
                lines.setdefault(parent, s.line)
                table = (*parent, arrays[parent] - 1)
            else:
                table = resolve(parts)
            lines.setdefault(table, s.line)
            s.skip_to_line_end()
            continue
        parts = s.read_key()
        if parts is None or s.peek() != "=":
            return lines
        line = s.line
        for k in range(1, len(parts) + 1):  # a.b = 1 writes the table a on this line too
            lines.setdefault(table + tuple(parts[:k]), line)
        s.i += 1
        s.skip_value()
    return lines


def _error_key(message: str) -> Key | None:
    m = _ERROR_KEY.match(message)
    if m is None:
        return None
    path: Key = ()
    for part in re.findall(r"[A-Za-z0-9_-]+|\[\d+\]", m.group(1)):
        path += (int(part[1:-1]),) if part.startswith("[") else (part,)
    return path


def error_line(text: str, message: str) -> int | None:
    """The line of the setting a validation message starts with, or of the nearest table above it that the file
    writes (a required key left out points at its table); None when the message names no setting the file has."""
    key = _error_key(message)
    if key is None:
        return None
    lines = setting_lines(text)
    for k in range(len(key), 0, -1):
        if key[:k] in lines:
            return lines[key[:k]]
    return None
