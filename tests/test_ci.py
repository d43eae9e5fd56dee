"""What CI runs and what it counts as a pass: .ci/run runs the README's CI command, a skipped
test fails under SMTP_GATE_REQUIRE_ALL=1, and pytest's "no tests collected" fails CI.  And
what the suite does not inherit from an operator's shell ($SMTP_GATE_CONFIG).

The switch is exercised on a small suite of its own in a subprocess (the real plugin,
tests/require_all.py, and a real pytest); .ci/run runs for real against a stand-in test.sh
that records how it was called and exits as told.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict

from tests.require_all import REQUIRE_ALL_ENV

REPO = Path(__file__).resolve().parent.parent

SMALL_SUITE: Dict[str, str] = {
    "test_runs.py": "def test_passes():\n    assert True\n",
    "test_skips.py": "import pytest\n\ndef test_skips():\n    pytest.skip('no frobnicator on this machine')\n\n"
                     "@pytest.mark.xfail(reason='known bug', strict=True)\ndef test_xfails():\n    assert False\n",
    "test_module_skip.py": "import pytest\npytest.skip('whole module: no widget', allow_module_level=True)\n\n"
                           "def test_never():\n    pass\n",
}


def small_suite(tmp_path: Path, require_all: str) -> subprocess.CompletedProcess:
    for name, text in SMALL_SUITE.items():
        (tmp_path / name).write_text(text)
    env = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="300")
    env.pop(REQUIRE_ALL_ENV, None)
    if require_all:
        env[REQUIRE_ALL_ENV] = require_all
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.require_all", "-q", "-rA", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), str(tmp_path)],
                          capture_output=True, text=True, cwd=str(tmp_path), env=env, timeout=120)


def test_without_the_switch_skips_are_skips(tmp_path: Path) -> None:
    for value in ("", "0"):
        r = small_suite(tmp_path, value)
        assert r.returncode == 0, r.stdout + r.stderr
        assert re.search(r"1 passed, 2 skipped, 1 xfailed", r.stdout), r.stdout


def test_with_the_switch_every_skip_fails_with_its_reason(tmp_path: Path) -> None:
    r = small_suite(tmp_path, "1")
    assert r.returncode == 1, r.stdout + r.stderr
    assert re.search(r"FAILED test_skips.py::test_skips - skipped: no frobnicator on this machine \(SMTP_GATE_REQUIRE_ALL=1", r.stdout), r.stdout
    assert re.search(r"modules that skipped.*\n.*test_module_skip.py: .*whole module: no widget", r.stdout), r.stdout
    assert re.search(r"1 failed, 1 passed, 1 skipped, 1 xfailed", r.stdout), r.stdout  # the skip is the module


def fake_checkout(tmp_path: Path, exit_code: int) -> Path:
    """A copy of .ci/run beside a test.sh that records its environment and arguments."""
    root = tmp_path / "checkout"
    (root / ".ci").mkdir(parents=True)
    shutil.copy2(REPO / ".ci" / "run", root / ".ci" / "run")
    (root / "test.sh").write_text(
        "#!/bin/sh\n"
        f'echo "{REQUIRE_ALL_ENV}=${{{REQUIRE_ALL_ENV}:-unset}} args=$# cwd=$PWD" >"$(dirname "$0")/called"\n'
        f"exit {exit_code}\n")
    (root / "test.sh").chmod(0o755)
    return root


def test_ci_run_calls_test_sh_with_the_switch_and_passes_its_verdict_on(tmp_path: Path) -> None:
    for code in (0, 1, 2):
        root = fake_checkout(tmp_path / str(code), code)
        env = {k: v for k, v in os.environ.items() if k != REQUIRE_ALL_ENV}
        r = subprocess.run([str(root / ".ci" / "run")], capture_output=True, text=True, env=env, cwd="/", timeout=60)
        assert r.returncode == code, r.stderr
        assert (root / "called").read_text() == f"{REQUIRE_ALL_ENV}=1 args=0 cwd={root}\n"


def test_ci_run_fails_when_no_test_was_collected(tmp_path: Path) -> None:
    root = fake_checkout(tmp_path, 5)
    r = subprocess.run([str(root / ".ci" / "run")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "collected no tests" in r.stderr


def test_the_readme_states_the_command_ci_runs() -> None:
    script = (REPO / ".ci" / "run").read_text()
    runs = [line.split("||")[0].strip() for line in script.splitlines()
            if "./test.sh" in line and not line.lstrip().startswith("#")]
    assert runs == [f"{REQUIRE_ALL_ENV}=1 ./test.sh"], runs
    readme = (REPO / "README.md").read_text()
    assert f"`{runs[0]}`" in readme, "README must state the exact command .ci/run runs"


def test_the_suite_does_not_pass_an_operators_smtp_gate_config_on(tmp_path: Path) -> None:
    """An operator's shell may export SMTP_GATE_CONFIG (the host's config); tests/conftest.py
    drops it before collection, so neither a module's copy of os.environ nor a CLI a test
    starts sees it.  Without the conftest the same little suite does see it."""
    (tmp_path / "test_env.py").write_text(
        "import os, subprocess, sys\n"
        "AT_IMPORT = dict(os.environ)\n"
        "def test_env():\n"
        "    assert 'SMTP_GATE_CONFIG' not in AT_IMPORT and 'SMTP_GATE_CONFIG' not in os.environ\n"
        "    out = subprocess.run([sys.executable, '-c', 'import os; print(os.environ.get(\"SMTP_GATE_CONFIG\"))'],\n"
        "                         capture_output=True, text=True).stdout\n"
        "    assert out == 'None\\n'\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), SMTP_GATE_CONFIG=str(tmp_path / "host-smtp-gate.conf"))
    env.pop(REQUIRE_ALL_ENV, None)

    def inner(*plugins: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *plugins,
                               "--rootdir", str(tmp_path), str(tmp_path)],
                              capture_output=True, text=True, cwd=str(tmp_path), env=env, timeout=120)

    with_conftest = inner("-p", "tests.conftest")
    assert with_conftest.returncode == 0, with_conftest.stdout + with_conftest.stderr
    assert inner().returncode == 1
