"""PyTorch twin of benches/simple_cnn.rs: SimpleCNN training (batch 64, SGD lr 0.01 m 0.9) and
evaluation (batch 256) throughput on the same embedded MNIST subset, 2 threads, one warm-up
then the median of --reps repetitions. Prints one JSON object."""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "tests", "data", "simple_cnn"))
from generate import SimpleCNN, read_idx  # noqa: E402  (the model definition lives with the fixtures)


def load(split):
    x = read_idx(os.path.join(ROOT, "data/mnist", f"{split}-images-idx3-ubyte.gz")).astype(np.float32)
    y = read_idx(os.path.join(ROOT, "data/mnist", f"{split}-labels-idx1-ubyte.gz")).astype(np.int64)
    x = ((x / 255.0 - 0.1307) / 0.3081).reshape(-1, 1, 28, 28).astype(np.float32)
    return torch.from_numpy(x), torch.from_numpy(y)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--train-samples", type=int, default=1920)
    args = parser.parse_args()
    torch.set_num_threads(2)
    xtr, ytr = load("train")
    xtr, ytr = xtr[: args.train_samples], ytr[: args.train_samples]
    xte, _ = load("t10k")
    train_rates, eval_rates = [], []
    for rep in range(args.reps + 1):
        torch.manual_seed(rep)
        model = SimpleCNN()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        perm = torch.randperm(len(xtr))
        start = time.perf_counter()
        for i in range(0, len(xtr), 64):
            idx = perm[i: i + 64]
            opt.zero_grad()
            F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
        if rep > 0:
            train_rates.append(len(xtr) / (time.perf_counter() - start))
    model.eval()
    for rep in range(args.reps + 1):
        start = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(xte), 256):
                model(xte[i: i + 256])
        if rep > 0:
            eval_rates.append(len(xte) / (time.perf_counter() - start))
    print(json.dumps({
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "train_samples_per_sec": statistics.median(train_rates),
        "eval_samples_per_sec": statistics.median(eval_rates),
    }))


if __name__ == "__main__":
    main()
