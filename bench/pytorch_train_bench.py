#!/usr/bin/python3
"""PyTorch eager baseline for `shoal bench train`: the same GPT (tests/reference/gpt_reference.py),
the same batch and context, a standard training step (forward, cross-entropy, backward,
clip_grad_norm_, AdamW), timed after warm-up steps.

Run one setting:   pytorch_train_bench.py --config configs/tiny.toml --steps 20
Data parallel:     python3 -m torch.distributed.run --nproc_per_node 2 pytorch_train_bench.py ...
                   (DistributedDataParallel over gloo; --batch-size is per rank; rank 0 prints
                   the global tokens/s)
The thread pools are set by the caller through OMP_NUM_THREADS / OPENBLAS_NUM_THREADS /
OMP_WAIT_POLICY (OpenBLAS reads its variables when it loads). Prints one JSON line.
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "reference"))
from gpt_reference import GPT  # noqa: E402

try:
    import tomllib
except ImportError:  # Python < 3.11
    import toml as tomllib


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=0, help="per rank; 0: the config's")
    args = ap.parse_args()
    with open(args.config, "rb") as f:
        try:
            cfg = tomllib.load(f)
        except TypeError:
            f.seek(0)
            cfg = tomllib.loads(f.read().decode())
    m, t = cfg["model"], cfg["train"]
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        import torch.distributed as dist
        dist.init_process_group("gloo")
    model = GPT(m)
    for name, p in model.named_parameters():   # GPT-2 init, as shoal does
        if p.dim() == 2:
            torch.nn.init.normal_(p, 0.0, 0.02)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), eps=1e-8, foreach=True)
    b, T, V = args.batch_size or t["batch_size"], m["block_size"], m["vocab_size"]
    x = torch.randint(V, (b, T))
    y = torch.randint(V, (b, T))
    times = []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, V), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if step >= args.warmup:
            times.append(dt)
    step_s = sum(times) / len(times)
    if rank != 0:
        return
    print(json.dumps({"tokens_per_s": world * b * T / step_s, "ranks": world, "step_time_ms": 1e3 * step_s,
                      "omp_threads": torch.get_num_threads(),
                      "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
                      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
                      "final_loss": loss.item()}))


if __name__ == "__main__":
    main()
