"""PyTorch oracle for the learned top-k router (router/router.h, LearnedRouter), used by tests/unit/test_router.cpp.

usage: router.py <dir> <score> <k> <capacity_factor|dropless> <normalize 0|1> <aux_coef> <z_coef> <loss_scale>
                 [+ <dir> ...] ...

Each job reads from <dir> (written by the C++ test):
  x[N,C] float32, w[E,C] float32, dgate[N,k] float32, and optionally noise[N,C] (the jitter multipliers) and
  bias[E] (the selection bias of auxiliary-loss-free balancing)
and recomputes the router forward in float64, choosing the top-k experts and the capacity drops itself:
  x' = x * noise;  logits = x' w^T;  probs = softmax(logits) | sigmoid(logits)
  top-k by descending logit (with a bias: by descending probs + bias, a constant), ties -> lower expert index
  capacity = ceil(v - 1e-6 v), v = k N cf / E; slot-major priority (all 1st choices, then all 2nd, ... tokens by
  index within a slot); dropped slots get expert -1, position -1, gate 0
  gates = selected probs (never the bias), divided by their sum when normalize and k > 1 (before dropping)
  aux = E * sum_e f_e P_e, f_e = pre-drop slot fraction (constant), P_e = mean probs (sigmoid: probs / row sum)
  z = mean_n logsumexp(logits_n)^2
then back-propagates L = sum(gate * dgate) + loss_scale * (aux_coef * aux + z_coef * z) with autograd and writes
  logits, probs, choice[N,k] (pre-drop), expert[N,k], position[N,k], gate[N,k], capacity[1], aux[1], z[1], dx, dw
as float64 / int64 .npy files into <dir>. Several jobs are chained with a lone `+` (importing torch costs ~1.5 s).

Exits non-zero with a message on any error. Run with /usr/bin/python3 (Debian's python3-torch); needs numpy, torch.
"""
import math
import os
import sys

import numpy as np
import torch

from oracle_common import DT, expect, load, run_jobs, save, to_float


def top_k(key, k):
    """[N,E] -> [N,k] expert ids by descending key, ties to the lower expert index."""
    order = np.argsort(-key.detach().numpy(), axis=1, kind="stable")
    return torch.from_numpy(order[:, :k].copy())


def assign_capacity(choice, E, capacity):
    """slot-major capacity assignment -> kept mask, expert (-1 dropped) and position (-1 dropped), all [N,k]."""
    N, k = choice.shape
    kept = torch.zeros(N, k, dtype=torch.bool)
    expert = torch.full((N, k), -1, dtype=torch.int64)
    position = torch.full((N, k), -1, dtype=torch.int64)
    fill = [0] * E
    for j in range(k):
        for n in range(N):
            e = int(choice[n, j])
            if capacity is not None and fill[e] >= capacity:
                continue
            kept[n, j] = True
            expert[n, j] = e
            position[n, j] = fill[e]
            fill[e] += 1
    return kept, expert, position


def run_job(job):
    expect(len(job) == 8, f"expected <dir> <score> <k> <cf|dropless> <normalize> <aux> <z> <scale>, got {job}")
    d, score, k, cf, normalize, aux_coef, z_coef, loss_scale = job
    expect(os.path.isdir(d), f"no such directory {d}")
    expect(score in ("softmax", "sigmoid"), f"score must be softmax or sigmoid, got {score!r}")
    k = int(k)
    normalize = normalize == "1"
    aux_coef, z_coef = to_float(aux_coef, "aux_coef"), to_float(z_coef, "z_coef")
    loss_scale = to_float(loss_scale, "loss_scale")

    x = load(d, "x").requires_grad_(True)
    w = load(d, "w").requires_grad_(True)
    dgate = load(d, "dgate")
    noise = load(d, "noise", required=False)
    bias = load(d, "bias", required=False)
    expect(x.dim() == 2 and w.dim() == 2 and x.shape[1] == w.shape[1], f"x {tuple(x.shape)} vs w {tuple(w.shape)}")
    N, E = x.shape[0], w.shape[0]
    expect(1 <= k <= E, f"k {k} outside [1, {E}]")
    expect(tuple(dgate.shape) == (N, k), f"dgate shape {tuple(dgate.shape)} != {(N, k)}")

    xin = x * noise if noise is not None else x
    logits = xin @ w.t()
    probs = torch.softmax(logits, dim=1) if score == "softmax" else torch.sigmoid(logits)
    if bias is not None:
        expect(tuple(bias.shape) == (E,), f"bias shape {tuple(bias.shape)} != {(E,)}")
    # the bias moves the selection only (a constant: no gradient flows through the choice)
    choice = top_k(logits, k) if bias is None else top_k(probs + bias, k)
    if cf == "dropless":
        capacity = None
    else:
        v = k * N * to_float(cf, "capacity_factor") / E
        capacity = math.ceil(v - 1e-6 * v)
    kept, expert, position = assign_capacity(choice, E, capacity)

    sel = probs.gather(1, choice)
    if normalize and k > 1:
        sel = sel / sel.sum(dim=1, keepdim=True)
    gate = sel * kept.to(DT)

    f = torch.bincount(choice.reshape(-1), minlength=E).to(DT) / (N * k)
    q = probs if score == "softmax" else probs / probs.sum(dim=1, keepdim=True)
    aux = E * (f * q.mean(dim=0)).sum()
    z = (torch.logsumexp(logits, dim=1) ** 2).mean()

    loss = (gate * dgate).sum() + loss_scale * (aux_coef * aux + z_coef * z)
    loss.backward()
    save(d, logits=logits, probs=probs, choice=choice, expert=expert, position=position, gate=gate,
         capacity=np.array([-1 if capacity is None else capacity], dtype=np.int64),
         aux=aux.reshape(1), z=z.reshape(1), dx=x.grad, dw=w.grad)


def main(argv):
    return run_jobs(argv, "router.py", __doc__, run_job)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
