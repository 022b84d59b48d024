"""Fixtures for the ResNet-18 parity test: a torchvision resnet18 exported by PyTorch, and its
logits on a fixed input.

The weights are not random: each tensor repeats a short arithmetic pattern (its own phase and
scale), so that the exported files gzip to a few hundred KB instead of 46 MB; BatchNorm running
statistics are real, gathered by forward passes in training mode on random images, so eval mode
is non-trivial. Run with PyTorch and torchvision installed (not run by CI):

    python3 tests/data/resnet18/generate.py
"""
import gzip
import os
import shutil

import numpy as np
import torch
import torchvision
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
PERIOD = 2003


def pattern(n, phase, scale):
    i = torch.arange(n, dtype=torch.float64)
    return (((i * 7919 + phase * 104729) % PERIOD) / PERIOD - 0.5) * 2 * scale


def main():
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    with torch.no_grad():
        for k, (name, p) in enumerate(model.named_parameters()):
            if name.endswith("bn1.weight") or name.endswith("bn2.weight") or ".1.weight" in name:
                values = 1.0 + pattern(p.numel(), k, 0.2)
            elif p.dim() == 1:
                values = pattern(p.numel(), k, 0.1)
            else:
                fan_in = p[0].numel()
                values = pattern(p.numel(), k, (3.0 / fan_in) ** 0.5)
            p.copy_(values.reshape(p.shape).to(torch.float32))
    # Real running statistics: a few batches in training mode.
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(8, 3, 64, 64))
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = model(x)
    np.save(os.path.join(HERE, "input.npy"), x.numpy())
    np.save(os.path.join(HERE, "logits.npy"), logits.numpy())
    state = model.state_dict()
    torch.save(state, os.path.join(HERE, "resnet18.pth"))
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(HERE, "resnet18.safetensors"))
    for name in ("resnet18.pth", "resnet18.safetensors"):
        path = os.path.join(HERE, name)
        with open(path, "rb") as src, gzip.open(path + ".gz", "wb", compresslevel=9) as dst:
            shutil.copyfileobj(src, dst)
        os.remove(path)
    print("torch", torch.__version__, "torchvision", torchvision.__version__)
    print("logits[0, :5]", logits[0, :5].tolist())


if __name__ == "__main__":
    main()
