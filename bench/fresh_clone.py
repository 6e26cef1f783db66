"""Time one of the README's two commands on a fresh clone, as a new user or CI runs it: clone this checkout's
HEAD beside ``../shared`` (the offline data mirror), run ``make TARGET`` there (installation and data included), and
write its wall time, the test count (for ``test``) and the machine under results/bench/ (issue 27: the README's
times and counts come from a file).

    python bench/fresh_clone.py test [--env ONEDNN_MAX_CPU_ISA=AVX2 ...] [--keep]
    python bench/fresh_clone.py reproduce

The clone goes to ``../fresh-TARGET`` (beside this checkout, so ``../shared`` resolves as it does for CI) and is
removed afterwards unless ``--keep``; the make output goes to logs/fresh-TARGET.log here. Writes
results/bench/fresh_clone_TARGET_cpu.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from summary import finish, markdown  # noqa: E402

PYTEST_SUMMARY = re.compile(r"(\d+ passed[^\n]*?) in ([\d.]+)s")


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", choices=["test", "reproduce"])
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the make run (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep the clone (the log is logs/fresh-TARGET.log here)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    clone = ROOT.parent / f"fresh-{args.target}"
    if clone.exists():
        shutil.rmtree(clone)
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.strip()
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    extra = dict(item.split("=", 1) for item in args.env)
    env = {k: v for k, v in os.environ.items() if k not in ("MOE_DATA_DIR", "VIRTUAL_ENV")} | extra
    start = time.perf_counter()
    done = subprocess.run(["make", args.target], cwd=clone, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    # the log outlives the clone, in this checkout's ignored logs/ folder; pip's lines about local indexes are noise
    output = "".join(line for line in (done.stdout + done.stderr).splitlines(keepends=True)
                     if not line.startswith("WARNING: Location"))
    log = ROOT / "logs" / f"fresh-{args.target}.log"
    log.parent.mkdir(exist_ok=True)
    log.write_text(output)
    tail = output[-3000:]
    found = ([None] + list(PYTEST_SUMMARY.finditer(tail)))[-1]  # pytest's summary is the last such line
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus"
    summary = {"target": args.target, "commit": commit, "rc": done.returncode, "wall_s": round(wall, 1),
               "tests": found.group(1) if found else None, "testing_s": float(found.group(2)) if found else None,
               "env": extra, "machine": machine, "device": "cpu"}
    print(tail[-1500:])
    if not args.keep:
        shutil.rmtree(clone)
    minutes = f"{int(wall // 60)} min {int(wall % 60)} s"
    row = [f"`make {args.target}`", commit, "passed" if done.returncode == 0 else f"**failed (rc {done.returncode})**",
           minutes, summary["tests"] or "", f"{summary['testing_s']:.0f} s" if found else ""]
    table = markdown(["fresh clone", "commit", "result", "wall time, installation included", "tests",
                      "of it testing"], [row],
                     f"`python bench/fresh_clone.py {args.target}"
                     + "".join(f" --env {k}={v}" for k, v in extra.items()) + f"`; {machine}, no GPU.")
    return finish(summary, f"fresh_clone_{args.target}", table, args.out)


if __name__ == "__main__":
    main()
