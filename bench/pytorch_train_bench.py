#!/usr/bin/python3
"""PyTorch eager baseline for `shoal bench train`: the same GPT (tests/reference/gpt_reference.py),
the same batch and context, a standard training step (forward, cross-entropy, backward,
clip_grad_norm_, AdamW), timed after warm-up steps.

Run one setting:   pytorch_train_bench.py --config configs/tiny.toml --steps 20
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
    model = GPT(m)
    for name, p in model.named_parameters():   # GPT-2 init, as shoal does
        if p.dim() == 2:
            torch.nn.init.normal_(p, 0.0, 0.02)
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), eps=1e-8, foreach=True)
    b, T, V = t["batch_size"], m["block_size"], m["vocab_size"]
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
    print(json.dumps({"tokens_per_s": b * T / step_s, "step_time_ms": 1e3 * step_s,
                      "omp_threads": torch.get_num_threads(),
                      "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
                      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
                      "final_loss": loss.item()}))


if __name__ == "__main__":
    main()
