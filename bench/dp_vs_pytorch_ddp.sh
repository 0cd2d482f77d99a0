#!/usr/bin/env bash
# Data parallel on one host, shoal vs PyTorch DDP (gloo), same model and global batch:
#   shoal bench dp   -> 2 ranks x 1 thread vs 1 rank x 2 threads (ratio, target >= 0.9)
#   PyTorch DDP      -> 2 ranks x 1 thread (OMP 1, OpenBLAS 1 per rank), torchrun's variables
# Usage: bench/dp_vs_pytorch_ddp.sh [config]   (default configs/small.toml)
set -euo pipefail
cd "$(dirname "$0")/.."
cfg=${1:-configs/small.toml}
STEPS=${STEPS:-10}
[[ -x build/shoal ]] || { echo "build first: scripts/build" >&2; exit 1; }
data=$(mktemp -d)
trap 'rm -rf "$data"' EXIT
/usr/bin/python3 bench/random_tokens.py "$data"
batch=$(/usr/bin/python3 -c "import tomllib; print(tomllib.load(open('$cfg','rb'))['train']['batch_size'])")
shoal=$(build/shoal bench dp --config "$cfg" --steps "$STEPS" --set data.dir="$data" 2>/dev/null | tail -1)
echo "shoal   $shoal"
# Debian's torchrun (torch 1.13 on Python 3.11) fails in its argument handling
# (AttributeError in elastic/multiprocessing), so the two DDP ranks get torchrun's variables here.
port=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
for r in 0 1; do
  RANK=$r LOCAL_RANK=$r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port OMP_NUM_THREADS=1 \
    OPENBLAS_NUM_THREADS=1 /usr/bin/python3 bench/pytorch_train_bench.py --config "$cfg" \
    --steps "$STEPS" --batch-size $((batch / 2)) > "$data/ddp$r.out" 2>&1 &
done
wait
ddp=$(grep tokens_per_s "$data/ddp0.out" | tail -1)
echo "pytorch $ddp"
/usr/bin/python3 - "$shoal" "$ddp" <<'PY'
import json, sys
s, p = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"RESULT shoal 2 ranks {s['tokens_per_s_2ranks_1thread']:.0f} tok/s, 1 rank x 2 threads "
      f"{s['tokens_per_s_1rank_2threads']:.0f} tok/s, ratio {s['ratio']:.2f}; PyTorch DDP 2 ranks "
      f"{p['tokens_per_s']:.0f} tok/s; shoal / DDP {s['tokens_per_s_2ranks_1thread']/p['tokens_per_s']:.2f}x")
PY
