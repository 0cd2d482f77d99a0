#!/usr/bin/python3
"""Independent PyTorch reference for shoal's DeMo optimizer: W workers, S steps, data parallel.

Written from the algorithm's description (docs ALGORITHMS.md, sections 1.3 to 1.7), not from
shoal's C++ code, and computed differently where it can be:
  * the orthonormal DCT-II and its inverse (DCT-III) come from a length-N FFT (Makhoul's
    even/odd reordering), not from a cosine matrix; a self-check against the defining cosine sum
    runs first;
  * the chunk rule enumerates divisors;
  * top-k per tile with torch.topk on |coef| (int64 indices, float32 values: the parameter dtype);
  * decompression with scatter_reduce("mean", include_self=False), the batch decompression by
    concatenating the workers' indices and values along the last axis, as the reference does;
  * per parameter, in order: decoupled weight decay, delta <- beta*delta + lr*grad, top-k of the
    DCT of delta, delta <- delta - decode(own selection), aggregate <- decode(batch mean), then the
    SGD step p <- p - lr*sign(aggregate).
State (parameters, deltas) is float32 like a float32 model's; transforms run in float64 and the
coefficients are rounded to float32 before selection (the reference's parameter dtype).

Usage: demo_reference.py --inputs in.safetensors --config cfg.json --out out.safetensors
in.safetensors: "param.<name>" float32 initial parameters; "grad.<name>" float32 of shape
  (S, W, *shape), the gradients each worker sees at each step (already multiplied by any clipping
  scale); "lr" float64 (S,).
cfg.json: {"chunk", "topk", "decay", "weight_decay", "params": [{"name", "decay": bool}, ...]}
  (parameters in optimizer order; weight decay applies where "decay" is true).
out.safetensors: "final.<name>" float32, "delta.<w>.<name>" float32 per worker, and
  "undecided.<name>" float32 (1 where, at some step, |aggregate| <= 1e-5 * max |aggregate| of that
  parameter: where the sign is not decidable in float32 and an implementation may differ).
"""
import argparse
import json
import math

import torch

from safetensors_io import read_safetensors, write_safetensors

UNDECIDED_REL = 1e-5


def chunk_length(d, s):
    """Section 1.4: s if it divides d, else the largest divisor of d below s (d itself if d < s)."""
    divisors = [i for i in range(1, d + 1) if d % i == 0]
    if d % s == 0:
        return s
    below = [i for i in divisors if i < s]
    return below[-1] if below else d


def _alpha(n):
    a = torch.full((n,), math.sqrt(2.0 / n), dtype=torch.float64)
    a[0] = math.sqrt(1.0 / n)
    return a


def dct2(x):
    """Orthonormal DCT-II along the last axis of a float64 tensor, via one FFT of length N:
    v = (x0, x2, x4, ..., x5, x3, x1);  X_k = alpha_k * Re(exp(-i pi k / 2N) * FFT(v)_k)."""
    n = x.shape[-1]
    v = torch.cat([x[..., 0::2], x[..., 1::2].flip(-1)], dim=-1)
    spec = torch.fft.fft(v, dim=-1)
    k = torch.arange(n, dtype=torch.float64)
    twiddle = torch.exp(-1j * math.pi * k / (2 * n))
    return (spec * twiddle).real * _alpha(n)


def idct2(c):
    """Inverse of dct2 (orthonormal DCT-III) along the last axis, via one inverse FFT:
    y_k = X_k / alpha_k;  V_k = exp(i pi k / 2N) (y_k - i y_{N-k}) with y_N = 0;  v = IFFT(V);
    x_{2m} = v_m, x_{2m+1} = v_{N-1-m}."""
    n = c.shape[-1]
    y = c / _alpha(n)
    y_rev = torch.cat([torch.zeros_like(y[..., :1]), y[..., 1:].flip(-1)], dim=-1)  # y_{N-k}
    k = torch.arange(n, dtype=torch.float64)
    spec = torch.exp(1j * math.pi * k / (2 * n)) * (y - 1j * y_rev)
    v = torch.fft.ifft(spec, dim=-1).real
    x = torch.empty_like(v)
    half = (n + 1) // 2
    x[..., 0::2] = v[..., :half]
    x[..., 1::2] = v[..., half:].flip(-1)
    return x


def self_check():
    """dct2 against the defining sum, and idct2(dct2(x)) == x."""
    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 5, 10, 16, 40, 48, 50, 64):
        x = torch.randn(3, n, generator=gen, dtype=torch.float64)
        j = torch.arange(n, dtype=torch.float64)
        kk = torch.arange(n, dtype=torch.float64).unsqueeze(1)
        direct = (x.unsqueeze(1) * torch.cos(math.pi * (2 * j + 1) * kk / (2 * n))).sum(-1)
        direct = direct * _alpha(n)
        assert torch.allclose(dct2(x), direct, atol=1e-12), n
        assert torch.allclose(idct2(dct2(x)), x, atol=1e-12), n
    for d, s, want in ((2048, 64, 64), (50280, 64, 60), (48, 64, 48), (97, 64, 1), (100, 64, 50)):
        assert chunk_length(d, s) == want, (d, s)


class Transform:
    """Tiles of one parameter shape: 2-D (R, C) as itself, 1-D (L,) as (1, L)."""

    def __init__(self, shape, chunk):
        self.shape = tuple(shape)
        self.rows, self.cols = (1, shape[0]) if len(shape) == 1 else tuple(shape)
        self.n1 = chunk_length(self.rows, chunk)
        self.n2 = chunk_length(self.cols, chunk)

    def encode(self, x):
        """(shape) -> (rows/n1, cols/n2, n1*n2), float64: a 2-D DCT per tile."""
        a, b = self.rows // self.n1, self.cols // self.n2
        t = x.to(torch.float64).reshape(a, self.n1, b, self.n2).permute(0, 2, 1, 3)
        t = dct2(t)                                     # along n2
        t = dct2(t.transpose(-1, -2)).transpose(-1, -2)  # along n1
        return t.reshape(a, b, self.n1 * self.n2)

    def decode(self, c):
        a, b = self.rows // self.n1, self.cols // self.n2
        t = c.to(torch.float64).reshape(a, b, self.n1, self.n2)
        t = idct2(t.transpose(-1, -2)).transpose(-1, -2)
        t = idct2(t)
        return t.permute(0, 2, 1, 3).reshape(self.shape)


def compress(coefs, topk):
    k = max(1, min(topk, coefs.shape[-1]))
    idx = torch.topk(coefs.abs(), k, dim=-1, sorted=False).indices  # int64
    return idx, torch.gather(coefs, -1, idx)


def decompress(like, idx, val):
    """Scatter-mean into zeros, the zeros not counted: a coefficient chosen m times gets the mean of
    its m values; one chosen by nobody stays 0."""
    out = torch.zeros(like.shape, dtype=torch.float64)
    return out.scatter_reduce(-1, idx, val.to(torch.float64), reduce="mean", include_self=False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    self_check()

    with open(args.config) as f:
        cfg = json.load(f)
    inputs = read_safetensors(args.inputs)
    lrs = inputs["lr"].tolist()
    names = [p["name"] for p in cfg["params"]]
    steps, workers = inputs["grad." + names[0]].shape[:2]
    beta, lam = cfg["decay"], cfg["weight_decay"]

    params = {n: inputs["param." + n].clone() for n in names}
    deltas = {n: [torch.zeros_like(params[n]) for _ in range(workers)] for n in names}
    undecided = {n: torch.zeros_like(params[n]) for n in names}
    transforms = {n: Transform(params[n].shape, cfg["chunk"]) for n in names}

    for s in range(steps):
        lr = lrs[s]
        for spec in cfg["params"]:
            n = spec["name"]
            p, tr = params[n], transforms[n]
            if spec["decay"] and lam != 0:
                p.mul_(1 - lr * lam)
            sent_idx, sent_val = [], []
            for w in range(workers):
                grad = inputs["grad." + n][s, w]
                d = beta * deltas[n][w].to(torch.float64) + lr * grad.to(torch.float64)
                d = d.to(torch.float32)
                coefs = tr.encode(d).to(torch.float32)  # the reference's parameter dtype
                idx, val = compress(coefs, cfg["topk"])
                sent = tr.decode(decompress(coefs, idx, val))
                deltas[n][w] = (d.to(torch.float64) - sent).to(torch.float32)
                sent_idx.append(idx)
                sent_val.append(val)
            aggregate = tr.decode(
                decompress(coefs, torch.cat(sent_idx, dim=-1), torch.cat(sent_val, dim=-1)))
            tol = UNDECIDED_REL * aggregate.abs().max().item()
            undecided[n] = torch.maximum(undecided[n], (aggregate.abs() <= tol).to(torch.float32))
            p.add_(aggregate.sign().to(torch.float32), alpha=-lr)

    out = {}
    for n in names:
        out["final." + n] = params[n]
        out["undecided." + n] = undecided[n]
        for w in range(workers):
            out["delta.%d.%s" % (w, n)] = deltas[n][w]
    write_safetensors(args.out, out)


if __name__ == "__main__":
    main()
