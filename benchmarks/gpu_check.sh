#!/usr/bin/env bash
# Everything the GPU machine should run, in one call of the device tool:
#   benchmarks/gpu_check.sh [tests] [bench] [memory] [long] [gqa] [fused] [tune] [tune-mosaic]
#   (default: tests bench memory; long = one GPU's fwd+bwd rate at the ring's local lengths;
#   gqa = the mosaic GQA forward with and without head pairs against cuDNN;
#   fused = fwd+bwd: the default backward, the two-kernel one, the fused one with
#   deterministic_backward=False, and cuDNN)
# Logs and JSON go to $OUT (or ./gpu_out); the last lines printed are the tables.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_out}"; mkdir -p "$out"
export PYTHONPATH="$PWD:$PWD/benchmarks" PYTHONUNBUFFERED=1
steps=("$@"); [ ${#steps[@]} -gt 0 ] || steps=(tests bench memory)
python3 -c 'import jax; d = jax.devices()[0]; print("#", d.device_kind, "| jax", jax.__version__)' | tee "$out/device.txt"
for step in "${steps[@]}"; do
  case "$step" in
    tests)
      # Kernel compilation is CPU-bound: spread the tests over processes that
      # share the GPU without preallocating its memory.
      # GEMM autotuning only slows compiles here; correctness does not need it.
      XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_FLAGS=--xla_gpu_autotune_level=0 \
        timeout "${TEST_TIMEOUT:-540}" python3 -m pytest -q -rf -p no:cacheprovider \
        -p no:benchmark -n "${TEST_WORKERS:-12}" --durations=15 ${TEST_ARGS:-tests} \
        > "$out/tests.log" 2>&1
      echo "tests: exit $? -- $(tail -n 1 "$out/tests.log")" | tee -a "$out/summary.txt" ;;
    bench)
      python3 benchmarks/bench.py --head-dims ${BENCH_HEAD_DIMS:-64 128 256} \
        --seqlens ${BENCH_SEQLENS:-512 1024 2048 4096 8192 16384} \
        --passes ${BENCH_PASSES:-both} --causal ${BENCH_CAUSAL:-both} \
        ${BENCH_IMPLS:+--impls $BENCH_IMPLS} --out "$out" > "$out/bench.stdout" 2> "$out/bench.log"
      echo "bench: exit $?" >> "$out/summary.txt" ;;
    memory)
      python3 benchmarks/memory.py ${MEMORY_SEQLENS:+--seqlens $MEMORY_SEQLENS} --out "$out" \
        > "$out/memory.stdout" 2> "$out/memory.log"
      echo "memory: exit $?" >> "$out/summary.txt" ;;
    long)
      # One GPU, causal fwd+bwd at long lengths (a one-device ring is plain flash_attention),
      # with the SM clock, power and throttle reasons sampled each second beside it.
      python3 benchmarks/clocks.py --sample "$out/long_clocks.csv" & sampler=$!
      python3 benchmarks/ring_bench.py --scaling --devices 1 --rounds 2 \
        --seqlens ${LONG_SEQLENS:-16384 65536 131072 262144 524288} --json "$out/long.json" \
        > "$out/long.md" 2> "$out/long.log"
      echo "long: exit $?" >> "$out/summary.txt"
      kill "$sampler" 2>/dev/null
      python3 benchmarks/clocks.py "$out/long_clocks.csv" >> "$out/long.md" ;;
    gqa)
      python3 benchmarks/gqa_bench.py > "$out/gqa.md" 2> "$out/gqa.log"
      echo "gqa: exit $?" >> "$out/summary.txt" ;;
    fused)
      python3 benchmarks/bench.py --head-dims ${FUSED_HEAD_DIMS:-64 128} --passes fwd+bwd \
        --seqlens ${FUSED_SEQLENS:-2048 4096 8192 16384} --causal ${FUSED_CAUSAL:-both} \
        --impls mosaic ${FUSED_IMPLS:-mosaic-twokernel mosaic-fused} cudnn --json "$out/fused.json" \
        > "$out/fused.md" 2> "$out/fused.log"
      echo "fused: exit $?" >> "$out/summary.txt" ;;
    tune)
      python3 benchmarks/tune_triton.py --head-dims ${TUNE_HEAD_DIMS:-64 256} --seqlen 16384 \
        > "$out/tune.log" 2>&1
      grep -A1 BEST "$out/tune.log" ;;
    tune-mosaic)
      python3 benchmarks/tune_mosaic.py --head-dims ${TUNE_HEAD_DIMS:-64 128 256} \
        --seqlen ${TUNE_SEQLEN:-4096} --causal ${TUNE_CAUSAL:-both} --parts ${TUNE_PARTS:-fwd bwd} ${TUNE_FWD_KV:+--fwd-kv $TUNE_FWD_KV} \
        > "$out/tune_mosaic.log" 2>&1
      echo "tune-mosaic: exit $?" >> "$out/summary.txt"
      grep BEST "$out/tune_mosaic.log" ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
cat "$out/summary.txt"
[ -f "$out/tests.log" ] && grep -E "^(FAILED|ERROR)" "$out/tests.log" | cut -c1-200
for table in bench memory long gqa fused; do [ -f "$out/$table.md" ] && cat "$out/$table.md"; done
exit 0
