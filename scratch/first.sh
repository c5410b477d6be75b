set -x
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv
python3 -c "import jax, flax; print(jax.__version__, flax.__version__, jax.devices())"
export PYTHONPATH=.:benchmarks PYTHONUNBUFFERED=1
timeout 120 python3 scratch/grad_check.py triton
timeout 200 python3 benchmarks/bench.py --seqlens 4096 16384 --head-dims 128 --causal no --impls triton cudnn
timeout 250 python3 benchmarks/tune_triton.py --head-dims 128 --seqlen 16384
