// Schemas of babyrt's ops, their ATen reference implementations (any device) and the CPU
// implementations over cpu_kernels. ops.h lists what each op computes.
#include "ops/ops.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ops/cpu_kernels.h"

namespace babyrt::ops {
namespace {

// Error messages are built with std::string alone, never through c10::str's ostream: a CUDA
// build on the GPU machine ended up with a private, uninitialised copy of libstdc++'s iostreams
// in libbabyrt, and formatting a message through it crashed instead of raising.
void append(std::string& s, const char* v) { s += v; }
void append(std::string& s, const std::string& v) { s += v; }
void append(std::string& s, c10::ScalarType v) { s += c10::toString(v); }
void append(std::string& s, at::IntArrayRef v) {
  s += "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  s += "]";
}
template <typename T, std::enable_if_t<std::is_arithmetic_v<T>, int> = 0>
void append(std::string& s, T v) {
  s += std::to_string(v);
}
template <typename... Args>
std::string cat(const Args&... args) {
  std::string s;
  (append(s, args), ...);
  return s;
}
#define BABYRT_CHECK(cond, ...) TORCH_CHECK(cond, cat(__VA_ARGS__))

// Up to this many rows of x, a linear runs as GEMVs that read each weight once per row (from
// cache after the first: each thread's block of rows stays in L2); beyond it, as one GEMM (MKL)
// that reuses each weight across rows. int8 gains more from GEMVs, which skip the dequantize.
constexpr int64_t kMaxGemvRows = 4;
constexpr int64_t kMaxGemvRowsInt8 = 64;

// The registered op `name`, typed as Sig, for calling through the dispatcher (so that each
// device's kernel runs).
template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

at::Tensor call_linear(const at::Tensor& x, const at::Tensor& w, const OptTensor& scales,
                       const OptTensor& residual) {
  static auto op = find_op<decltype(call_linear)>("babyrt::linear");
  return op.call(x, w, scales, residual);
}

at::Tensor call_attention(const at::Tensor& qkv, const at::Tensor& positions, const OptTensor& cos,
                          const OptTensor& sin, at::Tensor& k_cache, at::Tensor& v_cache, int64_t H,
                          int64_t KV) {
  static auto op = find_op<decltype(call_attention)>("babyrt::attention");
  return op.call(qkv, positions, cos, sin, k_cache, v_cache, H, KV);
}

at::Tensor call_rmsnorm_linear(const at::Tensor& x, const at::Tensor& norm_weight, double eps,
                               const at::Tensor& w, const OptTensor& scales) {
  static auto op = find_op<at::Tensor(const at::Tensor&, const at::Tensor&, double, const at::Tensor&,
                                      const OptTensor&, std::optional<at::ScalarType>)>(
      "babyrt::rmsnorm_linear");
  return op.call(x, norm_weight, eps, w, scales, std::nullopt);
}

at::Tensor call_swiglu_linear(const at::Tensor& gate_up, const at::Tensor& w, const OptTensor& scales,
                              const OptTensor& residual) {
  static auto op = find_op<decltype(call_swiglu_linear)>("babyrt::swiglu_linear");
  return op.call(gate_up, w, scales, residual);
}

at::Tensor call_attention_linear(const at::Tensor& qkv, const at::Tensor& positions,
                                 const OptTensor& cos, const OptTensor& sin, at::Tensor& k_cache,
                                 at::Tensor& v_cache, int64_t H, int64_t KV, const at::Tensor& w,
                                 const OptTensor& scales, const OptTensor& residual) {
  static auto op = find_op<decltype(call_attention_linear)>("babyrt::attention_linear");
  return op.call(qkv, positions, cos, sin, k_cache, v_cache, H, KV, w, scales, residual);
}

// ------------------------------------------------------------------ references (any device)
at::Tensor dequantize(const at::Tensor& w, const at::Tensor& scales) {
  BABYRT_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar, "dequantize: weight must be 2-D int8");
  BABYRT_CHECK(scales.dim() == 2 && scales.size(0) == w.size(0) && scales.size(1) > 0 &&
                  w.size(1) % scales.size(1) == 0,
              "dequantize: scales of shape ", scales.sizes(), " do not fit weight ", w.sizes());
  const int64_t N = w.size(0), K = w.size(1), G = scales.size(1);
  return (w.to(at::kFloat).view({N, G, K / G}) * scales.to(at::kFloat).unsqueeze(-1)).view({N, K});
}

at::Tensor rmsnorm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const at::Tensor xf = x.to(at::kFloat);
  return (xf * at::rsqrt(xf.pow(2).mean(-1, true) + eps)).to(x.scalar_type()) * weight;
}

at::Tensor swiglu(const at::Tensor& gate_up) {
  const int64_t H = gate_up.size(-1) / 2;
  return at::silu(gate_up.narrow(-1, 0, H)) * gate_up.narrow(-1, H, H);
}

}  // namespace

void check_norm(const at::Tensor& x, const at::Tensor& norm_weight) {
  BABYRT_CHECK(norm_weight.dim() == 1 && x.dim() >= 1 && norm_weight.size(0) == x.size(-1),
              "rmsnorm_linear: norm weight of shape ", norm_weight.sizes(), " for x of ", x.sizes());
}

at::Tensor rmsnorm_linear_reference(const at::Tensor& x, const at::Tensor& norm_weight, double eps,
                                    const at::Tensor& w, const OptTensor& scales,
                                    std::optional<at::ScalarType> out_dtype) {
  check_norm(x, norm_weight);
  const at::Tensor y = call_linear(rmsnorm(x, norm_weight, eps), w, scales, std::nullopt);
  return out_dtype ? y.to(*out_dtype) : y;
}

at::Tensor swiglu_linear_reference(const at::Tensor& gate_up, const at::Tensor& w,
                                   const OptTensor& scales, const OptTensor& residual) {
  BABYRT_CHECK(gate_up.size(-1) % 2 == 0, "swiglu_linear: gate_up has an odd last dimension");
  return call_linear(swiglu(gate_up), w, scales, residual);
}

// x: [B, T, heads, D], cos/sin: [B, T, D/2]; interleaved pairs as in training/models/layers.py.
static at::Tensor rope_reference(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const at::Tensor xf = x.to(at::kFloat).unflatten(-1, {-1, 2});
  const at::Tensor x0 = xf.select(-1, 0), x1 = xf.select(-1, 1);
  const at::Tensor c = cos.unsqueeze(2), s = sin.unsqueeze(2);
  return at::stack({x0 * c - x1 * s, x0 * s + x1 * c}, -1).flatten(3).to(x.scalar_type());
}

void check_attention(const at::Tensor& qkv, const at::Tensor& positions, const OptTensor& cos,
                     const OptTensor& sin, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     int64_t H, int64_t KV) {
  BABYRT_CHECK(H > 0 && KV > 0 && H % KV == 0, "attention: n_heads ", H,
              " is not a positive multiple of n_kv_heads ", KV);
  BABYRT_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.size(1) == KV,
              "attention: caches must be [B, n_kv_heads, slots, head_dim], got ", k_cache.sizes(),
              " and ", v_cache.sizes());
  const int64_t B = k_cache.size(0), D = k_cache.size(3);
  BABYRT_CHECK(qkv.dim() == 3 && qkv.size(0) == B && qkv.size(2) == (H + 2 * KV) * D,
              "attention: qkv of shape ", qkv.sizes(), " does not fit ", H, " + 2 x ", KV,
              " heads of ", D, " for batch ", B);
  BABYRT_CHECK(positions.dim() == 2 && positions.size(0) == B && positions.size(1) == qkv.size(1) &&
                  positions.scalar_type() == at::kLong,
              "attention: positions must be int64 [B, T]");
  BABYRT_CHECK(cos.has_value() == sin.has_value(), "attention: give both rope tables or neither");
  if (cos)
    BABYRT_CHECK(cos->dim() == 2 && cos->size(1) * 2 == D && sin->sizes() == cos->sizes(),
                "attention: rope tables must be [positions, head_dim / 2]");
  BABYRT_CHECK(k_cache.scalar_type() == qkv.scalar_type() && v_cache.scalar_type() == qkv.scalar_type(),
              "attention: caches must have the dtype of qkv");
}

void check_attention_linear(const at::Tensor& qkv, const at::Tensor& positions, const OptTensor& cos,
                            const OptTensor& sin, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            int64_t H, int64_t KV, const at::Tensor& weight, const OptTensor& scales,
                            const OptTensor& residual) {
  check_attention(qkv, positions, cos, sin, k_cache, v_cache, H, KV);
  // The attention's output, [B, T, H * head_dim], is the linear's x: its shape and dtype only.
  const at::Tensor y = at::empty({qkv.size(0), qkv.size(1), H * k_cache.size(3)},
                                 qkv.options().device(at::kMeta));
  check_linear(y, weight, scales, residual);
}

// The composition of the two ops (each takes its device's kernels).
at::Tensor attention_linear_unfused(const at::Tensor& qkv, const at::Tensor& positions,
                                    const OptTensor& cos, const OptTensor& sin, at::Tensor& k_cache,
                                    at::Tensor& v_cache, int64_t H, int64_t KV, const at::Tensor& w,
                                    const OptTensor& scales, const OptTensor& residual) {
  check_attention_linear(qkv, positions, cos, sin, k_cache, v_cache, H, KV, w, scales, residual);
  return call_linear(call_attention(qkv, positions, cos, sin, k_cache, v_cache, H, KV), w, scales,
                     residual);
}

void check_attention_block(const at::Tensor& x, const at::Tensor& norm_weight, const at::Tensor& wqkv,
                           const OptTensor& qkv_scales, const at::Tensor& positions, const OptTensor& cos,
                           const OptTensor& sin, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           int64_t H, int64_t KV, const at::Tensor& wo, const OptTensor& wo_scales) {
  check_norm(x, norm_weight);
  check_linear(x, wqkv, qkv_scales, std::nullopt);
  BABYRT_CHECK(x.dim() == 3, "attention_block: x must be [B, T, dim], got ", x.sizes());
  // The QKV projection's output, [B, T, (H + 2 KV) head_dim], is attention_linear's qkv: its
  // shape and dtype only; x is the residual.
  const at::Tensor qkv = at::empty({x.size(0), x.size(1), wqkv.size(0)}, x.options().device(at::kMeta));
  check_attention_linear(qkv, positions, cos, sin, k_cache, v_cache, H, KV, wo, wo_scales, x);
}

// The composition of the two ops (each takes its device's kernels).
at::Tensor attention_block_unfused(const at::Tensor& x, const at::Tensor& norm_weight, double eps,
                                   const at::Tensor& wqkv, const OptTensor& qkv_scales,
                                   const at::Tensor& positions, const OptTensor& cos,
                                   const OptTensor& sin, at::Tensor& k_cache, at::Tensor& v_cache,
                                   int64_t H, int64_t KV, const at::Tensor& wo, const OptTensor& wo_scales) {
  check_attention_block(x, norm_weight, wqkv, qkv_scales, positions, cos, sin, k_cache, v_cache, H,
                        KV, wo, wo_scales);
  return call_attention_linear(call_rmsnorm_linear(x, norm_weight, eps, wqkv, qkv_scales), positions,
                               cos, sin, k_cache, v_cache, H, KV, wo, wo_scales, x);
}

void check_ffn_block(const at::Tensor& x, const at::Tensor& norm_weight, const at::Tensor& w13,
                     const OptTensor& w13_scales, const at::Tensor& w2, const OptTensor& w2_scales) {
  check_norm(x, norm_weight);
  check_linear(x, w13, w13_scales, std::nullopt);
  BABYRT_CHECK(w13.size(0) % 2 == 0, "ffn_block: w13 must stack gate and up rows (an even count), got ",
               w13.sizes());
  // SwiGLU of the w13 projection, [..., hidden], is the w2 linear's x: its shape and dtype only;
  // x is the residual.
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = w13.size(0) / 2;
  check_linear(at::empty(shape, x.options().device(at::kMeta)), w2, w2_scales, x);
}

// The composition of the two ops (each takes its device's kernels).
at::Tensor ffn_block_unfused(const at::Tensor& x, const at::Tensor& norm_weight, double eps,
                             const at::Tensor& w13, const OptTensor& w13_scales, const at::Tensor& w2,
                             const OptTensor& w2_scales) {
  check_ffn_block(x, norm_weight, w13, w13_scales, w2, w2_scales);
  return call_swiglu_linear(call_rmsnorm_linear(x, norm_weight, eps, w13, w13_scales), w2, w2_scales, x);
}

at::Tensor attention_reference(const at::Tensor& qkv, const at::Tensor& positions,
                               const OptTensor& cos, const OptTensor& sin, at::Tensor& k_cache,
                               at::Tensor& v_cache, int64_t H, int64_t KV) {
  check_attention(qkv, positions, cos, sin, k_cache, v_cache, H, KV);
  const int64_t B = qkv.size(0), T = qkv.size(1), D = k_cache.size(3), S = k_cache.size(2);
  at::Tensor q = qkv.narrow(-1, 0, H * D).view({B, T, H, D});
  at::Tensor k = qkv.narrow(-1, H * D, KV * D).view({B, T, KV, D});
  const at::Tensor v = qkv.narrow(-1, (H + KV) * D, KV * D).view({B, T, KV, D});
  if (cos) {
    const at::Tensor c = cos->index_select(0, positions.flatten()).view({B, T, D / 2}).to(at::kFloat);
    const at::Tensor s = sin->index_select(0, positions.flatten()).view({B, T, D / 2}).to(at::kFloat);
    q = rope_reference(q, c, s);
    k = rope_reference(k, c, s);
  }
  const at::Tensor index = positions.view({B, 1, T, 1}).expand({B, KV, T, D});
  k_cache.scatter_(2, index, k.transpose(1, 2));
  v_cache.scatter_(2, index, v.transpose(1, 2));
  const at::Tensor mask = at::arange(S, positions.options()).view({1, 1, 1, S}) <=
                          positions.view({B, 1, T, 1});
  at::Tensor keys = k_cache, values = v_cache;
  if (H != KV) {
    keys = keys.repeat_interleave(H / KV, 1);
    values = values.repeat_interleave(H / KV, 1);
  }
  const at::Tensor y = at::scaled_dot_product_attention(q.transpose(1, 2), keys, values, mask);
  return y.transpose(1, 2).reshape({B, T, H * D});
}

at::Tensor embedding_reference(const at::Tensor& tokens, const at::Tensor& w,
                               const OptTensor& scales, at::ScalarType dtype) {
  BABYRT_CHECK(w.dim() == 2, "embedding: weight must be 2-D");
  const at::Tensor flat = tokens.flatten();
  // On the CPU a bad id is an error here; on CUDA index_select asserts on the device, and the
  // runtime checks ids before they get that far.
  if (flat.is_cpu())
    BABYRT_CHECK(flat.numel() == 0 || (flat.min().item<int64_t>() >= 0 &&
                                      flat.max().item<int64_t>() < w.size(0)),
                "embedding: token id out of range [0, ", w.size(0), ")");
  at::Tensor rows = w.index_select(0, flat);
  if (scales) rows = dequantize(rows, scales->index_select(0, flat));
  std::vector<int64_t> shape = tokens.sizes().vec();
  shape.push_back(w.size(1));
  return rows.to(dtype).view(shape);
}

namespace {

// ------------------------------------------------------------------ CPU
bool all_float(std::initializer_list<const at::Tensor*> ts) {
  for (const at::Tensor* t : ts)
    if (t && t->scalar_type() != at::kFloat) return false;
  return true;
}

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& w, const OptTensor& scales,
                      const OptTensor& residual) {
  check_linear(x, w, scales, residual);
  const bool q8 = scales.has_value();
  const int64_t K = x.size(-1), N = w.size(0), M = K ? x.numel() / K : 0;
  if (M > (q8 ? kMaxGemvRowsInt8 : kMaxGemvRows) || M == 0 || !all_float({&x, q8 ? nullptr : &w, residual ? &*residual : nullptr}))
    return linear_reference(x, w, scales, residual);
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  const at::Tensor sc = q8 ? scales->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor rc = residual ? residual->contiguous() : at::Tensor();
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = N;
  at::Tensor out = at::empty(shape, x.options());
  const float* xp = xc.const_data_ptr<float>();
  const float* rp = rc.defined() ? rc.const_data_ptr<float>() : nullptr;
  float* yp = out.mutable_data_ptr<float>();
  // With several rows of x, blocks of 64 weight rows are reused from L1/L2 across them.
  const int64_t block = M == 1 ? N : 64;
  at::parallel_for(0, N, 32, [&](int64_t n0, int64_t n1) {
    for (int64_t b0 = n0; b0 < n1; b0 += block) {
      const int64_t b1 = std::min(n1, b0 + block);
      for (int64_t m = 0; m < M; ++m) {
        const float* r = rp ? rp + m * N : nullptr;
        if (q8)
          cpu::gemv_q8(wc.const_data_ptr<int8_t>(), sc.const_data_ptr<float>(), K / sc.size(1),
                       xp + m * K, r, yp + m * N, K, b0, b1);
        else
          cpu::gemv_f32(wc.const_data_ptr<float>(), xp + m * K, r, yp + m * N, K, b0, b1);
      }
    }
  });
  return out;
}

// The norm and SwiGLU prologues run as plain loops in fp32: as ATen ops they cost ~8 op
// dispatches per call, more than the GEMV they feed at decode.
at::Tensor rmsnorm_linear_cpu(const at::Tensor& x, const at::Tensor& norm_weight, double eps,
                              const at::Tensor& w, const OptTensor& scales,
                              std::optional<at::ScalarType> out_dtype) {
  check_norm(x, norm_weight);
  if (!all_float({&x, &norm_weight})) {
    const at::Tensor y = linear_cpu(rmsnorm(x, norm_weight, eps), w, scales, std::nullopt);
    return out_dtype ? y.to(*out_dtype) : y;
  }
  const at::Tensor xc = x.contiguous(), nw = norm_weight.contiguous();
  at::Tensor normed = at::empty_like(xc);
  const int64_t K = xc.size(-1), M = K ? xc.numel() / K : 0;
  const float* xp = xc.const_data_ptr<float>();
  const float* wp = nw.const_data_ptr<float>();
  float* out = normed.mutable_data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const float* r = xp + m * K;
    float ss = 0;
    for (int64_t k = 0; k < K; ++k) ss += r[k] * r[k];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(K) + static_cast<float>(eps));
    for (int64_t k = 0; k < K; ++k) out[m * K + k] = r[k] * inv * wp[k];
  }
  const at::Tensor y = linear_cpu(normed, w, scales, std::nullopt);
  return out_dtype ? y.to(*out_dtype) : y;
}

at::Tensor swiglu_linear_cpu(const at::Tensor& gate_up, const at::Tensor& w,
                             const OptTensor& scales, const OptTensor& residual) {
  BABYRT_CHECK(gate_up.size(-1) % 2 == 0, "swiglu_linear: gate_up has an odd last dimension");
  if (!all_float({&gate_up})) return linear_cpu(swiglu(gate_up), w, scales, residual);
  const at::Tensor gc = gate_up.contiguous();
  const int64_t H = gc.size(-1) / 2, M = H ? gc.numel() / (2 * H) : 0;
  std::vector<int64_t> shape = gc.sizes().vec();
  shape.back() = H;
  at::Tensor act = at::empty(shape, gc.options());
  const float* g = gc.const_data_ptr<float>();
  float* a = act.mutable_data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t h = 0; h < H; ++h) {
      const float gate = g[m * 2 * H + h];
      a[m * H + h] = gate / (1.0f + std::exp(-gate)) * g[m * 2 * H + H + h];
    }
  return linear_cpu(act, w, scales, residual);
}

at::Tensor attention_cpu(const at::Tensor& qkv, const at::Tensor& positions, const OptTensor& cos,
                         const OptTensor& sin, at::Tensor& k_cache, at::Tensor& v_cache, int64_t H,
                         int64_t KV) {
  check_attention(qkv, positions, cos, sin, k_cache, v_cache, H, KV);
  if (!all_float({&qkv, cos ? &*cos : nullptr, sin ? &*sin : nullptr}) ||
      !k_cache.is_contiguous() || !v_cache.is_contiguous())
    return attention_reference(qkv, positions, cos, sin, k_cache, v_cache, H, KV);
  const int64_t B = qkv.size(0), T = qkv.size(1), D = k_cache.size(3), S = k_cache.size(2);
  const int64_t W = (H + 2 * KV) * D, half = D / 2;
  const at::Tensor qc = qkv.contiguous(), pc = positions.contiguous();
  const at::Tensor cc = cos ? cos->contiguous() : at::Tensor(), sc = sin ? sin->contiguous() : at::Tensor();
  const float* q = qc.const_data_ptr<float>();
  const int64_t* pos = pc.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < B * T; ++i)
    BABYRT_CHECK(pos[i] >= 0 && pos[i] < S && (!cos || pos[i] < cc.size(0)), "attention: position ",
                pos[i], " is outside the cache's ", S, " slots");
  float* kp = k_cache.mutable_data_ptr<float>();
  float* vp = v_cache.mutable_data_ptr<float>();
  // Keys (rotated) and values of the new tokens go into their slots first: a prompt's queries
  // see each other.
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const float* row = q + (b * T + t) * W;
      const int64_t p = pos[b * T + t];
      for (int64_t h = 0; h < KV; ++h) {
        float* kd = kp + ((b * KV + h) * S + p) * D;
        float* vd = vp + ((b * KV + h) * S + p) * D;
        std::copy(row + (H + h) * D, row + (H + h + 1) * D, kd);
        std::copy(row + (H + KV + h) * D, row + (H + KV + h + 1) * D, vd);
        if (cos) cpu::rope(kd, cc.const_data_ptr<float>() + p * half, sc.const_data_ptr<float>() + p * half, 1, D);
      }
    }
  at::Tensor out = at::empty({B, T, H * D}, qkv.options());
  float* op = out.mutable_data_ptr<float>();
  at::parallel_for(0, B * H * T, 1, [&](int64_t i0, int64_t i1) {
    thread_local std::vector<float> scores, qbuf;
    scores.resize(S);
    qbuf.resize(D);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (H * T), h = (i / T) % H, t = i % T;
      const int64_t p = pos[b * T + t], kvh = h / (H / KV);
      const float* src = q + (b * T + t) * W + h * D;
      std::copy(src, src + D, qbuf.data());
      cpu::attend_one(qbuf.data(), cos ? cc.const_data_ptr<float>() + p * half : nullptr,
                      cos ? sc.const_data_ptr<float>() + p * half : nullptr,
                      kp + (b * KV + kvh) * S * D, vp + (b * KV + kvh) * S * D, p + 1, D,
                      scores.data(), op + (b * T + t) * H * D + h * D);
    }
  });
  return out;
}

}  // namespace

void check_linear(const at::Tensor& x, const at::Tensor& w, const OptTensor& scales,
                  const OptTensor& residual) {
  BABYRT_CHECK(w.dim() == 2, "linear: weight must be 2-D, got ", w.sizes());
  BABYRT_CHECK(x.dim() >= 1 && x.size(-1) == w.size(1), "linear: x of shape ", x.sizes(),
              " does not fit weight ", w.sizes());
  BABYRT_CHECK(x.is_floating_point(), "linear: x must be floating point");
  if (scales) {
    BABYRT_CHECK(w.scalar_type() == at::kChar, "linear: scales given for a non-int8 weight");
    BABYRT_CHECK(scales->dim() == 2 && scales->size(0) == w.size(0) && scales->size(1) > 0 &&
                    w.size(1) % scales->size(1) == 0,
                "linear: scales of shape ", scales->sizes(), " do not fit weight ", w.sizes());
  } else {
    BABYRT_CHECK(w.scalar_type() == x.scalar_type(), "linear: weight dtype ", w.scalar_type(),
                " differs from x dtype ", x.scalar_type(), " (int8 weights need scales)");
  }
  if (residual) {
    std::vector<int64_t> shape = x.sizes().vec();
    shape.back() = w.size(0);
    BABYRT_CHECK(residual->sizes() == at::IntArrayRef(shape) &&
                    residual->scalar_type() == x.scalar_type(),
                "linear: residual of shape ", residual->sizes(), " for an output of ", shape);
  }
}

void check_greedy_advance(const at::Tensor& logits, const at::Tensor& token,
                          const at::Tensor& position, const at::Tensor& history) {
  BABYRT_CHECK(logits.dim() == 2 && logits.size(1) > 0 && logits.is_floating_point(),
               "greedy_advance: logits must be [batch, vocab] floats, got ", logits.sizes());
  const int64_t B = logits.size(0);
  for (const at::Tensor* t : {&token, &position, &history}) {
    BABYRT_CHECK(t->scalar_type() == at::kLong && t->dim() == 2 && t->size(0) == B,
                 "greedy_advance: token, position and history must be int64 [", B,
                 ", n], got ", t->sizes());
    BABYRT_CHECK(t->device() == logits.device(), "greedy_advance: tensors on different devices");
  }
  BABYRT_CHECK(token.size(1) == 1 && position.size(1) == 1,
               "greedy_advance: token and position must be [batch, 1]");
}

void greedy_advance_reference(const at::Tensor& logits, const at::Tensor& token,
                              const at::Tensor& position, const at::Tensor& history) {
  check_greedy_advance(logits, token, position, history);
  const at::Tensor next = logits.argmax(-1, /*keepdim=*/true);
  token.copy_(next);
  position.add_(1);
  history.scatter_(1, position, next);
}

at::Tensor decode_step_unfused(const at::Tensor& tokens, const at::Tensor&, at::TensorList,
                               const c10::List<std::optional<at::Tensor>>&, const at::Tensor&,
                               const at::Tensor&, at::Tensor&, at::Tensor&, int64_t, int64_t, double) {
  return at::empty({0}, tokens.options().dtype(at::kFloat));
}

at::Tensor linear_reference(const at::Tensor& x, const at::Tensor& w, const OptTensor& scales,
                            const OptTensor& residual) {
  check_linear(x, w, scales, residual);
  const at::Tensor weight = scales ? dequantize(w, *scales).to(x.scalar_type()) : w;
  at::Tensor y = at::linear(x, weight);
  return residual ? y.add_(*residual) : y;
}

}  // namespace babyrt::ops

TORCH_LIBRARY(babyrt, m) {
  m.def("linear(Tensor x, Tensor weight, Tensor? scales=None, Tensor? residual=None) -> Tensor");
  m.def("rmsnorm_linear(Tensor x, Tensor norm_weight, float eps, Tensor weight, "
        "Tensor? scales=None, ScalarType? out_dtype=None) -> Tensor");
  m.def("swiglu_linear(Tensor gate_up, Tensor weight, Tensor? scales=None, "
        "Tensor? residual=None) -> Tensor");
  m.def("attention(Tensor qkv, Tensor positions, Tensor? rope_cos, Tensor? rope_sin, "
        "Tensor(a!) k_cache, Tensor(b!) v_cache, int n_heads, int n_kv_heads) -> Tensor");
  m.def("attention_linear(Tensor qkv, Tensor positions, Tensor? rope_cos, Tensor? rope_sin, "
        "Tensor(a!) k_cache, Tensor(b!) v_cache, int n_heads, int n_kv_heads, Tensor weight, "
        "Tensor? scales=None, Tensor? residual=None) -> Tensor");
  m.def("attention_block(Tensor x, Tensor norm_weight, float eps, Tensor wqkv, Tensor? qkv_scales, "
        "Tensor positions, Tensor? rope_cos, Tensor? rope_sin, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, int n_heads, int n_kv_heads, Tensor wo, Tensor? wo_scales) -> Tensor");
  m.def("ffn_block(Tensor x, Tensor norm_weight, float eps, Tensor w13, Tensor? w13_scales, "
        "Tensor w2, Tensor? w2_scales) -> Tensor");
  m.def("embedding(Tensor tokens, Tensor weight, Tensor? scales, ScalarType dtype) -> Tensor");
  m.def("dequantize(Tensor weight, Tensor scales) -> Tensor");
  m.def("greedy_advance(Tensor logits, Tensor(a!) token, Tensor(b!) position, "
        "Tensor(c!) history) -> ()");
  m.def("decode_step(Tensor tokens, Tensor positions, Tensor[] weights, Tensor?[] scales, "
        "Tensor rope_cos, Tensor rope_sin, Tensor(a!) k_cache, Tensor(b!) v_cache, int n_heads, "
        "int n_kv_heads, float eps) -> Tensor");
  m.def("cpu_isa() -> str", [] { return std::string(babyrt::cpu::isa()); });
}

TORCH_LIBRARY_IMPL(babyrt, CompositeExplicitAutograd, m) {
  using namespace babyrt::ops;
  m.impl("linear", linear_reference);
  m.impl("rmsnorm_linear", rmsnorm_linear_reference);
  m.impl("swiglu_linear", swiglu_linear_reference);
  m.impl("attention", attention_reference);
  m.impl("attention_linear", attention_linear_unfused);
  m.impl("attention_block", attention_block_unfused);
  m.impl("ffn_block", ffn_block_unfused);
  m.impl("embedding", embedding_reference);
  m.impl("dequantize", dequantize);
  m.impl("greedy_advance", greedy_advance_reference);
  m.impl("decode_step", decode_step_unfused);
}

TORCH_LIBRARY_IMPL(babyrt, CPU, m) {
  using namespace babyrt::ops;
  m.impl("linear", linear_cpu);
  m.impl("rmsnorm_linear", rmsnorm_linear_cpu);
  m.impl("swiglu_linear", swiglu_linear_cpu);
  m.impl("attention", attention_cpu);
}
