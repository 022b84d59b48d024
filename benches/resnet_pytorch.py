"""PyTorch twin of benches/resnet.rs: torchvision ResNet-18 (1000 classes), 2 threads:
training steps (SGD lr 0.01 momentum 0.9, cross-entropy) at batch 8 x 224x224 and batch 32 x
32x32, and inference at batch 32 x 224x224; one warm-up, then the median of --reps timed
passes. Prints one JSON object of samples/s. `--device cuda` runs it on the GPU (kiln's
scripts/gpu-check)."""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("PyTorch has no CUDA here")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    model = torchvision.models.resnet18().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def train(batch, side):
        x = torch.randn(batch, 3, side, side, device=device)
        y = torch.randint(0, 1000, (batch,), device=device)
        model.train()

        def step():
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        return step

    def infer(batch, side):
        x = torch.randn(batch, 3, side, side, device=device)

        def step():
            model.eval()
            with torch.no_grad():
                model(x)
        return step

    out = {"torch": torch.__version__, "device": str(device)}
    for name, batch, make in [
        ("train_b8_224", 8, lambda: train(8, 224)),
        ("train_b32_32", 32, lambda: train(32, 32)),
        ("infer_b32_224", 32, lambda: infer(32, 224)),
    ]:
        step = make()
        step()
        sync()
        times = []
        for _ in range(args.reps):
            start = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - start)
        out[name] = batch / statistics.median(times)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
