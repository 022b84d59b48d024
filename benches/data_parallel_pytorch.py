"""PyTorch twin of benches/data_parallel.rs: gloo all-reduce bandwidth between 2 processes
(1, 16, 64 MiB) and SimpleCNN DistributedDataParallel training throughput (2 processes x 1
thread, batch 64 per rank, SGD lr 0.01 m 0.9) on the embedded MNIST subset, one warm-up then the
median of --reps repetitions (--all-reduce-only: the bandwidth part alone, for
benches/collectives.rs). Prints one JSON object."""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from simple_cnn_pytorch import SimpleCNN, load  # noqa: E402

MIB = 1024 * 1024


def worker(rank, world, args, init_file, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    result = {"all_reduce": []}
    for mib in (1, 16, 64):
        buf = torch.ones(mib * MIB // 4)
        times = []
        for rep in range(args.reps * 4 + 1):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(buf)
            if rep > 0:
                times.append(time.perf_counter() - start)
        t = statistics.median(times)
        result["all_reduce"].append({"mib": mib, "median_ms": t * 1e3, "gb_per_sec": mib * MIB / t / 1e9})
    if args.all_reduce_only:
        if rank == 0:
            result["torch"] = torch.__version__
            with open(out_file, "w") as f:
                json.dump(result, f)
        dist.destroy_process_group()
        return

    xtr, ytr = load("train")
    xtr, ytr = xtr[: args.train_samples], ytr[: args.train_samples]
    rates = []
    for rep in range(args.reps + 1):
        torch.manual_seed(rep)
        model = torch.nn.parallel.DistributedDataParallel(SimpleCNN())
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        sampler = torch.utils.data.DistributedSampler(range(len(xtr)), world, rank, seed=rep)
        idx_all = torch.tensor(list(iter(sampler)))
        dist.barrier()
        start = time.perf_counter()
        for i in range(0, len(idx_all), 64):
            idx = idx_all[i: i + 64]
            opt.zero_grad()
            F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
        dist.barrier()
        if rep > 0:
            rates.append(len(idx_all) * world / (time.perf_counter() - start))
    result["ddp_samples_per_sec"] = statistics.median(rates)
    result["ddp_global_batch_size"] = 64 * world
    if rank == 0:
        result["torch"] = torch.__version__
        result["processes"] = world
        result["threads_per_process"] = torch.get_num_threads()
        with open(out_file, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--train-samples", type=int, default=1920)
    parser.add_argument("--all-reduce-only", action="store_true", help="skip the DDP training part")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "out.json")
        mp.spawn(worker, args=(2, args, init_file, out_file), nprocs=2, join=True)
        with open(out_file) as f:
            print(json.dumps(json.load(f)))


if __name__ == "__main__":
    main()
