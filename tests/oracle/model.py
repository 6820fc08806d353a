"""PyTorch twin of the C++ decoder (core/model.cpp): same parameter names, layout and math.

Used two ways:
  model.py check <dir> <config.json>   load weights/*.npy + inputs.npy/targets.npy from <dir>, write loss.npy,
                                       logits.npy and grad_<name>.npy (float64 autograd) for the C++ test.
  model.py bench <config.json>         time training steps (forward + backward + AdamW) in float32 eager mode
                                       and print one JSON line with tokens/s (for bench/bench_train).
Run with /usr/bin/python3 (Debian's python3-torch).
"""
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F


def rope(x, theta):
    # x: [B, T, nh, D]; interleaved pairs (2i, 2i+1), angle = pos * theta^(-2i/D)
    B, T, nh, D = x.shape
    pos = torch.arange(T, dtype=x.dtype).unsqueeze(1)
    inv = theta ** (-torch.arange(0, D, 2, dtype=x.dtype) / D)
    ang = pos * inv  # [T, D/2]
    cos = torch.cos(ang).view(1, T, 1, D // 2)
    sin = torch.sin(ang).view(1, T, 1, D // 2)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2)


class Norm(torch.nn.Module):
    def __init__(self, C, kind, eps):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = torch.nn.Parameter(torch.ones(C))
        if kind == "LAYERNORM":
            self.bias = torch.nn.Parameter(torch.zeros(C))

    def forward(self, x):
        if self.kind == "LAYERNORM":
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(torch.nn.Module):
    def __init__(self, C, H, Hkv, theta):
        super().__init__()
        D = C // H
        self.H, self.Hkv, self.D, self.theta = H, Hkv, D, theta
        self.wq = torch.nn.Parameter(torch.empty(H * D, C))
        self.wk = torch.nn.Parameter(torch.empty(Hkv * D, C))
        self.wv = torch.nn.Parameter(torch.empty(Hkv * D, C))
        self.wo = torch.nn.Parameter(torch.empty(C, H * D))

    def forward(self, x):
        B, T, C = x.shape
        H, Hkv, D = self.H, self.Hkv, self.D
        q = rope((x @ self.wq.t()).view(B, T, H, D), self.theta).transpose(1, 2)
        k = rope((x @ self.wk.t()).view(B, T, Hkv, D), self.theta).transpose(1, 2)
        v = (x @ self.wv.t()).view(B, T, Hkv, D).transpose(1, 2)
        if Hkv != H:
            k = k.repeat_interleave(H // Hkv, dim=1)
            v = v.repeat_interleave(H // Hkv, dim=1)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(D)
        mask = torch.ones(T, T, dtype=torch.bool).triu(1)
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, H * D)
        return y @ self.wo.t()


class DenseFfn(torch.nn.Module):
    def __init__(self, C, Fd, act):
        super().__init__()
        self.act = act
        if act == "SWIGLU":
            self.w_gate = torch.nn.Parameter(torch.empty(Fd, C))
        self.w_up = torch.nn.Parameter(torch.empty(Fd, C))
        self.w_down = torch.nn.Parameter(torch.empty(C, Fd))
        if act == "GELU":
            self.b_up = torch.nn.Parameter(torch.zeros(Fd))
            self.b_down = torch.nn.Parameter(torch.zeros(C))

    def forward(self, x):
        if self.act == "SWIGLU":
            return (F.silu(x @ self.w_gate.t()) * (x @ self.w_up.t())) @ self.w_down.t()
        return F.gelu(x @ self.w_up.t() + self.b_up, approximate="tanh") @ self.w_down.t() + self.b_down


class Block(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        C = c["d_model"]
        self.attn_norm = Norm(C, c["norm"], c["norm_eps"])
        self.attn = Attention(C, c["n_heads"], c["n_kv_heads"], c["rope_theta"])
        self.ffn_norm = Norm(C, c["norm"], c["norm_eps"])
        self.ffn = DenseFfn(C, c["d_ff"], c["activation"])

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class Model(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.tok_emb = torch.nn.Embedding(c["vocab_size"], c["d_model"])
        self.layers = torch.nn.ModuleList([Block(c) for _ in range(c["n_layers"])])
        self.final_norm = Norm(c["d_model"], c["norm"], c["norm_eps"])
        if not c.get("tie_embeddings", False):
            self.lm_head = torch.nn.Linear(c["d_model"], c["vocab_size"], bias=False)

    def forward(self, idx, targets):
        x = self.tok_emb(idx)
        for b in self.layers:
            x = b(x)
        x = self.final_norm(x)
        w = self.tok_emb.weight if self.c.get("tie_embeddings", False) else self.lm_head.weight
        logits = x @ w.t()
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1), ignore_index=-1)
        return logits, loss


def defaults(c):
    c.setdefault("n_kv_heads", c["n_heads"])
    c.setdefault("rope_theta", 10000.0)
    c.setdefault("norm_eps", 1e-5)
    c.setdefault("norm", "RMSNORM")
    c.setdefault("activation", "SWIGLU")
    return c


def check(d, cfg_path):
    c = defaults(json.load(open(cfg_path)))
    torch.set_default_dtype(torch.float64)
    m = Model(c)
    names = dict(m.named_parameters())
    for name, p in names.items():
        f = os.path.join(d, "weights", name + ".npy")
        if not os.path.exists(f):
            sys.exit(f"model.py: missing weight file {f} (the C++ model has no parameter {name}?)")
        w = np.load(f).astype(np.float64)
        if w.shape != tuple(p.shape):
            sys.exit(f"model.py: {name}: C++ shape {w.shape} != torch shape {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(torch.from_numpy(w))
    cpp_names = {f[:-4] for f in os.listdir(os.path.join(d, "weights"))}
    extra = cpp_names - set(names)
    if extra:
        sys.exit(f"model.py: C++ parameters unknown to the torch twin: {sorted(extra)}")
    idx = torch.from_numpy(np.load(os.path.join(d, "inputs.npy")).astype(np.int64))
    tgt = torch.from_numpy(np.load(os.path.join(d, "targets.npy")).astype(np.int64))
    logits, loss = m(idx, tgt)
    loss.backward()
    np.save(os.path.join(d, "loss.npy"), np.array([loss.item()]))
    np.save(os.path.join(d, "logits.npy"), logits.detach().numpy().reshape(-1, c["vocab_size"]))
    for name, p in names.items():
        np.save(os.path.join(d, "grad_" + name + ".npy"), p.grad.numpy())


def bench(cfg_path):
    c = defaults(json.load(open(cfg_path)))
    torch.manual_seed(0)
    threads = int(c.get("threads", 0)) or os.cpu_count()
    torch.set_num_threads(threads)
    m = Model(c)
    for name, p in m.named_parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    B, T, V = c["batch_size"], c["seq_len"], c["vocab_size"]
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, V, (B, T + 1), generator=g)
    x, y = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()

    def step():
        opt.zero_grad(set_to_none=True)
        _, loss = m(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        return loss.item()

    for _ in range(int(c.get("warmup", 2))):
        step()
    iters = int(c.get("iters", 10))
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    dt = (time.perf_counter() - t0) / iters
    print(json.dumps({"step_ms": dt * 1e3, "tokens_per_s": B * T / dt, "threads": threads,
                      "torch": torch.__version__}))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "check":
        check(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 3 and sys.argv[1] == "bench":
        bench(sys.argv[2])
    else:
        sys.exit("usage: model.py check <dir> <config.json> | model.py bench <config.json>")
