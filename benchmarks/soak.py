"""Soak: K concurrent clients x M turns against a local swarm while a server is killed and restarted.

    python benchmarks/soak.py [--clients 4] [--turns 3] [--minutes 2] [--kill-every 20]

A 4-server swarm of the built-in model (0:10, 10:20, 10:20, 20:30). Client processes run
interactive `chat` sessions of M turns, K at a time, back to back, until time is up. Every
--kill-every seconds one of the two 10:20 servers is killed (-9) and restarted. Reports chats,
failed chats, recoveries seen by clients, and the RSS of the servers that were never killed, at
the start and at the end.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import threading
import time

import psutil
from llmswarm.bench.local_swarm import LocalSwarm, llmswarm_command

QUESTIONS = ["What is the capital of France?", "Name three colours.", "What is 2 + 2?", "Say hello in Spanish.",
             "What is the largest planet?", "Give me a fruit."]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("--kill-every", type=float, default=20.0)
    args = ap.parse_args()
    stats = {"chats": 0, "failed": 0, "recoveries": 0, "kills": 0, "errors": []}
    lock = threading.Lock()
    with LocalSwarm("smollm2-135m", [(0, 10), (10, 20), (10, 20), (20, 30)], announce_period_s=2.0) as s:
        stable = [s.servers[0].pid, s.servers[3].pid]
        rss = lambda: [psutil.Process(p).memory_info().rss / 2**20 for p in stable]  # noqa: E731
        end_at = time.monotonic() + 60 * args.minutes

        def client(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < end_at:
                turns = "\n".join(rng.choice(QUESTIONS) for _ in range(args.turns)) + "\n"
                res = subprocess.run(llmswarm_command("chat", "--peers", *s.peers, "-n", "16", "--step-timeout", "5"),
                                     input=turns, capture_output=True, text=True, timeout=300)
                with lock:
                    stats["chats"] += 1
                    stats["recoveries"] += res.stderr.count("recovered in")
                    if res.returncode != 0 or res.stderr.count("tokens/s") != args.turns:
                        stats["failed"] += 1
                        stats["errors"].append(res.stderr.strip().splitlines()[-1:] or ["?"])

        def killer() -> None:
            victim = 1
            while time.monotonic() < end_at - args.kill_every / 2:
                time.sleep(args.kill_every)
                s.servers[victim].send_signal(signal.SIGKILL)
                s.servers[victim].wait()
                s.start_server(victim, 10, 20)
                json.loads(s._read_line(s.servers[victim], "restarted"))
                with lock:
                    stats["kills"] += 1
                victim = 3 - victim  # alternate between the two 10:20 servers

        time.sleep(3.0)
        rss_start = rss()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        threads.append(threading.Thread(target=killer))
        series: list[list[float]] = []

        def sampler() -> None:
            while time.monotonic() < end_at:
                series.append([round(x, 1) for x in rss()])
                time.sleep(20.0)

        threads.append(threading.Thread(target=sampler))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rss_end = rss()
    print(json.dumps({"clients": args.clients, "turns_per_chat": args.turns, "minutes": args.minutes, **stats,
                      "stable_server_rss_mib_start": [round(x, 1) for x in rss_start],
                      "stable_server_rss_mib_end": [round(x, 1) for x in rss_end],
                      "stable_server_rss_mib_every_20s": series}))


if __name__ == "__main__":
    main()
