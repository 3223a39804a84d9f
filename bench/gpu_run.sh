#!/usr/bin/env bash
# The GPU run (issue 19) in stages, from the repository root on a machine with a GPU; each stage writes its log and
# JSON under $OUT. Stages run in the order given; a failing stage is logged and the next one still runs.
#
#   OUT=/tmp/gpu bash bench/gpu_run.sh env tests decode trace-offline trace-auto trace-full throughput glm cli
#
# Knobs (environment): TRACE_TOKENS (32768), TRACE_KV (the traces' KV pool in tokens; default: what the cap leaves),
# TP_TOKENS (8192, throughput), TP_POLICIES (full,triattention,snapkv), VRAM (24). Without an installed
# openclaw, the repository is made importable in place (openclaw.kernels / openclaw.models are links); a
# bitsandbytes unpacked under .whl/site (the peer) is put on the path.
set -uo pipefail
OUT=${OUT:-/tmp/openclaw-gpu}
VRAM=${VRAM:-24}
TRACE_TOKENS=${TRACE_TOKENS:-32768}
TP_TOKENS=${TP_TOKENS:-8192}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ! python3 -c "import openclaw.kernels" 2>/dev/null; then
    # the package from a directory outside the repository: tests/conftest.py drops the repository root from sys.path
    [ -e openclaw/kernels ] || ln -s ../kernels openclaw/kernels
    [ -e openclaw/models ] || ln -s ../models openclaw/models
    PKG=$(mktemp -d)
    ln -s "$PWD/openclaw" "$PKG/openclaw"
    export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}"
fi
[ -d .whl/site ] && export PYTHONPATH="$PWD/.whl/site${PYTHONPATH:+:$PYTHONPATH}"
# the test files with GPU tests (the others are CPU-only and some need packages the device image lacks)
GPU_TESTS="test_decode_ops test_fidelity test_graphs test_kv_compact test_moe_gemv test_qgemm test_qlinear
 test_quant_model test_query_stats test_sampler test_tri_score test_mla_attention"

stage() {  # name, command...: the command's output to the console and $OUT/name.log, its time on the console
    local name=$1
    shift
    local t0=$SECONDS
    echo "=== $name: $*"
    "$@" 2>&1 | tee "$OUT/$name.log"
    echo "=== $name: rc ${PIPESTATUS[0]}, $((SECONDS - t0)) s"
}

for s in "$@"; do
    case $s in
        env) stage env bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv;
             python3 -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())'" ;;
        tests) stage tests bash -c "cd tests && python3 -m pytest -m gpu -q -p no:cacheprovider \
               $(for t in $GPU_TESTS; do printf '%s.py ' "$t"; done)" ;;
        decode) stage decode python3 bench/gpu_decode.py --vram "$VRAM" --json "$OUT/decode.json" ;;
        trace-offline|trace-auto|trace-full)
            stage "$s" python3 bench/gpu_trace.py --vram "$VRAM" --tokens "$TRACE_TOKENS" --mode "${s#trace-}" \
                ${TRACE_KV:+--kv-tokens $TRACE_KV} --json "$OUT/$s.json" ;;
        throughput) stage throughput python3 bench/gpu_throughput.py --vram "$VRAM" --tokens "$TP_TOKENS" \
                --policies "${TP_POLICIES:-full,triattention,snapkv}" --json "$OUT/throughput.json" ;;
        glm) stage glm-z1 python3 bench/gpu_decode.py --model GLM-Z1-32B --vram "$VRAM" --no-peer \
                 --prompts 4096 --json "$OUT/glm-z1.json"
             stage glm-flash python3 bench/gpu_decode.py --model GLM-4.7-Flash --vram "$VRAM" --no-peer --no-kernels \
                 --prompts 4096 --json "$OUT/glm-flash.json" ;;
        glm-trace) stage glm-trace python3 bench/gpu_trace.py --model GLM-4.7-Flash --vram "$VRAM" \
                 --tokens "$TRACE_TOKENS" --mode full --json "$OUT/glm-trace.json" ;;
        cli) stage cli python3 -m openclaw bench Qwen3-32B --random-weights --vram "$VRAM" --json "$OUT/cli.json" ;;
        *) echo "unknown stage $s" ;;
    esac
done
