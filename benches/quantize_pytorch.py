"""PyTorch twin of benches/quantize.rs: SimpleCNN inference at batch 256 (samples/s) and batch 1
(latency, ms), float32 and after torch.ao.quantization.quantize_dynamic (Linear layers to
qint8, seed 003's recipe), 2 threads, one warm-up, medians of --reps timed passes each,
float and int8 alternating. Prints one JSON object."""
import argparse
import json
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn as nn

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "tests", "data", "simple_cnn"))
from generate import SimpleCNN  # noqa: E402  (the model definition lives with the fixtures)


def timed(model, x):
    start = time.perf_counter()
    with torch.no_grad():
        model(x)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--latency-reps", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    fp32 = SimpleCNN().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        int8 = torch.ao.quantization.quantize_dynamic(fp32, {nn.Linear}, dtype=torch.qint8)
    batch = torch.randn(256, 1, 28, 28)
    one = torch.randn(1, 1, 28, 28)
    timed(fp32, batch), timed(int8, batch)
    f, q = [], []
    for _ in range(args.reps):
        f.append(256 / timed(fp32, batch))
        q.append(256 / timed(int8, batch))
    fl, ql = [], []
    for _ in range(args.latency_reps):
        fl.append(1e3 * timed(fp32, one))
        ql.append(1e3 * timed(int8, one))
    print(json.dumps({
        "torch": torch.__version__,
        "fp32_samples_per_sec": statistics.median(f),
        "int8_samples_per_sec": statistics.median(q),
        "fp32_latency_ms": statistics.median(fl),
        "int8_latency_ms": statistics.median(ql),
    }))


if __name__ == "__main__":
    main()
