"""Usage mistakes are usage errors: the usage line, the did-you-mean, exit status 2 (never "internal error").

Run through the installed console script (.venv/bin/mergeedit), as a user meets them: typer raises its own copies of
click's exception classes, which an in-process runner catching click's would not notice."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).with_name("mergeedit")


@pytest.mark.skipif(not SCRIPT.is_file(), reason="needs the console script (bash setup.sh installs it)")
@pytest.mark.parametrize(
    "args, usage, message",
    [
        (["mrge"], "Usage: mergeedit [OPTIONS] COMMAND", "No such command 'mrge'. Did you mean 'merge'?"),
        (["merge", "a", "b", "--bogus"], "Usage: mergeedit merge [OPTIONS]", "No such option: --bogus"),
        (["merge", "a", "b", "--memory-budgit", "1G"], "Usage: mergeedit merge [OPTIONS]", "(Possible options: --memory-budget)"),
        (["merge"], "Usage: mergeedit merge [OPTIONS]", "Missing argument 'config'"),
    ],
)
def test_usage_mistakes_print_usage_and_exit_2(args, usage, message):
    result = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert usage in result.stderr and message in result.stderr, result.stderr
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr
