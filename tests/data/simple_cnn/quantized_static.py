"""Generates the fixture of the same-scales check between kiln's integer SimpleCNN and
PyTorch's static int8 one (tests/integration/quantize.rs).

Run from the repository root (not run by CI; the outputs are committed):
    python3 tests/data/simple_cnn/quantized_static.py
Made with PyTorch 2.15.0 (x86 engine: FBGEMM), numpy 2.4.6, safetensors 0.8.0.

PyTorch's FX static quantization of simple_cnn.safetensors with the scales kiln uses: weights
int8 per output channel, symmetric, scale = max|w| / 127 (quant range -127..127); activations
7-bit per tensor (0..127, as kiln and PyTorch's x86 reduce_range), min-max calibrated on
input.npy (the 64 images the check runs). Writes:
- static_int8_scales.json: the activation (scale, zero point) at each point kiln quantizes
  (the image, conv2's input, fc1's input, fc2's input) and of the logits PyTorch quantizes;
- logits_static_int8.npy: the quantized model's logits on input.npy, float32 [64, 10].
"""
import copy
import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import load_file
from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver, QConfig, QConfigMapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from generate import SimpleCNN  # noqa: E402


def main():
    torch.backends.quantized.engine = "x86"
    model = SimpleCNN().eval()
    model.load_state_dict(load_file(os.path.join(HERE, "simple_cnn.safetensors")))
    x = torch.from_numpy(np.load(os.path.join(HERE, "input.npy")))
    qconfig = QConfig(
        activation=MinMaxObserver.with_args(
            dtype=torch.quint8, quant_min=0, quant_max=127, qscheme=torch.per_tensor_affine
        ),
        weight=PerChannelMinMaxObserver.with_args(
            dtype=torch.qint8, quant_min=-127, quant_max=127, qscheme=torch.per_channel_symmetric
        ),
    )
    prepared = prepare_fx(copy.deepcopy(model), QConfigMapping().set_global(qconfig), (x[:1],))
    with torch.no_grad():
        prepared(x)
    quantized = convert_fx(prepared)
    with torch.no_grad():
        logits = quantized(x).numpy().astype(np.float32)
    # The (scale, zero point) of each quantized activation, in the graph's order: the
    # image, then the outputs of conv1 (+ReLU, also the pool's and conv2's input), conv2
    # (+ReLU: fc1's input), fc1 (+ReLU: fc2's input) and fc2 (the logits).
    points = []
    for node in quantized.graph.nodes:
        if node.op == "call_function" and node.target == torch.quantize_per_tensor:
            scale = getattr(quantized, node.args[1].target)
            zero = getattr(quantized, node.args[2].target)
            points.append((float(scale), int(zero)))
    for name in ["conv1", "conv2", "fc1", "fc2"]:
        m = getattr(quantized, name)
        points.append((float(m.scale), int(m.zero_point)))
    names = ["image", "conv2_input", "fc1_input", "fc2_input", "logits"]
    out = {n: {"scale": s, "zero_point": z} for n, (s, z) in zip(names, points)}
    with open(os.path.join(HERE, "static_int8_scales.json"), "w") as f:
        json.dump(out, f, indent=1)
    np.save(os.path.join(HERE, "logits_static_int8.npy"), logits)
    float_logits = model(x).detach().numpy()
    print(json.dumps(out))
    print("max |int8 - float logit|", np.abs(logits - float_logits).max())


if __name__ == "__main__":
    main()
