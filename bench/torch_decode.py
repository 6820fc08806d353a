"""The PyTorch baseline of bench/serve.sh: the same model as a checkpoint (weights read from its model.h5 with h5py),
decoding greedily in eager mode with a KV cache, the way a plain PyTorch server loop does (Hugging Face Mixtral's
sparse MoE block: route, then one gather / FFN / index_add per expert). Prints one JSON line per batch size.

usage: /usr/bin/python3 bench/torch_decode.py CHECKPOINT_STEP_DIR [--batches 1,16] [--prompt 17] [--new 64]
       [--threads 2] [--greedy-ids "ID ID ..."]
--greedy-ids: instead, print the greedy continuation (--new tokens) of those prompt ids, to check that this loop
decodes the same model as `moe generate` (bench/serve.sh compares them).
"""
import argparse
import json
import math
import re
import time

import h5py
import torch
import torch.nn.functional as F


def model_config(step_dir):
    """The model block of the checkpoint's manifest.txt (protobuf text): the fields the decoder needs."""
    text = open(step_dir + "/manifest.txt").read()
    block = text[text.index("model {"):]
    depth, end = 0, 0
    for i, ch in enumerate(block):
        depth += ch == "{"
        depth -= ch == "}"
        if depth == 0 and ch == "}":
            end = i
            break
    block = block[:end]

    def field(name, default=None, cast=int):
        m = re.search(r"(?m)^\s*%s: (\S+)" % name, block)
        return cast(m.group(1)) if m else default

    c = {k: field(k) for k in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff")}
    c["n_kv_heads"] = field("n_kv_heads", c["n_heads"])
    c["rope_theta"] = field("rope_theta", 10000.0, float)
    c["norm_eps"] = field("norm_eps", 1e-5, float)
    c["tie"] = field("tie_embeddings", "false", str) == "true"
    c["pattern"] = re.findall(r"(?m)^\s*ffn_pattern: (\S+)", block) or ["FFN_DENSE"]
    c["experts"] = field("num_experts", 0)
    c["top_k"] = field("top_k", 2)
    assert field("activation", "SWIGLU", str) == "SWIGLU" and field("norm", "RMSNORM", str) == "RMSNORM", \
        "torch_decode.py: SwiGLU + RMSNorm models only"
    return c


def load(step_dir, c):
    f = h5py.File(step_dir + "/model.h5", "r")
    w = lambda name: torch.from_numpy(f["params/" + name][()]).float()
    p = {"emb": w("tok_emb.weight"), "final": w("final_norm.weight")}
    p["head"] = p["emb"] if c["tie"] else w("lm_head.weight")
    p["layers"] = []
    for l in range(c["n_layers"]):
        pre = "layers.%d." % l
        L = {k: w(pre + "attn." + k) for k in ("wq", "wk", "wv", "wo")}
        L["n1"], L["n2"] = w(pre + "attn_norm.weight"), w(pre + "ffn_norm.weight")
        kind = c["pattern"][l % len(c["pattern"])]
        if kind == "FFN_MOE":
            L["router"] = w(pre + "ffn.router.weight")
            L["experts"] = [w(pre + "ffn.experts." + k) for k in ("w_gate", "w_up", "w_down")]  # [E,F,C],[E,F,C],[E,C,F]
        else:
            assert kind == "FFN_DENSE", "torch_decode.py: dense and MoE layers only, not " + kind
            L["ffn"] = [w(pre + "ffn." + k) for k in ("w_gate", "w_up", "w_down")]
        p["layers"].append(L)
    return p


def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x, pos, theta):  # x [B, T, nh, D] at positions pos [T]; interleaved pairs
    D = x.shape[-1]
    inv = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = (pos.double().unsqueeze(1) * inv).float()
    cos, sin = ang.cos().view(1, -1, 1, D // 2), ang.sin().view(1, -1, 1, D // 2)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


def moe_ffn(x, L, k):  # x [N, C]: Mixtral's sparse block
    logits = x @ L["router"].t()
    probs = logits.softmax(-1)
    gates, chosen = probs.topk(k, dim=-1)
    gates = gates / gates.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    wg, wu, wd = L["experts"]
    for e in range(wg.shape[0]):
        rows, slot = (chosen == e).nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        h = x[rows]
        y = (F.silu(h @ wg[e].t()) * (h @ wu[e].t())) @ wd[e].t()
        out.index_add_(0, rows, y * gates[rows, slot].unsqueeze(1))
    return out


class Decoder:
    def __init__(self, c, p, B, T):
        self.c, self.p = c, p
        D = c["d_model"] // c["n_heads"]
        self.k = [torch.zeros(B, c["n_kv_heads"], T, D) for _ in range(c["n_layers"])]
        self.v = [torch.zeros(B, c["n_kv_heads"], T, D) for _ in range(c["n_layers"])]

    def step(self, ids, pos0):  # ids [B, T] at positions pos0..pos0+T-1 -> logits of the last position [B, V]
        c, p = self.c, self.p
        B, T = ids.shape
        H, Hkv, C = c["n_heads"], c["n_kv_heads"], c["d_model"]
        D = C // H
        pos = torch.arange(pos0, pos0 + T)
        x = p["emb"][ids]
        for l, L in enumerate(p["layers"]):
            h = rms(x, L["n1"], c["norm_eps"])
            q = rope((h @ L["wq"].t()).view(B, T, H, D), pos, c["rope_theta"]).transpose(1, 2)
            kk = rope((h @ L["wk"].t()).view(B, T, Hkv, D), pos, c["rope_theta"]).transpose(1, 2)
            vv = (h @ L["wv"].t()).view(B, T, Hkv, D).transpose(1, 2)
            self.k[l][:, :, pos0:pos0 + T] = kk
            self.v[l][:, :, pos0:pos0 + T] = vv
            K = self.k[l][:, :, :pos0 + T].repeat_interleave(H // Hkv, dim=1)
            V = self.v[l][:, :, :pos0 + T].repeat_interleave(H // Hkv, dim=1)
            att = (q @ K.transpose(-2, -1)) / math.sqrt(D)
            if T > 1:
                mask = torch.ones(T, pos0 + T, dtype=torch.bool).triu(pos0 + 1)
                att = att.masked_fill(mask, float("-inf"))
            y = (att.softmax(-1) @ V).transpose(1, 2).reshape(B, T, H * D)
            x = x + y @ L["wo"].t()
            h = rms(x, L["n2"], c["norm_eps"])
            if "router" in L:
                x = x + moe_ffn(h.reshape(B * T, C), L, c["top_k"]).view(B, T, C)
            else:
                wg, wu, wd = L["ffn"]
                x = x + (F.silu(h @ wg.t()) * (h @ wu.t())) @ wd.t()
        return rms(x[:, -1], p["final"], c["norm_eps"]) @ p["head"].t()


def run(c, p, B, prompt, new):
    g = torch.Generator().manual_seed(B)
    ids = torch.randint(0, c["vocab_size"], (B, prompt), generator=g)
    dec = Decoder(c, p, B, prompt + new)
    with torch.inference_mode():
        logits = dec.step(ids, 0)
        t0 = time.perf_counter()
        for i in range(new):
            nxt = logits.argmax(-1, keepdim=True)
            logits = dec.step(nxt, prompt + i)
        dt = time.perf_counter() - t0
    return {"batch": B, "tokens_per_s": B * new / dt, "ms_per_step": dt / new * 1e3}


def greedy(c, p, ids, new):
    dec = Decoder(c, p, 1, len(ids) + new)
    out = []
    with torch.inference_mode():
        logits = dec.step(torch.tensor([ids]), 0)
        for i in range(new):
            nxt = int(logits[0].argmax())
            out.append(nxt)
            logits = dec.step(torch.tensor([[nxt]]), len(ids) + i)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("step_dir")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt", type=int, default=17)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--greedy-ids", default="")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    c = model_config(a.step_dir)
    p = load(a.step_dir, c)
    if a.greedy_ids:
        print(" ".join(str(t) for t in greedy(c, p, [int(t) for t in a.greedy_ids.split()], a.new)))
        return
    run(c, p, 1, a.prompt, 4)  # warm-up
    for B in [int(b) for b in a.batches.split(",")]:
        r = run(c, p, B, a.prompt, a.new)
        r.update(threads=a.threads, torch=torch.__version__)
        print("TORCH " + json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
