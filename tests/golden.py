"""Golden files: compare rendered text with a checked-in file, fail with a unified diff.

A reviewer reads a change of behaviour as a diff of the golden file in the same commit.
Set SMTP_GATE_REGENERATE=1 to rewrite the files from the current output instead.
"""

import difflib
import os
from pathlib import Path

import pytest

REGENERATE_ENV = "SMTP_GATE_REGENERATE"


def regenerating() -> bool:
    return os.environ.get(REGENERATE_ENV, "") not in ("", "0")


def assert_golden(path: Path, actual: str) -> None:
    """Fail unless PATH holds exactly ACTUAL; with SMTP_GATE_REGENERATE=1, write it instead."""
    path = Path(path)
    if regenerating():
        if not path.exists() or path.read_text(encoding="utf-8") != actual:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", encoding="utf-8", newline="\n") as out:
                out.write(actual)
        return
    if not path.exists():
        pytest.fail(f"golden file {path} is missing: run the tests with {REGENERATE_ENV}=1 to create it", pytrace=False)
    expected = path.read_text(encoding="utf-8")
    if expected != actual:
        diff = difflib.unified_diff(
            expected.splitlines(keepends=True),
            actual.splitlines(keepends=True),
            fromfile=f"{path} (golden)",
            tofile="actual",
        )
        pytest.fail(
            f"output differs from {path} ({REGENERATE_ENV}=1 rewrites it if the change is intended):\n"
            + "".join(diff),
            pytrace=False,
        )
