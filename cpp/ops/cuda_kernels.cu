// CUDA kernels behind babyrt's ops. Built only when the Torch found has CUDA.
//
// int8 linear at decode (M <= kMaxGemvRows rows of x): one warp per output row, each lane
// loading 16 weight bytes at a time, so that every weight byte is read once and in full
// 128-byte lines; x comes through L1, scales once per 16 weights. Larger M (prefill) runs as
// dequantize + cuBLAS GEMM through the ATen reference.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "ops/ops.h"

namespace babyrt::ops {
namespace {

constexpr int kMaxGemvRows = 8;
constexpr int kWarpsPerBlock = 8;
constexpr int kUnroll = 8;  // 16-byte loads in flight per lane

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}

// y[m, n] = sum_k x[m, k] * W[n, k] * scales[n, k / group] (+ residual[m, n]).
// K and group are multiples of 16, so each lane's 16 weights share one scale.
template <typename T, typename S>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
gemv_q8_kernel(const int8_t* __restrict__ W, const S* __restrict__ scales,
               const T* __restrict__ x, const T* __restrict__ residual, T* __restrict__ y,
               int M, int N, int K, int group) {
  const int lane = threadIdx.x % 32;
  const int n = blockIdx.x * kWarpsPerBlock + threadIdx.x / 32;
  if (n >= N) return;
  const int G = K / group;
  const int4* row = reinterpret_cast<const int4*>(W + static_cast<int64_t>(n) * K);
  const int chunks = K / 16;
  float acc[kMaxGemvRows];
#pragma unroll
  for (int m = 0; m < kMaxGemvRows; ++m) acc[m] = 0.f;

  for (int c0 = lane; c0 < chunks; c0 += 32 * kUnroll) {
    int4 w[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + u * 32;
      w[u] = c < chunks ? __ldcs(row + c) : make_int4(0, 0, 0, 0);  // streamed: read once
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + u * 32;
      if (c >= chunks) break;
      const int k = c * 16;
      const float s = to_float(scales[static_cast<int64_t>(n) * G + k / group]);
      const int8_t* b = reinterpret_cast<const int8_t*>(&w[u]);
#pragma unroll
      for (int m = 0; m < kMaxGemvRows; ++m) {
        if (m >= M) break;
        // The 16 activations as 16-byte vector loads (K % 16 == 0 keeps them aligned).
        constexpr int kVec = 16 * sizeof(T) / 16;
        int4 xv[kVec];
        const int4* xm = reinterpret_cast<const int4*>(x + static_cast<int64_t>(m) * K + k);
#pragma unroll
        for (int i = 0; i < kVec; ++i) xv[i] = xm[i];
        const T* xe = reinterpret_cast<const T*>(xv);
        float part = 0.f;
#pragma unroll
        for (int j = 0; j < 16; ++j) part += static_cast<float>(b[j]) * to_float(xe[j]);
        acc[m] += part * s;
      }
    }
  }
#pragma unroll
  for (int m = 0; m < kMaxGemvRows; ++m) {
    if (m >= M) break;
    float v = acc[m];
#pragma unroll
    for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffff, v, off);
    if (lane == 0) {
      const int64_t i = static_cast<int64_t>(m) * N + n;
      y[i] = from_float<T>(v + (residual ? to_float(residual[i]) : 0.f));
    }
  }
}

template <typename T, typename S>
void launch(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
            const at::Tensor* residual, at::Tensor& y, int M, int N, int K) {
  const int group = K / static_cast<int>(scales.size(1));
  const dim3 grid((N + kWarpsPerBlock - 1) / kWarpsPerBlock), block(kWarpsPerBlock * 32);
  gemv_q8_kernel<T, S><<<grid, block, 0, c10::cuda::getCurrentCUDAStream()>>>(
      w.const_data_ptr<int8_t>(), reinterpret_cast<const S*>(scales.const_data_ptr()),
      reinterpret_cast<const T*>(x.const_data_ptr()),
      residual ? reinterpret_cast<const T*>(residual->const_data_ptr()) : nullptr,
      reinterpret_cast<T*>(y.mutable_data_ptr()), M, N, K, group);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_scales(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                   const at::Tensor* residual, at::Tensor& y, int M, int N, int K) {
  if (scales.scalar_type() == at::kBFloat16)
    launch<T, __nv_bfloat16>(x, w, scales, residual, y, M, N, K);
  else
    launch<T, float>(x, w, scales, residual, y, M, N, K);
}

at::Tensor linear_cuda(const at::Tensor& x, const at::Tensor& w,
                       const std::optional<at::Tensor>& scales,
                       const std::optional<at::Tensor>& residual) {
  check_linear(x, w, scales, residual);
  const int64_t K = x.size(-1), N = w.size(0), M = K ? x.numel() / K : 0;
  const bool fits = scales && M >= 1 && M <= kMaxGemvRows && K % 16 == 0 &&
                    (K / scales->size(1)) % 16 == 0 && K < (int64_t{1} << 30) &&
                    (scales->scalar_type() == at::kFloat || scales->scalar_type() == at::kBFloat16);
  if (!fits) return linear_reference(x, w, scales, residual);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), wc = w.contiguous(), sc = scales->contiguous();
  const at::Tensor rc = residual ? residual->contiguous() : at::Tensor();
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = N;
  at::Tensor y = at::empty(shape, x.options());
  const at::Tensor* r = rc.defined() ? &rc : nullptr;
  switch (x.scalar_type()) {
    case at::kFloat: launch_scales<float>(xc, wc, sc, r, y, M, N, K); break;
    case at::kHalf: launch_scales<__half>(xc, wc, sc, r, y, M, N, K); break;
    case at::kBFloat16: launch_scales<__nv_bfloat16>(xc, wc, sc, r, y, M, N, K); break;
    default: return linear_reference(x, w, scales, residual);
  }
  return y;
}

}  // namespace
}  // namespace babyrt::ops

TORCH_LIBRARY_IMPL(babyrt, CUDA, m) { m.impl("linear", babyrt::ops::linear_cuda); }
