"""Helpers shared by the PyTorch oracle scripts (kernels.py, router.py, experts.py, word_experts.py).

Each script is run by path (`/usr/bin/python3 tests/oracle/<script>.py ...`), so Python puts this directory on
sys.path and `from oracle_common import ...` finds this module. Provides the float64 dtype, the error type and
`expect`, the .npy `load`/`save` helpers and `run_jobs`, the command line driver that splits the arguments into
jobs on a lone `+` and reports which job failed.
"""
import os
import sys

import numpy as np
import torch

DT = torch.float64


class OracleError(Exception):
    pass


def expect(cond, msg):
    if not cond:
        raise OracleError(msg)


def to_float(s, name):
    try:
        return float(s)
    except ValueError:
        raise OracleError(f"{name}: not a number: {s!r}")


def load(d, name, integer=False, grad=False, required=True):
    """<d>/<name>.npy as a tensor: float64 (requires_grad when grad), or int64 when integer.

    A missing file is an error, or returns None when not required."""
    path = os.path.join(d, name + ".npy")
    if not os.path.isfile(path):
        expect(not required, f"missing input {path}")
        return None
    a = np.load(path)
    if integer:
        expect(a.dtype.kind in "iu", f"{path}: expected an integer array, got {a.dtype}")
        return torch.from_numpy(a.astype(np.int64))
    expect(a.dtype.kind == "f", f"{path}: expected a float array, got {a.dtype}")
    return torch.from_numpy(a.astype(np.float64)).requires_grad_(grad)


def save(d, **arrays):
    """Writes each tensor or array as <d>/<name>.npy: integer ones as int64, everything else as float64."""
    for name, t in arrays.items():
        if isinstance(t, torch.Tensor):
            t = t.detach().numpy()
        t = np.asarray(t)
        np.save(os.path.join(d, name + ".npy"), t.astype(np.int64 if t.dtype.kind in "iu" else np.float64))


def run_jobs(argv, script, usage, run_job, min_args=1):
    """Command line driver: argv[1:] split on a lone `+` into jobs, each passed (a list of strings) to run_job.

    Fewer than min_args arguments: prints usage, returns 2. The first failing job: prints
    `<script>: error in job '<args>': <type>: <message>` to stderr, returns 1. Otherwise returns 0."""
    if len(argv) < 1 + min_args:
        print(usage, file=sys.stderr)
        return 2
    torch.set_default_dtype(DT)
    jobs, cur = [], []
    for a in argv[1:]:
        if a == "+":
            jobs.append(cur)
            cur = []
        else:
            cur.append(a)
    jobs.append(cur)
    for job in jobs:
        try:
            run_job(job)
        except Exception as e:  # report which job failed, then exit non-zero
            print(f"{script}: error in job {' '.join(job)!r}: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
    return 0
