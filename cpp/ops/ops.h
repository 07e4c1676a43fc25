// babyrt's custom ops (TORCH_LIBRARY(babyrt)): the fused pieces that exported models call,
// each with a plain ATen reference that runs on any device, and faster kernels for the CPU
// (ops.cpp, cpu_kernels.cpp) and CUDA (cuda_kernels.cu) where they exist.
//
//   linear(x, weight, scales?, residual?)             x @ W^T (+ residual); W float, or int8
//                                                      with scales [N, K / group]
//   rmsnorm_linear(x, norm_weight, eps, weight, scales?)   linear(rmsnorm(x) * norm_weight, W)
//   swiglu_linear(gate_up, weight, scales?, residual?)     linear(silu(gate) * up, W)
//   attention(qkv, positions, cos?, sin?, k_cache!, v_cache!, n_heads, n_kv_heads)
//        RoPE on q and k, k and v written into the cache at `positions`, then each query
//        attends to the cache slots <= its position
//   embedding(tokens, weight, scales?, dtype)          rows of W (dequantized), as dtype
//   dequantize(weight, scales)                          int8 W times its group scales, fp32
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

namespace babyrt::ops {

at::Tensor linear_reference(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& scales,
                            const std::optional<at::Tensor>& residual);

// Shapes and dtypes of a linear call; throws c10::Error with a message naming the mismatch.
void check_linear(const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& scales,
                  const std::optional<at::Tensor>& residual);

}  // namespace babyrt::ops
