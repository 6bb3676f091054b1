"""The README's first example is real code: it runs and its queued listener runs (embedded default)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_on_the_embedded_default(tmp_path, monkeypatch):
    """The example dispatches, and the mailer runs after dispatch returned, without a broker."""
    source = re.search(r"```python\n(# blog_events.py\n.*?\n)```\n", README.read_text(), re.DOTALL)
    assert source is not None
    script = tmp_path / "blog_events.py"
    script.write_text(source.group(1))
    monkeypatch.delenv("QUEUEABLE_URL", raising=False)
    result = subprocess.run(  # noqa: S603 - our own interpreter on our own file
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "mailing ann@example.com about post 42\n"
    assert "QUEUEABLE_URL is not set" in result.stderr


def _unclosed_fences(text: str) -> list[int]:
    """Line numbers of code fences that open while another block is still open (a missing closing fence)."""
    problems: list[int] = []
    open_at: int | None = None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped.startswith("```"):
            continue
        if open_at is None:
            open_at = number
        elif stripped == "```":
            open_at = None
        else:  # "```lang" inside a block: the block before it was never closed
            problems.append(open_at)
            open_at = number
    if open_at is not None:
        problems.append(open_at)
    return problems


def test_every_code_block_of_the_docs_is_closed():
    """An unclosed fence renders the rest of a page as code (the README's first example once did)."""
    root = README.parent
    pages = [README, *sorted((root / "docs").glob("*.md"))]
    assert len(pages) > 1
    unclosed = {page.name: lines for page in pages if (lines := _unclosed_fences(page.read_text()))}
    assert unclosed == {}


def test_the_fence_check_finds_a_missing_closing_fence():
    assert _unclosed_fences("```python\nx = 1\n```console\n$ run\n```\n") == [1]
    assert _unclosed_fences("```python\nx = 1\n") == [1]
    assert _unclosed_fences("```python\nx = 1\n```\n\n```console\n$ run\n```\n") == []
