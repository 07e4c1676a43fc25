// babyrt's custom ops (TORCH_LIBRARY(babyrt)): the fused pieces that exported models call,
// each with a plain ATen reference that runs on any device, and faster kernels for the CPU
// (ops.cpp, cpu_kernels.cpp) and CUDA (cuda_kernels.cu) where they exist.
//
//   linear(x, weight, scales?, residual?)             x @ W^T (+ residual); W float, or int8
//                                                      with scales [N, K / group]
//   rmsnorm_linear(x, norm_weight, eps, weight, scales?, out_dtype?)
//        linear(rmsnorm(x) * norm_weight, W), computed in x's dtype, then cast to out_dtype
//        (the classifier asks for fp32 logits: one kernel instead of a GEMV and a cast)
//   swiglu_linear(gate_up, weight, scales?, residual?)     linear(silu(gate) * up, W)
//   attention(qkv, positions, cos?, sin?, k_cache!, v_cache!, n_heads, n_kv_heads)
//        RoPE on q and k, k and v written into the cache at `positions`, then each query
//        attends to the cache slots <= its position
//   attention_linear(qkv, positions, cos?, sin?, k_cache!, v_cache!, n_heads, n_kv_heads,
//                    weight, scales?, residual?)
//        linear(attention(...), weight, scales, residual): a layer's attention and its output
//        projection, one op so that a device can run them as one kernel (CUDA: opt-in)
//   attention_block(x, norm_weight, eps, wqkv, qkv_scales?, positions, cos?, sin?, k_cache!,
//                   v_cache!, n_heads, n_kv_heads, wo, wo_scales?)
//        attention_linear(rmsnorm_linear(x, norm_weight, eps, wqkv, qkv_scales), positions, ...,
//        wo, wo_scales, residual=x): a layer's whole attention half, one op so that a device can
//        fuse across it (every device runs the two ops: a CUDA kernel of the QKV GEMV and
//        attention was slower, docs/cuda-decode.md)
//   ffn_block(x, norm_weight, eps, w13, w13_scales?, w2, w2_scales?)
//        swiglu_linear(rmsnorm_linear(x, norm_weight, eps, w13, w13_scales), w2, w2_scales,
//        residual=x): a layer's feed-forward half, one op so that a device can compute SwiGLU
//        once where the w2 GEMV's blocks would each recompute it (CUDA computes it in the w13
//        GEMV's epilogue, BABYRT_FFN_FUSED=0 runs the two ops; other devices run the two ops;
//        docs/cuda-decode.md)
//   embedding(tokens, weight, scales?, dtype)          rows of W (dequantized), as dtype
//   dequantize(weight, scales)                          int8 W times its group scales, fp32
//   greedy_advance(logits, token!, position!, history!)  a greedy decode step's bookkeeping:
//        token = argmax(logits) per row, position += 1, history[b, position] = token
//   decode_step(tokens, positions, weights, scales, rope_cos, rope_sin, k_cache!, v_cache!,
//               n_heads, n_kv_heads, eps)
//        a whole LLaMA decode step (one sequence, one token) in one kernel, fp32 logits
//        [1, 1, V]; or an empty tensor where no such kernel covers the call (other devices,
//        dtypes, shapes), and the caller runs the layers op by op. weights: the embedding,
//        the final norm, the classifier, then per layer attention_norm, ffn_norm, wqkv, wo, w13,
//        w2; scales: the embedding's, the classifier's, then per layer wqkv's .. w2's (None for
//        float weights). FusedLlama (python/babyrt/fused_llama.py) builds the two lists.
#pragma once
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include <optional>

namespace babyrt::ops {

using OptTensor = std::optional<at::Tensor>;

// The ATen references, which device kernels fall back to for shapes they do not cover.
at::Tensor linear_reference(const at::Tensor& x, const at::Tensor& weight, const OptTensor& scales,
                            const OptTensor& residual);
at::Tensor rmsnorm_linear_reference(const at::Tensor& x, const at::Tensor& norm_weight, double eps,
                                    const at::Tensor& w, const OptTensor& scales,
                                    std::optional<at::ScalarType> out_dtype);
at::Tensor swiglu_linear_reference(const at::Tensor& gate_up, const at::Tensor& w,
                                   const OptTensor& scales, const OptTensor& residual);
at::Tensor attention_reference(const at::Tensor& qkv, const at::Tensor& positions,
                               const OptTensor& cos, const OptTensor& sin, at::Tensor& k_cache,
                               at::Tensor& v_cache, int64_t H, int64_t KV);

at::Tensor embedding_reference(const at::Tensor& tokens, const at::Tensor& w,
                               const OptTensor& scales, at::ScalarType dtype);
at::Tensor decode_step_unfused(const at::Tensor& tokens, const at::Tensor& positions,
                               at::TensorList weights, const c10::List<std::optional<at::Tensor>>& scales,
                               const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache,
                               at::Tensor& v_cache, int64_t H, int64_t KV, double eps);
at::Tensor ffn_block_unfused(const at::Tensor& x, const at::Tensor& norm_weight, double eps,
                             const at::Tensor& w13, const OptTensor& w13_scales, const at::Tensor& w2,
                             const OptTensor& w2_scales);
void greedy_advance_reference(const at::Tensor& logits, const at::Tensor& token,
                              const at::Tensor& position, const at::Tensor& history);

// Shapes and dtypes of a call; throw c10::Error with a message naming the mismatch.
void check_linear(const at::Tensor& x, const at::Tensor& weight, const OptTensor& scales,
                  const OptTensor& residual);
void check_norm(const at::Tensor& x, const at::Tensor& norm_weight);
void check_attention(const at::Tensor& qkv, const at::Tensor& positions, const OptTensor& cos,
                     const OptTensor& sin, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     int64_t H, int64_t KV);
void check_attention_linear(const at::Tensor& qkv, const at::Tensor& positions, const OptTensor& cos,
                            const OptTensor& sin, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            int64_t H, int64_t KV, const at::Tensor& weight, const OptTensor& scales,
                            const OptTensor& residual);
void check_attention_block(const at::Tensor& x, const at::Tensor& norm_weight, const at::Tensor& wqkv,
                           const OptTensor& qkv_scales, const at::Tensor& positions, const OptTensor& cos,
                           const OptTensor& sin, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           int64_t H, int64_t KV, const at::Tensor& wo, const OptTensor& wo_scales);
void check_ffn_block(const at::Tensor& x, const at::Tensor& norm_weight, const at::Tensor& w13,
                     const OptTensor& w13_scales, const at::Tensor& w2, const OptTensor& w2_scales);
void check_greedy_advance(const at::Tensor& logits, const at::Tensor& token,
                          const at::Tensor& position, const at::Tensor& history);

}  // namespace babyrt::ops
