#!/usr/bin/env python3
"""Quality at equal active FLOPs: dense vs learned MoE vs word experts (hash-routed, MoWE routing vocabulary with and
without a shared table and the skip list), 3 seeds, validation loss overall and by the target token's training
frequency rank (moe eval --by-frequency), on tinyshakespeare and on a second corpus, the King James Version of the
Bible (public domain; Debian's bible-kjv-text package, dumped with the `bible` program of bible-kjv).

  /usr/bin/python3 bench/quality.py [--steps 300] [--seeds 1,2,3] [--jobs 2] [--corpora shakespeare,kjv]
                                    [--variants dense,moe,hash,mowe,mowe_shared_skip] [--out runs/quality]

Every model: d_model 64, 4 layers (layers 1 and 3 are the variant's FFN, 0 and 2 dense), 4/2 heads, seq_len 64,
batch 16, a BPE tokenizer of 8192 pieces per corpus (so that the rarest bucket, ranks > 4096, is populated). Active
FLOPs per token are equal: the dense FFN has d_ff 192; the MoE 8 experts top-2 of d_expert 96; every word-expert
layer runs one expert of d_expert 192. Word-expert tables hold 4096 experts (3584 of them one per frequent route).
Prints one markdown table per corpus (mean +- std over the seeds) and writes results.json under --out.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOE = os.environ.get("MOE_BIN", os.path.join(ROOT, "build", "moe"))  # (a copy keeps a rebuild out of a long run)

BASE = """model {{ d_model: 64 n_layers: 4 n_heads: 4 n_kv_heads: 2 d_ff: 192 max_seq_len: 64 {ffn} }}
data {{ train_file: "{train}" tokenizer_model: "{tok}" seq_len: 64 batch_size: 16 val_fraction: 0.1 }}
optimizer {{ lr: 0.004 min_lr: 0.0004 weight_decay: 0.1 grad_clip: 1.0 warmup_steps: 20 }}
train {{ steps: {steps} log_every: 50 eval_every: 0 eval_batches: 8 seed: {seed} out_dir: "{out}" }}
checkpoint {{ every: 0 }}
"""
WORD = "word_experts {{ num_experts: 4096 d_expert: 192 num_frequent: 3584 {extra} }}"
VARIANTS = {
    "dense": "ffn_pattern: [FFN_DENSE]",
    "moe": "ffn_pattern: [FFN_DENSE, FFN_MOE] moe { num_experts: 8 top_k: 2 d_expert: 96 aux_loss_coef: 0.01 }",
    "hash": "ffn_pattern: [FFN_DENSE, FFN_WORD_EXPERT] word_experts { num_experts: 4096 d_expert: 192 "
            "hash_routing: true }",
    "mowe": "ffn_pattern: [FFN_DENSE, FFN_WORD_EXPERT] "
            + WORD.format(extra="routing_vocab_size: 65536 skip_top: 0"),
    "mowe_shared_skip": "ffn_pattern: [FFN_DENSE, FFN_WORD_EXPERT] "
                        + WORD.format(extra="routing_vocab_size: 65536 skip_top: 16 share_table: true"),
}
LABELS = {
    "dense": "dense (d_ff 192)",
    "moe": "learned MoE, 8 experts top-2 (d_expert 96)",
    "hash": "word experts, hash-routed by token id",
    "mowe": "MoWE, routing vocabulary 65,536",
    "mowe_shared_skip": "MoWE, routing vocabulary, shared table + skip top 16",
}


def sh(cmd, log):
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if r.returncode != 0:
        sys.exit("failed (%d): %s\n%s" % (r.returncode, " ".join(cmd), open(log).read()[-3000:]))


def prepare_kjv(path):
    """The KJV text, one verse per line without its number (chapter headings kept), its first ~1.1 MB."""
    if os.path.exists(path):
        return
    if not shutil.which("bible"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "bible-kjv", "bible-kjv-text"], check=True,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    out = subprocess.run(["bible", "-l0", "Genesis1:1-Revelation22:21"], capture_output=True, text=True, check=True)
    lines = []
    for line in out.stdout.splitlines():
        s = line.strip()
        if not s:
            continue
        head, _, rest = s.partition(" ")
        lines.append(rest if head.isdigit() else s)
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text[:1_115_000])


def tokenizer(corpus_file, out):
    """One BPE tokenizer of 8192 pieces per corpus (a 1-step run trains it), shared by every run."""
    tok = os.path.join(out, "tokenizer.model")
    if os.path.exists(tok):
        return tok
    cfg = os.path.join(out, "tok.pbtxt")
    os.makedirs(out, exist_ok=True)
    with open(cfg, "w") as f:
        f.write(BASE.format(ffn="", train=corpus_file, tok="", steps=1, seed=1, out=out)
                .replace('tokenizer_model: ""', "tokenizer_vocab_size: 8192"))
    sh([MOE, "train", "--config", cfg, "--threads", "2"], os.path.join(out, "tok.log"))
    return tok


def run_one(job):
    corpus, corpus_file, tok, variant, seed, steps, out = job
    d = os.path.join(out, corpus, variant, "seed%d" % seed)
    res = os.path.join(d, "eval.json")
    if os.path.exists(res):
        return job, json.load(open(res))
    os.makedirs(d, exist_ok=True)
    cfg = os.path.join(d, "config.pbtxt")
    with open(cfg, "w") as f:
        f.write(BASE.format(ffn=VARIANTS[variant], train=corpus_file, tok=tok, steps=steps, seed=seed, out=d))
    sh([MOE, "train", "--config", cfg, "--threads", "1"], os.path.join(d, "train.log"))
    sh([MOE, "eval", "--checkpoint", os.path.join(d, "checkpoints"), "--by-frequency", "--threads", "1"],
       os.path.join(d, "eval.log"))
    r = json.loads(open(os.path.join(d, "eval.log")).read().strip().splitlines()[-1])
    tps = [float(l.split("|")[4].split()[0]) for l in open(os.path.join(d, "train.log")) if "tok/s" in l]
    r["tokens_per_s"] = statistics.mean(tps[1:] or tps)
    with open(res, "w") as f:
        json.dump(r, f)
    shutil.rmtree(os.path.join(d, "checkpoints"))  # (GBs of word-expert tables)
    return job, r


def mean_std(xs):
    return "%.4f ± %.4f" % (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def table(corpus, results, variants):
    buckets = [b["ranks"] for b in next(iter(results.values()))[0]["buckets"]]
    counts = [b["tokens"] for b in next(iter(results.values()))[0]["buckets"]]
    print("\n%s (validation tokens per bucket: %s)\n" % (corpus, ", ".join(
        "%s: %d" % (b, c) for b, c in zip(buckets, counts))))
    print("| model | val loss | " + " | ".join("ranks " + b for b in buckets) + " | tok/s |")
    print("|---|---|" + "---|" * len(buckets) + "---|")
    for v in variants:
        rs = results[v]
        cells = [mean_std([r["val_loss"] for r in rs])]
        cells += [mean_std([r["buckets"][i]["loss"] for r in rs]) for i in range(len(buckets))]
        print("| %s | %s | %.0f |" % (LABELS[v], " | ".join(cells), statistics.mean(r["tokens_per_s"] for r in rs)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--corpora", default="shakespeare,kjv")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "quality"))
    a = ap.parse_args()
    out = os.path.abspath(a.out)
    files = {"shakespeare": os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt"),
             "kjv": os.path.join(out, "data", "kjv.txt")}
    corpora = a.corpora.split(",")
    if "kjv" in corpora:
        prepare_kjv(files["kjv"])
    variants = a.variants.split(",")
    seeds = [int(s) for s in a.seeds.split(",")]
    jobs = []
    for c in corpora:
        tok = tokenizer(os.path.abspath(files[c]), os.path.join(out, c, "tokenizer"))
        jobs += [(c, os.path.abspath(files[c]), tok, v, s, a.steps, out) for v in variants for s in seeds]
    results = {}
    with ThreadPoolExecutor(a.jobs) as ex:
        for job, r in ex.map(run_one, jobs):
            results.setdefault(job[0], {}).setdefault(job[3], []).append(r)
            print("done %s %s seed %d: val loss %.4f" % (job[0], job[3], job[4], r["val_loss"]), flush=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    for c in corpora:
        table(c, results[c], variants)


if __name__ == "__main__":
    main()
