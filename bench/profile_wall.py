"""How long a profile's `make reproduce` took when it ran as several invocations (a run that died or was stopped
resumes where it stopped: artifacts are keyed), from the invocations' own logs: each one's wall time (installation
and data checks included), its steps and how it ended, and the total. Writes results/bench/profile_wall_PROFILE_cpu.md
(issue 27: the README's time for the cpu profile comes from a file).

    python bench/profile_wall.py --profile cpu --commit SHA \
        --run "logs/a.log|2148.2|died: ..." --run "logs/b.log||stopped: ..." --run "logs/c.log||finished"

A run's wall time is taken from its log's last ``rc=N wall=S`` line (what the resume wrapper appends) unless given;
LOG ``-`` is a run whose log was lost (its wall time must be given).
"""
from __future__ import annotations

import argparse
import platform
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from summary import finish, markdown  # noqa: E402

STEP = re.compile(r"reproduce: (\d+)/(\d+) step done in ([\d.]+) s")
WALL = re.compile(r"rc=(\d+) wall=(\d+)")


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", required=True)
    parser.add_argument("--commit", required=True, help="the commit the last invocation ran at")
    parser.add_argument("--run", action="append", required=True, help="LOG|WALL_S (or empty)|how it ended")
    args = parser.parse_args()
    rows, total, runs = [], 0.0, []
    for number, spec in enumerate(args.run, 1):
        log, wall, ended = spec.split("|", 2)
        text = Path(log).read_text() if log != "-" else ""  # "-": a run whose log was overwritten
        steps = STEP.findall(text)
        if not wall:
            found = WALL.findall(text)
            if not found:
                raise SystemExit(f"{log}: no 'rc=N wall=S' line; give the wall time as LOG|SECONDS|...")
            wall = found[-1][1]
        seconds = float(wall)
        total += seconds
        last = f"{steps[-1][0]}/{steps[-1][1]}" if steps else "none"
        worked = sum(float(s[2]) for s in steps)
        runs.append({"log": Path(log).name if log != "-" else None, "wall_s": seconds, "steps_logged": len(steps), "last_step": last,
                     "step_seconds": round(worked, 1), "ended": ended})
        rows.append([str(number), f"{int(seconds // 60)} min {int(seconds % 60)} s", str(len(steps)), last, ended])
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus"
    rows.append(["all", f"**{int(total // 3600)} h {int(total % 3600 // 60)} min {int(total % 60)} s**", "", "", ""])
    summary = {"profile": args.profile, "commit": args.commit, "wall_s": round(total, 1), "runs": runs,
               "machine": machine, "device": "cpu"}
    table = markdown(["invocation of `make reproduce PROFILE=" + args.profile + "`", "wall time (installation and "
                      "checks included)", "steps logged", "last step", "how it ended"], rows,
                     f"One fresh clone, the invocations one after another, each resuming the last (finished steps "
                     f"reused, not redone); the last one at commit {args.commit}; {machine}, no GPU. "
                     f"`python bench/profile_wall.py --profile {args.profile} ...` from the invocations' logs.")
    return finish(summary, f"profile_wall_{args.profile}", table)


if __name__ == "__main__":
    main()
