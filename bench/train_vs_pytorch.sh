#!/usr/bin/env bash
# shoal vs PyTorch eager (Debian's python3-torch 1.13), same model, batch and cores, in one go.
# PyTorch gets its best thread setting: every OpenMP x OpenBLAS combination, with the default and
# the passive OpenMP wait policy, is run and the fastest kept. Prints one line per run and the
# ratio per config. Usage: bench/train_vs_pytorch.sh [config ...]   (default: tiny and small)
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-20}
configs=("$@")
[[ ${#configs[@]} -gt 0 ]] || configs=(configs/tiny.toml configs/small.toml)
[[ -x build/shoal ]] || { echo "build first: scripts/build" >&2; exit 1; }

# Token data: speed does not depend on the text, so random bytes do if no corpus is prepared.
data=$(mktemp -d)
trap 'rm -rf "$data"' EXIT
/usr/bin/python3 bench/random_tokens.py "$data"

cores=$(nproc)
for cfg in "${configs[@]}"; do
  name=$(basename "$cfg" .toml)
  shoal_json=$(build/shoal bench train --config "$cfg" --steps "$STEPS" \
      --set data.dir="$data" 2>/dev/null | tail -1)
  echo "shoal   $name  $shoal_json"
  best=0
  for omp in 1 "$cores"; do
    for blas in 1 "$cores"; do
      [[ $omp -eq 1 && $blas -eq 1 && $cores -gt 1 ]] && continue
      for policy in default passive; do
        envs=(OMP_NUM_THREADS=$omp OPENBLAS_NUM_THREADS=$blas)
        [[ $policy == passive ]] && envs+=(OMP_WAIT_POLICY=PASSIVE)
        j=$(env "${envs[@]}" /usr/bin/python3 bench/pytorch_train_bench.py --config "$cfg" \
              --steps "$STEPS" | tail -1)
        echo "pytorch $name  $j"
        tps=$(echo "$j" | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["tokens_per_s"])')
        best=$(/usr/bin/python3 -c "print(max($best, $tps))")
      done
    done
  done
  /usr/bin/python3 - "$shoal_json" "$best" "$name" <<'PY'
import json, sys
s = json.loads(sys.argv[1]); best = float(sys.argv[2])
print(f"RESULT {sys.argv[3]}: shoal {s['tokens_per_s']:.0f} tok/s (MFU {100*s['mfu']:.1f}%), "
      f"best PyTorch {best:.0f} tok/s, ratio {s['tokens_per_s']/best:.2f}x")
PY
done
