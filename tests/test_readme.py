"""The README's two commands are the project's contract with a newcomer; keep them and CI in sync."""

import re

from conftest import REPO


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)][:2]


def test_ci_runs_exactly_the_readme_test_command():
    setup, test = readme_commands()
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert test in ci_lines
    assert "python -m pip install -q torch==2.13.0" in ci_lines
    assert ci_lines.index("python -m pip install -q torch==2.13.0") < ci_lines.index(test)
    assert setup.startswith("pip install")
