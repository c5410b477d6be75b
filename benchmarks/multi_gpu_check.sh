#!/usr/bin/env bash
# Ring attention on every GPU of one host (issue 7), in one call of the device tool:
#   benchmarks/multi_gpu_check.sh [tests] [correctness] [scaling]   (default: all three)
# Rings of 2 GPUs and of all GPUs (RING_SIZES overrides), head_dim 128, bf16, causal zigzag.
# NVLink multicast stays off (the machine's NCCL_NVLS_ENABLE=0 is kept, and set if missing).
# Logs, JSON and Markdown go to $OUT (or ./gpu_out); the tables are printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_out}"; mkdir -p "$out"
export PYTHONPATH="$PWD:$PWD/benchmarks" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
steps=("$@"); [ ${#steps[@]} -gt 0 ] || steps=(tests correctness scaling)
gpus=$(nvidia-smi -L | wc -l)
sizes=${RING_SIZES:-$( [ "$gpus" -gt 2 ] && echo "2 $gpus" || echo "$gpus")}
{ nvidia-smi -L; python3 -c 'import jax; print("jax", jax.__version__)'; } | tee "$out/device.txt"
for step in "${steps[@]}"; do
  case "$step" in
    tests)
      timeout 300 python3 -m pytest -q -rf -p no:cacheprovider tests/test_ring.py -k gpu \
        > "$out/ring_tests.log" 2>&1
      echo "ring tests ($gpus GPUs): exit $? -- $(tail -n 1 "$out/ring_tests.log")" | tee -a "$out/summary.txt" ;;
    correctness)
      for p in $sizes; do
        python3 benchmarks/ring_bench.py --correctness --devices "$p" \
          --seqlens ${CORRECTNESS_SEQLENS:-16384} --json "$out/correctness_$p.json" \
          > "$out/correctness_$p.md" 2> "$out/correctness_$p.log"
        echo "correctness P=$p: exit $?" >> "$out/summary.txt"
      done ;;
    scaling)
      # SM clock, power and throttle reasons of every GPU, sampled each second beside the runs.
      python3 benchmarks/clocks.py --sample "$out/scaling_clocks.csv" & sampler=$!
      for p in $sizes; do
        python3 benchmarks/ring_bench.py --scaling --devices "$p" \
          --seqlens ${SCALING_SEQLENS:-262144 524288 1048576} --rounds ${SCALING_ROUNDS:-2} \
          --json "$out/scaling_$p.json" > "$out/scaling_$p.md" 2> "$out/scaling_$p.log"
        echo "scaling P=$p: exit $?" >> "$out/summary.txt"
      done
      kill "$sampler" 2>/dev/null
      python3 benchmarks/clocks.py "$out/scaling_clocks.csv" > "$out/scaling_clocks.md" ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
cat "$out/summary.txt"
# The device tool returns at most 8 files: the logs and clock samples travel as one archive.
(cd "$out" && shopt -s nullglob && logs=(./*.log ./*.csv) && [ ${#logs[@]} -gt 0 ] \
  && tar czf logs.tgz "${logs[@]}" && rm -f "${logs[@]}")
for f in "$out"/correctness_*.md "$out"/scaling_*.md; do [ -f "$f" ] && { echo "## $f"; cat "$f"; }; done
exit 0
