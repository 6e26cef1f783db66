"""Time one of the README's two commands on a fresh clone, as a new user or CI runs it: clone this checkout's
HEAD beside ``../shared`` (the offline data mirror), run ``make TARGET`` there (installation and data included), and
write its wall time, the test count (for ``test``) and the machine under results/bench/ (issue 27: the README's
times and counts come from a file).

    python bench/fresh_clone.py test [--env ONEDNN_MAX_CPU_ISA=AVX2 ...] [--keep]
    python bench/fresh_clone.py reproduce [--profile cpu --keep]

The clone goes to ``../fresh-TARGET`` (beside this checkout, so ``../shared`` resolves as it does for CI) and is
removed afterwards unless ``--keep`` (keep a profile run's clone: its results/PROFILE is the run's output); the make
output goes to logs/fresh-TARGET.log here as it runs, so a run ended early leaves its log. Writes
results/bench/fresh_clone_TARGET_cpu.{json,md} (fresh_clone_reproduce_PROFILE_profile_cpu.* for a profile other
than quick).
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
    parser.add_argument("--profile", default="quick", help="the profile `make reproduce` runs (PROFILE=NAME)")
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
    command = ["make", args.target] + ([f"PROFILE={args.profile}"] if args.target == "reproduce" else [])
    # the log outlives the clone, in this checkout's ignored logs/ folder, written as the run goes
    log = ROOT / "logs" / f"fresh-{args.target}.log"
    log.parent.mkdir(exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(command, cwd=clone, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    # pip's lines about local indexes are noise
    tail = "".join(line for line in log.read_text().splitlines(keepends=True)
                   if not line.startswith("WARNING: Location"))[-3000:]
    found = ([None] + list(PYTEST_SUMMARY.finditer(tail)))[-1]  # pytest's summary is the last such line
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus"
    summary = {"target": args.target, "profile": args.profile if args.target == "reproduce" else None, "commit": commit, "rc": done.returncode, "wall_s": round(wall, 1),
               "tests": found.group(1) if found else None, "testing_s": float(found.group(2)) if found else None,
               "env": extra, "machine": machine, "device": "cpu"}
    print(tail[-1500:])
    if not args.keep:
        shutil.rmtree(clone)
    minutes = f"{int(wall // 60)} min {int(wall % 60)} s"
    row = [f"`{' '.join(command)}`", commit, "passed" if done.returncode == 0 else f"**failed (rc {done.returncode})**",
           minutes, summary["tests"] or "", f"{summary['testing_s']:.0f} s" if found else ""]
    table = markdown(["fresh clone", "commit", "result", "wall time, installation included", "tests",
                      "of it testing"], [row],
                     f"`python bench/fresh_clone.py {args.target}"
                     + (f" --profile {args.profile}" if args.profile != "quick" else "")
                     + "".join(f" --env {k}={v}" for k, v in extra.items()) + f"`; {machine}, no GPU.")
    name = f"fresh_clone_{args.target}" + (f"_{args.profile}_profile" if args.profile != "quick" else "")
    return finish(summary, name, table, args.out)


if __name__ == "__main__":
    main()
