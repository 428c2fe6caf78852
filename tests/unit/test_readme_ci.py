"""README's two set-up commands are exactly what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"<!-- (install|test|browser) -->\s*```bash\n(.*?)\n```", text, flags=re.S)
    return [cmd.strip() for _, cmd in blocks]


def test_readme_has_the_two_commands_and_ci_runs_them_verbatim() -> None:
    commands = _readme_commands()
    assert len(commands) == 3, "README.md must mark the install, test and browser commands"
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    for command in commands:
        assert command in ci, f"CI does not run the README command: {command}"
    assert "torch==2.13.0" in commands[0], "pin torch so pip takes the local CPU wheel"
    assert "chromium" in commands[2]
