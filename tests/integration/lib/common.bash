# Shared set-up of the integration scripts (sourced; not a test itself: ctest registers tests/integration/*.sh):
# the variables ctest passes, Open MPI as root on one machine, a scratch directory removed on exit, the tiny test
# config, and small assertion helpers.
: "${MOE_BIN:?run through ctest}" "${MOE_SOURCE_DIR:?}" "${MOE_DATA_DIR:?}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
PY=${MOE_PYTHON:-python3}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
cfg="$MOE_SOURCE_DIR/deploy/configs/tiny_test.pbtxt"
fail() { echo "FAIL: $*"; exit 1; }
# expect_fail PATTERN CMD...: the command must exit non-zero and print PATTERN
expect_fail() {
  local pat=$1; shift
  if "$@" > "$work/out.txt" 2>&1; then cat "$work/out.txt"; fail "'$*' succeeded"; fi
  grep -q -- "$pat" "$work/out.txt" || { cat "$work/out.txt"; fail "'$*' did not report '$pat'"; }
}
# has PATTERN CMD...: the command succeeds and its output matches PATTERN (no pipe: grep -q would SIGPIPE it)
has() {
  local pat=$1; shift
  "$@" > "$work/has.txt" 2>&1 || { cat "$work/has.txt"; fail "'$*' failed"; }
  grep -q -- "$pat" "$work/has.txt"
}
# flip_byte FILE DATASET OFFSET MASK: xor the byte OFFSET bytes into DATASET's storage in the HDF5 FILE with MASK
flip_byte() {
  "$PY" - "$@" <<'PY'
import h5py, sys
path, name, off, mask = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4], 0)
with h5py.File(path, "r") as f:
    base = f[name].id.get_offset()
with open(path, "r+b") as g:
    g.seek(base + off); b = g.read(1); g.seek(base + off); g.write(bytes([b[0] ^ mask]))
PY
}
