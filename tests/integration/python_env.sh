#!/usr/bin/env bash
# The project's Python environment (.venv, made by deploy/setup.sh) has every pinned test client at its pinned
# version, and still sees Debian's torch and h5py (the numerical oracle) through --system-site-packages.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.bash"
VPY=${MOE_VENV_PYTHON:?run through ctest}
[ -x "$VPY" ] || fail "no $VPY: run deploy/setup.sh (it creates the project's .venv with the test clients)"
pins=$(sed -n '/^VENV_PKGS=(/,/)/p' "$MOE_SOURCE_DIR/deploy/setup.sh" | tr -d '()' | sed 's/VENV_PKGS=//' | tr -s ' \n' '\n' | grep '==')
test "$(wc -l <<<"$pins")" -ge 6 || fail "could not read the pins from deploy/setup.sh: $pins"
"$VPY" - $pins <<'PY'
import sys
from importlib.metadata import version
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    got = version(name)
    assert got == want, (name, got, want)
import torch, h5py, tensorboard, transformers, safetensors, sentencepiece, openai, prometheus_client, schemathesis
assert torch.__version__.startswith("1.13"), torch.__version__  # Debian's python3-torch, not a PyPI wheel
print("venv: %s; torch %s (Debian), h5py %s" % (", ".join(sys.argv[1:]), torch.__version__, h5py.__version__))
PY
echo PASS
