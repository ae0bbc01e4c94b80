"""Recovery time after a chain server is killed (-9) mid-chat, with a replacement in the swarm.

    python benchmarks/failover.py [--runs 5]

A 4-server swarm of the built-in model (0:10, 10:20, 10:20, 20:30). Each run starts a chat, kills
the server its route uses for blocks 10:20 one second in, checks the answer equals a fault-free
local run, and reads the client's own "recovered in X s" line (failure seen -> replacement caught
up). The killed server is restarted before the next run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import time

from llmswarm.bench.local_swarm import LocalSwarm, llmswarm_command

PROMPT = "Write a long story about a dragon who learns to paint."


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    ref = json.loads(subprocess.run(llmswarm_command("chat", "--local", "-p", PROMPT, "-n", "64", "--json"),
                                    capture_output=True, text=True, check=True).stdout)["token_ids"]
    times, identical = [], 0
    with LocalSwarm("smollm2-135m", [(0, 10), (10, 20), (10, 20), (20, 30)], announce_period_s=1.0) as s:
        for run in range(args.runs):
            proc = subprocess.Popen(llmswarm_command("chat", "--peers", *s.peers, "-p", PROMPT, "-n", "64", "--json",
                                                     "--show-route", "--solver", "exact"),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            while not (m := re.search(r"server(\d+) \[10:20\)", proc.stderr.readline())):
                pass
            time.sleep(1.0)
            victim = int(m.group(1))
            os.kill(s.servers[victim].pid, signal.SIGKILL)
            out, err = proc.communicate(timeout=180)
            got = re.search(r"recovered in ([\d.]+) s", err)
            if got:
                times.append(float(got.group(1)))
            identical += json.loads(out)["token_ids"] == ref
            same = json.loads(out)["token_ids"] == ref
            print(f"run {run}: recovered in {got.group(1) if got else '?'} s, identical: {same}")
            s.start_server(victim, 10, 20)
            json.loads(s._read_line(s.servers[victim], "restarted"))
            time.sleep(2.0)  # let every client-visible record settle
    print(json.dumps({"runs": args.runs, "recovery_s_median": statistics.median(times) if times else None,
                      "recovery_s": times, "token_identical_runs": identical}))


if __name__ == "__main__":
    main()
