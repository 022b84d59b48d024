"""Generates the quantization parity fixtures used by tests/integration/quantize.rs.

Run from the repository root after generate.py (not run by CI; the outputs are committed):
    python3 tests/data/simple_cnn/quantized.py
Made with PyTorch 2.15.0, numpy 2.4.6, safetensors 0.8.0.

Quantizes the Linear and Conv2d weights of simple_cnn.safetensors with PyTorch's own
quantizers (torch.quantize_per_tensor / quantize_per_channel, qint8, symmetric: zero point 0,
scale = max|w| / 127 per tensor or per output channel), dequantizes them, and writes the
eval-mode logits of that model on input.npy:
- logits_int8_tensor.npy, logits_int8_channel.npy: float32 [64, 10].
"""
import os

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))


def scale_of(w):
    # float32 arithmetic, as kiln computes it.
    return (w.abs().max() / 127.0).to(torch.float32)


def per_tensor(w):
    q = torch.quantize_per_tensor(w, float(scale_of(w)), 0, torch.qint8)
    return q.dequantize()


def per_channel(w):
    flat = w.reshape(w.shape[0], -1)
    scales = (flat.abs().amax(dim=1) / 127.0).to(torch.float32).to(torch.float64)
    zeros = torch.zeros(w.shape[0], dtype=torch.int64)
    q = torch.quantize_per_channel(w, scales, zeros, 0, torch.qint8)
    return q.dequantize()


def forward(sd, x):
    x = F.max_pool2d(F.relu(F.conv2d(x, sd["conv1.weight"], sd["conv1.bias"], padding=1)), 2)
    x = F.max_pool2d(F.relu(F.conv2d(x, sd["conv2.weight"], sd["conv2.bias"], padding=1)), 2)
    x = x.flatten(1)
    x = F.relu(F.linear(x, sd["fc1.weight"], sd["fc1.bias"]))
    return F.linear(x, sd["fc2.weight"], sd["fc2.bias"])


def main():
    sd = load_file(os.path.join(HERE, "simple_cnn.safetensors"))
    x = torch.from_numpy(np.load(os.path.join(HERE, "input.npy")))
    for name, quantize in [("tensor", per_tensor), ("channel", per_channel)]:
        q = {k: (quantize(v) if k.endswith(".weight") else v) for k, v in sd.items()}
        with torch.no_grad():
            logits = forward(q, x).numpy().astype(np.float32)
        np.save(os.path.join(HERE, f"logits_int8_{name}.npy"), logits)
        diff = np.abs(logits - forward(sd, x).detach().numpy()).max()
        print(name, "max |logit - float logit|", diff)


if __name__ == "__main__":
    main()
