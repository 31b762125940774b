"""The README's example blocks, as the tests read them (``tests/test_readme.py`` and the tests
that run a block of it elsewhere).

A block is a fenced code block with a language (```` ```bash ````, ```` ```yaml ````); the line
just above its fence is its note, an HTML comment that says which test runs it
(``<!-- tested: tests/test_readme.py -->``) or why none does (``<!-- not run by the tests: ... -->``).
Output blocks (a fence without a language) are not examples.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
NOTE_RE = re.compile(r"^<!-- (tested: (?P<tests>[^>]+?)|not run by the tests: (?P<why>[^>]+?)) -->$")


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    note: str  # the HTML comment above the fence ("" when there is none)

    @property
    def tested_by(self) -> list[str]:
        m = NOTE_RE.match(self.note)
        return [t.strip() for t in m.group("tests").split(",")] if m and m.group("tests") else []


def blocks(path: Path = README) -> list[Block]:
    lines = path.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(\S*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        if m.group(1):
            prev = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            out.append(Block(i + 1, m.group(1), "\n".join(lines[i + 1:end]), prev if prev.startswith("<!--") else ""))
        i = end + 1
    return out


def commands(block: Block) -> list[list[str]]:
    """The shell commands of a bash block, tokenised: continuation lines joined, comments
    dropped, split at ``&&`` and ``;``; a trailing ``&`` stays as the last token."""
    text = re.sub(r"\\\n\s*", " ", block.text)
    out: list[list[str]] = []
    for line in text.splitlines():
        cur: list[str] = []
        for tok in shlex.split(line, comments=True):
            if tok in ("&&", ";"):
                out.append(cur)
                cur = []
            else:
                cur.append(tok[:-1] if tok.endswith(";") else tok)
        out.append(cur)
    return [c for c in out if c]


def all_commands() -> list[tuple[Block, list[str]]]:
    return [(b, c) for b in blocks() if b.lang == "bash" for c in commands(b)]


def readme_command(prefix: str, exact: bool = False) -> list[str]:
    """The README's first command that starts with ``prefix`` (or, ``exact``, is it), as tokens."""
    want = shlex.split(prefix)
    for _, cmd in all_commands():
        if cmd == want or (not exact and cmd[:len(want)] == want):
            return cmd
    raise AssertionError(f"README.md has no command starting with {prefix!r} any more")
