"""Times hook calls from inside the hypervisor namespace (run there by bench_hook.py), so that
`ip netns exec` is not part of any figure.  Each hook runs as libvirt runs it: the
executable itself, argv `name op sub -`, the domain XML on stdin, libvirt's environment
(LC_ALL, PATH, HOME) plus SMTP_GATE_CONFIG, no PYTHONDONTWRITEBYTECODE.

Reads a JSON spec on stdin, prints JSON results on stdout.
"""

import json
import subprocess
import sys
import time
from typing import Dict, List


def call(argv: List[str], xml: bytes, env: Dict[str, str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(argv, input=xml, capture_output=True, env=env, timeout=60)
    elapsed = time.perf_counter() - start
    if result.returncode != 0 or result.stdout:
        raise SystemExit(f"{argv[1:4]} exited {result.returncode}, stdout {result.stdout[:200]!r}")
    if b"failed" in result.stderr or b"cannot" in result.stderr or b"Traceback" in result.stderr:
        raise SystemExit(f"{argv[1:4]} reported an error: {result.stderr.decode(errors='replace')[:600]}")
    return elapsed


def allowed_listing() -> str:
    result = subprocess.run(["nft", "list", "set", "bridge", "smtp_gate", "allowed"], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"nft list set failed: {result.stderr}")
    return result.stdout


def main() -> int:
    spec = json.load(sys.stdin)
    env = spec["env"]
    name = spec["name"]
    start_xml = spec["start_xml"].encode()
    stop_xml = spec["stop_xml"].encode()
    mode = spec["mode"]
    out: Dict[str, object] = {}
    if mode == "cycles":
        hook = spec["hook"]
        ops = [("prepare begin", start_xml), ("start begin", start_xml), ("reconnect begin", start_xml),
               ("stopped end", stop_xml)]
        times: Dict[str, List[float]] = {op: [] for op, _ in ops}
        times["bare"] = []
        for n in range(spec["iterations"]):
            times["bare"].append(call([spec["python"], "-c", "pass"], b"", env))
            for op, xml in ops:
                times[op].append(call([hook, name, *op.split(), "-"], xml, env))
                if n == 0 and op == "start begin" and spec["mac"] not in allowed_listing():
                    raise SystemExit("start begin did not add the guest's allowance")
                if n == 0 and op == "stopped end" and spec["mac"] in allowed_listing():
                    raise SystemExit("stopped end did not remove the guest's allowance")
        out["times"] = times
    elif mode == "cold":
        # HOOKS: fresh copies of the application without bytecode; the first call compiles
        first, second = [], []
        for hook in spec["hooks"]:
            first.append(call([hook, name, "start", "begin", "-"], start_xml, env))
            call([hook, name, "stopped", "end", "-"], stop_xml, env)
            second.append(call([hook, name, "start", "begin", "-"], start_xml, env))
            call([hook, name, "stopped", "end", "-"], stop_xml, env)
        out["first"], out["second"] = first, second
    elif mode == "importtime":
        res = {}
        for label, argv, xml in (
            ("hook", [spec["python"], "-X", "importtime", spec["hook"], name, "start", "begin", "-"], start_xml),
            ("bare", [spec["python"], "-X", "importtime", "-c", "pass"], b""),
        ):
            result = subprocess.run(argv, input=xml, capture_output=True, env=env, timeout=60)
            if result.returncode != 0:
                raise SystemExit(f"importtime run exited {result.returncode}")
            res[label] = [l for l in result.stderr.decode(errors="replace").splitlines() if l.startswith("import time:")]
        call([spec["hook"], name, "stopped", "end", "-"], stop_xml, env)
        out["importtime"] = res
    elif mode == "profile":
        argv = [spec["python"], "-m", "cProfile", "-o", spec["profile_out"], spec["hook"], name, "start", "begin", "-"]
        result = subprocess.run(argv, input=start_xml, capture_output=True, env=env, timeout=60)
        if result.returncode != 0:
            raise SystemExit(f"profiled hook exited {result.returncode}: {result.stderr[-400:]!r}")
        call([spec["hook"], name, "stopped", "end", "-"], stop_xml, env)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
