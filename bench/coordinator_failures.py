#!/usr/bin/env python3
"""Failure recovery under `moe coordinator run`: injects failures into a supervised training job and measures, per
failure, the detection time (the coordinator's failure event minus the injection time), the time from detection to
the new group's first step, and the steps redone (past the checkpoint it resumed from), with min / median / max.

  python3 bench/coordinator_failures.py [--moe build/moe] [--kills 4] [--stops 2] [--every 50] [--slots 2]

Each failure: a random 2-5 s of training, then kill -9 (or SIGSTOP, a hang) of a random rank. Prints one line per
failure and the summary table with the anchors of other systems' default detection (bench/RESULTS.md)."""
import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def status(moe, jd):
    out = subprocess.run([moe, "coordinator", "status", "--job-dir", jd, "--json"], capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else None


def wait(moe, jd, cond, what, limit=120):
    deadline = time.time() + limit
    while time.time() < deadline:
        s = status(moe, jd)
        if s and cond(s):
            return s
        time.sleep(0.05)
    sys.exit("timed out waiting for " + what)


def running(epoch):
    return lambda s: (s["epoch"] == epoch and s["job"]["state"] == "running" and s["ranks"] and
                      all(r["step"] > 0 for r in s["ranks"]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moe", default=os.path.join(ROOT, "build", "moe"))
    ap.add_argument("--kills", type=int, default=4)
    ap.add_argument("--stops", type=int, default=2)
    ap.add_argument("--every", type=int, default=50, help="checkpoint.every")
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    work = tempfile.mkdtemp(prefix="moe_coord_bench_")
    jd = os.path.join(work, "job")
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    sets = ["data.train_file=" + os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt"),
            "train.out_dir=" + os.path.join(work, "run"), "train.steps=1000000", "train.log_every=100",
            "train.eval_every=0", "checkpoint.every=%d" % a.every, "model.ffn_pattern=FFN_MOE",
            "model.moe.num_experts=4", "model.d_model=96", "data.batch_size=16", "parallel.expert_parallel=2"]
    cmd = [a.moe, "coordinator", "run", "--config", os.path.join(ROOT, "deploy", "configs", "tiny_test.pbtxt"),
           "--slots", str(a.slots), "--job-dir", jd, "--max-restarts", "3"]
    for x in sets:
        cmd += ["--set", x]
    log = open(os.path.join(work, "coordinator.out"), "w")
    coord = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    rows = []
    try:
        s = wait(a.moe, jd, running(1), "epoch 1")
        kinds = ["kill"] * a.kills + ["stop"] * a.stops
        rng.shuffle(kinds)
        for i, kind in enumerate(kinds):
            epoch = s["epoch"]
            time.sleep(rng.uniform(2, 5))
            s = status(a.moe, jd)
            rank = rng.randrange(len(s["ranks"]))
            pid = [r["pid"] for r in s["ranks"] if r["rank"] == rank][0]
            step = s["ranks"][0]["step"]
            t0 = time.time()
            os.kill(pid, signal.SIGKILL if kind == "kill" else signal.SIGSTOP)
            s = wait(a.moe, jd, running(epoch + 1), "epoch %d" % (epoch + 1))
            ev = [e for e in s["events"] if e["kind"] == "failure" and e["epoch"] == epoch][0]
            row = {"kind": kind, "detect": ev["time"] - t0, "next": ev["next_step_s"], "redone": ev["steps_redone"]}
            row["total"] = row["detect"] + row["next"]
            rows.append(row)
            print("failure %d: %-4s rank %d at step %5d: detected %.3f s, next step %.2f s later, %d step(s) redone"
                  " | %s" % (i + 1, kind, rank, step, row["detect"], row["next"], row["redone"], ev["cause"]))
            sys.stdout.flush()
    finally:
        coord.send_signal(signal.SIGTERM)
        try:
            coord.wait(60)
        except subprocess.TimeoutExpired:
            coord.kill()
    print("\n%d failures (%d kill -9, %d SIGSTOP), checkpoint.every=%d, %d slots; min / median / max" % (
        len(rows), a.kills, a.stops, a.every, a.slots))
    for key, name, unit in (("detect", "detection", "s"), ("next", "detection -> next step", "s"),
                            ("total", "failure -> next step", "s"), ("redone", "steps redone", "")):
        for kind in ("kill", "stop", None):
            v = [r[key] for r in rows if kind is None or r["kind"] == kind]
            if not v:
                continue
            label = "%s (%s)" % (name, {"kill": "kill -9", "stop": "SIGSTOP", None: "all"}[kind])
            print("  %-36s %8.3f %8.3f %8.3f %s" % (label, min(v), statistics.median(v), max(v), unit))
    print("anchors (default detection): TorchElastic ~15 s (rendezvous/keep-alive), MPI ULFM 10 s,"
          " NVIDIA resiliency extension 180-300 s")


if __name__ == "__main__":
    main()
