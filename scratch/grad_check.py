import sys, jax, jax.numpy as jnp, numpy as np
from jax import enable_x64
from pallas_attention import flash_attention, reference
impl = sys.argv[1] if len(sys.argv) > 1 else "xla"
rng = np.random.default_rng(0)
B,T,S,N,K,H = 2, 700, 450, 4, 2, 40
q = rng.standard_normal((B,T,N,H)).astype(np.float32)
k = rng.standard_normal((B,S,K,H)).astype(np.float32)
v = rng.standard_normal((B,S,K,H)).astype(np.float32)
bias = rng.standard_normal((1,N,1,S)).astype(np.float32)
ct = rng.standard_normal((B,T,N,H)).astype(np.float32)
ctl = rng.standard_normal((B,N,T)).astype(np.float32)
def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a-b)/max(np.linalg.norm(b), 1e-30)
for kw in [dict(), dict(is_causal=True), dict(local_window_size=(30, 5)), dict(query_seq_lengths=np.array([100, 3]), key_value_seq_lengths=np.array([120, 77]), is_causal=True), dict(bias=bias), dict(mask=rng.random((B,1,T,S))>0.5)]:
    b = kw.pop('bias', None)
    def loss(f, q, k, v, b, **extra):
        o, l = f(q, k, v, b, **kw, **extra)
        l = jnp.where(jnp.isfinite(l), l, 0)
        return jnp.sum(o * ct) + jnp.sum(l * ctl)
    g = jax.grad(lambda *a: loss(lambda *x, **y: flash_attention(*x, **y, return_residual=True, implementation=impl), *a), argnums=(0,1,2,3) if b is not None else (0,1,2))(q,k,v,b)
    with enable_x64(True):
        ct, ctl = ct.astype(np.float64), ctl.astype(np.float64)
        args = [x.astype(np.float64) for x in (q,k,v)] + [None if b is None else b.astype(np.float64)]
        gr = jax.grad(lambda *a: loss(reference.attention, *a), argnums=(0,1,2,3) if b is not None else (0,1,2))(*args)
    print(list(kw) + (['bias'] if b is not None else []), [f"{rel(x, y):.2e}" for x, y in zip(g, gr)], all(np.isfinite(np.asarray(x)).all() for x in g))
