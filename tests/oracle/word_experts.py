"""PyTorch oracle for the word-expert table (experts/word_experts.h), used by tests/unit/test_word_experts.cpp.

usage: word_experts.py <swiglu|gelu> <dir> [+ <swiglu|gelu> <dir>] ...

Each job reads from <dir> (written by the C++ test):
  x[rows,C], dy[rows,C]                  float32
  experts[G], offsets[G+1]               int32 (expert of group g owns rows offsets[g]..offsets[g+1])
  w_up[E,F,C], w_down[E,C,F]             float32 whole tables, plus w_gate[E,F,C] for swiglu
computes, in float64 with torch autograd, y = FFN_{experts[g]}(x[rows of g]) group by group
  swiglu: (silu(x Wg^T) * (x Wu^T)) Wd^T        gelu: gelu_tanh(x Wu^T) Wd^T        (no biases)
back-propagates dy and writes y, dx and the gradients of the whole tables (dw_up, dw_down, dw_gate) as float64
.npy files into <dir>. Rows of experts no group uses get exactly zero gradient. Several jobs can be chained with a
lone `+` so one interpreter start serves them all.

Exits non-zero with a message on any error. Run with /usr/bin/python3 (Debian's python3-torch); needs numpy, torch.
"""
import os
import sys

import torch
import torch.nn.functional as F

from oracle_common import expect, load, run_jobs, save


def run_job(job):
    expect(len(job) == 2, f"expected <swiglu|gelu> <dir>, got {job}")
    act, d = job
    expect(act in ("swiglu", "gelu"), f"unknown activation {act!r} (swiglu | gelu)")
    expect(os.path.isdir(d), f"no such directory {d}")
    x = load(d, "x", grad=True)
    dy = load(d, "dy")
    experts = load(d, "experts", integer=True).reshape(-1).tolist()  # python ints
    offsets = load(d, "offsets", integer=True).reshape(-1).tolist()
    w_up = load(d, "w_up", grad=True)
    w_down = load(d, "w_down", grad=True)
    w_gate = load(d, "w_gate", grad=True) if act == "swiglu" else None
    expect(x.dim() == 2 and dy.shape == x.shape, f"x {tuple(x.shape)} and dy {tuple(dy.shape)} must be [rows,C]")
    E, Fh, C = w_up.shape
    expect(w_down.shape == (E, C, Fh), f"w_down {tuple(w_down.shape)} != {(E, C, Fh)}")
    expect(w_gate is None or w_gate.shape == w_up.shape, f"w_gate {tuple(w_gate.shape) if w_gate is not None else ''}")
    expect(x.shape[1] == C, f"x has {x.shape[1]} channels, tables {C}")
    G = len(experts)
    expect(len(offsets) == G + 1 and offsets[0] == 0 and offsets[-1] == x.shape[0],
           f"offsets {offsets} do not cover {x.shape[0]} rows in {G} groups")
    expect(len(set(experts)) == G and all(0 <= e < E for e in experts), f"experts {experts} not distinct in [0,{E})")

    parts = []
    for g, e in enumerate(experts):
        xg = x[offsets[g]:offsets[g + 1]]
        up = xg @ w_up[e].T
        if act == "swiglu":
            h = F.silu(xg @ w_gate[e].T) * up
        else:
            h = F.gelu(up, approximate="tanh")
        parts.append(h @ w_down[e].T)
    y = torch.cat(parts, 0) if parts else torch.zeros_like(x)
    expect(y.shape == x.shape, f"y {tuple(y.shape)} != x {tuple(x.shape)}")
    y.backward(dy)
    zeros = lambda w: w.grad if w.grad is not None else torch.zeros_like(w)
    out = dict(y=y, dx=zeros(x), dw_up=zeros(w_up), dw_down=zeros(w_down))
    if w_gate is not None:
        out["dw_gate"] = zeros(w_gate)
    save(d, **out)


def main(argv):
    return run_jobs(argv, "word_experts.py", __doc__, run_job, min_args=2)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
