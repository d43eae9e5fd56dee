"""pytest plugin: with SMTP_GATE_REQUIRE_ALL=1 (what .ci/run sets) a skip is a failure.

Every skipped test is reported as FAILED with its skip reason; a module that skips as a
whole is listed with its reason at the end and makes the session fail (exit 1).  No test is exempt: every skip in
this suite means "not root", "a tool is missing" or "a kernel feature is missing", and each
of those is something ./test.sh installs or a CI machine must have, so a skip in CI is a
test that silently did not run.  (xfail is not a skip and is left alone.)

Loaded by tests/conftest.py; tests/test_ci.py runs it on a small suite of its own.
"""

import os
from typing import Any, Iterator, List

import pytest

REQUIRE_ALL_ENV = "SMTP_GATE_REQUIRE_ALL"


def require_all() -> bool:
    return os.environ.get(REQUIRE_ALL_ENV, "") not in ("", "0")


def _reason(longrepr: object) -> str:
    # a skip's longrepr is (file, line, "Skipped: reason")
    text = str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return text[len("Skipped: "):] if text.startswith("Skipped: ") else text


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.skipped and require_all() and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped: {_reason(report.longrepr)} ({REQUIRE_ALL_ENV}=1: a skip is a failure)"


_skipped_modules: List[str] = []


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.skipped and require_all():
        _skipped_modules.append(f"{report.nodeid}: {_reason(report.longrepr)}")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _skipped_modules:
        terminalreporter.section(f"{REQUIRE_ALL_ENV}=1: modules that skipped (a failure)", red=True)
        for line in _skipped_modules:
            terminalreporter.line(line)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # a module that skipped as a whole is not a test report that could fail; it fails the session
    # (after the other modules ran, rather than interrupting them as a collection error would)
    if _skipped_modules and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_report_header(config: pytest.Config) -> str:
    return (f"{REQUIRE_ALL_ENV}=1: a skipped test fails" if require_all()
            else f"{REQUIRE_ALL_ENV} unset: tests may skip (.ci/run sets it)")
