"""The README's two opening commands stay true: CI runs exactly its test command, and the demo command exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _opening_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line.split("#")[0].strip() for line in block.strip().splitlines()]


def test_readme_opens_with_demo_and_test_commands():
    demo, tests = _opening_commands()
    assert demo.startswith("bash setup.sh && ") and "mergeedit run recipes/demo.yaml" in demo
    assert (ROOT / "recipes" / "demo.yaml").is_file()
    assert tests.startswith("bash setup.sh && ") and "pytest" in tests


def test_ci_runs_the_readme_test_command():
    _, tests = _opening_commands()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert tests in ci_lines


def test_demo_recipe_validates(run_cli):
    result = run_cli("validate", ROOT / "recipes" / "demo.yaml")
    assert result.code == 0, result.stderr
    assert "20 edits" in result.stdout


def test_recipe_schema_file_is_current(run_cli):
    result = run_cli("schema")
    assert result.code == 0
    assert result.stdout == (ROOT / "recipe.schema.json").read_text(), "run: mergeedit schema > recipe.schema.json"


def test_readme_lists_every_merge_method():
    from mergeedit.merging.methods import METHODS

    readme = (ROOT / "README.md").read_text()
    for name in METHODS:
        assert f"| `{name}` |" in readme, name
