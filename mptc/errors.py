"""Compiler-grade errors: `file:line:col: error: message`, the source line, a caret, a hint."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Source:
    """The text of one spec file, kept so errors can quote it."""

    name: str
    text: str

    def line(self, n: int) -> str:
        """Line `n` (1-based), counted at line feeds as the parser counts them, without its line break."""
        lines = self.text.split("\n")
        return lines[n - 1].rstrip("\r") if 0 < n <= len(lines) else ""


@dataclass(frozen=True)
class Span:
    """A region of a source file; 1-based line and column, end exclusive."""

    line: int
    col: int
    end_line: int
    end_col: int
    source: Source | None = field(default=None, compare=False, repr=False)

    @property
    def file(self) -> str:
        return self.source.name if self.source else "<spec>"


class MptcError(Exception):
    """Any error caused by user input. The CLI prints it and exits 1."""

    def __init__(self, message: str, span: Span | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.span = span
        self.hint = hint

    @property
    def line(self) -> int | None:
        return self.span.line if self.span else None

    @property
    def col(self) -> int | None:
        return self.span.col if self.span else None

    def render(self) -> str:
        if self.span is None:
            head = f"error: {self.message}"
            return head + (f"\n  hint: {self.hint}" if self.hint else "")
        s = self.span
        out = [f"{s.file}:{s.line}:{s.col}: error: {self.message}"]
        if s.source is not None:
            text = s.source.line(s.line)
            width = (s.end_col - s.col) if s.end_line == s.line else len(text) - s.col + 1
            out.append(f"  {text}")
            pad = "".join(c if c == "\t" else " " for c in text[: s.col - 1])  # tabs kept, so the caret lines up
            out.append("  " + pad.ljust(s.col - 1) + "^" + "~" * max(0, width - 1))
        if self.hint:
            out.append(f"  hint: {self.hint}")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.render()


class SpecError(MptcError):
    """An error located in a spec file."""


def suggest(word: str, choices: list[str] | tuple[str, ...]) -> str | None:
    """`did you mean 'x'?` for a misspelt name, or None."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None


def one_of(choices: list[str] | tuple[str, ...]) -> str:
    return "expected one of: " + ", ".join(choices)
