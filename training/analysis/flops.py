"""FLOPs per generated token of a LLaMA, one formula for every figure babyrt reports.

A decode step at position t (t tokens already in the cache) costs, counting a multiply-add as 2:

    2 * N_matmul                          every weight matrix once (q, k, v, o, w1, w2, w3 of each
                                          layer, and the classifier; the embedding is a lookup)
  + 4 * L * H * D * (t + 1)               attention: q.k over t+1 keys, then the weighted sum of
                                          t+1 values, for H heads of size D in L layers
  + 3 * L * (H + KV) * D     (RoPE only)  rotating q and k: per pair (x0, x1) 4 multiplies and 2
                                          adds, i.e. 3 FLOPs per element, for H query and KV key heads

Norms, SwiGLU, softmax and residual adds are O(L * (dim + hidden)) and left out, as is usual
(they are below 1% here). flops_per_token() in the model is the training count (6N + attention,
forward and backward); this is generation, forward only.
"""


def flops_per_generated_token(cfg, position: int, rope: bool = True) -> int:
    L, H, KV, D = cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    per_layer = cfg.dim * (H * D) * 2 + cfg.dim * (KV * D) * 2 + 3 * cfg.dim * cfg.hidden_dim
    n_matmul = L * per_layer + cfg.vocab_size * cfg.dim
    flops = 2 * n_matmul + 4 * L * H * D * (position + 1)
    if rope:
        flops += 3 * L * (H + KV) * D
    return flops
