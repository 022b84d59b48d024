"""Generates the SimpleCNN parity fixtures used by tests/integration/parity.rs.

Run from the repository root (not run by CI; the outputs are committed):
    python3 tests/data/simple_cnn/generate.py
Made with PyTorch 2.15.0, numpy 2.4.6, safetensors 0.8.0, seed 0.

Writes, next to this script:
- simple_cnn.pth / simple_cnn.safetensors: the state_dict of a freshly seeded SimpleCNN;
- input.npy: 64 preprocessed MNIST test digits (x/255 - 0.1307)/0.3081, float32 [64, 1, 28, 28];
- logits.npy: the model's eval-mode logits on input.npy, float32 [64, 10];
- train_labels.npy: labels of input.npy, as float32 [64];
- eval_test_split.json: test loss and accuracy of that model on the whole embedded test split
  (what `kiln eval --model simple-cnn --weights simple_cnn.pth` must report);
- logits_after_steps.npy: logits on input.npy after 3 SGD steps (lr 0.01, momentum 0.9,
  cross-entropy, the whole of input.npy as the batch), float32 [64, 10].
"""
import gzip
import json
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

N = 64  # one batch of the recipe
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", ".."))


class SimpleCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        return self.fc2(x)


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def main():
    torch.manual_seed(0)
    model = SimpleCNN()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save(state, os.path.join(HERE, "simple_cnn.pth"))
    save_file(state, os.path.join(HERE, "simple_cnn.safetensors"))

    images = read_idx(os.path.join(ROOT, "data/mnist/t10k-images-idx3-ubyte.gz"))[:N]
    labels = read_idx(os.path.join(ROOT, "data/mnist/t10k-labels-idx1-ubyte.gz"))[:N]
    x = ((images.astype(np.float32) / 255.0 - 0.1307) / 0.3081).reshape(N, 1, 28, 28)
    x = x.astype(np.float32)
    np.save(os.path.join(HERE, "input.npy"), x)
    np.save(os.path.join(HERE, "train_labels.npy"), labels.astype(np.float32))

    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
    np.save(os.path.join(HERE, "logits.npy"), logits.numpy().astype(np.float32))

    all_images = read_idx(os.path.join(ROOT, "data/mnist/t10k-images-idx3-ubyte.gz"))
    all_labels = read_idx(os.path.join(ROOT, "data/mnist/t10k-labels-idx1-ubyte.gz"))
    xs = ((all_images.astype(np.float32) / 255.0 - 0.1307) / 0.3081).reshape(-1, 1, 28, 28)
    with torch.no_grad():
        out = model(torch.from_numpy(xs.astype(np.float32)))
        ys = torch.from_numpy(all_labels.astype(np.int64))
        summary = {
            "test_loss": F.cross_entropy(out, ys).item(),
            "test_accuracy": (out.argmax(1) == ys).double().mean().item(),
            "samples": len(ys),
        }
    with open(os.path.join(HERE, "eval_test_split.json"), "w") as f:
        json.dump(summary, f, indent=2)

    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    xt, yt = torch.from_numpy(x), torch.from_numpy(labels.astype(np.int64))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(xt), yt).backward()
        opt.step()
    with torch.no_grad():
        after = model(xt)
    np.save(os.path.join(HERE, "logits_after_steps.npy"), after.numpy().astype(np.float32))


if __name__ == "__main__":
    main()
