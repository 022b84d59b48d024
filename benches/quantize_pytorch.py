"""PyTorch twin of benches/quantize.rs: SimpleCNN inference at batch 256 (samples/s) and batch 1
(latency, ms), float32, after torch.ao.quantization.quantize_dynamic (Linear layers to qint8),
and after x86 static quantization (FX graph mode, get_default_qconfig_mapping("x86"): FBGEMM /
oneDNN int8 convolutions and linears, activations calibrated on 32 batches of 32 inputs),
2 threads, one warm-up, medians of --reps timed passes each, the models alternating. Prints one
JSON object (static_* keys absent when FX quantization is unavailable). With --resnet-reps N,
also torchvision's ResNet-18 (10 classes) at batch 32 x 224, float32 and x86 static int8
(calibrated on 4 batches of 8): resnet_* keys."""
import argparse
import copy
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
    parser.add_argument("--resnet-reps", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    fp32 = SimpleCNN().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        int8 = torch.ao.quantization.quantize_dynamic(fp32, {nn.Linear}, dtype=torch.qint8)
    batch = torch.rand(256, 1, 28, 28)
    one = torch.rand(1, 1, 28, 28)
    models = {"fp32": fp32, "int8": int8}
    static = static_x86(fp32)
    if static is not None:
        models["static"] = static
    for m in models.values():
        timed(m, batch)
    rates = {k: [] for k in models}
    latencies = {k: [] for k in models}
    for _ in range(args.reps):
        for k, m in models.items():
            rates[k].append(256 / timed(m, batch))
    for _ in range(args.latency_reps):
        for k, m in models.items():
            latencies[k].append(1e3 * timed(m, one))
    out = {"torch": torch.__version__}
    for k in models:
        out[f"{k}_samples_per_sec"] = statistics.median(rates[k])
        out[f"{k}_latency_ms"] = statistics.median(latencies[k])
    if args.resnet_reps > 0:
        out.update(resnet(args.resnet_reps))
    print(json.dumps(out))


def resnet(reps):
    """ResNet-18 at batch 32 x 224: samples/s, float32 and x86 static int8."""
    import torchvision

    fp32 = torchvision.models.resnet18(num_classes=10).eval()
    batch = torch.rand(32, 3, 224, 224)
    models = {"fp32": fp32}
    static = static_x86(fp32, (3, 224, 224), batches=4, size=8)
    if static is not None:
        models["static"] = static
    for m in models.values():
        timed(m, batch)
    rates = {k: [] for k in models}
    for _ in range(reps):
        for k, m in models.items():
            rates[k].append(32 / timed(m, batch))
    return {f"resnet_{k}_samples_per_sec": statistics.median(v) for k, v in rates.items()}


def static_x86(fp32, shape=(1, 28, 28), batches=32, size=32):
    """x86 static int8 (FX graph mode), calibrated on `batches` of `size` uniform [0, 1)
    inputs of `shape`; None if FX quantization cannot run here."""
    try:
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.backends.quantized.engine = "x86"
            example = (torch.rand(1, *shape),)
            prepared = prepare_fx(copy.deepcopy(fp32), get_default_qconfig_mapping("x86"), example)
            with torch.no_grad():
                for _ in range(batches):
                    prepared(torch.rand(size, *shape))
            return convert_fx(prepared)
    except Exception as e:  # noqa: BLE001  (report and go on without it)
        print(f"x86 static quantization unavailable: {e}", file=sys.stderr)
        return None


if __name__ == "__main__":
    main()
