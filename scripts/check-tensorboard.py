#!/usr/bin/env python3
"""Reads a kiln run's TensorBoard event files with TensorBoard's own reader and checks them
against the run's metrics.jsonl: every epoch's losses, accuracy and throughput at the epoch's
last step, and one loss, learning rate and gradient norm per optimizer step.

Usage: python3 scripts/check-tensorboard.py RUN_DIR   (needs `pip install tensorboard`)
Exits non-zero, naming the tag, on the first difference.
"""
import json
import math
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main(run_dir: Path) -> None:
    # size_guidance 0: keep every event (the default samples 1,000 per tag).
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    expected = {
        "loss/train": "train_loss",
        "loss/validation": "test_loss",
        "accuracy/validation": "test_accuracy",
        "speed/samples_per_sec": "samples_per_sec",
    }
    for tag, key in expected.items():
        if key not in epochs[0]:
            continue
        events = {e.step: e.value for e in acc.Scalars(tag)} if tag in tags else {}
        for epoch in epochs:
            value = events.get(epoch["step"])
            want = epoch[key]
            # TensorBoard stores float32.
            if value is None or not math.isclose(value, want, rel_tol=1e-6, abs_tol=1e-6):
                sys.exit(f"{tag} at step {epoch['step']}: TensorBoard has {value}, metrics.jsonl {want}")
    last_step = epochs[-1]["step"]
    for tag in ("loss/train_step", "optimizer/lr", "optimizer/grad_norm"):
        steps = [e.step for e in acc.Scalars(tag)] if tag in tags else []
        if steps != list(range(1, last_step + 1)):
            sys.exit(f"{tag}: steps {steps[:3]}...{steps[-3:]} (expected 1..{last_step})")
        if not all(math.isfinite(e.value) for e in acc.Scalars(tag)):
            sys.exit(f"{tag}: a value is not finite")
    print(f"TensorBoard reads {len(tags)} scalar tags of {run_dir}, {len(epochs)} epochs and "
          f"{last_step} steps, equal to metrics.jsonl")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
