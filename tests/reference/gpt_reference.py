#!/usr/bin/python3
"""Independent PyTorch reference for shoal's GPT: forward, loss, gradients and AdamW steps.

Written from the model description (docs/architecture.md, "Model"), not from shoal's C++ code:
GPT-2 blocks with pre-LayerNorm, fused qkv, causal softmax attention, 4x MLP with tanh-GELU, final
LayerNorm, head tied to the token embedding; torch.optim.AdamW with weight decay on 2-D weights,
clip_grad_norm_, linear warm-up then cosine decay to min_lr_ratio * lr.

Usage: gpt_reference.py --model model.safetensors --inputs inputs.safetensors --config cfg.json \
           --out out.safetensors
inputs.safetensors holds "tokens" and "targets" of shape (steps, micro, B, T) int64.
out.safetensors receives "logits" (B, T, V) and "grad.<name>" for micro-batch (0, 0) at the initial
weights, plus "losses" (steps,) float64: the mean micro-batch loss of each optimizer step, and
"final.<name>" with the weights after the last step.
"""
import argparse
import json
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from safetensors_io import read_safetensors, write_safetensors


class Block(nn.Module):
    def __init__(self, c, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln1 = nn.LayerNorm(c)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(c, 3 * c)
        self.attn.proj = nn.Linear(c, c)
        self.ln2 = nn.LayerNorm(c)
        self.mlp = nn.Module()
        self.mlp.fc = nn.Linear(c, 4 * c)
        self.mlp.proj = nn.Linear(4 * c, c)

    def forward(self, x):
        b, t, c = x.shape
        h = self.n_head
        q, k, v = self.attn.qkv(self.ln1(x)).split(c, dim=2)
        q = q.view(b, t, h, c // h).transpose(1, 2)
        k = k.view(b, t, h, c // h).transpose(1, 2)
        v = v.view(b, t, h, c // h).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(c // h))
        mask = torch.tril(torch.ones(t, t, dtype=torch.bool))
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(b, t, c)
        x = x + self.attn.proj(y)
        x = x + self.mlp.proj(F.gelu(self.mlp.fc(self.ln2(x)), approximate="tanh"))
        return x


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        c = cfg["n_embd"]
        self.wte = nn.Embedding(cfg["vocab_size"], c)
        self.wpe = nn.Embedding(cfg["block_size"], c)
        self.blocks = nn.ModuleList(Block(c, cfg["n_head"]) for _ in range(cfg["n_layer"]))
        self.ln_f = nn.LayerNorm(c)

    def forward(self, idx):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t))
        for blk in self.blocks:
            x = blk(x)
        return self.ln_f(x) @ self.wte.weight.t()   # tied head


def lr_at(step, cfg):
    peak, warm, total = cfg["lr"], cfg["warmup_steps"], cfg["steps"]
    floor = peak * cfg["min_lr_ratio"]
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return floor + 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * (peak - floor)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = json.load(open(args.config))
    model = GPT(cfg)
    weights = read_safetensors(args.model)
    state = {k: weights[k] for k in model.state_dict().keys()}
    model.load_state_dict(state, strict=True)
    inputs = read_safetensors(args.inputs)
    tokens, targets = inputs["tokens"], inputs["targets"]
    steps, micro = tokens.shape[0], tokens.shape[1]
    vocab = cfg["vocab_size"]

    out = {}
    logits = model(tokens[0, 0])
    out["logits"] = logits.detach().clone()
    loss = F.cross_entropy(logits.view(-1, vocab), targets[0, 0].reshape(-1))
    loss.backward()
    for name, p in model.named_parameters():
        out["grad." + name] = p.grad.detach().clone()
    model.zero_grad(set_to_none=True)

    decay = [p for n, p in model.named_parameters() if p.dim() == 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]), eps=cfg["eps"])
    losses = []
    for s in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(s, cfg)
        total = 0.0
        for m in range(micro):
            lg = model(tokens[s, m])
            l = F.cross_entropy(lg.view(-1, vocab), targets[s, m].reshape(-1))
            (l / micro).backward()
            total += l.item()
        losses.append(total / micro)
        if cfg["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
    out["losses"] = torch.tensor(losses, dtype=torch.float64)
    for name, p in model.named_parameters():
        out["final." + name] = p.detach().clone()
    write_safetensors(args.out, out)


if __name__ == "__main__":
    main()
