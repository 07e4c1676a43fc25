// Device helpers shared by babyrt's CUDA kernels (cuda_kernels.cu: one op per kernel;
// cuda_decode_step.cu: a whole decode step in one kernel): conversions, PDL, the GEMV's
// staging and dot products, bulk copies on mbarriers, and decode attention for one head.
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cooperative_groups.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <fnmatch.h>  // BABYRT_CARVEOUT_SKIP's patterns
#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "ops/ops.h"

namespace babyrt::ops {
namespace {

constexpr int kMaxRows = 8;      // rows of x one GEMV launch takes
constexpr int kMaxGemvRows = 32; // rows of x the GEMV takes, kMaxRows a launch; more: cuBLAS
constexpr int kMaxHeadDim = 256;
constexpr int kPieceBytes = 16384;       // the unit of bulk weight copies
constexpr int kPieceChunks = kPieceBytes / 16;

// ------------------------------------------------------------------ helpers
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(int8_t v) { return static_cast<float>(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}
// v rounded to T and back: what storing an fp32 intermediate as T does in the reference.
template <typename T> __device__ __forceinline__ float round_to(float v) {
  return to_float(from_float<T>(v));
}

// PDL: wait for the previous kernel's results / let the next kernel launch.
__device__ __forceinline__ void wait_for_inputs() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void allow_next_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
}

// The threads that run a piece of device code together, and how they synchronize:
// - WholeBlock: every thread of the block (__syncthreads), data from earlier kernels.
// - Consumers: the first kThreads threads of a block whose other warps do something else (a
//   named barrier), reading data that other blocks of the same kernel wrote: those loads go to
//   L2 (ld.global.cg), since an SM's L1 does not see other SMs' writes.
struct WholeBlock {
  static constexpr bool kCoherent = false;
  __device__ static int threads() { return blockDim.x; }
  __device__ static void sync() { __syncthreads(); }
};
template <int kThreads>
struct Consumers {
  static constexpr bool kCoherent = true;
  __device__ static int threads() { return kThreads; }
  __device__ static void sync() { asm volatile("bar.sync 1, %0;" ::"n"(kThreads) : "memory"); }
};

// *p, from L2 when kCG (data another block of this kernel wrote).
template <bool kCG, typename V>
__device__ __forceinline__ V load(const V* p) {
  if constexpr (kCG) return __ldcg(p);
  else return *p;
}

// N consecutive T values at p (16-byte aligned, N * sizeof(T) a multiple of 16), as floats.
template <typename T, int N, bool kCG = false>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[N]) {
  static_assert(N * sizeof(T) % 16 == 0, "whole 16-byte vectors only");
  constexpr int kVecs = N * sizeof(T) / 16;
  int4 raw[kVecs];
#pragma unroll
  for (int i = 0; i < kVecs; ++i) raw[i] = load<kCG>(reinterpret_cast<const int4*>(p) + i);
  const T* v = reinterpret_cast<const T*>(raw);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(v[i]);
}

// Whether environment variable name is set to value (the kernels' opt-in and debug switches).
inline bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v && std::strcmp(v, value) == 0;
}

// Environment variable name as a count of at least 0 (0 when unset: the kernels' measurement
// knobs).
inline int env_count(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::max(std::atoi(v), 0) : 0;
}

// An SM runs blocks of two kernels at once only under one split of its L1 / shared memory, and
// the driver picks a kernel's split from the shared memory it needs: a GEMV with little shared
// memory and the attention after it need different splits, so attention's blocks (and their
// copies before the PDL wait) wait for the GEMV's to leave. Opt-in, read once per kernel:
// BABYRT_CARVEOUT=N, kernels prefer N% shared memory (100: one split) but those whose (mangled)
// names contain one of BABYRT_CARVEOUT_SKIP's ':'-separated shell patterns (default
// gemv_rowbuf: the int8 row-buffer GEMVs keep the driver's split; under one split 1B int8 lost
// 4.5%, attention left out of it or not; empty: none; e.g. gemv_rowbuf*ActE0, the row-buffer
// GEMVs without RMSNorm or SwiGLU staging). H200, bf16 / int8 tok/s, one build: stories110M
// 4,584 / 5,923-5,963 -> 4,732 / 5,949, 1B 1,124-1,128 / 1,867-1,873 -> 1,182 / 1,879,
// stories15M 11,215-11,411 / 13,356-13,591 -> 11,361 / 13,519.
// Not the default: as the default, the reruns under BABYRT_ATTN_LINEAR=1 did not finish
// (docs/cuda-decode.md, twentieth session). BABYRT_SMEM_FLOOR=BYTES: every launch takes at
// least that much dynamic shared memory.
inline bool named_in(const void* kernel, const char* words) {
  const char* name = nullptr;
  if (cudaFuncGetName(&name, kernel) != cudaSuccess || !name) return false;
  for (const char* w = words; *w;) {
    const char* end = std::strchr(w, ':');
    const std::string word(w, end ? end - w : std::strlen(w));
    if (!word.empty() && fnmatch(("*" + word + "*").c_str(), name, 0) == 0) return true;
    if (!end) break;
    w = end + 1;
  }
  return false;
}
inline size_t shape_smem(const void* kernel, size_t smem) {
  static const int carveout = std::getenv("BABYRT_CARVEOUT") ? std::atoi(std::getenv("BABYRT_CARVEOUT")) : -1;
  static const char* skip = std::getenv("BABYRT_CARVEOUT_SKIP") ? std::getenv("BABYRT_CARVEOUT_SKIP") : "gemv_rowbuf";
  static const size_t floor = env_count("BABYRT_SMEM_FLOOR");
  if (carveout < 0 && smem >= floor) return smem;  // the default: nothing to set
  static std::mutex mutex;
  static std::map<const void*, int> max_dynamic;  // the attribute as last set, per kernel
  std::lock_guard<std::mutex> lock(mutex);
  auto known = max_dynamic.find(kernel);
  if (known == max_dynamic.end()) {
    if (carveout >= 0 && !named_in(kernel, skip))
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, carveout));
    cudaFuncAttributes attr;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
    known = max_dynamic.emplace(kernel, attr.maxDynamicSharedSizeBytes).first;
  }
  if (smem >= floor) return smem;
  if (known->second < static_cast<int>(floor)) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(floor)));
    known->second = static_cast<int>(floor);
  }
  return floor;
}

// Launches kernel on the current stream with PDL and, when cluster > 1, thread-block clusters
// of `cluster` blocks along x (grid.x must be a multiple of it).
template <typename Kernel, typename... Args>
void launch_clustered(Kernel kernel, dim3 grid, dim3 block, size_t smem, int cluster, Args... args) {
  static const bool pdl = !env_is("BABYRT_PDL", "0");
  smem = shape_smem(reinterpret_cast<const void*>(kernel), smem);
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = c10::cuda::getCurrentCUDAStream();
  cudaLaunchAttribute attr[2];
  int n = 0;
  if (pdl) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (cluster > 1) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n].val.clusterDim.x = cluster;
    attr[n].val.clusterDim.y = 1;
    attr[n++].val.clusterDim.z = 1;
  }
  config.attrs = attr;
  config.numAttrs = n;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, args...));
}

template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, size_t smem, Args... args) {
  launch_clustered(kernel, grid, block, smem, 1, args...);
}

// Whether kernel runs in thread-block clusters on the current device: the binary picked for it
// must be for compute capability 9.0 or up (its cluster code is compiled only there).
template <typename Kernel>
bool runs_clusters(Kernel kernel) {
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  return attr.binaryVersion >= 90;
}

// f(T{}) with T the CUDA type of a float dtype (callers check the dtype first).
template <typename F>
void dispatch_float(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, "babyrt CUDA kernels take fp32, fp16 or bf16");
  }
}

// f(W{}, S{}) for a call's weights: T (float weights; S unused), or int8 with fp32 or bf16
// scales (callers check the scales' dtype first).
template <typename T, typename F>
void dispatch_weights(const OptTensor& scales, F&& f) {
  if (!scales)
    f(T{}, float{});
  else if (scales->scalar_type() == at::kBFloat16)
    f(int8_t{}, __nv_bfloat16{});
  else
    f(int8_t{}, float{});
}

// ------------------------------------------------------------------ GEMV
enum class Act { kNone, kRmsNorm, kSwiGlu };

struct GemvArgs {
  const void* w;         // [N, K], int8 or T
  const void* scales;    // [N, K / group] (int8 weights only)
  const void* x;         // [M, K] (kSwiGlu: [M, 2K], gate then up)
  const void* norm;      // [K] (kRmsNorm)
  const void* residual;  // [M, N] or null
  void* y;               // [M, N], T (or fp32 when y_float)
  float eps;
  int M, N, K, group;
  int rows_per_warp;     // gemv_kernel: rows of W each warp takes (the grid covers N with them)
  int ring_slots;        // gemv_stream_kernel: pieces of W its shared-memory ring holds
  int row_lanes;         // lanes per row (gemv_kernel 32 to 4, gemv_stream_kernel 32 to 8; a warp takes 32 / it rows)
  bool y_float;          // y is fp32: the T result widened (the reference's cast)
  // gemv_kernel only: 0, or hidden where W stacks gate rows [0, hidden) on up rows [hidden,
  // 2 hidden) and y is [M, hidden] of silu(gate) * up (ffn_block). The kernel then takes the
  // rows in the order gate 0, up 0, gate 1, up 1, ... so that a pair shares a warp's group.
  int pair_half = 0;
  // Let the next kernel launch before this one's PDL wait, not after it (attention_block's wo:
  // see attention_block_cuda). Only where the next kernel reads nothing before its own wait
  // that a kernel still running could write.
  bool trigger_early = false;
};

// W's row for the n-th row a GEMV takes: n itself, or in pairs with kPair (gate n / 2, up n / 2).
template <bool kPair>
__device__ __forceinline__ int64_t weight_row(const GemvArgs& a, int n) {
  return kPair ? (n >> 1) + static_cast<int64_t>(n & 1) * a.pair_half : n;
}

// Shared memory the GEMV stages act(x) in: as T for float weights; as int8 with one fp32 scale
// per 16 values for int8 weights (so that the dot products run on DP4A, see below).
template <typename T, typename W>
__host__ __device__ constexpr size_t gemv_smem_bytes(int M, int K) {
  return sizeof(W) == 1 ? static_cast<size_t>(M) * K + static_cast<size_t>(M) * (K / 16) * sizeof(float)
                        : static_cast<size_t>(M) * K * sizeof(T);
}

// Group i (16 values v of act(x)) into the GEMV's shared memory (see gemv_smem_bytes): int8
// with a scale for int8 weights, else as T.
template <typename T, typename W>
__device__ __forceinline__ void store_staged(unsigned char* smem, int i, int M, int K, const float (&v)[16]) {
  constexpr int E = 16 / sizeof(T);
  if constexpr (sizeof(W) == 1) {
    // Symmetric int8 with one scale per 16 values: the rounding error of a value is at most
    // half a step, max|group| / 254.
    float amax = 0.f;
#pragma unroll
    for (int j = 0; j < 16; ++j) amax = fmaxf(amax, fabsf(v[j]));
    const float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    alignas(16) int8_t q[16];
#pragma unroll
    for (int j = 0; j < 16; ++j) q[j] = static_cast<int8_t>(__float2int_rn(v[j] * inv));
    reinterpret_cast<int4*>(smem)[i] = *reinterpret_cast<const int4*>(q);
    reinterpret_cast<float*>(smem + static_cast<size_t>(M) * K)[i] = scale;
  } else {
    alignas(16) T t[16];
#pragma unroll
    for (int j = 0; j < 16; ++j) t[j] = from_float<T>(v[j]);
#pragma unroll
    for (int h = 0; h < 16; h += E)
      reinterpret_cast<int4*>(smem)[(i * 16 + h) / E] = *reinterpret_cast<const int4*>(t + h);
  }
}

// The first pass of the GEMV: act(x) for all M rows, computed once per block (not once per
// output row) into shared memory. Roundings follow the references.
template <typename T, typename W, Act kAct, typename Block = WholeBlock>
__device__ __forceinline__ void stage_activations(const GemvArgs& a, unsigned char* smem) {
  constexpr bool kCG = Block::kCoherent;
  constexpr int E = 16 / sizeof(T);  // values of x per 16-byte vector
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const T* x = static_cast<const T*>(a.x);
  const int64_t xs = kAct == Act::kSwiGlu ? 2 * static_cast<int64_t>(a.K) : a.K;
  __shared__ float inv_rms[kMaxRows];
  if constexpr (kAct == Act::kRmsNorm) {
    __shared__ float partial[32][kMaxRows];  // one sum per warp (up to 32 warps)
    for (int m = 0; m < a.M; ++m) {
      float ss = 0.f;
      for (int k = threadIdx.x * E; k < a.K; k += Block::threads() * E) {
        float v[E];
        load_floats<T, E, kCG>(x + m * xs + k, v);
#pragma unroll
        for (int j = 0; j < E; ++j) ss += v[j] * v[j];
      }
#pragma unroll
      for (int off = 16; off > 0; off /= 2) ss += __shfl_xor_sync(0xffffffff, ss, off);
      if (lane == 0) partial[warp][m] = ss;
    }
    Block::sync();
    if (threadIdx.x < a.M) {
      float ss = 0.f;
      for (int i = 0; i < Block::threads() / 32; ++i) ss += partial[i][threadIdx.x];
      inv_rms[threadIdx.x] = rsqrtf(ss / a.K + a.eps);
    }
    Block::sync();
  }
  // Groups of 16 values (the int8 quantization group; two or four vectors of x).
  const int groups = a.K / 16;
  for (int i = threadIdx.x; i < a.M * groups; i += Block::threads()) {
    const int m = i / groups, k = (i % groups) * 16;
    float v[16];
#pragma unroll
    for (int h = 0; h < 16; h += E) {
      float part[E];
      load_floats<T, E, kCG>(x + m * xs + k + h, part);
      if constexpr (kAct == Act::kRmsNorm) {
        float g[E];
        load_floats<T, E>(static_cast<const T*>(a.norm) + k + h, g);
#pragma unroll
        for (int j = 0; j < E; ++j) part[j] = round_to<T>(round_to<T>(part[j] * inv_rms[m]) * g[j]);
      } else if constexpr (kAct == Act::kSwiGlu) {
        float up[E];
        load_floats<T, E, kCG>(x + m * xs + a.K + k + h, up);
#pragma unroll
        for (int j = 0; j < E; ++j)
          part[j] = round_to<T>(round_to<T>(part[j] / (1.f + __expf(-part[j]))) * up[j]);
      }
#pragma unroll
      for (int j = 0; j < E; ++j) v[h + j] = part[j];
    }
    store_staged<T, W>(smem, i, a.M, a.K, v);
  }
  Block::sync();
}

// stage_activations for RMSNorm of one row of x (M = 1), K <= 16 x the Block's threads: each
// thread loads its 16 values of x and of the norm weights at once and keeps them while the
// block sums the squares, so that staging costs one round trip to L2 (stage_activations takes
// two: x, then the norm weights). Roundings as stage_activations' (the squares summed in
// another order).
template <typename T, typename W, typename Block>
__device__ void stage_rmsnorm_row(const GemvArgs& a, unsigned char* smem) {
  constexpr int kVecs = 16 * sizeof(T) / 16;  // 16-byte vectors per group of 16 values
  __shared__ float partial[32];
  const int i = threadIdx.x, lane = threadIdx.x % 32;
  const bool has = i < a.K / 16;
  int4 xr[kVecs], gr[kVecs];
  float ss = 0.f;
  if (has) {
#pragma unroll
    for (int h = 0; h < kVecs; ++h) {
      xr[h] = load<Block::kCoherent>(reinterpret_cast<const int4*>(static_cast<const T*>(a.x) + i * 16) + h);
      gr[h] = reinterpret_cast<const int4*>(static_cast<const T*>(a.norm) + i * 16)[h];
    }
    const T* xv = reinterpret_cast<const T*>(xr);
#pragma unroll
    for (int j = 0; j < 16; ++j) ss += to_float(xv[j]) * to_float(xv[j]);
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) ss += __shfl_xor_sync(0xffffffff, ss, off);
  if (lane == 0) partial[threadIdx.x / 32] = ss;
  Block::sync();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < Block::threads() / 32; ++w) total += partial[w];
  const float inv_rms = rsqrtf(total / a.K + a.eps);
  if (has) {
    const T* xv = reinterpret_cast<const T*>(xr);
    const T* g = reinterpret_cast<const T*>(gr);
    float v[16];
#pragma unroll
    for (int j = 0; j < 16; ++j) v[j] = round_to<T>(round_to<T>(to_float(xv[j]) * inv_rms) * to_float(g[j]));
    store_staged<T, W>(smem, i, 1, a.K, v);
  }
  Block::sync();  // staged; and partial may be written again
}

// The dot product of one 16-byte chunk of weights wv (chunk c of its row) with row m of act(x)
// as stage_activations left it in smem. int8 weights: DP4A against int8 x, times the weights'
// scale w_scale and x's scale.
template <typename T, typename W>
__device__ __forceinline__ float chunk_dot(const int4& wv, float w_scale, const unsigned char* smem,
                                           int M, int K, int m, int c) {
  constexpr int E = 16 / sizeof(W);
  const int chunks = K / E;
  if constexpr (sizeof(W) == 1) {
    const int4 xq = reinterpret_cast<const int4*>(smem)[m * chunks + c];
    const float xscale = reinterpret_cast<const float*>(smem + static_cast<size_t>(M) * K)[m * chunks + c];
    int d = __dp4a(wv.x, xq.x, 0);
    d = __dp4a(wv.y, xq.y, d);
    d = __dp4a(wv.z, xq.z, d);
    d = __dp4a(wv.w, xq.w, d);
    return static_cast<float>(d) * (w_scale * xscale);
  } else {
    const int4 xr = reinterpret_cast<const int4*>(smem)[m * chunks + c];
    const W* wp = reinterpret_cast<const W*>(&wv);
    const T* xp = reinterpret_cast<const T*>(&xr);
    float part = 0.f;
#pragma unroll
    for (int j = 0; j < E; ++j) part += to_float(wp[j]) * to_float(xp[j]);
    return part;
  }
}

// The residual of y[m, n] (0 without one). The GEMVs of one row of x read it right after the
// PDL wait, so that its round trip to L2 overlaps the staging of x instead of following the dot
// product (H200, with the RoPE row read early in attention: stories15M bf16 10,490 -> 10,747
// tok/s, stories110M 4,153 -> 4,237, 1B 1,047 -> 1,061 bf16 and 1,512 -> 1,531 int8).
template <typename T>
__device__ __forceinline__ float early_residual(const GemvArgs& a, int m, int n) {
  return a.residual && n < a.N ? to_float(static_cast<const T*>(a.residual)[static_cast<int64_t>(m) * a.N + n])
                               : 0.f;
}

// y[m, n] from its dot product v: the residual added and the result rounded as the reference
// does (fp32 y: the T result widened). have_res: res is the residual, as early_residual read it.
template <typename T, bool kCG = false>
__device__ __forceinline__ void store_output(const GemvArgs& a, int m, int n, float v, bool have_res = false,
                                             float res = 0.f) {
  const int64_t i = static_cast<int64_t>(m) * a.N + n;
  float out = v;
  if (a.residual)
    out = round_to<T>(out) + (have_res ? res : to_float(load<kCG>(static_cast<const T*>(a.residual) + i)));
  if (a.y_float)
    static_cast<float*>(a.y)[i] = round_to<T>(out);
  else
    static_cast<T*>(a.y)[i] = from_float<T>(out);
}


__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void barrier_init(uint64_t* bar, int count) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_address(bar)), "r"(count) : "memory");
#endif
}
__device__ __forceinline__ void fence_barrier_init() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
}
__device__ __forceinline__ void barrier_arrive(uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_address(bar)) : "memory");
#endif
}
// bar's phase completes once this many more bytes have landed (see bulk_copy).
__device__ __forceinline__ void expect_bytes(uint64_t* bar, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;"
               ::"r"(smem_address(bar)), "r"(bytes) : "memory");
#endif
}
// bytes (a multiple of 16) from global src to shared dst by the bulk-copy engine; bar's phase
// completes when they have landed.
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  expect_bytes(bar, bytes);
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
      ::"r"(smem_address(dst)), "l"(src), "r"(bytes), "r"(smem_address(bar)) : "memory");
#endif
}
// An L2 policy for data read once (streamed weights): evicted first, so that it does not push
// out what is read again (activations, the KV cache).
__device__ __forceinline__ uint64_t evict_first_policy() {
  uint64_t policy = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
#endif
  return policy;
}
// bulk_copy with an L2 cache policy (evict_first_policy).
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes, uint64_t* bar,
                                          uint64_t policy) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  expect_bytes(bar, bytes);
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;"
      ::"r"(smem_address(dst)), "l"(src), "r"(bytes), "r"(smem_address(bar)), "l"(policy) : "memory");
#endif
}
// 16 bytes from global src to shared dst, asynchronously (complete after cp_async_wait_all).
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_address(dst)), "l"(src) : "memory");
#endif
}
// cp_async16 with an L2 cache policy (evict_first_policy).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, uint64_t policy) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;"
               ::"r"(smem_address(dst)), "l"(src), "l"(policy) : "memory");
#endif
}
__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;" ::: "memory");
#endif
}
// Waits until the phase of bar with this parity has completed.
__device__ __forceinline__ void barrier_wait(uint64_t* bar, uint32_t parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint32_t done = 0;
  while (!done)
    asm volatile(
        "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
        : "=r"(done) : "r"(smem_address(bar)), "r"(parity) : "memory");
#endif
}


// A kernel on the current device: its SMs, whether its binary is for Hopper or later, and the
// dynamic shared memory a block of it may take, budget(the device's opt-in limit, the kernel's
// static shared memory), which is set as the kernel's limit (the default limit is 48 KB).
struct KernelRoom {
  bool hopper;
  int sms, smem;
};
template <typename Kernel, typename Budget>
KernelRoom kernel_room(Kernel kernel, Budget&& budget) {
  int device = 0, sms = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  const int smem = budget(optin, static_cast<int>(attr.sharedSizeBytes));
  if (smem > 0)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  return KernelRoom{attr.binaryVersion >= 90, sms, smem};
}

// Blocks of kernel (threads each, smem bytes of dynamic shared memory) that fit on an SM of the
// current device at once. Queried once per kernel, device and size: the occupancy query costs
// host time, which an eager prefill would pay on every launch.
inline int blocks_per_sm(const void* kernel, int threads, size_t smem) {
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, int, size_t>, int> known;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const std::tuple<const void*, int, int, size_t> key{kernel, device, threads, smem};
  const std::lock_guard<std::mutex> lock(mutex);
  if (auto it = known.find(key); it != known.end()) return it->second;
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
  known.emplace(key, per_sm);
  return per_sm;
}

// Clusters of `cluster` blocks of kernel (as blocks_per_sm) that fit on the current device at
// once (0: none, or a size the device does not take). Queried once per kernel, device and size.
inline int clusters_that_fit(const void* kernel, int cluster, int threads, size_t smem) {
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, int, int, size_t>, int> known;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const std::tuple<const void*, int, int, int, size_t> key{kernel, device, cluster, threads, smem};
  const std::lock_guard<std::mutex> lock(mutex);
  if (auto it = known.find(key); it != known.end()) return it->second;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(cluster);
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem;
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = cluster;
  attr.val.clusterDim.y = attr.val.clusterDim.z = 1;
  config.attrs = &attr;
  config.numAttrs = 1;
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, kernel, &config) != cudaSuccess) n = 0;
  (void)cudaGetLastError();  // an unsupported size answers an error: leave none behind
  known.emplace(key, n);
  return n;
}

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
}


// ffn_block's w13 GEMV: silu(gate) * up of row j of x's m-th row, from the two dot products,
// rounded as the references round (rmsnorm_linear's output in T, then swiglu_linear's
// staging), into y [M, a.pair_half].
template <typename T>
__device__ __forceinline__ void store_swiglu(const GemvArgs& a, int m, int j, float gate, float up) {
  const float g = round_to<T>(gate), u = round_to<T>(up);
  static_cast<T*>(a.y)[static_cast<int64_t>(m) * a.pair_half + j] =
      from_float<T>(round_to<T>(round_to<T>(g / (1.f + __expf(-g))) * u));
}

// ------------------------------------------------------------------ attention at decode
struct AttnArgs {
  const void* qkv;           // [B, 1, (H + 2 KV) D]
  const int64_t* positions;  // [B, 1]
  const float* cos;          // [P, D/2] or null
  const float* sin;
  void* k_cache;             // [B, KV, S, D]
  void* v_cache;
  void* out;                 // [B, 1, H D]
  int H, KV, D, S, P;
  int early_slots;  // attention_decode_kernel: K and V rows it copies before its PDL wait (0: none)
  int k_stride;     // elements from one copied K row to the next: D, or more to spread the banks
  bool trigger_late = false;  // attention_decode_kernel: the next kernel launches after its wait (attention_block)
};

// What an attention kernel read before its PDL wait: the sequence's position p (-1: nothing),
// and where rope, this thread's pair (threadIdx.x) of RoPE row p. attend() checks the position
// after the wait; if it moved, it drops the early K/V copy and reads the tables again.
struct EarlyReads {
  int64_t p;
  bool rope;
  float c, s;
};

// Shared memory attend() takes: each warp's running max, sum and weighted row of V.
__host__ __device__ constexpr size_t attend_smem_bytes(int D, int threads) {
  return static_cast<size_t>(threads / 32) * (D + 2) * sizeof(float);
}

// softmax(q K^T / sqrt(D)) V over n slots (n >= 1) for query q (D floats in shared memory,
// rotated, synced), by the Block's kThreads threads: slot j's K row at k + j * ks, its V row at
// v + j * D (shared or global memory). Calls emit(d, value) for each output d (each by one
// thread). work: attend_smem_bytes.
//
// One pass, no block-wide reductions in it (the scores, max and sum each took a block-wide
// round of shared memory and two syncs): a slot takes kL lanes (up to two 16-byte chunks of its
// K and V rows each), a warp 32 / kL slots at a time, and each group of lanes keeps a running
// max, sum and weighted V (online softmax); the groups of a warp then combine by shuffles, and
// the warps through shared memory after one sync. kL is a template constant so that the
// shuffle sums unroll and the rounds' two slots interleave (a loop over a run-time lane count
// ran them one after the other).
template <typename T, int kThreads, typename Block, int kL, typename Emit>
__device__ void attend_slots_lanes(const float* q, const T* k, int ks, const T* v, int64_t n, int D,
                                   float* work, Emit& emit) {
  constexpr int E = 16 / sizeof(T);  // values per 16-byte chunk
  constexpr int kC = 2;              // chunks per lane
  constexpr int kU = 2;              // slots a group takes per round, their loads in flight together
  constexpr int kWarps = kThreads / 32, G = 32 / kL;  // G: slots a warp takes at once
  const int vecs = D / E;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / kL, c0 = lane % kL;
  const float scale = rsqrtf(static_cast<float>(D));
  float qr[kC][E];
#pragma unroll
  for (int c = 0; c < kC; ++c)
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const int d = (c0 + c * kL) * E + e;
      qr[c][e] = d < D ? q[d] * scale : 0.f;
    }
  float m = -INFINITY, l = 0.f, acc[kC][E];
#pragma unroll
  for (int c = 0; c < kC; ++c)
#pragma unroll
    for (int e = 0; e < E; ++e) acc[c][e] = 0.f;

  // Every lane of the warp runs the same rounds, so the shuffles see the whole warp.
  const int64_t step = static_cast<int64_t>(kWarps) * G;
  for (int64_t j0 = static_cast<int64_t>(warp) * G + g; j0 - g < n; j0 += kU * step) {
    // The rows' chunks stay raw (16 bytes, 4 registers) until used: as floats, two slots' K
    // and V rows would hold 64 registers.
    int4 kr[kU][kC], vr[kU][kC];
    float s[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u)
#pragma unroll
      for (int c = 0; c < kC; ++c) {
        const int64_t j = j0 + u * step;
        const int chunk = c0 + c * kL;
        if (j < n && chunk < vecs) {
          kr[u][c] = *reinterpret_cast<const int4*>(k + j * ks + chunk * E);
          vr[u][c] = *reinterpret_cast<const int4*>(v + j * D + chunk * E);
        } else {
          kr[u][c] = vr[u][c] = make_int4(0, 0, 0, 0);  // zero bits: 0.0 in every T
        }
      }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      float dot = 0.f;
#pragma unroll
      for (int c = 0; c < kC; ++c) {
        const T* kt = reinterpret_cast<const T*>(&kr[u][c]);
#pragma unroll
        for (int e = 0; e < E; ++e) dot += qr[c][e] * to_float(kt[e]);
      }
      s[u] = dot;
    }
#pragma unroll
    for (int off = kL / 2; off > 0; off /= 2)
#pragma unroll
      for (int u = 0; u < kU; ++u) s[u] += __shfl_xor_sync(0xffffffff, s[u], off);
    float mn = m;
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      if (j0 + u * step >= n) s[u] = -INFINITY;
      mn = fmaxf(mn, s[u]);
    }
    if (mn == -INFINITY) continue;  // no slot for this group this round (uniform in the group)
    const float a = __expf(m - mn);
    l *= a;
#pragma unroll
    for (int c = 0; c < kC; ++c)
#pragma unroll
      for (int e = 0; e < E; ++e) acc[c][e] *= a;
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const float p = __expf(s[u] - mn);
      l += p;
#pragma unroll
      for (int c = 0; c < kC; ++c) {
        const T* vt = reinterpret_cast<const T*>(&vr[u][c]);
#pragma unroll
        for (int e = 0; e < E; ++e) acc[c][e] += p * to_float(vt[e]);
      }
    }
    m = mn;
  }
  // The warp's groups, by shuffles.
#pragma unroll
  for (int off = kL; off < 32; off *= 2) {
    const float om = __shfl_xor_sync(0xffffffff, m, off), ol = __shfl_xor_sync(0xffffffff, l, off);
    float oacc[kC][E];
#pragma unroll
    for (int c = 0; c < kC; ++c)
#pragma unroll
      for (int e = 0; e < E; ++e) oacc[c][e] = __shfl_xor_sync(0xffffffff, acc[c][e], off);
    const float mn = fmaxf(m, om);
    if (mn == -INFINITY) continue;  // both empty
    const float a = __expf(m - mn), b = __expf(om - mn);
    l = l * a + ol * b;
#pragma unroll
    for (int c = 0; c < kC; ++c)
#pragma unroll
      for (int e = 0; e < E; ++e) acc[c][e] = acc[c][e] * a + oacc[c][e] * b;
    m = mn;
  }
  // The warps, through shared memory: [warp][D values, max, sum].
  float* mine = work + warp * (D + 2);
  if (g == 0) {
#pragma unroll
    for (int c = 0; c < kC; ++c)
      if (c0 + c * kL < vecs)
#pragma unroll
        for (int e = 0; e < E; ++e) mine[(c0 + c * kL) * E + e] = acc[c][e];
    if (lane == 0) mine[D] = m, mine[D + 1] = l;
  }
  Block::sync();
  for (int d = threadIdx.x; d < D; d += kThreads) {
    float mx = -INFINITY;
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, work[w * (D + 2) + D]);
    float num = 0.f, den = 0.f;
    for (int w = 0; w < kWarps; ++w) {
      const float* r = work + w * (D + 2);
      if (r[D] == -INFINITY) continue;  // a warp that had no slot
      const float f = __expf(r[D] - mx);
      num += r[d] * f;
      den += r[D + 1] * f;
    }
    emit(d, num / den);
  }
}

// attend_slots_lanes with the fewest lanes a slot (4 to 32) whose two chunks each cover a row.
template <typename T, int kThreads, typename Block, typename Emit>
__device__ void attend_slots(const float* q, const T* k, int ks, const T* v, int64_t n, int D, float* work,
                             Emit&& emit) {
  static_assert(kMaxHeadDim * sizeof(T) <= 2 * 32 * 16, "two 16-byte chunks a lane cover a row");
  const int vecs = D * static_cast<int>(sizeof(T)) / 16;
  if (vecs <= 8) attend_slots_lanes<T, kThreads, Block, 4>(q, k, ks, v, n, D, work, emit);
  else if (vecs <= 16) attend_slots_lanes<T, kThreads, Block, 8>(q, k, ks, v, n, D, work, emit);
  else if (vecs <= 32) attend_slots_lanes<T, kThreads, Block, 16>(q, k, ks, v, n, D, work, emit);
  else attend_slots_lanes<T, kThreads, Block, 32>(q, k, ks, v, n, D, work, emit);
}

// Head h of sequence b for one new token, by the Block's kThreads threads: RoPE on q and k, k
// and v into the cache at the sequence's position, softmax(q K^T / sqrt(D)) V over the slots up
// to it, into out. smem: attend_smem_bytes. kCopy: kv_copy (or null) is shared memory that
// already holds the head's K rows of the slots before position early.p (a.k_stride elements
// apart), and a.early_slots K rows further on its V rows (D apart); the new k and v go there
// too, and the slots are read from there instead of the cache. (A template flag, so that
// decode_step, which copies nothing, reads the cache through global loads, not through pointers
// chosen at run time.) y_smem (or null): the head's output goes there instead, as floats
// rounded to T (attention_linear_kernel). early: what the caller read before its PDL wait.
template <typename T, int kThreads, typename Block, bool kCopy = false>
__device__ void attend(const AttnArgs& a, int h, int b, float* smem, T* kv_copy = nullptr,
                       float* y_smem = nullptr, EarlyReads early = EarlyReads{-1, false, 0.f, 0.f}) {
  static_assert(kThreads >= kMaxHeadDim, "a thread per pair of q and k, and per value of v");
  constexpr bool kCG = Block::kCoherent;
  __shared__ float q[kMaxHeadDim];
  const int D = a.D, half = D / 2;
  const int kvh = h / (a.H / a.KV);

  // The position, and this thread's values of q, k and v, in one round trip to L2 (their
  // addresses do not depend on the position).
  const int64_t p = a.positions[b];
  const T* row = static_cast<const T*>(a.qkv) + static_cast<int64_t>(b) * (a.H + 2 * a.KV) * D;
  const T* qh = row + h * D;
  const T* kh = row + (a.H + kvh) * D;
  const T* vh = row + (a.H + a.KV + kvh) * D;
  const int i = threadIdx.x;  // this thread's pair of q and k, and value of v
  float q0 = 0.f, q1 = 0.f, k0 = 0.f, k1 = 0.f;
  T v_new{};
  if (i < half) {
    q0 = to_float(load<kCG>(qh + 2 * i)), q1 = to_float(load<kCG>(qh + 2 * i + 1));
    k0 = to_float(load<kCG>(kh + 2 * i)), k1 = to_float(load<kCG>(kh + 2 * i + 1));
  }
  if (i < D) v_new = load<kCG>(vh + i);
  T* out = static_cast<T*>(a.out) + (static_cast<int64_t>(b) * a.H + h) * D;
  if (p < 0 || p >= a.S || (a.cos && p >= a.P)) {  // the runtime never asks this; stay in bounds
    for (int d = threadIdx.x; d < D; d += kThreads) {
      if (y_smem) y_smem[d] = 0.f;
      else out[d] = from_float<T>(0.f);
    }
    return;
  }
  const int64_t cache_off = (static_cast<int64_t>(b) * a.KV + kvh) * a.S * D;
  T* kc = static_cast<T*>(a.k_cache) + cache_off;
  T* vc = static_cast<T*>(a.v_cache) + cache_off;
  if (early.p != p) kv_copy = nullptr;  // the position moved since the copy: read the cache
  T* const k_rows = kCopy ? kv_copy : nullptr;  // the slots' copies, if any
  const int ks = a.k_stride;  // of k_rows
  T* const v_rows = kCopy && kv_copy ? kv_copy + static_cast<int64_t>(a.early_slots) * ks : nullptr;

  // RoPE on q and on this token's k; k and v into their slot. Every block of a kv head writes
  // the same values, so the duplicate writes are benign and each block then reads its own.
  if (i < half) {
    if (a.cos) {
      const bool pre = early.rope && early.p == p;
      const float c = pre ? early.c : a.cos[p * half + i], s = pre ? early.s : a.sin[p * half + i];
      q[2 * i] = round_to<T>(q0 * c - q1 * s);
      q[2 * i + 1] = round_to<T>(q0 * s + q1 * c);
      kc[p * D + 2 * i] = from_float<T>(k0 * c - k1 * s);
      kc[p * D + 2 * i + 1] = from_float<T>(k0 * s + k1 * c);
      if constexpr (kCopy)
        if (k_rows) {
          k_rows[p * ks + 2 * i] = from_float<T>(k0 * c - k1 * s);
          k_rows[p * ks + 2 * i + 1] = from_float<T>(k0 * s + k1 * c);
        }
    } else {
      q[2 * i] = q0;
      q[2 * i + 1] = q1;
      kc[p * D + 2 * i] = from_float<T>(k0);
      kc[p * D + 2 * i + 1] = from_float<T>(k1);
      if constexpr (kCopy)
        if (k_rows) k_rows[p * ks + 2 * i] = from_float<T>(k0), k_rows[p * ks + 2 * i + 1] = from_float<T>(k1);
    }
  }
  if (i < D) {
    vc[p * D + i] = v_new;
    if constexpr (kCopy)
      if (v_rows) v_rows[p * D + i] = v_new;
  }
  Block::sync();

  attend_slots<T, kThreads, Block>(q, kCopy && k_rows ? k_rows : kc, kCopy && k_rows ? ks : D,
                                   kCopy && v_rows ? v_rows : vc, p + 1, D, smem, [&](int d, float v) {
                                     if (y_smem) y_smem[d] = round_to<T>(v);
                                     else out[d] = from_float<T>(v);
                                   });
}


}  // namespace
}  // namespace babyrt::ops
