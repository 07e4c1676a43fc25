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
// Build: nvcc -O3 -std=c++17 -arch=sm_90a benchmarks/kernel_chain.cu -o kernel_chain
// Run: ./kernel_chain [--no-pdl] [--carveout PERCENT]   (tools/gpu_check.sh chain: with and
// without PDL). H200, fifteenth session (docs/cuda-decode.md has the table): a link of 132
// blocks 1.03 us under PDL, a second dependent load +0.13 us, the GEMV 2.84 us; after the GEMV
// a plain kernel adds 1.07 us, one with 100 KB of shared memory 1.3, one in clusters 1.6-1.9.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
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

// Captures `links` calls of link(i, stream) in a graph and returns us per link (median of 5
// timings of 20 replays each).
double time_chain(int links, const std::function<void(int, cudaStream_t)>& link) {
  cudaStream_t s;
  CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaGraph_t g;
  cudaGraphExec_t ge;
  CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < links; ++i) link(i, s);
  CHECK(cudaStreamEndCapture(s, &g));
  CHECK(cudaGraphInstantiate(&ge, g, 0));
  for (int i = 0; i < 3; ++i) CHECK(cudaGraphLaunch(ge, s));
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  std::vector<float> ms;
  for (int t = 0; t < 5; ++t) {
    CHECK(cudaEventRecord(a, s));
    for (int r = 0; r < 20; ++r) CHECK(cudaGraphLaunch(ge, s));
    CHECK(cudaEventRecord(b, s));
    CHECK(cudaEventSynchronize(b));
    float m;
    CHECK(cudaEventElapsedTime(&m, a, b));
    ms.push_back(m);
  }
  std::sort(ms.begin(), ms.end());
  CHECK(cudaGraphExecDestroy(ge));
  CHECK(cudaGraphDestroy(g));
  CHECK(cudaStreamDestroy(s));
  return ms[2] * 1e3 / 20 / links;
}

int main(int argc, char** argv) {
  // --carveout N: every kernel prefers N% of the SM's L1 / shared memory as shared memory.
  int carveout = -1;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--no-pdl")) g_pdl = false;
    if (!std::strcmp(argv[i], "--carveout") && i + 1 < argc) carveout = std::atoi(argv[++i]);
  }
  CHECK(cudaFuncSetAttribute(vec_kernel<false, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, kBigSmem));
  if (carveout >= 0) {
    const void* kernels[] = {reinterpret_cast<const void*>(empty_kernel),
                             reinterpret_cast<const void*>(vec_kernel<false>),
                             reinterpret_cast<const void*>(vec_kernel<true>),
                             reinterpret_cast<const void*>(vec_kernel<false, true>),
                             reinterpret_cast<const void*>(cluster_kernel),
                             reinterpret_cast<const void*>(gemv_kernel)};
    for (const void* k : kernels)
      CHECK(cudaFuncSetAttribute(k, cudaFuncAttributePreferredSharedMemoryCarveout, carveout));
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

  std::printf("kernel_chain: %d SMs, PDL %s, carveout %d, us per link (%d links a graph)\n", sms,
              g_pdl ? "on" : "off", carveout, links);
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
  CHECK(cudaDeviceSynchronize());
  return 0;
}
