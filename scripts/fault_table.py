#!/usr/bin/env python3
"""The fault table of kiln's fault tolerance: a 2-process `kiln launch` of cnn-mnist hit by
faults, each run compared with an uninterrupted one (max |delta param| of the final models).

  - kill -9 of a random rank at N random moments (--max-restarts 1, --checkpoint-every 5),
    every fourth one of rank 0 while it writes a checkpoint (a .tmp file present);
  - SIGSTOP of rank 1 beyond --collective-timeout (the job stops, then restarts);
  - SIGTERM to the launcher (the ranks stop at one step with a checkpoint; --resume goes on);
  - a disk that fills mid-run (a 4 MB tmpfs; root only).

Usage: python3 scripts/fault_table.py [--kills 20] [--seed 1]
Needs `cargo build --release --features mpi` and
`cargo build --release --example compare_checkpoints`. Prints a Markdown table and a JSON line.
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time

KILN = os.path.abspath("target/release/kiln")
COMPARE = os.path.abspath("target/release/examples/compare_checkpoints")
TRAIN = ["--limit", "2048", "--epochs", "3", "--checkpoint-every", "5", "-q"]


def launch(out, extra_launch=(), extra_train=(), marker=None):
    env = dict(os.environ)
    if marker:
        env["KILN_FAULT_JOB"] = marker
    cmd = [KILN, "launch", "--nproc-per-node", "2", *extra_launch, "--", "kiln", "train",
           "cnn-mnist", *TRAIN, "--out", out, *extra_train]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def watch(proc):
    """Collects the launcher's stderr lines with their arrival times."""
    lines = []

    def read():
        for line in proc.stderr:
            lines.append((time.monotonic(), line.rstrip()))

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return lines, thread


def rank_pid(marker, rank):
    want = [f"KILN_FAULT_JOB={marker}".encode(), f"OMPI_COMM_WORLD_RANK={rank}".encode()]
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if all(w in environ for w in want):
            return int(pid)
    return None


def wait_pid(marker, rank, proc, limit=60.0):
    """The rank's pid once it runs; None if the job ended first or it never showed."""
    deadline = time.monotonic() + limit
    while proc.poll() is None and time.monotonic() < deadline:
        pid = rank_pid(marker, rank)
        if pid:
            return pid
        time.sleep(0.02)
    return None


def compare(a, b):
    out = subprocess.run([COMPARE, a, b], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["max_abs_diff"]


def first_after(lines, needle, since):
    for at, line in lines:
        if needle in line and at >= since:
            return at - since
    return None


def kill_run(base, reference, i, rng, duration):
    out, marker = os.path.join(base, f"kill-{i}"), f"kill-{i}-{os.getpid()}"
    proc = launch(out, ["--max-restarts", "1"], marker=marker)
    lines, reader = watch(proc)
    ckpt_dir = os.path.join(out, "checkpoints")
    in_write = lambda: os.path.isdir(ckpt_dir) and any(".tmp-" in f for f in os.listdir(ckpt_dir))
    if i % 4 == 3:
        # Rank 0 (the writer) while a checkpoint file is being written.
        rank, pid = 0, wait_pid(marker, 0, proc)
        deadline = time.monotonic() + duration
        while not in_write() and proc.poll() is None and time.monotonic() < deadline:
            pass
    else:
        time.sleep(rng.uniform(0.3, duration * 0.85))
        rank = rng.choice([0, 1])
        pid = wait_pid(marker, rank, proc)
    writing = in_write()
    killed = time.monotonic()
    if pid:
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=600)
    reader.join(timeout=10)
    detect = first_after(lines, "restarting it from its latest checkpoint", killed)
    restarted = detect is not None
    return {
        "fault": f"kill -9 rank {rank}",
        "during_checkpoint_write": writing,
        "outcome": ("restart from checkpoint" if restarted else
                    "finished before the kill" if pid is None else "no restart"),
        "exit": proc.returncode,
        "detect_s": detect,
        "max_abs_diff": compare(reference, out) if proc.returncode == 0 else None,
    }


def stall_run(base, reference):
    out, marker = os.path.join(base, "stall"), f"stall-{os.getpid()}"
    proc = launch(out, ["--max-restarts", "1"], ["--collective-timeout", "5"], marker=marker)
    lines, reader = watch(proc)
    pid = wait_pid(marker, 1, proc)
    time.sleep(1.0)
    stopped = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    proc.wait(timeout=600)
    reader.join(timeout=10)
    return {
        "fault": "SIGSTOP rank 1 beyond --collective-timeout 5",
        "during_checkpoint_write": False,
        "outcome": "timeout, then restart from checkpoint",
        "exit": proc.returncode,
        "detect_s": first_after(lines, "restarting it from its latest checkpoint", stopped),
        "max_abs_diff": compare(reference, out) if proc.returncode == 0 else None,
    }


def sigterm_run(base, reference):
    out = os.path.join(base, "sigterm")
    proc = launch(out)
    lines, reader = watch(proc)
    time.sleep(1.5)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=600)
    reader.join(timeout=10)
    stopped_after = time.monotonic() - sent
    resumed = launch(out, extra_train=["--resume"])
    resumed.wait(timeout=600)
    return {
        "fault": "SIGTERM to kiln launch, then --resume",
        "during_checkpoint_write": False,
        "outcome": f"stopped at a checkpoint (exit {proc.returncode}), resumed",
        "exit": resumed.returncode,
        "detect_s": stopped_after,
        "max_abs_diff": compare(reference, out) if resumed.returncode == 0 else None,
    }


def disk_full_run(base):
    if os.geteuid() != 0:
        return None
    small = tempfile.mkdtemp(dir=base)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", small], check=True)
    try:
        started = time.monotonic()
        run = subprocess.run([KILN, "train", "cnn-mnist", "--epochs", "3", "-q", "--out",
                              os.path.join(small, "run")], capture_output=True, text=True)
        error = [l for l in run.stderr.splitlines() if "No space left" in l]
        kept = os.path.exists(os.path.join(small, "run/checkpoints/epoch-0001.ckpt"))
        return {
            "fault": "disk full mid-run (4 MB tmpfs)",
            "during_checkpoint_write": True,
            "outcome": ("clean error, epoch 1's checkpoint kept" if error and kept
                        else "UNEXPECTED: " + run.stderr[-300:]),
            "exit": run.returncode,
            "detect_s": time.monotonic() - started,
            "max_abs_diff": None,
        }
    finally:
        subprocess.run(["umount", small], check=False)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    base = tempfile.mkdtemp(prefix="kiln-faults-")
    reference = os.path.join(base, "reference")
    started = time.monotonic()
    ref = launch(reference)
    ref.wait()
    duration = time.monotonic() - started
    print("| fault | during a checkpoint write | outcome | exit | "
          "detected / stopped after (s) | max abs delta param |")
    print("|---|---|---|---|---|---|", flush=True)
    faults = [lambda i=i: kill_run(base, reference, i, rng, duration)
              for i in range(args.kills)]
    faults += [lambda: stall_run(base, reference), lambda: sigterm_run(base, reference),
               lambda: disk_full_run(base)]
    rows = []
    for fault in faults:
        r = fault()
        if r is None:
            continue
        rows.append(r)
        detect = "-" if r["detect_s"] is None else f"{r['detect_s']:.2f}"
        diff = "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:g}"
        print(f"| {r['fault']} | {'yes' if r['during_checkpoint_write'] else 'no'} | "
              f"{r['outcome']} | {r['exit']} | {detect} | {diff} |", flush=True)
    print(json.dumps({"reference_seconds": duration, "rows": rows}))
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
