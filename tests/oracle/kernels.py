"""PyTorch oracle for the CPU kernels (core/kernels/cpu/kernels.h), used by tests/unit/test_kernels.cpp.

usage: kernels.py <op> <dir> [args...] [+ <op> <dir> [args...]] ...

Each job reads its inputs as .npy files from <dir> (written by the C++ test), computes the forward pass in
float64 with torch autograd, back-propagates the given upstream gradient `dout.npy` and writes the outputs and
every gradient as float64 .npy files into the same <dir>. Several jobs can be chained with a lone `+` so one
interpreter start (importing torch costs ~1.5 s) serves several configurations.

ops (inputs -> outputs):
  matmul <dir> <trans_a 0|1> <trans_b 0|1> <alpha> <beta>   a, b, c -> out = alpha op(a) op(b) + beta c
  linear <dir> <bias|nobias>          x[N,IC], w[OC,IC], (b[OC]), dout -> out, dx, dw, (db)
  embedding <dir>                     ids[N] int32, wte[V,C], dout[N,C] -> out, dwte
  rmsnorm <dir> <eps>                 x[N,C], w[C], dout -> out, rstd, dx, dw
  layernorm <dir> <eps>               x[N,C], w[C], b[C], dout -> out, mean, rstd, dx, dw, db
  rope <dir> <pos0> <theta>           x[B,T,nh,D], dout -> out, dx
  attention <dir>                     q[B,T,H,D], k[B,T,Hkv,D], v, dout -> out, att[B,H,T,T], dq, dk, dv
  rope_attention <dir> <pos0> <theta> q, k (before rope), v, dout -> out, dq, dk, dv (rope applied to q and k)
  gelu <dir>                          x, dout -> out, dx          (tanh approximation)
  swiglu <dir>                        gate, up, dout -> out, dgate, dup
  cross_entropy <dir> <dloss>         logits[N,V], targets[N] int32 (<0 ignored) -> losses, probs, loss, dlogits

Exits non-zero with a message on any error. Run with /usr/bin/python3 (Debian's python3-torch); needs numpy, torch.
"""
import math
import os
import sys

import torch
import torch.nn.functional as F

from oracle_common import DT, OracleError, expect, load, run_jobs, save, to_float


def shape_of(t, n, name):
    expect(t.dim() == n, f"{name}: expected {n} dims, got shape {tuple(t.shape)}")
    return tuple(t.shape)


def backward(out, dout):
    expect(out.shape == dout.shape, f"dout shape {tuple(dout.shape)} != output shape {tuple(out.shape)}")
    out.backward(dout)


# ---------------------------------------------------------------- ops
def op_matmul(d, ta, tb, alpha, beta):
    a, b, c = load(d, "a"), load(d, "b"), load(d, "c")
    shape_of(a, 2, "a"), shape_of(b, 2, "b"), shape_of(c, 2, "c")
    opa = a.t() if ta == "1" else a
    opb = b.t() if tb == "1" else b
    expect(opa.shape[1] == opb.shape[0], f"inner dims differ: op(a) {tuple(opa.shape)} op(b) {tuple(opb.shape)}")
    expect(c.shape == (opa.shape[0], opb.shape[1]), f"c shape {tuple(c.shape)}")
    save(d, out=to_float(alpha, "alpha") * (opa @ opb) + to_float(beta, "beta") * c)


def op_linear(d, bias):
    expect(bias in ("bias", "nobias"), f"linear: expected bias|nobias, got {bias!r}")
    x, w, dout = load(d, "x", grad=True), load(d, "w", grad=True), load(d, "dout")
    N, IC = shape_of(x, 2, "x")
    OC, IC2 = shape_of(w, 2, "w")
    expect(IC == IC2, f"linear: x has {IC} input channels, w has {IC2}")
    b = load(d, "b", grad=True) if bias == "bias" else None
    out = F.linear(x, w, b)
    backward(out, dout)
    save(d, out=out, dx=x.grad, dw=w.grad)
    if b is not None:
        save(d, db=b.grad)


def op_embedding(d):
    ids, wte, dout = load(d, "ids", integer=True), load(d, "wte", grad=True), load(d, "dout")
    V, C = shape_of(wte, 2, "wte")
    expect(ids.dim() == 1 and bool((ids >= 0).all()) and bool((ids < V).all()), "embedding: ids out of range")
    out = F.embedding(ids, wte)
    backward(out, dout)
    save(d, out=out, dwte=wte.grad)


def op_rmsnorm(d, eps):
    eps = to_float(eps, "eps")
    x, w, dout = load(d, "x", grad=True), load(d, "w", grad=True), load(d, "dout")
    N, C = shape_of(x, 2, "x")
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    out = x * rstd * w
    backward(out, dout)
    save(d, out=out, rstd=rstd.squeeze(-1), dx=x.grad, dw=w.grad)


def op_layernorm(d, eps):
    eps = to_float(eps, "eps")
    x, w, b, dout = load(d, "x", grad=True), load(d, "w", grad=True), load(d, "b", grad=True), load(d, "dout")
    N, C = shape_of(x, 2, "x")
    out = F.layer_norm(x, (C,), w, b, eps)
    backward(out, dout)
    with torch.no_grad():
        mean = x.mean(-1)
        rstd = torch.rsqrt(x.var(-1, unbiased=False) + eps)
    save(d, out=out, mean=mean, rstd=rstd, dx=x.grad, dw=w.grad, db=b.grad)


def rope(x, pos0, theta):
    # x[B,T,nh,D]; interleaved pairs (x[2i], x[2i+1]) as complex numbers, multiplied by exp(i (pos0 + t) theta^(-2i/D))
    # (the original LLaMA formulation through view_as_complex)
    B, T, nh, D = x.shape
    expect(D % 2 == 0, f"rope: D={D} must be even")
    pos = torch.arange(pos0, pos0 + T, dtype=DT)
    inv_freq = theta ** (-torch.arange(0, D, 2, dtype=DT) / D)  # [D/2]
    ang = torch.outer(pos, inv_freq)  # [T, D/2]
    rot = torch.polar(torch.ones_like(ang), ang).view(1, T, 1, D // 2)
    xc = torch.view_as_complex(x.reshape(B, T, nh, D // 2, 2).contiguous())
    return torch.view_as_real(xc * rot).reshape(B, T, nh, D)


def op_rope(d, pos0, theta):
    x, dout = load(d, "x", grad=True), load(d, "dout")
    shape_of(x, 4, "x")
    out = rope(x, int(pos0), to_float(theta, "theta"))
    backward(out, dout)
    save(d, out=out, dx=x.grad)


def attention(q, k, v):
    # q[B,T,H,D], k/v[B,T,Hkv,D] -> out[B,T,H,D], att[B,H,T,T]; query head h reads kv head h // (H / Hkv)
    B, T, H, D = shape_of(q, 4, "q")
    Bk, Tk, Hkv, Dk = shape_of(k, 4, "k")
    expect((Bk, Tk, Dk) == (B, T, D) and v.shape == k.shape, f"q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)}")
    expect(H % Hkv == 0, f"H={H} is not a multiple of Hkv={Hkv}")
    group = H // Hkv
    qh = q.permute(0, 2, 1, 3)  # [B,H,T,D]
    kh = k.permute(0, 2, 1, 3).repeat_interleave(group, dim=1)
    vh = v.permute(0, 2, 1, 3).repeat_interleave(group, dim=1)
    s = qh @ kh.transpose(-1, -2) / math.sqrt(D)
    mask = torch.ones(T, T, dtype=torch.bool).triu(1)
    att = torch.softmax(s.masked_fill(mask, float("-inf")), dim=-1)
    out = (att @ vh).permute(0, 2, 1, 3)
    return out, att


def op_attention(d):
    q, k, v = load(d, "q", grad=True), load(d, "k", grad=True), load(d, "v", grad=True)
    out, att = attention(q, k, v)
    backward(out, load(d, "dout"))
    save(d, out=out, att=att, dq=q.grad, dk=k.grad, dv=v.grad)


def op_rope_attention(d, pos0, theta):
    q, k, v = load(d, "q", grad=True), load(d, "k", grad=True), load(d, "v", grad=True)
    pos0, theta = int(pos0), to_float(theta, "theta")
    out, _ = attention(rope(q, pos0, theta), rope(k, pos0, theta), v)
    backward(out, load(d, "dout"))
    save(d, out=out, dq=q.grad, dk=k.grad, dv=v.grad)


def op_gelu(d):
    x, dout = load(d, "x", grad=True), load(d, "dout")
    out = F.gelu(x, approximate="tanh")
    backward(out, dout)
    save(d, out=out, dx=x.grad)


def op_swiglu(d):
    gate, up, dout = load(d, "gate", grad=True), load(d, "up", grad=True), load(d, "dout")
    expect(gate.shape == up.shape, f"gate {tuple(gate.shape)} vs up {tuple(up.shape)}")
    out = F.silu(gate) * up
    backward(out, dout)
    save(d, out=out, dgate=gate.grad, dup=up.grad)


def op_cross_entropy(d, dloss):
    logits, targets = load(d, "logits", grad=True), load(d, "targets", integer=True)
    N, V = shape_of(logits, 2, "logits")
    expect(targets.shape == (N,), f"targets shape {tuple(targets.shape)}, logits {tuple(logits.shape)}")
    expect(bool((targets < V).all()), "cross_entropy: target >= V")
    keep = targets >= 0
    count = int(keep.sum())
    logp = torch.log_softmax(logits, dim=-1)
    losses = -logp.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1) * keep
    loss = losses.sum() / count if count > 0 else losses.sum() * 0
    if count > 0:  # cross-check against torch's own ignore_index implementation
        ref = F.cross_entropy(logits.detach(), targets.masked_fill(~keep, -100), ignore_index=-100)
        expect(torch.allclose(ref, loss.detach(), rtol=1e-12, atol=1e-12), f"cross_entropy: {ref} vs {loss}")
    (loss * to_float(dloss, "dloss")).backward()
    save(d, losses=losses, probs=logp.exp(), loss=loss.reshape(1), dlogits=logits.grad)


OPS = {
    "matmul": (op_matmul, 4),
    "linear": (op_linear, 1),
    "embedding": (op_embedding, 0),
    "rmsnorm": (op_rmsnorm, 1),
    "layernorm": (op_layernorm, 1),
    "rope": (op_rope, 2),
    "attention": (op_attention, 0),
    "rope_attention": (op_rope_attention, 2),
    "gelu": (op_gelu, 0),
    "swiglu": (op_swiglu, 0),
    "cross_entropy": (op_cross_entropy, 1),
}


def run_job(job):
    if len(job) < 2:
        raise OracleError(f"job {' '.join(job)!r}: expected <op> <dir> [args]")
    op, d, args = job[0], job[1], job[2:]
    if op not in OPS:
        raise OracleError(f"unknown op {op!r} (known: {', '.join(OPS)})")
    fn, nargs = OPS[op]
    if len(args) != nargs:
        raise OracleError(f"{op}: expected {nargs} argument(s) after <dir>, got {args}")
    if not os.path.isdir(d):
        raise OracleError(f"{op}: no such directory {d}")
    fn(d, *args)


def main(argv):
    return run_jobs(argv, "kernels.py", __doc__, run_job)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
