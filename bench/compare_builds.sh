#!/usr/bin/env bash
# Two builds side by side in one run: the training step of bench_train (dense demo model, 2 threads), the MoE layer
# fwd+bwd of bench_moe section 1 (slowest rank), the expert bank forward of section 3 and the word-expert layer step
# of section 4 (1k / 16k / 128k experts), each on 2 ranks of 1 thread. The builds alternate round by round (A B, B A, ...), so
# background load hits both alike; the table gives the median of each over the rounds and new / old.
#   usage: bench/compare_builds.sh OLD_BUILD_DIR NEW_BUILD_DIR [ROUNDS (default 5)]
# e.g. git worktree add /tmp/old <rev> && cmake -S /tmp/old -B /tmp/old/build -G Ninja -DMOE_CUDA=OFF &&
#      cmake --build /tmp/old/build --target bench_train bench_moe && bench/compare_builds.sh /tmp/old/build build
set -euo pipefail
old=$1 new=$2 rounds=${3:-5}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
metrics=(train_step_ms moe_layer_ms expert_bank_ms word_1k_ms word_16k_ms word_128k_ms)

# measure BUILD TAG: one round of every metric, appended to $out/TAG.<metric>
measure() {
  local b=$1 tag=$2 txt
  txt=$("$b/bench_train" --threads 2 --iters 20 2>/dev/null)
  sed -n 's/^ours (C++, OpenBLAS + OpenMP) *\([0-9.]*\) .*/\1/p' <<<"$txt" >> "$out/$tag.train_step_ms"
  txt=$(mpirun -np 2 "$b/bench_moe" --threads 1 --section 1 --iters 5 2>/dev/null)
  sed -n 's/^total, slowest rank *\([0-9.]*\).*/\1/p' <<<"$txt" >> "$out/$tag.moe_layer_ms"
  txt=$(mpirun -np 2 "$b/bench_moe" --threads 1 --section 3 --iters 5 2>/dev/null)
  sed -n 's/^ExpertBank (SwiGLU, one GEMM per expert) *[0-9.]* *\([0-9.]*\) .*/\1/p' <<<"$txt" >> "$out/$tag.expert_bank_ms"
  txt=$(mpirun -np 2 "$b/bench_moe" --threads 1 --section 4 --word-scattered 0 2>/dev/null)
  local i=0 m
  for m in word_1k_ms word_16k_ms word_128k_ms; do
    i=$((i + 1))
    grep -E '^[0-9]+ experts \(d' <<<"$txt" | sed -n "${i}p" | awk '{ for (f = 1; f <= NF; ++f) if ($f ~ /tokens\)$/) { print $(f + 1); exit } }' \
      >> "$out/$tag.$m"
  done
}

for r in $(seq 1 "$rounds"); do
  if [ $((r % 2)) -eq 1 ]; then measure "$old" old; measure "$new" new; else measure "$new" new; measure "$old" old; fi
  echo "round $r/$rounds done" >&2
done
median() { sort -g "$1" | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
printf "%-18s %12s %12s %10s   (median of %d rounds, alternating)\n" metric old new "new/old" "$rounds"
for m in "${metrics[@]}"; do
  a=$(median "$out/old.$m"); b=$(median "$out/new.$m")
  printf "%-18s %12.3f %12.3f %9.3fx\n" "$m" "$a" "$b" "$(awk -v a="$a" -v b="$b" 'BEGIN { print b / a }')"
done
