#!/usr/bin/env bash
# The accelerator figures in one run (under 8 minutes on one GPU), written as one JSON:
#   1. bench_core: LoRA vs full step, forward, memory (and transformers + peft + torch on the
#      GPU when torch sees it);
#   2. bench_generate: KV-cache decoding, base / LoRA unmerged / merged / mixed adapters;
#   3. bench_memory --table long, reduced: Llama-3.1-8B shapes at 2k and 8k tokens compiled
#      for this device (xla attention + plain loss; auto attention + chunked loss; the same
#      on an NF4 base);
#   4. bench_memory --step-time: the train step with chunked and auto attention over xla.
#
#   bash benchmarks/accelerator.sh [--out accelerator.json]   # on the GPU / TPU host
#   bash benchmarks/accelerator.sh --smoke                    # tiny sizes on CPU (slow tests)
#
# PYTHON selects the interpreter (default: .venv/bin/python if present, else python).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=accelerator.json
SMOKE=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --smoke) SMOKE=1; shift ;;
    --out) OUT="$2"; shift 2 ;;
    *) echo "accelerator.sh: unknown argument $1 (expected --smoke, --out FILE)" >&2; exit 2 ;;
  esac
done
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

if [[ $SMOKE == 1 ]]; then
  export JAX_PLATFORMS=cpu
  CORE=(--d-model 64 --layers 1 --seq 32 --vocab 256 --repeats 1)
  GEN=(--d-model 64 --layers 1 --heads 4 --kv-heads 2 --ffn 128 --vocab 256 --batch 2
       --prompt 8 --new 4 --rank 4 --repeats 1)
  MEM=(--backend cpu --devices 1 --models tiny --seqs 256 --rows xla+plain auto+chunked+nf4
       --loss-chunk 128)
  STEP=(--backend cpu --devices 1 --step-seqs 128 --attentions xla auto --repeats 1)
else
  CORE=()
  GEN=()
  MEM=(--backend default --devices 1 --models llama-3.1-8b --seqs 2048 8192
       --rows xla+plain auto+chunked auto+chunked+nf4)
  STEP=(--backend default --devices 1 --step-seqs 512 2048 8192 --attentions xla chunked auto
        --step-dtype bfloat16 --repeats 5)
fi

run() {  # name, then the command; its stdout goes to the terminal and $TMP/name.txt
  local name=$1; shift
  local t0=$SECONDS
  echo "== $name: $*" >&2
  "$@" | tee "$TMP/$name.txt"
  echo "== $name: $((SECONDS - t0)) s" >&2
  echo "$((SECONDS - t0))" > "$TMP/$name.seconds"
}

run core "$PYTHON" benchmarks/bench_core.py "${CORE[@]}" --json "$TMP/core.json"
run generate "$PYTHON" benchmarks/bench_generate.py "${GEN[@]}" --json "$TMP/generate.json"
run memory "$PYTHON" benchmarks/bench_memory.py --table long --long-devices 1 "${MEM[@]}" \
  --json "$TMP/memory.json"
run step_time "$PYTHON" benchmarks/bench_memory.py --step-time "${STEP[@]}" \
  --json "$TMP/step_time.json"

"$PYTHON" - "$TMP" "$OUT" "$SMOKE" <<'EOF'
import json, os, sys, platform
import jax

tmp, out, smoke = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
result = {
    "smoke": smoke,
    "jax": jax.__version__,
    "devices": [f"{d.platform}: {d.device_kind}" for d in jax.devices()],
    "host": platform.node(),
}
try:
    import torch

    result["torch_cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
except ImportError:
    result["torch_cuda"] = None
for name in ("core", "generate", "memory", "step_time"):
    with open(os.path.join(tmp, f"{name}.json")) as f:
        result[name] = json.load(f)
    with open(os.path.join(tmp, f"{name}.seconds")) as f:
        result[name + "_wall_s"] = int(f.read())
    with open(os.path.join(tmp, f"{name}.txt")) as f:
        result[name + "_table"] = f.read()
with open(out, "w") as f:
    json.dump(result, f, indent=1)
print(f"accelerator.sh: wrote {out} ({', '.join(result['devices'])})")
EOF
