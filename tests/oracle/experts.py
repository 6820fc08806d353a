"""PyTorch oracle for the expert FFN bank (experts/expert_bank.h), used by tests/unit/test_expert_bank.cpp.

usage: experts.py <dir> <SWIGLU|GELU> [+ <dir> <SWIGLU|GELU>] ...

Each job reads from <dir> (written by the C++ test):
  x[rows,C], offsets[E+1] (int32; rows offsets[e]..offsets[e+1] belong to expert e), dy[rows,C],
  w_up[E,F,C], w_down[E,C,F], and w_gate[E,F,C] (SWIGLU) or b_up[E,F], b_down[E,C] (GELU),
computes in float64 with torch autograd, expert by expert on its own rows,
  SWIGLU  y = (silu(x Wg^T) * (x Wu^T)) Wd^T          GELU  y = gelu(x Wu^T + bu) Wd^T + bd   (tanh approximation)
back-propagates dy and writes y, dx and d<param> for every parameter (dw_gate, dw_up, dw_down, db_up, db_down) as
float64 .npy files into <dir>. Experts with no rows get exactly zero gradients. Several jobs chained with a lone
`+` share one interpreter start (importing torch costs ~1.5 s).

Exits non-zero with a message on any error. Run with /usr/bin/python3 (Debian's python3-torch); needs numpy, torch.
"""
import os
import sys

import torch
import torch.nn.functional as F

from oracle_common import expect, load, run_jobs, save


def run_job(job):
    expect(len(job) == 2, f"expected <dir> <SWIGLU|GELU>, got {job}")
    d, act = job
    expect(act in ("SWIGLU", "GELU"), f"activation must be SWIGLU or GELU, got {act!r}")
    expect(os.path.isdir(d), f"no such directory {d}")
    x, dy = load(d, "x", grad=True), load(d, "dy")
    offsets = load(d, "offsets", integer=True)
    params = {"w_up": load(d, "w_up", grad=True), "w_down": load(d, "w_down", grad=True)}
    if act == "SWIGLU":
        params["w_gate"] = load(d, "w_gate", grad=True)
    else:
        params["b_up"], params["b_down"] = load(d, "b_up", grad=True), load(d, "b_down", grad=True)

    expect(x.dim() == 2, f"x: expected 2 dims, got {tuple(x.shape)}")
    rows, C = x.shape
    E, Fd, C2 = params["w_up"].shape
    expect(C2 == C, f"w_up {tuple(params['w_up'].shape)} vs x {tuple(x.shape)}")
    expect(params["w_down"].shape == (E, C, Fd), f"w_down shape {tuple(params['w_down'].shape)}")
    if act == "SWIGLU":
        expect(params["w_gate"].shape == (E, Fd, C), f"w_gate shape {tuple(params['w_gate'].shape)}")
    else:
        expect(params["b_up"].shape == (E, Fd), f"b_up shape {tuple(params['b_up'].shape)}")
        expect(params["b_down"].shape == (E, C), f"b_down shape {tuple(params['b_down'].shape)}")
    expect(offsets.shape == (E + 1,), f"offsets shape {tuple(offsets.shape)}, E={E}")
    expect(int(offsets[0]) == 0 and int(offsets[-1]) == rows, f"offsets {offsets.tolist()} for rows={rows}")
    expect(bool((offsets[1:] >= offsets[:-1]).all()), f"offsets not non-decreasing: {offsets.tolist()}")
    expect(dy.shape == x.shape, f"dy shape {tuple(dy.shape)} vs x {tuple(x.shape)}")

    ys = []
    for e in range(E):
        xe = x[int(offsets[e]):int(offsets[e + 1])]
        if act == "SWIGLU":
            h = F.silu(F.linear(xe, params["w_gate"][e])) * F.linear(xe, params["w_up"][e])
            ys.append(F.linear(h, params["w_down"][e]))
        else:
            h = F.gelu(F.linear(xe, params["w_up"][e], params["b_up"][e]), approximate="tanh")
            ys.append(F.linear(h, params["w_down"][e], params["b_down"][e]))
    y = torch.cat(ys, dim=0)
    y.backward(dy)
    for name, p in params.items():  # a parameter no row reached has no .grad at all
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if x.grad is None:
        x.grad = torch.zeros_like(x)
    save(d, y=y, dx=x.grad, **{"d" + name: p.grad for name, p in params.items()})


def main(argv):
    return run_jobs(argv, "experts.py", __doc__, run_job, min_args=2)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
