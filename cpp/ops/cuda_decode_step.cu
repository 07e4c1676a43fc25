// babyrt::decode_step on CUDA: a whole LLaMA decode step (one sequence, one token) as one
// persistent kernel, for bf16/fp16 activations with float or int8 weights on Hopper.
//
// Why: at batch 1 a small model's step is bound by the fixed cost of each kernel (launch, the
// wait for the previous kernel, staging x, the tail), not by bandwidth: stories15M took 34
// kernels of at least ~1.6 us each. Here one block per SM runs every phase of the step, and a
// grid barrier takes the place of each kernel boundary. A producer warp per block streams the
// block's slice of every weight matrix of the step, in order, into a ring of 16 KB pieces in
// shared memory (bulk copies on mbarriers, as in cuda_kernels.cu's streamed GEMV). Weights do
// not depend on activations, so while a block waits at a barrier, or attends, the next
// matrices' weights are already on their way.
//
// The phases (h: the residual stream; each GEMV phase gives every block a slice of the rows):
//   h = embedding[token]                                   | barrier
//   per layer:  qkv = Wqkv rmsnorm(h)                      | barrier
//               attention (RoPE, cache write), a head per block | barrier
//               h += Wo attn                               | barrier
//               gu = W13 rmsnorm(h)                        | barrier
//               h += W2 swiglu(gu)                         | barrier
//   logits = Wout rmsnorm(h), fp32
// Every phase is the device code of the one-op kernels (cuda_common.cuh), run by the 16
// consumer warps, so the roundings are the same as the op-by-op path's.
//
// Opt-in (BABYRT_DECODE_STEP=1): it is slower than the op-by-op kernels so far (stories15M
// 6,963 vs 9,071 tok/s; docs/cuda-decode.md has the per-phase trace). Without it, and for
// shapes or devices it does not cover, it returns an empty tensor and the caller (FusedLlama)
// runs the layers op by op.
#include <mutex>
#include <unordered_map>

#include "ops/cuda_common.cuh"

namespace babyrt::ops {
namespace {

constexpr int kStepWarps = 16;                       // consumer warps
constexpr int kStepThreads = (kStepWarps + 1) * 32;  // and one producer warp
constexpr int kStepMaxLayers = 64;                   // the layers' pointers travel as kernel arguments
constexpr int kMaxSlice = 128;                       // rows of h a block keeps (dim <= 128 x SMs)
using StepBlock = Consumers<kStepWarps * 32>;

// The matrices of a step, in the order the producer streams them within a layer (kOut last).
enum Matrix { kQkv, kWo, kW13, kW2, kOut, kMatrices };

struct StepLayer {
  const void* attn_norm;
  const void* ffn_norm;
  const void* w[4];  // kQkv .. kW2
  const void* s[4];  // their scales (int8 weights)
};

struct StepArgs {
  const int64_t* token;     // [1, 1]
  const int64_t* position;  // [1, 1]
  const void* emb;          // [rows, dim], T or int8
  const void* emb_scales;   // [rows, emb_groups], fp32 or bf16 (int8 table)
  const void* final_norm;
  const void* out_w;        // [V, dim], T, or int8 like the layers (S scales)
  const void* out_s;
  const float* cos;         // [P, D / 2]
  const float* sin;
  void* k_cache;            // [L, 1, KV, S, D]
  void* v_cache;
  void* h;                  // [dim]: the residual stream
  void* qkv;                // [(H + 2 KV) D]
  void* attn;               // [H D]
  void* gu;                 // [2 hidden]: gate, then up
  float* logits;            // [V]
  unsigned long long* arrivals;  // the grid barriers' counter (see GridSync)
  int64_t emb_rows;
  float eps;
  int L, dim, hidden, H, KV, D, S, P, V;
  int group[kMatrices];              // int8 group size of each matrix (K for per-channel)
  int emb_groups;                    // scales per row of an int8 embedding table
  bool emb_q8, emb_scales_bf16, out_q8;
  int slots, ring_offset;            // the ring: slots pieces from ring_offset in shared memory
  int debug;  // BABYRT_STEP_DEBUG: 1 no barriers, 2 no GEMV math, 4 no attention, 8 poll backoff
  unsigned long long* trace;         // BABYRT_STEP_TRACE=1: per block, the time at each mark
  int row_lanes[kMatrices];          // lanes per row in each matrix's GEMV (32, 16 or 8)
  StepLayer layer[kStepMaxLayers];
};

// Rows and columns of matrix m.
__host__ __device__ inline void matrix_shape(const StepArgs& a, int m, int& N, int& K) {
  switch (m) {
    case kQkv: N = (a.H + 2 * a.KV) * a.D, K = a.dim; break;
    case kWo: N = a.dim, K = a.H * a.D; break;
    case kW13: N = 2 * a.hidden, K = a.dim; break;
    case kW2: N = a.dim, K = a.hidden; break;
    default: N = a.V, K = a.dim; break;
  }
}

// Block b's rows [r0, r1) of a matrix of N rows: slices differ by at most one row.
__host__ __device__ inline int slice_start(int64_t N, int b, int blocks) {
  return static_cast<int>(N * b / blocks);
}

__device__ __forceinline__ unsigned long long globaltimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}

// BABYRT_STEP_TRACE: where the marks of a step go (kTraceMarks per block), read back with
// babyrt::decode_step_trace (benchmarks/decode_step_trace.py).
constexpr int kTraceMarks = 512;

// The grid barriers of a step: one 64-bit counter that only grows. Each block adds one per
// barrier (a release: the block's writes before it are visible to whoever acquires the count)
// and waits until the count reaches its target (an acquire). A launch adds exactly
// barriers x blocks, so the count at a launch's start, rounded down to a multiple of that, is
// the base of its targets: no block can be a whole barrier ahead of the one reading it. All
// blocks are resident at once (one per SM, as many as SMs), so every one arrives.
struct GridSync {
  unsigned long long* count;
  unsigned long long target;  // thread 0's

  __device__ GridSync(unsigned long long* c, int barriers) : count(c), target(0) {
    if (threadIdx.x == 0) {
      unsigned long long v;
      asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(count) : "memory");
      const unsigned long long per_launch = static_cast<unsigned long long>(barriers) * gridDim.x;
      target = v / per_launch * per_launch;
    }
  }
  __device__ __forceinline__ void operator()(bool skip, bool backoff, unsigned long long* trace) {
    StepBlock::sync();  // the block's writes of this phase are done
    if (threadIdx.x == 0) {
      if (trace) *trace = globaltimer();
      target += gridDim.x;
      asm volatile("red.release.gpu.global.add.u64 [%0], 1;" ::"l"(count) : "memory");
      unsigned long long v = target;
      if (!skip) {
        do {
          asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(count) : "memory");
          if (v < target && backoff) __nanosleep(32);
        } while (v < target);
      }
    }
    StepBlock::sync();
  }
};

// Asks L2 to fetch the 128-byte lines of [p, p + bytes) (no wait; a hint).
__device__ __forceinline__ void prefetch_l2(const void* p, int64_t bytes) {
  const char* c = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) & ~uintptr_t{127});
  const char* end = static_cast<const char*>(p) + bytes;
  for (; c < end; c += 128) asm volatile("prefetch.global.L2 [%0];" ::"l"(c));
}

struct StepRing {
  const int4* chunks;  // slots * kPieceChunks 16-byte chunks
  uint64_t* full;      // per slot: its piece has landed
  uint64_t* empty;     // per slot: every consumer warp is done with it
  int slots;
};

// The consumers' side of one GEMV phase: act(x) staged, then this block's rows read from the
// ring, whose pieces base, base + 1, ... hold them (advanced past them on return). The row
// walk, release order and no-deadlock argument are gemv_stream_kernel's (cuda_kernels.cu).
// With a residual (h += W x), the block's rows of h come from and go to h_slice in shared
// memory as well as to global h: no round trip to L2 for them.
template <typename T, typename W, typename S, Act kAct, typename Mark>
__device__ void step_gemv(const GemvArgs& a, int row_lanes, const StepRing& ring, int& base,
                          unsigned char* work, float* h_slice, bool no_math, Mark&& mark) {
  constexpr int E = 16 / sizeof(W);
  constexpr bool kQ8 = sizeof(W) == 1;
  if (kAct == Act::kRmsNorm && a.K <= 16 * kStepWarps * 32)
    stage_rmsnorm_row<T, W, StepBlock>(a, work);
  else
    stage_activations<T, W, kAct, StepBlock>(a, work);
  mark(false);  // staged
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int chunks = a.K / E, slots = ring.slots;
  const int r0 = slice_start(a.N, blockIdx.x, gridDim.x);
  const int rows = slice_start(a.N, blockIdx.x + 1, gridDim.x) - r0;
  const int pieces = (rows * chunks + kPieceChunks - 1) / kPieceChunks;
  const int groups = a.K / a.group;
  const int ring_chunks = slots * kPieceChunks;
  const int first_pos = static_cast<int>(base % slots) * kPieceChunks;
  auto wait_landed = [&](int p) {
    const int g = base + p;  // 32-bit: 64-bit division is emulated
    barrier_wait(&ring.full[g % slots], (g / slots) & 1);
  };
  int released = 0;
  auto release_below = [&](int p_end) {
    __syncwarp();  // every lane's reads of those pieces are done
    for (; released < p_end; ++released) {
      wait_landed(released);
      if (lane == 0) barrier_arrive(&ring.empty[(base + released) % slots]);
    }
  };
  const int L = row_lanes, per_warp = 32 / L, sub = lane / L, col = lane % L;
  for (int first = warp * per_warp; first < rows; first += kStepWarps * per_warp) {
    const int group_end = min(first + per_warp, rows);
    release_below(first * chunks / kPieceChunks);
    for (int p = first * chunks / kPieceChunks; p <= (group_end * chunks - 1) / kPieceChunks; ++p)
      wait_landed(p);
    const int r = first + sub;
    float acc = 0.f;
    if (r < rows) {
      int pos = (first_pos + r * chunks + col) % ring_chunks;
      const S* row_scales = kQ8 ? static_cast<const S*>(a.scales) + static_cast<int64_t>(r0 + r) * groups
                                : nullptr;
      const float row_scale = kQ8 ? to_float(__ldg(row_scales)) : 1.f;
      for (int c = col; c < chunks && !no_math; c += L) {
        const int4 wv = ring.chunks[pos];
        const float ws = !kQ8 ? 1.f : groups == 1 ? row_scale : to_float(__ldg(row_scales + c * E / a.group));
        acc += chunk_dot<T, W>(wv, ws, work, 1, a.K, 0, c);
        pos += L;
        if (pos >= ring_chunks) pos -= ring_chunks;
      }
    }
    for (int off = L / 2; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffff, acc, off);
    if (col == 0 && r < rows) {
      if (a.residual) {  // as store_output, with the residual from h_slice
        const T y = from_float<T>(round_to<T>(acc) + h_slice[r]);
        h_slice[r] = to_float(y);
        static_cast<T*>(a.y)[r0 + r] = y;
      } else {
        store_output<T, true>(a, 0, r0 + r, acc);
      }
    }
  }
  mark(true);  // rows done (every warp's: a sync first when tracing)
  release_below(pieces);
  base += pieces;
}

template <typename T, typename W, typename S>
__global__ void __launch_bounds__(kStepThreads, 1) decode_step_kernel(const __grid_constant__ StepArgs a) {
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ float h_slice[kMaxSlice];  // this block's rows of h (embedding, wo and w2 rows)
  unsigned char* work = smem;  // act(x) of a GEMV phase, or attention's scores
  StepRing ring{reinterpret_cast<const int4*>(smem + a.ring_offset),
                reinterpret_cast<uint64_t*>(smem + a.ring_offset + static_cast<size_t>(a.slots) * kPieceBytes),
                nullptr, a.slots};
  ring.empty = ring.full + a.slots;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (threadIdx.x == 0) {
    for (int s = 0; s < a.slots; ++s) {
      barrier_init(&ring.full[s], 1);
      barrier_init(&ring.empty[s], kStepWarps);
    }
    fence_barrier_init();
  }
  __syncthreads();  // the last barrier of the whole block: from here the producer goes its own way

  auto weights_of = [&](int l, int m) { return m == kOut ? a.out_w : a.layer[l].w[m]; };
  auto scales_of = [&](int l, int m) { return m == kOut ? a.out_s : a.layer[l].s[m]; };
  auto element_bytes = [&](int m) { return m == kOut && !a.out_q8 ? sizeof(T) : sizeof(W); };

  if (warp == kStepWarps) {
    // The producer: this block's slice of every matrix, in the consumers' order, each piece as
    // soon as its slot is free. The weights are read-only, so it does not wait for the
    // previous kernel (PDL): the first ring-full overlaps its tail.
    if (lane == 0) {
      // Each weight is read once a step: evict-first, so that it does not push the step's
      // activations out of L2 (H200, same run: stories15M 6,935 -> 7,081 tok/s, 1B bf16 864 -> 908).
      const uint64_t policy = evict_first_policy();
      int p = 0;
      auto stream = [&](int l, int m) {
        int N, K;
        matrix_shape(a, m, N, K);
        const int r0 = slice_start(N, blockIdx.x, gridDim.x);
        const int64_t row_bytes = static_cast<int64_t>(K) * element_bytes(m);
        const int64_t bytes = (slice_start(N, blockIdx.x + 1, gridDim.x) - r0) * row_bytes;
        const char* src = static_cast<const char*>(weights_of(l, m)) + r0 * row_bytes;
        if (element_bytes(m) == 1) {  // int8: the scales into L2 ahead of the consumers
          const int64_t srow = static_cast<int64_t>(K / a.group[m]) * sizeof(S);
          prefetch_l2(static_cast<const char*>(scales_of(l, m)) + r0 * srow, bytes / row_bytes * srow);
        }
        for (int64_t off = 0; off < bytes; off += kPieceBytes, ++p) {
          if (p >= a.slots) barrier_wait(&ring.empty[p % a.slots], (p / a.slots - 1) & 1);
          int4* dst = const_cast<int4*>(ring.chunks) + (p % a.slots) * kPieceChunks;
          const uint32_t n = static_cast<uint32_t>(bytes - off < kPieceBytes ? bytes - off : kPieceBytes);
          bulk_copy(dst, src + off, n, &ring.full[p % a.slots], policy);
        }
      };
      for (int l = 0; l < a.L; ++l) {
        prefetch_l2(a.layer[l].attn_norm, a.dim * sizeof(T));
        prefetch_l2(a.layer[l].ffn_norm, a.dim * sizeof(T));
        for (int m = kQkv; m <= kW2; ++m) stream(l, m);
      }
      prefetch_l2(a.final_norm, a.dim * sizeof(T));
      stream(0, kOut);
    }
    return;
  }

  // Trace marks: start, inputs ready; per GEMV phase staged, rows done; per barrier arrived,
  // passed; the end. The trace stays off (one branch per mark) unless BABYRT_STEP_TRACE is set.
  int marks = 0;
  unsigned long long* trace = a.trace ? a.trace + blockIdx.x * kTraceMarks : nullptr;
  auto mark = [&]() -> unsigned long long* {
    unsigned long long* m = trace && marks < kTraceMarks ? trace + marks : nullptr;
    ++marks;
    return m;
  };
  auto stamp = [&](bool sync_first = false) {
    if (trace && sync_first) StepBlock::sync();
    if (unsigned long long* m = mark(); m && threadIdx.x == 0) *m = globaltimer();
  };
  stamp();
  wait_for_inputs();  // the token and position come from the previous kernel
  stamp();
  GridSync grid_sync(a.arrivals, 1 + 5 * a.L);
  const bool no_sync = a.debug & 1;
  auto sync = [&] {
    unsigned long long* arrived = mark();
    grid_sync(no_sync, a.debug & 8, arrived);
    stamp();
  };
  // h = the token's embedding row (dequantized for an int8 table), this block's slice of it.
  {
    const int64_t id = *a.token;
    const bool ok = id >= 0 && id < a.emb_rows;  // the runtime checks ids first; stay in bounds
    const int64_t row = (ok ? id : 0) * a.dim;
    const int group = a.dim / a.emb_groups;
    for (int i = slice_start(a.dim, blockIdx.x, gridDim.x) + threadIdx.x;
         i < slice_start(a.dim, blockIdx.x + 1, gridDim.x); i += kStepWarps * 32) {
      float v;
      if (a.emb_q8) {
        const int64_t s = (ok ? id : 0) * a.emb_groups + i / group;
        v = to_float(static_cast<const int8_t*>(a.emb)[row + i]) *
            (a.emb_scales_bf16 ? to_float(static_cast<const __nv_bfloat16*>(a.emb_scales)[s])
                               : static_cast<const float*>(a.emb_scales)[s]);
      } else {
        v = to_float(static_cast<const T*>(a.emb)[row + i]);
      }
      const T y = from_float<T>(ok ? v : 0.f);
      static_cast<T*>(a.h)[i] = y;
      h_slice[i - slice_start(a.dim, blockIdx.x, gridDim.x)] = to_float(y);
    }
  }
  sync();

  int base = 0;  // the ring piece the next matrix starts at
  auto gemv_args = [&](int l, int m, const void* x, const void* norm, void* residual_and_y, void* y) {
    int N, K;
    matrix_shape(a, m, N, K);
    GemvArgs g{};
    g.w = weights_of(l, m);
    g.scales = scales_of(l, m);
    g.x = x;
    g.norm = norm;
    g.residual = residual_and_y;
    g.y = residual_and_y ? residual_and_y : y;
    g.eps = a.eps;
    g.M = 1, g.N = N, g.K = K;
    g.group = a.group[m];
    g.y_float = m == kOut;
    return g;
  };
  const int64_t layer_cache = static_cast<int64_t>(a.KV) * a.S * a.D;
  for (int l = 0; l < a.L; ++l) {
    const StepLayer& ly = a.layer[l];
    step_gemv<T, W, S, Act::kRmsNorm>(gemv_args(l, kQkv, a.h, ly.attn_norm, nullptr, a.qkv),
                                      a.row_lanes[kQkv], ring, base, work, h_slice, a.debug & 2, stamp);
    sync();
    const AttnArgs at{a.qkv, a.position, a.cos, a.sin,
                      static_cast<T*>(a.k_cache) + l * layer_cache,
                      static_cast<T*>(a.v_cache) + l * layer_cache, a.attn, a.H, a.KV, a.D, a.S, a.P};
    for (int h = blockIdx.x; h < a.H && !(a.debug & 4); h += gridDim.x)
      attend<T, kStepWarps * 32, StepBlock>(at, h, 0, reinterpret_cast<float*>(work));
    sync();
    step_gemv<T, W, S, Act::kNone>(gemv_args(l, kWo, a.attn, nullptr, a.h, nullptr),
                                   a.row_lanes[kWo], ring, base, work, h_slice, a.debug & 2, stamp);
    sync();
    step_gemv<T, W, S, Act::kRmsNorm>(gemv_args(l, kW13, a.h, ly.ffn_norm, nullptr, a.gu),
                                      a.row_lanes[kW13], ring, base, work, h_slice, a.debug & 2, stamp);
    sync();
    step_gemv<T, W, S, Act::kSwiGlu>(gemv_args(l, kW2, a.gu, nullptr, a.h, nullptr),
                                     a.row_lanes[kW2], ring, base, work, h_slice, a.debug & 2, stamp);
    sync();
  }
  allow_next_launch();  // the sampler's blocks may take their places as these finish
  const GemvArgs out = gemv_args(0, kOut, a.h, a.final_norm, nullptr, a.logits);
  if (a.out_q8)
    step_gemv<T, W, S, Act::kRmsNorm>(out, a.row_lanes[kOut], ring, base, work, h_slice, a.debug & 2, stamp);
  else
    step_gemv<T, T, float, Act::kRmsNorm>(out, a.row_lanes[kOut], ring, base, work, h_slice, a.debug & 2, stamp);
  stamp();
}

// The grid barrier's counter for steps that work on this KV cache, zeroed once. Keyed by the
// cache, so that two steps that could run at once (two generations, each with its own cache)
// never share one, and steps that share one run one after another with the same barriers.
unsigned long long* step_counter(const at::Tensor& k_cache) {
  static std::mutex mutex;
  static std::unordered_map<const void*, at::Tensor> counters;
  const std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& c = counters[k_cache.const_data_ptr()];
  if (!c.defined() || c.device() != k_cache.device())
    c = at::zeros({16}, k_cache.options().dtype(at::kLong));  // a 128-byte line of its own
  return reinterpret_cast<unsigned long long*>(c.mutable_data_ptr<int64_t>());
}

// The trace buffer (BABYRT_STEP_TRACE=1; null otherwise): kTraceMarks times per block of the
// last step, in ns.
unsigned long long* step_trace(const at::Device& device) {
  static const bool on = std::getenv("BABYRT_STEP_TRACE") != nullptr;
  static at::Tensor buffer;
  if (!on) return nullptr;
  if (!buffer.defined()) {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device.index()));
    buffer = at::zeros({sms, kTraceMarks}, at::TensorOptions().device(device).dtype(at::kLong));
  }
  return reinterpret_cast<unsigned long long*>(buffer.mutable_data_ptr<int64_t>());
}

at::Tensor decode_step_trace() {
  unsigned long long* t = step_trace(at::Device(at::kCUDA, 0));
  if (!t) return at::empty({0}, at::kLong);
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  return at::from_blob(t, {sms, kTraceMarks}, at::TensorOptions().device(at::kCUDA).dtype(at::kLong)).clone();
}


// Sizes the ring and launches; false where the step does not fit (the caller falls back).
template <typename T, typename W, typename S>
bool launch_decode_step(StepArgs& a) {
  static const KernelRoom dev =
      kernel_room(decode_step_kernel<T, W, S>, [](int optin, int fixed) { return optin - fixed; });
  if (!dev.hopper) return false;
  const int blocks = dev.sms;
  if ((a.dim + blocks - 1) / blocks > kMaxSlice) return false;
  auto up = [](size_t v) { return (v + 127) / 128 * 128; };
  size_t work = attend_smem_bytes(a.D, kStepWarps * 32);
  int min_slots = 1;
  for (int m = 0; m < kMatrices; ++m) {
    int N, K;
    matrix_shape(a, m, N, K);
    const bool q8 = m != kOut ? sizeof(W) == 1 : a.out_q8;
    const int stage_k = m == kW2 ? a.hidden : K;
    work = std::max(work, q8 ? gemv_smem_bytes<T, int8_t>(1, stage_k) : gemv_smem_bytes<T, T>(1, stage_k));
    const int64_t rows_max = (N + blocks - 1) / blocks;
    const int64_t per_warp_rows = (rows_max + kStepWarps - 1) / kStepWarps;
    a.row_lanes[m] = per_warp_rows >= 3 ? 8 : per_warp_rows == 2 ? 16 : 32;
    const int64_t row_bytes = static_cast<int64_t>(K) * (q8 ? 1 : sizeof(T));
    if (rows_max * row_bytes / 16 >= (int64_t{1} << 30)) return false;
    // A warp's group of rows spans at most this many pieces; the ring must hold them at once.
    const int64_t group_pieces = ((32 / a.row_lanes[m]) * row_bytes + kPieceBytes - 1) / kPieceBytes + 1;
    min_slots = std::max<int>(min_slots, static_cast<int>(group_pieces));
  }
  a.ring_offset = static_cast<int>(up(work));
  const int64_t per_slot = kPieceBytes + 2 * sizeof(uint64_t);
  a.slots = static_cast<int>((dev.smem - a.ring_offset) / per_slot);
  if (a.slots < min_slots) return false;
  const size_t smem = a.ring_offset + a.slots * per_slot;
  auto kernel = decode_step_kernel<T, W, S>;
  // Every block must be resident at once (the grid barrier).
  if (blocks_per_sm(reinterpret_cast<const void*>(kernel), kStepThreads, smem) < 1) return false;
  launch(kernel, dim3(blocks), dim3(kStepThreads), smem, a);
  return true;
}

bool is_vector(const at::Tensor& t, int64_t n, at::ScalarType dt) {
  return t.dim() == 1 && t.size(0) == n && t.scalar_type() == dt && t.is_contiguous() && aligned16(t);
}

// A [N, K] matrix as the step takes it: float in dtype T, or int8 with [N, K / group] scales
// of dtype sdt (group a multiple of 16). Returns the group (K for per-channel), 0 if it does not fit.
int64_t matrix_fits(const at::Tensor& w, const std::optional<at::Tensor>& s, int64_t N, int64_t K,
                    at::ScalarType T, std::optional<at::ScalarType> sdt) {
  if (w.dim() != 2 || w.size(0) != N || w.size(1) != K || !w.is_contiguous() || !aligned16(w)) return 0;
  if (!sdt) return !s && w.scalar_type() == T ? K : 0;
  if (!s || w.scalar_type() != at::kChar || s->scalar_type() != *sdt || s->dim() != 2 ||
      s->size(0) != N || s->size(1) < 1 || K % s->size(1) || !s->is_contiguous())
    return 0;
  const int64_t group = K / s->size(1);
  return group % 16 == 0 ? group : 0;
}

at::Tensor decode_step_cuda(const at::Tensor& tokens, const at::Tensor& positions,
                            at::TensorList weights, const c10::List<std::optional<at::Tensor>>& scales,
                            const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache,
                            at::Tensor& v_cache, int64_t H, int64_t KV, double eps) {
  // Opt-in (BABYRT_DECODE_STEP=1), read per call: not yet faster than the op-by-op kernels
  // (docs/cuda-decode.md).
  const bool enabled = env_is("BABYRT_DECODE_STEP", "1");
  const at::Tensor none = at::empty({0}, tokens.options().dtype(at::kFloat));
  const int64_t L = (static_cast<int64_t>(weights.size()) - 3) / 6;
  if (!enabled || L < 1 || L > kStepMaxLayers || weights.size() != static_cast<size_t>(3 + 6 * L) ||
      scales.size() != static_cast<size_t>(2 + 4 * L))
    return none;
  // Every tensor on the tokens' device (the kernel reads them all through raw pointers).
  const at::Device dev = tokens.device();
  auto here = [&](const at::Tensor& t) { return t.device() == dev; };
  if (!tokens.is_cuda() || !here(positions) || !here(cos) || !here(sin) || !here(k_cache) ||
      !here(v_cache) || !std::all_of(weights.begin(), weights.end(), here))
    return none;
  for (size_t i = 0; i < scales.size(); ++i)
    if (const std::optional<at::Tensor> s = scales.get(i); s && !here(*s)) return none;
  const at::Tensor& emb = weights[0];
  const at::Tensor& final_norm = weights[1];
  const at::Tensor& out_w = weights[2];
  const auto T = final_norm.scalar_type();
  if (T != at::kHalf && T != at::kBFloat16) return none;
  if (tokens.numel() != 1 || positions.numel() != 1 || tokens.scalar_type() != at::kLong ||
      positions.scalar_type() != at::kLong || !tokens.is_cuda() || tokens.device() != positions.device())
    return none;
  // Shapes, from the first layer and the cache.
  if (k_cache.dim() != 5 || k_cache.size(0) != L || k_cache.size(1) != 1 || k_cache.size(2) != KV ||
      !k_cache.is_contiguous() || !v_cache.is_contiguous() || v_cache.sizes() != k_cache.sizes() ||
      k_cache.scalar_type() != T || v_cache.scalar_type() != T || !aligned16(k_cache) || !aligned16(v_cache))
    return none;
  const int64_t S = k_cache.size(3), D = k_cache.size(4), dim = final_norm.numel();
  const at::Tensor& w13_0 = weights[3 + 4];
  if (w13_0.dim() != 2) return none;
  const int64_t hidden = w13_0.size(0) / 2, V = out_w.dim() == 2 ? out_w.size(0) : 0;
  const int64_t E = 16 / 2;  // T values per 16-byte vector
  if (H < 1 || KV < 1 || H % KV || D % 2 || D % E || D > kMaxHeadDim ||
      dim % 16 || hidden % 16 || (H * D) % 16 || V < 1 || !is_vector(final_norm, dim, T) ||
      cos.scalar_type() != at::kFloat || sin.scalar_type() != at::kFloat || cos.dim() != 2 ||
      cos.size(1) != D / 2 || sin.sizes() != cos.sizes() || !cos.is_contiguous() || !sin.is_contiguous() ||
      dim >= (1 << 30) || hidden >= (1 << 29) || V >= (1 << 30))
    return none;
  // The layers' weights: all float (T), or all int8 with scales of one dtype and one group.
  const auto& s0 = scales.get(2);
  std::optional<at::ScalarType> sdt;
  if (s0) sdt = s0->scalar_type();
  if (sdt && *sdt != at::kFloat && *sdt != at::kBFloat16) return none;
  const int64_t qkv_rows = (H + 2 * KV) * D;
  const int64_t shapes[4][2] = {{qkv_rows, dim}, {dim, H * D}, {2 * hidden, dim}, {dim, hidden}};
  StepArgs a{};
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor& an = weights[3 + 6 * l];
    const at::Tensor& fn = weights[3 + 6 * l + 1];
    if (!is_vector(an, dim, T) || !is_vector(fn, dim, T)) return none;
    a.layer[l].attn_norm = an.const_data_ptr();
    a.layer[l].ffn_norm = fn.const_data_ptr();
    for (int m = 0; m < 4; ++m) {
      const at::Tensor& w = weights[3 + 6 * l + 2 + m];
      const std::optional<at::Tensor> s = scales.get(2 + 4 * l + m);
      const int64_t g = matrix_fits(w, s, shapes[m][0], shapes[m][1], T, sdt);
      if (!g || (l > 0 && g != a.group[m])) return none;  // every layer alike
      a.group[m] = static_cast<int>(g);
      a.layer[l].w[m] = w.const_data_ptr();
      a.layer[l].s[m] = s ? s->const_data_ptr() : nullptr;
    }
  }
  // The classifier: float, or int8 like the layers.
  const std::optional<at::Tensor> out_s = scales.get(1);
  const int64_t out_group = matrix_fits(out_w, out_s, V, dim, T, out_s ? sdt : std::nullopt);
  if (!out_group || (out_s && !sdt)) return none;
  a.group[kOut] = static_cast<int>(out_group);
  // The embedding table: T, or int8 with fp32 or bf16 scales.
  const std::optional<at::Tensor> emb_s = scales.get(0);
  if (emb.dim() != 2 || emb.size(1) != dim || !emb.is_contiguous()) return none;
  if (emb_s ? (emb.scalar_type() != at::kChar || emb_s->dim() != 2 || emb_s->size(0) != emb.size(0) ||
               emb_s->size(1) < 1 || dim % emb_s->size(1) || !emb_s->is_contiguous() ||
               (emb_s->scalar_type() != at::kFloat && emb_s->scalar_type() != at::kBFloat16))
            : emb.scalar_type() != T)
    return none;

  const c10::cuda::CUDAGuard guard(tokens.device());
  const auto opts = final_norm.options();
  at::Tensor h = at::empty({dim}, opts), qkv = at::empty({qkv_rows}, opts);
  at::Tensor attn = at::empty({H * D}, opts), gu = at::empty({2 * hidden}, opts);
  at::Tensor logits = at::empty({1, 1, V}, opts.dtype(at::kFloat));
  a.token = tokens.const_data_ptr<int64_t>();
  a.position = positions.const_data_ptr<int64_t>();
  a.emb = emb.const_data_ptr();
  a.emb_scales = emb_s ? emb_s->const_data_ptr() : nullptr;
  a.final_norm = final_norm.const_data_ptr();
  a.out_w = out_w.const_data_ptr();
  a.out_s = out_s ? out_s->const_data_ptr() : nullptr;
  a.cos = cos.const_data_ptr<float>();
  a.sin = sin.const_data_ptr<float>();
  a.k_cache = k_cache.mutable_data_ptr();
  a.v_cache = v_cache.mutable_data_ptr();
  a.h = h.mutable_data_ptr();
  a.qkv = qkv.mutable_data_ptr();
  a.attn = attn.mutable_data_ptr();
  a.gu = gu.mutable_data_ptr();
  a.logits = logits.mutable_data_ptr<float>();
  a.arrivals = step_counter(k_cache);
  static const int debug = env_count("BABYRT_STEP_DEBUG");
  a.debug = debug;
  a.trace = step_trace(tokens.device());
  a.emb_rows = emb.size(0);
  a.eps = static_cast<float>(eps);
  a.L = static_cast<int>(L), a.dim = static_cast<int>(dim), a.hidden = static_cast<int>(hidden);
  a.H = static_cast<int>(H), a.KV = static_cast<int>(KV), a.D = static_cast<int>(D);
  a.S = static_cast<int>(S), a.P = static_cast<int>(cos.size(0)), a.V = static_cast<int>(V);
  a.emb_groups = emb_s ? static_cast<int>(emb_s->size(1)) : 1;
  a.emb_q8 = emb_s.has_value();
  a.emb_scales_bf16 = emb_s && emb_s->scalar_type() == at::kBFloat16;
  a.out_q8 = out_s.has_value();
  bool launched = false;
  dispatch_float(T, [&](auto ttag) {
    using CT = decltype(ttag);
    if constexpr (!std::is_same_v<CT, float>) {
      if (!sdt) launched = launch_decode_step<CT, CT, float>(a);
      else if (*sdt == at::kFloat) launched = launch_decode_step<CT, int8_t, float>(a);
      else launched = launch_decode_step<CT, int8_t, __nv_bfloat16>(a);
    }
  });
  return launched ? logits : none;
}

}  // namespace
}  // namespace babyrt::ops

TORCH_LIBRARY_IMPL(babyrt, CUDA, m) { m.impl("decode_step", babyrt::ops::decode_step_cuda); }

// The marks of the last step with BABYRT_STEP_TRACE=1 ([blocks, kTraceMarks] ns; empty without it).
TORCH_LIBRARY_FRAGMENT(babyrt, m) { m.def("decode_step_trace", babyrt::ops::decode_step_trace); }
