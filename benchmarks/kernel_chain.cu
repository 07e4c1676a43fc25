// What a kernel boundary costs a decode step on this GPU, apart from babyrt's kernels: chains of
// dependent kernels (each reads what the one before wrote), captured in a CUDA graph, launched
// with programmatic dependent launch (PDL) as babyrt launches its own, timed with CUDA events.
//
// A decode step is ~35-120 such dependent kernels, so the floor of one link (the previous grid
// draining, the PDL wait releasing, one round trip to L2 for the input, a block reduction and a
// store) is the floor of a step. The chains:
//   empty       kernels that do nothing (launch throughput, no dependency)
//   vec G       wait, read the previous kernel's 1.5 KB vector, block-sum it, write this
//               kernel's slice of the next vector; G blocks of 256 threads
//   vec2 G      the same, but the vector's address comes from a first dependent load (two round
//               trips to L2 after the wait, like the embedding's token id and then its row)
//   gemv        a GEMV shaped like stories110M's QKV (2304 rows of 1,536 bytes): each warp loads
//               its row before the PDL wait, then reads x (the previous GEMV's output)
//   gemv+vec G / gemv+vec 100KB G / gemv+cluster C G
//               a GEMV, then a small kernel of G blocks (plain, plain with 100 KB of shared
//               memory as attention takes, or in clusters of C blocks with a cluster barrier):
//               what a kernel after a register-heavy GEMV costs
//   layer      a stories110M-shaped layer of toy kernels (bf16 weights from HBM, 12 layers a graph):
//               QKV GEMV with RMSNorm staging (288 blocks), attention over 144 slots copied to
//               shared memory before the wait (12 blocks), wo (96), w13 (256, two rows a warp), w2
//               (96, rows of 4 KB); each GEMV loads its rows before the PDL wait and lets the next
//               kernel launch after it (as babyrt's), "early": before it. us a layer, by a
//               mask of the kernels that let the next launch before their wait ("pad": the
//               GEMVs at 3 blocks an SM, as babyrt's; "attn 96KB": attention with ~99 KB of
//               shared memory, as babyrt's). "layer attn+wo":
//               the same with attention and wo as one kernel (each head's block multiplies its
//               output by its 64 columns of Wo, copied to shared memory before the wait, and
//               writes fp32 parts that the w13 GEMV sums while staging; masks from 100: the
//               last head's block to finish sums them into h instead): 4 kernels a layer.
//               "by role": the layer's kernels each record their end (%globaltimer), and each
//               role's marginal time (its end less the previous kernel's) is averaged over
//               layers 1-11 of 20 replays, as benchmarks/cuda_decode_profile.py's under PDL.
//   persistent MODE one kernel of one block an SM running 96 dependent phases, each phase
//               reading the whole vector the one before wrote (768 bf16, stories110M's x) and
//               writing its block's slice of the next: the one-kernel step's floor per phase.
//               MODE barrier: a grid barrier between phases (as cuda_decode_step.cu's
//               GridSync), then plain loads; ll: no barrier, every value carries the phase's
//               16-bit epoch in the same 32-bit word (NCCL's LL protocol), and readers spin
//               until every word they read carries the epoch they expect. "gemv" variants:
//               each phase a GEMV of 2304 rows of 768 bf16 from HBM, its block's rows loaded
//               into registers at the phase's start, before the wait for x
// Build: nvcc -O3 -std=c++17 -arch=sm_90a benchmarks/kernel_chain.cu -o kernel_chain
// Run: ./kernel_chain [--no-pdl] [--carveout PERCENT | --carveout-gemvs PERCENT]
// (tools/gpu_check.sh chain: with PDL, and with all shared memory preferred, for every kernel
// or the GEMVs only). H200, fifteenth session (docs/cuda-decode.md has the table): a link of 132
// blocks 1.03 us under PDL, a second dependent load +0.13 us, the GEMV 2.84 us; after the GEMV
// a plain kernel adds 1.07 us, one with 100 KB of shared memory 1.3, one in clusters 1.6-1.9.
// Nineteenth session: the toy layer 16.7 us (mask 2) -> 12.9 with "pad" and 12.8 with
// --carveout 100: its kernels ran under different L1 / shared splits, and an SM holds blocks of
// two kernels only under one split; "layer attn+wo" 18.0-20.1 us, slower than the 5 kernels.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace cg = cooperative_groups;

#define CHECK(x)                                                                         \
  do {                                                                                   \
    cudaError_t e = (x);                                                                 \
    if (e != cudaSuccess) {                                                              \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); \
      std::exit(1);                                                                      \
    }                                                                                    \
  } while (0)

constexpr int kThreads = 256;
constexpr int kVec = 384;  // floats: 1.5 KB, stories110M's x in bf16
constexpr int kRows = 2304, kRowBytes = 1536;

__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void pdl_launch() { asm volatile("griddepcontrol.launch_dependents;"); }

// The toy layer's kernels by role: each block, once all its threads are done, raises *stamp to
// the global timer (ns), so that *stamp ends as the kernel's end (null: nothing recorded).
__device__ __forceinline__ void stamp_end(unsigned long long* stamp) {
  if (!stamp) return;
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    atomicMax(stamp, t);
  }
}

__device__ float block_sum(float v) {
  __shared__ float part[kThreads / 32];
  for (int o = 16; o; o /= 2) v += __shfl_xor_sync(0xffffffff, v, o);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = v;
  __syncthreads();
  float s = 0.f;
  for (int i = 0; i < kThreads / 32; ++i) s += part[i];
  return s;
}

__global__ void empty_kernel() {}

// in: the previous link's vector; out: this link's. idx: where the vector starts (vec2 reads it
// first, a dependent load). Each block writes its share of out, so the next link depends on all.
// kSmem: the block also takes kBigSmem bytes of dynamic shared memory (as attention does).
template <bool kTwoTrips, bool kSmem = false>
__global__ void __launch_bounds__(kThreads) vec_kernel(const float* in, float* out, const int* idx) {
  extern __shared__ float big[];
  pdl_launch();
  pdl_wait();
  const float* src = in;
  if constexpr (kTwoTrips) src += __ldcg(idx);
  float v = 0.f;
  if (threadIdx.x < kVec / 4) {
    const float4 f = __ldcg(reinterpret_cast<const float4*>(src) + threadIdx.x);
    v = f.x + f.y + f.z + f.w;
  }
  float s = block_sum(v) * 1e-3f;
  if constexpr (kSmem) {
    big[threadIdx.x * 97] = s;
    __syncthreads();
    s = big[(threadIdx.x + 1) % kThreads * 97];
  }
  const int per = (kVec + gridDim.x - 1) / gridDim.x;
  for (int i = threadIdx.x; i < per; i += kThreads) {
    const int j = blockIdx.x * per + i;
    if (j < kVec) out[j] = s + j;
  }
}

// The same work in clusters, with a cluster barrier before the store (as babyrt's cluster
// kernels combine through distributed shared memory).
__global__ void __launch_bounds__(kThreads) cluster_kernel(const float* in, float* out) {
  pdl_launch();
  pdl_wait();
  float v = 0.f;
  if (threadIdx.x < kVec / 4) {
    const float4 f = __ldcg(reinterpret_cast<const float4*>(in) + threadIdx.x);
    v = f.x + f.y + f.z + f.w;
  }
  const float s = block_sum(v) * 1e-3f;
  cg::this_cluster().sync();
  const int per = (kVec + gridDim.x - 1) / gridDim.x;
  for (int i = threadIdx.x; i < per; i += kThreads) {
    const int j = blockIdx.x * per + i;
    if (j < kVec) out[j] = s + j;
  }
}

// One row of w per warp, loaded before the PDL wait (16-byte chunks held in registers, as
// babyrt's register GEMV does), then x (the previous link's output) from L2, a dot product of
// the bytes as floats, a warp sum, and the row's output.
__global__ void __launch_bounds__(kThreads, 3) gemv_kernel(const int4* w, const float* x, float* y) {
  constexpr int kChunks = kRowBytes / 16 / 32;  // per lane
  const int lane = threadIdx.x % 32;
  const int row = blockIdx.x * (kThreads / 32) + threadIdx.x / 32;
  int4 c[kChunks];
  if (row < kRows)
#pragma unroll
    for (int i = 0; i < kChunks; ++i) c[i] = __ldcs(w + row * (kRowBytes / 16) + i * 32 + lane);
  pdl_wait();
  pdl_launch();  // as babyrt's GEMVs: the next kernel launches after this one's wait
  if (row >= kRows) return;
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < kChunks; ++i) {
    const float4 xv = __ldcg(reinterpret_cast<const float4*>(x) + (i * 32 + lane) % (kVec / 4));
    acc += c[i].x * xv.x + c[i].y * xv.y + c[i].z * xv.z + c[i].w * xv.w;
  }
  for (int o = 16; o; o /= 2) acc += __shfl_xor_sync(0xffffffff, acc, o);
  if (lane == 0) y[row % kVec] = acc * 1e-9f;
}



// ---------------------------------------------------------------- a toy stories110M layer
#include <cuda_bf16.h>
// C chunks a lane of each of the warp's R rows (one warp a row group, 32 lanes a row).
// kParts > 0: x is x plus kParts fp32 vectors (parts, kParts x K: the heads' shares of the wo
// product when attention computes them), summed while staging.
template <int C, int R, bool kNorm, int kParts = 0>
__global__ void __launch_bounds__(kThreads, 3)
    toy_gemv(const int4* w, int N, int row_chunks, const __nv_bfloat16* x, int K, __nv_bfloat16* y, bool early,
             const float* parts, unsigned long long* stamp) {
  __shared__ __align__(16) __nv_bfloat16 xs[2048];
  __shared__ float part[kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int row0 = (blockIdx.x * (kThreads / 32) + warp) * R;
  int4 c[R][C];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int i = 0; i < C; ++i) {
      const int ch = i * 32 + lane;
      c[r][i] = row0 + r < N && ch < row_chunks ? __ldcs(w + static_cast<size_t>(row0 + r) * row_chunks + ch) : make_int4(0, 0, 0, 0);
    }
  if (early) pdl_launch();
  pdl_wait();
  if (!early) pdl_launch();
  int4 xv = make_int4(0, 0, 0, 0);
  const bool has = threadIdx.x < K / 8;
  if (has) xv = __ldcg(reinterpret_cast<const int4*>(x) + threadIdx.x);
  if constexpr (kParts > 0) {  // every thread loads its share of the parts (one round trip), then sums
    __shared__ float4 sp[kParts > 0 ? kParts * 768 / 4 : 1];
    constexpr int kLoads = (kParts * 768 / 4 + kThreads - 1) / kThreads;
    float4 pv[kLoads];
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      const int j = threadIdx.x + i * kThreads;
      if (j < kParts * K / 4) pv[i] = __ldcg(reinterpret_cast<const float4*>(parts) + j);
    }
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      const int j = threadIdx.x + i * kThreads;
      if (j < kParts * K / 4) sp[j] = pv[i];
    }
    __syncthreads();
    if (has) {
      const float* f = reinterpret_cast<const float*>(sp);
      __nv_bfloat16* e = reinterpret_cast<__nv_bfloat16*>(&xv);
      for (int j = 0; j < 8; ++j) {
        float v = 0.f;
        for (int q = 0; q < kParts; ++q) v += f[q * K + 8 * threadIdx.x + j];
        e[j] = __float2bfloat16(__bfloat162float(e[j]) + v);
      }
      if (blockIdx.x == 0) reinterpret_cast<int4*>(y + N)[threadIdx.x] = xv;  // the new h, for w2's residual
    }
  }
  float scale = 1.f;
  if constexpr (kNorm) {
    const __nv_bfloat16* e = reinterpret_cast<const __nv_bfloat16*>(&xv);
    float ss = 0.f;
    for (int j = 0; j < 8; ++j) ss += __bfloat162float(e[j]) * __bfloat162float(e[j]);
    for (int o = 16; o; o /= 2) ss += __shfl_xor_sync(0xffffffff, ss, o);
    if (lane == 0) part[warp] = ss;
    __syncthreads();
    float t = 0.f;
    for (int i = 0; i < kThreads / 32; ++i) t += part[i];
    scale = rsqrtf(t / K + 1e-5f);
  }
  if (has) {
    __nv_bfloat16* e = reinterpret_cast<__nv_bfloat16*>(&xv);
    for (int j = 0; j < 8; ++j) e[j] = __float2bfloat16(__bfloat162float(e[j]) * scale);
    reinterpret_cast<int4*>(xs)[threadIdx.x] = xv;
  }
  __syncthreads();
#pragma unroll
  for (int r = 0; r < R; ++r) {
    float acc = 0.f;
#pragma unroll
    for (int i = 0; i < C; ++i) {
      const int ch = i * 32 + lane;
      if (ch >= row_chunks) break;
      const int4 xc = reinterpret_cast<const int4*>(xs)[ch % (K / 8)];
      const __nv_bfloat162* a = reinterpret_cast<const __nv_bfloat162*>(&c[r][i]);
      const __nv_bfloat162* b = reinterpret_cast<const __nv_bfloat162*>(&xc);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 fa = __bfloat1622float2(a[j]), fb = __bfloat1622float2(b[j]);
        acc += fa.x * fb.x + fa.y * fb.y;
      }
    }
    for (int o = 16; o; o /= 2) acc += __shfl_xor_sync(0xffffffff, acc, o);
    if (lane == 0 && row0 + r < N) y[row0 + r] = __float2bfloat16(acc * 1e-3f);
  }
  stamp_end(stamp);
}

constexpr int kSlots = 144;  // the toy attention's filled slots

// The toy attention of one head after its wait: q from the QKV output, scores against the K
// rows in shared memory, softmax, the weighted V rows. Returns output d (threads below 64).
__device__ float toy_attend(const __nv_bfloat16* ks, const __nv_bfloat16* vs, const __nv_bfloat16* qkv, int h) {
  __shared__ float p[kSlots], q[64], red[4 * 64], stat[2];
  if (threadIdx.x < 64) q[threadIdx.x] = __bfloat162float(__ldcg(qkv + h * 64 + threadIdx.x));
  __syncthreads();
  if (threadIdx.x < kSlots) {
    float s = 0.f;
    for (int d = 0; d < 64; ++d) s += q[(d + threadIdx.x) % 64] * __bfloat162float(ks[threadIdx.x * 64 + (d + threadIdx.x) % 64]);
    p[threadIdx.x] = s * 0.125f;
  }
  __syncthreads();
  if (threadIdx.x < 32) {
    float m = -1e30f;
    for (int i = threadIdx.x; i < kSlots; i += 32) m = fmaxf(m, p[i]);
    for (int o = 16; o; o /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, o));
    float sum = 0.f;
    for (int i = threadIdx.x; i < kSlots; i += 32) sum += __expf(p[i] - m);
    for (int o = 16; o; o /= 2) sum += __shfl_xor_sync(0xffffffff, sum, o);
    if (threadIdx.x == 0) stat[0] = m, stat[1] = sum;
  }
  __syncthreads();
  const int d = threadIdx.x % 64, quarter = threadIdx.x / 64;
  float acc = 0.f;
  for (int i = quarter * (kSlots / 4); i < (quarter + 1) * (kSlots / 4); ++i)
    acc += __expf(p[i] - stat[0]) * __bfloat162float(vs[i * 64 + d]);
  red[quarter * 64 + d] = acc;
  __syncthreads();
  return threadIdx.x < 64 ? (red[d] + red[64 + d] + red[128 + d] + red[192 + d]) / stat[1] : 0.f;
}

// Attention of one head (D 64) over kSlots slots whose K and V rows are copied into shared
// memory before the wait; q from the QKV output; 64 outputs.
__global__ void __launch_bounds__(kThreads) toy_attention(const __nv_bfloat16* kv, const __nv_bfloat16* qkv,
                                                         __nv_bfloat16* out, bool early, unsigned long long* stamp) {
  __shared__ __align__(16) __nv_bfloat16 ks[kSlots * 64], vs[kSlots * 64];
  const int h = blockIdx.x;
  const int4* src = reinterpret_cast<const int4*>(kv + static_cast<size_t>(h) * 2 * kSlots * 64);
  for (int i = threadIdx.x; i < kSlots * 8; i += kThreads) {
    reinterpret_cast<int4*>(ks)[i] = __ldcg(src + i);
    reinterpret_cast<int4*>(vs)[i] = __ldcg(src + kSlots * 8 + i);
  }
  if (early) pdl_launch();
  pdl_wait();
  if (!early) pdl_launch();
  const float y = toy_attend(ks, vs, qkv, h);
  if (threadIdx.x < 64) out[h * 64 + threadIdx.x] = __float2bfloat16(y);
  stamp_end(stamp);
}

// toy_attention, then the head's share of the wo product: the head's 64 columns of Wo (768
// rows, copied to shared memory before the wait with the K and V rows) times its output,
// written as fp32 parts[head][768] for the next GEMV to sum while staging. wo: [768, 768] bf16.
constexpr int kWoRows = 768;
constexpr size_t kAttnWoSmem = (2 * kSlots * 64 + kWoRows * 64) * sizeof(__nv_bfloat16);
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(static_cast<unsigned>(__cvta_generic_to_shared(dst))),
               "l"(src) : "memory");
}
// combine (non-null): the last head's block to finish sums every head's parts into h (after
// a fence and a count in combine[0]), so that the next GEMV stages h as usual.
__global__ void __launch_bounds__(kThreads) toy_attention_wo(const __nv_bfloat16* kv, const __nv_bfloat16* qkv,
                                                            const __nv_bfloat16* wo, float* parts, bool early,
                                                            unsigned* combine, __nv_bfloat16* h_out) {
  extern __shared__ __align__(16) __nv_bfloat16 big_smem[];
  __nv_bfloat16* ks = big_smem;
  __nv_bfloat16* vs = ks + kSlots * 64;
  __nv_bfloat16* ws = vs + kSlots * 64;
  __shared__ float o[64];
  const int h = blockIdx.x;
  const int4* src = reinterpret_cast<const int4*>(kv + static_cast<size_t>(h) * 2 * kSlots * 64);
  for (int i = threadIdx.x; i < kSlots * 8; i += kThreads) {
    cp_async16(reinterpret_cast<int4*>(ks) + i, src + i);
    cp_async16(reinterpret_cast<int4*>(vs) + i, src + kSlots * 8 + i);
  }
  for (int i = threadIdx.x; i < kWoRows * 8; i += kThreads)  // row r's 8 chunks of this head's columns
    cp_async16(reinterpret_cast<int4*>(ws) + i, reinterpret_cast<const int4*>(wo + static_cast<size_t>(i / 8) * kWoRows + h * 64) + i % 8);
  if (early) pdl_launch();
  pdl_wait();
  if (!early) pdl_launch();
  asm volatile("cp.async.wait_all;" ::: "memory");
  const float y = toy_attend(ks, vs, qkv, h);
  if (threadIdx.x < 64) o[threadIdx.x] = y;
  __syncthreads();
  for (int r = threadIdx.x; r < kWoRows; r += kThreads) {
    float y = 0.f;
    for (int k = 0; k < 64; ++k) y += __bfloat162float(ws[r * 64 + (k + r) % 64]) * o[(k + r) % 64];
    parts[h * kWoRows + r] = y;
  }
  if (!combine) return;
  __shared__ bool last;
  __threadfence();  // this block's parts are visible before it counts itself
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(combine, 1) == gridDim.x - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int r = threadIdx.x; r < kWoRows; r += kThreads) {
    float v = __bfloat162float(h_out[r]);
    for (int head = 0; head < gridDim.x; ++head) v += __ldcg(parts + head * kWoRows + r);
    h_out[r] = __float2bfloat16(v);
  }
  if (threadIdx.x == 0) *combine = 0;  // for the next call (after this kernel ends)
}

// ---------------------------------------------------------------- persistent phases
constexpr int kPhases = 96;   // phases a launch
constexpr int kPVec = 768;    // 32-bit words of the vector a phase reads (768 bf16 values)
constexpr int kPRows = 2304;  // GEMV phases: rows of 768 bf16 (1,536 bytes, 96 chunks)
constexpr int kPRowChunks = 1536 / 16;
constexpr int kPMaxRows = 3;  // rows a warp takes at most (18 a block over 8 warps)

__device__ __forceinline__ unsigned ll_pack(float v, unsigned epoch) {
  const unsigned bits = __float_as_uint(v) >> 16;  // bf16 by truncation: enough for timing
  return (epoch << 16) | bits;
}
__device__ __forceinline__ float ll_value(unsigned w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ void st_ll(unsigned* p, unsigned w) {
  asm volatile("st.relaxed.gpu.global.b32 [%0], %1;" ::"l"(p), "r"(w) : "memory");
}
__device__ __forceinline__ uint4 ld_ll4(const unsigned* p) {
  uint4 v;
  asm volatile("ld.relaxed.gpu.global.v4.b32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p) : "memory");
  return v;
}

// Grid barrier on a counter that only grows (cuda_decode_step.cu's GridSync).
__device__ __forceinline__ void grid_barrier(unsigned long long* count, unsigned long long& target) {
  __syncthreads();
  if (threadIdx.x == 0) {
    target += gridDim.x;
    asm volatile("red.release.gpu.global.add.u64 [%0], 1;" ::"l"(count) : "memory");
    unsigned long long v;
    do asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(count) : "memory");
    while (v < target);
  }
  __syncthreads();
}

// kLL: epochs in the words (no barrier), else a grid barrier and plain words. kGemv: each phase
// a GEMV (w: kMats matrices, phase p reads matrix p % mats), else a block sum of the vector.
// vec: two buffers of kPRows words. state[0]: the launch count (epochs), state[8]: the barrier.
template <bool kLL, bool kGemv>
__global__ void __launch_bounds__(kThreads, 1)
    persistent_kernel(const int4* w, int mats, unsigned* vec, unsigned long long* state) {
  __shared__ float xs[kPVec];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const unsigned long long launch_count = *reinterpret_cast<volatile unsigned long long*>(state);
  unsigned long long target = 0;
  if (!kLL && threadIdx.x == 0) {
    const unsigned long long per = static_cast<unsigned long long>(kPhases + 1) * gridDim.x;
    target = *reinterpret_cast<volatile unsigned long long*>(state + 8) / per * per;
  }
  auto epoch = [&](int p) { return static_cast<unsigned>((launch_count * (kPhases + 1) + p + 1) & 0xffff); };
  const int N = kGemv ? kPRows : kPVec;
  const int r0 = N * blockIdx.x / gridDim.x, r1 = N * (blockIdx.x + 1) / gridDim.x;
  // Phase 0's input: this block's slice of buffer 0.
  for (int j = r0 + threadIdx.x; j < r1; j += kThreads) st_ll(vec + j, ll_pack(1e-3f * j, epoch(0)));
  for (int p = 0; p < kPhases; ++p) {
    const unsigned* in = vec + (p % 2) * kPRows;
    unsigned* out = vec + ((p + 1) % 2) * kPRows;
    int4 c[kPMaxRows][3];
    if constexpr (kGemv) {  // this phase's rows, before the wait for x
      const int4* m = w + static_cast<size_t>(p % mats) * kPRows * kPRowChunks;
#pragma unroll
      for (int r = 0; r < kPMaxRows; ++r)
#pragma unroll
        for (int i = 0; i < 3; ++i) {
          const int row = r0 + warp + r * (kThreads / 32);
          c[r][i] = row < r1 ? __ldcs(m + static_cast<size_t>(row) * kPRowChunks + i * 32 + lane) : make_int4(0, 0, 0, 0);
        }
    }
    if (!kLL) grid_barrier(state + 8, target);
    const unsigned e = epoch(p);
    float v = 0.f;
    if constexpr (kGemv) {  // x[k] = out[k] + out[k + 768] + out[k + 1536]: every block's rows
      for (int k = 4 * threadIdx.x; k < kPVec; k += 4 * kThreads) xs[k] = xs[k + 1] = xs[k + 2] = xs[k + 3] = 0.f;
      __syncthreads();
    }
    constexpr int kPer = ((kGemv ? kPRows : kPVec) / 4 + kThreads - 1) / kThreads;  // v4 words a thread
    uint4 q[kPer];
    bool ready = false;
    while (!ready) {  // every word loaded at once, then checked (LL: again until all are current)
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int t = threadIdx.x + i * kThreads;
        if (t < N / 4) q[i] = kLL ? ld_ll4(in + 4 * t) : __ldcg(reinterpret_cast<const uint4*>(in) + t);
      }
      ready = true;
#pragma unroll
      for (int i = 0; i < kPer; ++i)
        if (kLL && threadIdx.x + i * kThreads < N / 4)
          ready &= (q[i].x >> 16) == e && (q[i].y >> 16) == e && (q[i].z >> 16) == e && (q[i].w >> 16) == e;
    }
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int t = threadIdx.x + i * kThreads;
      if (t >= N / 4) break;
      const float f[4] = {ll_value(q[i].x), ll_value(q[i].y), ll_value(q[i].z), ll_value(q[i].w)};
      if constexpr (kGemv) {
        for (int k = 0; k < 4; ++k) atomicAdd(&xs[(4 * t + k) % kPVec], f[k]);
      } else {
        v += f[0] + f[1] + f[2] + f[3];
      }
    }
    const unsigned next = epoch(p + 1);
    if constexpr (kGemv) {
      __syncthreads();
#pragma unroll
      for (int r = 0; r < kPMaxRows; ++r) {
        const int row = r0 + warp + r * (kThreads / 32);
        float acc = 0.f;
#pragma unroll
        for (int i = 0; i < 3; ++i) {  // 8 bf16 weights a chunk against x
          const unsigned* u = reinterpret_cast<const unsigned*>(&c[r][i]);
          const float* x = xs + (i * 32 + lane) * 8;
#pragma unroll
          for (int k = 0; k < 4; ++k)
            acc += __uint_as_float(u[k] << 16) * x[2 * k] + __uint_as_float(u[k] & 0xffff0000u) * x[2 * k + 1];
        }
        for (int o = 16; o; o /= 2) acc += __shfl_xor_sync(0xffffffff, acc, o);
        if (lane == 0 && row < r1) st_ll(out + row, ll_pack(acc * 1e-6f, next));
      }
      __syncthreads();  // xs is rewritten next phase
    } else {
      const float s = block_sum(v) * 1e-3f;
      for (int j = r0 + threadIdx.x; j < r1; j += kThreads) st_ll(out + j, ll_pack(s + j, next));
    }
  }
  if (!kLL) grid_barrier(state + 8, target);  // as many barriers a launch as phases + 1
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    // Every block has read the launch count: block 0's last phase read every block's writes.
    asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(state), "l"(launch_count + 1) : "memory");
  }
}

constexpr int kBigSmem = 100 * 1024;
bool g_pdl = true;

template <typename Kernel, typename... Args>
void launch_smem(Kernel k, int grid, int cluster, size_t smem, cudaStream_t s, Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = s;
  cudaLaunchAttribute attr[2];
  int n = 0;
  if (g_pdl) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (cluster > 1) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n++].val.clusterDim = {static_cast<unsigned>(cluster), 1, 1};
  }
  cfg.attrs = attr;
  cfg.numAttrs = n;
  CHECK(cudaLaunchKernelEx(&cfg, k, args...));
}
template <typename Kernel, typename... Args>
void launch(Kernel k, int grid, int cluster, cudaStream_t s, Args... args) {
  launch_smem(k, grid, cluster, 0, s, args...);
}

// `links` calls of link(i, stream) captured in a graph, instantiated, with its own stream.
struct ChainGraph {
  cudaStream_t s;
  cudaGraphExec_t ge;
  ChainGraph(int links, const std::function<void(int, cudaStream_t)>& link) {
    CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    cudaGraph_t g;
    CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    for (int i = 0; i < links; ++i) link(i, s);
    CHECK(cudaStreamEndCapture(s, &g));
    CHECK(cudaGraphInstantiate(&ge, g, 0));
    CHECK(cudaGraphDestroy(g));
  }
  ~ChainGraph() {
    CHECK(cudaGraphExecDestroy(ge));
    CHECK(cudaStreamDestroy(s));
  }
};

// us per link of the chain's graph (median of 5 timings of 20 replays each).
double time_chain(int links, const std::function<void(int, cudaStream_t)>& link) {
  ChainGraph chain(links, link);
  for (int i = 0; i < 3; ++i) CHECK(cudaGraphLaunch(chain.ge, chain.s));
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  std::vector<float> ms;
  for (int t = 0; t < 5; ++t) {
    CHECK(cudaEventRecord(a, chain.s));
    for (int r = 0; r < 20; ++r) CHECK(cudaGraphLaunch(chain.ge, chain.s));
    CHECK(cudaEventRecord(b, chain.s));
    CHECK(cudaEventSynchronize(b));
    float m;
    CHECK(cudaEventElapsedTime(&m, a, b));
    ms.push_back(m);
  }
  std::sort(ms.begin(), ms.end());
  CHECK(cudaEventDestroy(a));
  CHECK(cudaEventDestroy(b));
  return ms[2] * 1e3 / 20 / links;
}

// The chain's graph replayed alone 20 times (after one warm-up): the mean of stamps[i] -
// stamps[i - 1] (each link's end less the previous one's, from the stamps its kernel records)
// over i >= roles, by role i % roles, in us.
std::vector<double> role_times(int links, int roles, const std::function<void(int, cudaStream_t)>& link,
                               unsigned long long* stamps) {
  ChainGraph chain(links, link);
  std::vector<double> sum(roles, 0.0);
  std::vector<int> count(roles, 0);
  std::vector<unsigned long long> t(links);
  for (int r = 0; r < 21; ++r) {
    CHECK(cudaMemsetAsync(stamps, 0, links * sizeof(unsigned long long), chain.s));
    CHECK(cudaGraphLaunch(chain.ge, chain.s));
    CHECK(cudaMemcpyAsync(t.data(), stamps, links * sizeof(unsigned long long), cudaMemcpyDeviceToHost, chain.s));
    CHECK(cudaStreamSynchronize(chain.s));
    if (r == 0) continue;
    for (int i = roles; i < links; ++i) {
      sum[i % roles] += static_cast<double>(t[i] - t[i - 1]) * 1e-3;
      ++count[i % roles];
    }
  }
  for (int i = 0; i < roles; ++i) sum[i] /= count[i];
  return sum;
}

int main(int argc, char** argv) {
  // --carveout N: every kernel prefers N% of the SM's L1 / shared memory as shared memory;
  // --carveout-gemvs N: the GEMVs only (the toy attention keeps the split the driver picks).
  int carveout = -1;
  bool gemvs_only = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--no-pdl")) g_pdl = false;
    if ((!std::strcmp(argv[i], "--carveout") || !std::strcmp(argv[i], "--carveout-gemvs")) && i + 1 < argc) {
      gemvs_only = !std::strcmp(argv[i], "--carveout-gemvs");
      carveout = std::atoi(argv[++i]);
    }
  }
  CHECK(cudaFuncSetAttribute(vec_kernel<false, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, kBigSmem));
  if (carveout >= 0) {
    const void* gemvs[] = {reinterpret_cast<const void*>(gemv_kernel),
                           reinterpret_cast<const void*>(toy_gemv<3, 1, true>),
                           reinterpret_cast<const void*>(toy_gemv<3, 1, false>),
                           reinterpret_cast<const void*>(toy_gemv<3, 2, true>),
                           reinterpret_cast<const void*>(toy_gemv<8, 1, false>),
                           reinterpret_cast<const void*>(toy_gemv<3, 2, true, 12>)};
    const void* others[] = {reinterpret_cast<const void*>(empty_kernel),
                            reinterpret_cast<const void*>(vec_kernel<false>),
                            reinterpret_cast<const void*>(vec_kernel<true>),
                            reinterpret_cast<const void*>(vec_kernel<false, true>),
                            reinterpret_cast<const void*>(cluster_kernel),
                            reinterpret_cast<const void*>(toy_attention),
                            reinterpret_cast<const void*>(toy_attention_wo)};
    for (const void* k : gemvs)
      CHECK(cudaFuncSetAttribute(k, cudaFuncAttributePreferredSharedMemoryCarveout, carveout));
    for (const void* k : others)
      if (!gemvs_only) CHECK(cudaFuncSetAttribute(k, cudaFuncAttributePreferredSharedMemoryCarveout, carveout));
  }
  int sms;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  float *va, *vb;
  int* idx;
  int4* w;
  CHECK(cudaMalloc(&va, kVec * 2 * sizeof(float)));
  CHECK(cudaMalloc(&vb, kVec * 2 * sizeof(float)));
  CHECK(cudaMemset(va, 0, kVec * 2 * sizeof(float)));
  CHECK(cudaMemset(vb, 0, kVec * 2 * sizeof(float)));
  CHECK(cudaMalloc(&idx, sizeof(int)));
  CHECK(cudaMemset(idx, 0, sizeof(int)));
  // Several GEMV weight matrices, so that consecutive GEMVs read different bytes (from HBM:
  // 48 x 3.5 MB is past the 50 MB L2).
  constexpr int kMats = 48;
  const size_t mat = static_cast<size_t>(kRows) * kRowBytes;
  CHECK(cudaMalloc(&w, mat * kMats));
  CHECK(cudaMemset(w, 1, mat * kMats));
  auto W = [&](int i) { return w + (i % kMats) * (mat / 16); };
  const int gemv_grid = (kRows + kThreads / 32 - 1) / (kThreads / 32);
  const int links = 96;

  std::printf("kernel_chain: %d SMs, PDL %s, carveout %d%s, us per link (%d links a graph)\n", sms,
              g_pdl ? "on" : "off", carveout, gemvs_only ? " (GEMVs only)" : "", links);
  std::printf("%-28s %8.2f\n", "empty",
              time_chain(links, [&](int, cudaStream_t s) { launch(empty_kernel, sms, 1, s); }));
  for (int grid : {12, sms, 2 * sms, 3 * sms}) {
    char name[64];
    std::snprintf(name, sizeof name, "vec %d", grid);
    std::printf("%-28s %8.2f\n", name, time_chain(links, [&](int i, cudaStream_t s) {
                  launch(vec_kernel<false>, grid, 1, s, i % 2 ? vb : va, i % 2 ? va : vb, idx);
                }));
    std::snprintf(name, sizeof name, "vec2 %d", grid);
    std::printf("%-28s %8.2f\n", name, time_chain(links, [&](int i, cudaStream_t s) {
                  launch(vec_kernel<true>, grid, 1, s, i % 2 ? vb : va, i % 2 ? va : vb, idx);
                }));
  }
  std::printf("%-28s %8.2f\n", "gemv 2304x1536B", time_chain(links, [&](int i, cudaStream_t s) {
                launch(gemv_kernel, gemv_grid, 1, s, W(i), i % 2 ? vb : va, i % 2 ? va : vb);
              }));
  // Pairs: the time per pair, less the GEMV chain's time per GEMV, is the small kernel's share.
  for (int grid : {12, 96}) {
    char name[64];
    std::snprintf(name, sizeof name, "gemv+vec %d (pair)", grid);
    std::printf("%-28s %8.2f\n", name, 2 * time_chain(links, [&](int i, cudaStream_t s) {
                  if (i % 2 == 0) launch(gemv_kernel, gemv_grid, 1, s, W(i), va, vb);
                  else launch(vec_kernel<false>, grid, 1, s, vb, va, idx);
                }));
    std::snprintf(name, sizeof name, "gemv+vec 100KB %d (pair)", grid);
    std::printf("%-28s %8.2f\n", name, 2 * time_chain(links, [&](int i, cudaStream_t s) {
                  if (i % 2 == 0) launch(gemv_kernel, gemv_grid, 1, s, W(i), va, vb);
                  else launch_smem(vec_kernel<false, true>, grid, 1, kBigSmem, s, vb, va, idx);
                }));
    for (int cluster : {4, 8}) {
      if (grid % cluster) continue;
      std::snprintf(name, sizeof name, "gemv+cluster %d x %d (pair)", cluster, grid / cluster);
      std::printf("%-28s %8.2f\n", name, 2 * time_chain(links, [&](int i, cudaStream_t s) {
                    if (i % 2 == 0) launch(gemv_kernel, gemv_grid, 1, s, W(i), va, vb);
                    else launch(cluster_kernel, grid, cluster, s, vb, va);
                  }));
    }
  }
  // A toy stories110M layer: us a layer (12 layers a graph), GEMVs letting the next kernel
  // launch after their wait (babyrt) and before it.
  {
    constexpr int kLayers = 12, kDim = 768, kHidden = 2048;
    const size_t qkv_b = 2304ull * 1536, wo_b = 768ull * 1536, w13_b = 4096ull * 1536, w2_b = 768ull * 4096;
    const size_t layer_b = qkv_b + wo_b + w13_b + w2_b;
    char* lw;
    CHECK(cudaMalloc(&lw, layer_b * kLayers));
    CHECK(cudaMemset(lw, 0, layer_b * kLayers));
    // Layer l's matrix at byte offset off of its weights (QKV, wo, w13, w2, in that order).
    auto layer_matrix = [&](int l, size_t off) { return reinterpret_cast<const int4*>(lw + l * layer_b + off); };
    __nv_bfloat16 *h, *qkv, *attn, *gu, *kv;
    CHECK(cudaMalloc(&h, kDim * 2));
    CHECK(cudaMalloc(&qkv, 2304 * 2));
    CHECK(cudaMalloc(&attn, kDim * 2));
    CHECK(cudaMalloc(&gu, 2 * kHidden * 2));
    CHECK(cudaMalloc(&kv, static_cast<size_t>(kLayers) * 12 * 2 * kSlots * 64 * 2));
    CHECK(cudaMemset(h, 0, kDim * 2));
    CHECK(cudaMemset(qkv, 0, 2304 * 2));
    CHECK(cudaMemset(attn, 0, kDim * 2));
    CHECK(cudaMemset(gu, 0, 2 * kHidden * 2));
    CHECK(cudaMemset(kv, 0, static_cast<size_t>(kLayers) * 12 * 2 * kSlots * 64 * 2));
    // Which kernels let the next launch before their wait: bit 1 QKV, 2 attention, 4 wo, 8 w13,
    // 16 w2. babyrt: 2 (attention only; its GEMVs after their wait).
    // pad: each GEMV block also takes 64 KB of dynamic shared memory, so that at most 3 fit an
    // SM, as babyrt's GEMVs at 80 registers (the toy's take 38-69 registers, up to 6 an SM).
    // attn 96KB: the toy attention also takes 60 KB of dynamic shared memory (~99 KB in all,
    // as babyrt's, whose early K and V rows take up to 96 KB).
    constexpr int kPad = 64 << 10, kAttnPad = 60 << 10;
    for (auto k : {toy_gemv<3, 1, true>, toy_gemv<3, 1, false>, toy_gemv<3, 2, true>, toy_gemv<8, 1, false>})
      CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, kPad));
    CHECK(cudaFuncSetAttribute(toy_attention, cudaFuncAttributeMaxDynamicSharedMemorySize, kAttnPad));
    struct LayerRun {
      int mask;
      bool pad, attn_pad;
    };
    const LayerRun runs[] = {{2, false, false}, {4, false, false}, {6, false, false}, {0, false, false},
                             {29, false, false}, {31, false, false}, {30, false, false}, {28, false, false},
                             {26, false, false}, {24, false, false}, {16, false, false}, {8, false, false},
                             {2, true, false}, {4, true, false}, {6, true, false}, {28, true, false},
                             {0, false, true}, {2, false, true}, {4, false, true}, {4, true, true}};
    // Link i of a graph of kLayers layers under run; stamps (or null): where link i records its end.
    auto layer_link = [&](const LayerRun& run, unsigned long long* stamps) {
      return [&, run, stamps](int i, cudaStream_t s) {
        const int l = i / 5;
        const int4* wq = layer_matrix(l, 0);
        const int4* wo = layer_matrix(l, qkv_b);
        const int4* w13 = layer_matrix(l, qkv_b + wo_b);
        const int4* w2 = layer_matrix(l, qkv_b + wo_b + w13_b);
        const bool early = run.mask >> (i % 5) & 1;
        const size_t gemv_smem = run.pad ? kPad : 0;
        const float* none = nullptr;
        unsigned long long* stamp = stamps ? stamps + i : nullptr;
        switch (i % 5) {
          case 0: launch_smem(toy_gemv<3, 1, true>, 288, 1, gemv_smem, s, wq, 2304, 96, static_cast<const __nv_bfloat16*>(h), kDim, qkv, early, none, stamp); break;
          case 1: launch_smem(toy_attention, 12, 1, run.attn_pad ? kAttnPad : 0, s,
                              static_cast<const __nv_bfloat16*>(kv + static_cast<size_t>(l) * 12 * 2 * kSlots * 64),
                              static_cast<const __nv_bfloat16*>(qkv), attn, early, stamp); break;
          case 2: launch_smem(toy_gemv<3, 1, false>, 96, 1, gemv_smem, s, wo, kDim, 96, static_cast<const __nv_bfloat16*>(attn), kDim, h, early, none, stamp); break;
          case 3: launch_smem(toy_gemv<3, 2, true>, 256, 1, gemv_smem, s, w13, 4096, 96, static_cast<const __nv_bfloat16*>(h), kDim, gu, early, none, stamp); break;
          default: launch_smem(toy_gemv<8, 1, false>, 96, 1, gemv_smem, s, w2, kDim, 256, static_cast<const __nv_bfloat16*>(gu), kHidden, h, early, none, stamp); break;
        }
      };
    };
    auto layer_name = [](const LayerRun& run) {
      char name[64];
      std::snprintf(name, sizeof name, "layer, early mask %d%s%s", run.mask, run.pad ? ", pad" : "",
                    run.attn_pad ? ", attn 96KB" : "");
      return std::string(name);
    };
    for (const auto& run : runs)
      std::printf("%-28s %8.2f\n", layer_name(run).c_str(), 5 * time_chain(5 * kLayers, layer_link(run, nullptr)));
    // By role, as benchmarks/cuda_decode_profile.py's marginal times under PDL (a kernel's end
    // less the previous kernel's end), over layers 1-11 of 20 single replays.
    unsigned long long* stamps;
    CHECK(cudaMalloc(&stamps, 5 * kLayers * sizeof(unsigned long long)));
    for (const LayerRun& run : {LayerRun{2, false, false}, LayerRun{4, false, false}, LayerRun{4, true, true}}) {
      const std::vector<double> us = role_times(5 * kLayers, 5, layer_link(run, stamps), stamps);
      std::printf("%s by role (us): QKV %.2f, attention %.2f, wo %.2f, w13 %.2f, w2 %.2f\n",
                  layer_name(run).c_str(), us[0], us[1], us[2], us[3], us[4]);
    }
    CHECK(cudaFree(stamps));
    // attention and wo as one kernel (the head's share of wo, summed by the w13 GEMV's
    // staging): 4 kernels a layer. Masks: bit 1 QKV, 2 attention+wo, 4 w13, 8 w2.
    CHECK(cudaFuncSetAttribute(toy_attention_wo, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kAttnWoSmem)));
    float* parts;
    CHECK(cudaMalloc(&parts, 12 * kDim * sizeof(float)));
    CHECK(cudaMemset(parts, 0, 12 * kDim * sizeof(float)));
    __nv_bfloat16* gu_h;  // w13's output, then the new h (written by its block 0)
    CHECK(cudaMalloc(&gu_h, (2 * kHidden + kDim) * 2));
    CHECK(cudaMemset(gu_h, 0, (2 * kHidden + kDim) * 2));
    unsigned* combine;
    CHECK(cudaMalloc(&combine, sizeof(unsigned)));
    CHECK(cudaMemset(combine, 0, sizeof(unsigned)));
    for (int mask : {0, 2, 6, 14, 3, 15, 100, 102, 106}) {  // 100 +: the last head's block sums the parts
      const bool last_sums = mask >= 100;
      const double us = time_chain(4 * kLayers, [&](int i, cudaStream_t s) {
        const int l = i / 4;
        const int4* wq = layer_matrix(l, 0);
        const auto* wo = reinterpret_cast<const __nv_bfloat16*>(layer_matrix(l, qkv_b));
        const int4* w13 = layer_matrix(l, qkv_b + wo_b);
        const int4* w2 = layer_matrix(l, qkv_b + wo_b + w13_b);
        const bool early = (mask % 100) >> (i % 4) & 1;
        switch (i % 4) {
          case 0: launch(toy_gemv<3, 1, true>, 288, 1, s, wq, 2304, 96, static_cast<const __nv_bfloat16*>(h), kDim, qkv, early,
                         static_cast<const float*>(nullptr), static_cast<unsigned long long*>(nullptr)); break;
          case 1: launch_smem(toy_attention_wo, 12, 1, kAttnWoSmem, s, static_cast<const __nv_bfloat16*>(kv + static_cast<size_t>(l) * 12 * 2 * kSlots * 64),
                              static_cast<const __nv_bfloat16*>(qkv), wo, parts, early, last_sums ? combine : nullptr, h); break;
          case 2:
            if (last_sums)
              launch(toy_gemv<3, 2, true>, 256, 1, s, w13, 4096, 96, static_cast<const __nv_bfloat16*>(h), kDim, gu_h, early,
                     static_cast<const float*>(nullptr), static_cast<unsigned long long*>(nullptr));
            else
              launch(toy_gemv<3, 2, true, 12>, 256, 1, s, w13, 4096, 96, static_cast<const __nv_bfloat16*>(h), kDim, gu_h, early,
                     static_cast<const float*>(parts), static_cast<unsigned long long*>(nullptr));
            break;
          default: launch(toy_gemv<8, 1, false>, 96, 1, s, w2, kDim, 256, static_cast<const __nv_bfloat16*>(gu_h), kHidden, h, early,
                          static_cast<const float*>(nullptr), static_cast<unsigned long long*>(nullptr)); break;
        }
      });
      char name[64];
      std::snprintf(name, sizeof name, "layer attn+wo, mask %d", mask);
      std::printf("%-28s %8.2f\n", name, 4 * us);
    }
    CHECK(cudaFree(combine));
    CHECK(cudaFree(parts));
    CHECK(cudaFree(gu_h));
    CHECK(cudaFree(lw));
  }
  // Persistent: one launch runs kPhases phases; us per phase.
  {
    unsigned* vec;
    unsigned long long* state;
    CHECK(cudaMalloc(&vec, 2 * kPRows * sizeof(unsigned)));
    CHECK(cudaMemset(vec, 0, 2 * kPRows * sizeof(unsigned)));
    CHECK(cudaMalloc(&state, 16 * sizeof(unsigned long long)));
    CHECK(cudaMemset(state, 0, 16 * sizeof(unsigned long long)));
    const int pmats = static_cast<int>(mat * kMats / (static_cast<size_t>(kPRows) * kPRowChunks * 16));
    const bool pdl = g_pdl;
    g_pdl = false;  // a launch's phases wait for nothing but the launch before, whole
    auto run = [&](const char* name, auto kernel) {
      std::printf("%-28s %8.2f\n", name, time_chain(4, [&](int, cudaStream_t s) {
                    launch(kernel, sms, 1, s, static_cast<const int4*>(w), pmats, vec, state);
                  }) / kPhases);
    };
    run("persistent barrier", persistent_kernel<false, false>);
    run("persistent ll", persistent_kernel<true, false>);
    run("persistent barrier gemv", persistent_kernel<false, true>);
    run("persistent ll gemv", persistent_kernel<true, true>);
    g_pdl = pdl;
    CHECK(cudaFree(vec));
    CHECK(cudaFree(state));
  }
  CHECK(cudaDeviceSynchronize());
  return 0;
}
