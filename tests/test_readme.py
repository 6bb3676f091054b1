"""The README's first example is real code: it runs and its queued listener runs (embedded default)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_on_the_embedded_default(tmp_path, monkeypatch):
    """The example dispatches, and the mailer runs after dispatch returned, without a broker."""
    source = re.search(r"```python\n(# blog_events.py\n.*?)```", README.read_text(), re.DOTALL)
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
