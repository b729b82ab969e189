#!/usr/bin/env bash
# One GPU, under 8 minutes: simjax against the PyTorch peer on CIFAR-10 DDPM++, and the PixArt path.
#
#   EDM=/path/to/NVlabs/edm bash benchmarks/device_pair.sh [OUT_DIR]
#
# - simjax's SIM iteration, f32 (TF32 matmuls) and bf16, batch 64 and 128, with its model-FLOPs
#   utilisation against a bf16 matmul measured in the same rounds (benchmarks/sim_step.py);
# - the peer (SiD's iteration on EDM's own networks, benchmarks/peer_pytorch.py) under bf16 AMP,
#   eager and with torch.compile, at the same batches, alternating with simjax's bf16 iteration;
# - PixArt-XL-2 at 512 (28 blocks, cuDNN attention): memory against batch and remat, and the time
#   per image (benchmarks/transformer_memory.py).
# Each part has its own time limit (470 s in all), so one that hangs costs its budget, not the run. The results are
# JSON lines in OUT_DIR, and the table is printed at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${EDM:-}" ]; then
  echo "device_pair.sh: set EDM=/path/to/a checkout of NVlabs/edm (git clone https://github.com/NVlabs/edm)" >&2
  exit 2
fi
OUT=${1:-${OUT:-/tmp/device_pair}}
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # simjax and torch share the GPU in the peer runs

for B in 64 128; do
  timeout 100 python benchmarks/sim_step.py --config=configs/cifar10.py --batch=$B --variant=f32 --variant=bf16 \
    --repeats=3 > "$OUT/simjax_b$B.jsonl" 2> "$OUT/simjax_b$B.err"
  timeout 40 python benchmarks/peer_pytorch.py --edm="$EDM" --batch=$B --variant=bf16 --amp --rounds=3 \
    > "$OUT/peer_eager_b$B.json" 2> "$OUT/peer_eager_b$B.err"
  timeout 70 python benchmarks/peer_pytorch.py --edm="$EDM" --batch=$B --variant=bf16 --amp --compile --rounds=3 \
    > "$OUT/peer_compiled_b$B.json" 2> "$OUT/peer_compiled_b$B.err"
done
timeout 50 python benchmarks/transformer_memory.py --depth 28 --batches 8,32 --dtypes bfloat16 --time_depth 28 \
  --time_batch 8 --iters 3 > "$OUT/pixart.jsonl" 2> "$OUT/pixart.err"

python - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
def rows(name):
  path = out / name
  return [json.loads(l) for l in path.read_text().splitlines() if l.startswith("{")] if path.exists() else []
print("| run | batch | img/s | ms/iteration | MFU | simjax / peer |")
print("|---|---|---|---|---|---|")
for b in (64, 128):
  for r in rows(f"simjax_b{b}.jsonl"):
    print(f"| simjax {r['variant']} | {b} | {r['images_per_sec']:.1f} | {r['ms_iteration']:.1f} | "
          f"{r['model_flops_utilisation']:.2f} | |")
  for kind in ("eager", "compiled"):
    for r in rows(f"peer_{kind}_b{b}.json"):
      print(f"| peer {kind} AMP | {b} | {r['images_per_sec']['peer']:.1f} | {r['ms_per_iteration']['peer']:.1f} | | "
            f"{r['simjax_over_peer_images_per_sec']:.2f} ({r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f}) |")
for r in rows("pixart.jsonl"):
  print(json.dumps(r))
PY
