"""Wall time of `smtp-gate selftest`, the command as an operator runs it: it builds its
throwaway lab in network namespaces, applies the real ruleset there, runs every check
(real TCP connections, crafted frames) and tears the lab down.  Median, best and worst of
several runs.  (tests/test_selftest.py checks that it passes and leaves nothing behind; it
asserts nothing about its speed.)

    sudo .venv/bin/python bench/bench_selftest.py [--runs 5]
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import BenchError  # noqa: E402


def one_run(conf: Path) -> float:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "smtp_gate", "--config", str(conf), "selftest"],
                            capture_output=True, text=True, env=common.prod_env(PYTHONPATH=str(common.REPO)),
                            cwd=str(conf.parent), timeout=600)
    took = time.monotonic() - started
    if result.returncode != 0:
        raise BenchError(f"smtp-gate selftest exited {result.returncode}:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="selftests to time (median reported)")
    args = parser.parse_args()
    common.require_root_and_kernel()
    common.install_signal_cleanup()
    common.compile_bytecode()
    times: List[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-selftest-") as tmp:
        conf = Path(tmp) / "smtp-gate.conf"
        conf.write_text("")  # every default: ports 25 and 465, enforce mode
        for _ in range(args.runs):
            times.append(one_run(conf))
    common.emit(common.machine_line() + "\n")
    common.emit(common.table(
        f"bench_selftest: `smtp-gate selftest` wall time (s; {args.runs} runs)",
        ["what", "p50", "best", "worst"],
        [["smtp-gate selftest (default config)", f"{common.median(times):.2f}", f"{min(times):.2f}",
          f"{max(times):.2f}"]],
        notes=["each run builds its lab, runs every check and removes the lab; all checks passed in every run"],
    ))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except common.FAILURES as exc:
        print(f"bench_selftest: error: {exc}", file=sys.stderr)
        sys.exit(1)
