"""The guides' code blocks as a reader copies them, and running them as written.

Every fenced ```bash and ```python block of README.md and docs/*.md is a command someone will paste. The
guide walkthrough (``test_guides_e2e.py``) runs each one in a sandboxed checkout; ``test_guides.py`` checks,
without running anything, that no block is left out. A block is named by its guide and a piece of its
text, so moving a block within a guide changes nothing, and editing its text makes the walkthrough run the
new text.

Placeholders a reader fills in (``<kits>``, ``<id>``, ``/opt/fl/hospital-a``) are replaced literally, from a
table each step passes; a block with a ``<placeholder>`` left over is an error, not a silent no-op.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMAND_LANGUAGES = ("bash", "python")
# A fence may be indented (a block inside a list item); its body is dedented as a reader copies it.
_FENCE = re.compile(r"^([ \t]*)```(\w*)[ \t]*\n(.*?)^[ \t]*```[ \t]*$", re.S | re.M)
_PLACEHOLDER = re.compile(r"<[a-z][a-z ]*>")


@dataclass(frozen=True)
class Block:
    guide: str  # path relative to the repository, e.g. "docs/operator.md"
    line: int  # of the opening fence
    lang: str
    text: str

    def __str__(self) -> str:
        first = self.text.strip().splitlines()[0] if self.text.strip() else ""
        return f"{self.guide}:{self.line} ({self.lang}) {first[:80]}"


def guides() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def all_blocks() -> list[Block]:
    blocks = []
    for path in guides():
        text = path.read_text()
        for m in _FENCE.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            blocks.append(Block(str(path.relative_to(REPO)), line, m.group(2), textwrap.dedent(m.group(3))))
    return blocks


def command_blocks() -> list[Block]:
    return [b for b in all_blocks() if b.lang in COMMAND_LANGUAGES]


def find(guide: str, piece: str) -> Block:
    """The one command block of ``guide`` whose text contains ``piece``, or is exactly ``piece`` when
    several contain it (``make kits`` alone, and a longer block that also runs it)."""
    blocks = [b for b in command_blocks() if b.guide == guide]
    hits = [b for b in blocks if piece in b.text]
    if len(hits) > 1:
        hits = [b for b in hits if b.text.strip() == piece.strip()]
    if len(hits) != 1:
        raise LookupError(f"{guide}: {len(hits)} blocks contain {piece!r}; name a piece of text unique to one block")
    return hits[0]


def fill(text: str, values: dict[str, str], where: Block | str) -> str:
    if values:  # one pass, longest first: a value may contain another placeholder's text
        pattern = "|".join(re.escape(k) for k in sorted(values, key=len, reverse=True))
        text = re.sub(pattern, lambda m: values[m.group(0)], text)
    left = _PLACEHOLDER.findall(text)
    if left:
        raise ValueError(f"{where}: placeholders {left} have no value in this step")
    return text


@dataclass
class Sandbox:
    """A checkout-like folder (``root``) where the guides' commands run as a reader would run them there:
    the repository's ``.venv`` first on ``PATH`` (as after ``source .venv/bin/activate``), ``custom/`` on
    ``PYTHONPATH`` (as ``make`` sets), and ``marker`` in every process's environment so that whatever a
    command leaves running can be found and stopped."""

    root: Path
    env: dict[str, str]
    ran: list[Block]

    @classmethod
    def create(cls, root: Path, marker: tuple[str, str]) -> "Sandbox":
        env = dict(os.environ)
        venv_bin = Path(sys.executable).parent
        env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(venv_bin.parent)
        env["PYTHONPATH"] = str(root / "custom")
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("OMP_NUM_THREADS", "2")
        env.pop("MAKEFLAGS", None)
        env.pop("MFLAGS", None)
        env[marker[0]] = marker[1]
        return cls(root, env, [])

    def run(
        self,
        block: Block,
        values: dict[str, str] | None = None,
        *,
        cwd: Path | None = None,
        stdin: str | None = None,
        timeout: float = 300,
        check: bool = True,
    ) -> subprocess.CompletedProcess:
        """Run ``block`` as written (placeholders filled from ``values``) in ``cwd`` (default the sandbox root)."""
        text = fill(block.text, values or {}, block)
        return self.run_text(block, text, cwd=cwd, stdin=stdin, timeout=timeout, check=check)

    def run_text(self, block: Block, text: str, *, cwd=None, stdin=None, timeout=300.0, check=True):
        """Run ``text``, a part of ``block`` (one line of a block whose later lines need an earlier one's output)."""
        cmd = ["bash", "-eo", "pipefail", "-c", text] if block.lang == "bash" else [sys.executable, "-c", text]
        # Files, not pipes: a command that starts a kit leaves processes holding its output open.
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            code = subprocess.run(
                cmd, cwd=cwd or self.root, env=self.env, input=stdin if stdin is not None else "",
                stdout=out, stderr=err, text=True, timeout=timeout,
            ).returncode  # fmt: skip
            out.seek(0)
            err.seek(0)
            proc = subprocess.CompletedProcess(cmd, code, out.read(), err.read())
        self.ran.append(block)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{block} failed (exit {proc.returncode}) in {cwd or self.root}:\n$ {text}\n"
                f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
            )
        return proc
