// CUDA kernels behind babyrt's ops, for decode (a few rows at a time) and short prefills. Built
// only when the Torch found has CUDA. Shapes they do not cover (long prompts, odd sizes) run the
// ATen references.
//
// - gemv: y = act(x) @ W^T (+ residual) for M <= kMaxGemvRows rows of x (kMaxRows a launch: a
//   short prompt's prefill takes a few launches, not the ~10 ATen ops of the reference path,
//   whose host time dominated prefill), W float (the dtype of x) or
//   int8 with group scales. act is the identity, RMSNorm (rmsnorm_linear) or SwiGLU
//   (swiglu_linear): each block computes it once into shared memory (int8 per 16 values for
//   int8 weights), then its warps stream rows of W against it, so every weight byte is read once,
//   in full lines. The fused ops are one kernel each. Per-channel int8 rows against one row of
//   x take gemv_rowbuf_kernel (rows copied into shared memory) where its grid fits.
//   BABYRT_GEMV=stream picks, for int8 weights from 2 MB on Hopper, gemv_stream_kernel
//   (weights brought in by bulk copies).
// - attention_decode: one token per sequence. RoPE on q and k, k and v written into the cache,
//   softmax(q K^T / sqrt(D)) V over the filled slots only. One block per (head, sequence).
//   Prefill (several tokens): RoPE and the cache writes in one kernel, then ATen's SDPA.
// - embedding: a token's row, gathered, dequantized (int8 tables) and cast, one kernel.
// - greedy_advance: argmax of the logits and the decode loop's bookkeeping, one kernel.
//
// All launch with programmatic dependent launch (PDL, Hopper): a kernel starts while its
// predecessor drains, loads what no kernel writes (the GEMV's weights), and only then waits for
// the predecessor's results (griddepcontrol.wait). BABYRT_PDL=0 turns it off, to measure it.
//
// Roundings follow the references (ops.cpp): intermediate values are rounded to the dtype of x
// where the reference rounds them, so that the fused ops track the unfused ones. The one
// departure: int8 weights meet act(x) rounded to int8 (as on the CPU's VNNI path).
#include "ops/cuda_common.cuh"

namespace babyrt::ops {
namespace {

constexpr int kWarps = 8;        // warps per block (each takes rows of W)
constexpr int kBatch = 8;        // 16-byte weight chunks per lane in flight at once
// Chunks a lane holds for one row of x against per-channel int8 rows of 257 to 384 chunks (K
// 4,097 to 6,144, e.g. 1B's 2048x5632): every warp then reads its row in one round trip to HBM,
// at 3 blocks an SM (80 registers; a scale a chunk would spill). See launch_gemv.
constexpr int kLongRowBatch = 12;
// BABYRT_GEMV=small (opt-in): one row of x against float rows of up to 4 chunks a lane (K <=
// 1024 in bf16: stories110M's QKV and wo, all of stories15M's) at 4 chunks a lane, 4 blocks an
// SM (64 registers, not 80), so that the next kernels' blocks fit beside a GEMV's. Measured
// (H200, nineteenth session, bf16 tok/s): stories15M 11,330-11,434 -> 11,720, stories110M
// 4,578-4,587 -> 4,480; int8 unchanged. The toy layer's gain from an early launch was not its
// registers but the L1 / shared split (docs/cuda-decode.md, "Nineteenth session").
constexpr int kSmallBatch = 4;
constexpr int kAttnThreads = 256;
constexpr int64_t kEarlyRowsBytes = 96 << 10;  // shared memory for attention's early K and V rows
constexpr int64_t kMaxAttnCluster = 16;  // heads attention_linear_kernel takes (one cluster)

// Elements from one early-copied K row to the next: 16 bytes more than a row. The score loop
// gave each thread a slot and read its K row 16 bytes at a time, and rows of 128 bytes (bf16,
// D 64) put the 8 lanes of a quarter-warp on the same four banks. Measured on the H200
// (benchmarks/attention_cuda.py, stories110M at position 272): 5.45 -> 4.38 us alone;
// stories110M bf16 4,079 -> 4,192 tok/s. (The one-pass loop of attend_slots reads a row's
// chunks with consecutive lanes, which needs no padding; it does no harm either.)
constexpr int64_t early_k_stride(int64_t D, int64_t element_size) { return D + 16 / element_size; }

// Where attention_decode_kernel's early rows start in its shared memory: after attend's.
__host__ __device__ constexpr size_t early_rows_offset(int D) {
  return (attend_smem_bytes(D, kAttnThreads) + 15) / 16 * 16;
}

// act(x) into a GEMV block's shared memory (kWarps warps): RMSNorm of one 16-bit row in one
// round trip to L2 where the block covers it (stage_rmsnorm_row), else stage_activations.
template <typename T, typename W, Act kAct>
__device__ __forceinline__ void stage_block(const GemvArgs& a, unsigned char* smem) {
  if constexpr (kAct == Act::kRmsNorm && sizeof(T) == 2) {  // fp32 x: 94 registers, left out
    if (a.M == 1 && a.K <= 16 * kWarps * 32) {  // one row: one round trip (stories15M +4%)
      stage_rmsnorm_row<T, W, WholeBlock>(a, smem);
      return;
    }
  }
  stage_activations<T, W, kAct>(a, smem);
}

// T: dtype of x and y. W: weight element (T, or int8_t with scales S).
//
// Each block first stages act(x) in shared memory (once per block), then each warp streams
// rows of W, 32 / L at a time (L = a.row_lanes lanes a row, 32 for long rows): a lane reads
// 16-byte chunks col, col + L, ... of its row, kBatch at a time, so every weight byte is read
// once, in full lines, with many bytes in flight. Short rows take fewer lanes so that a warp's
// batch covers several rows: each round trip to HBM then brings a warp up to 4 KB, not one
// short row (the classifier, 32000 rows of 288 or 768, took 11 round trips a warp at L 32).
// int8 weights meet x quantized to int8 (one scale per 16 values): four DP4A per 16 weights
// instead of 16 int-to-float conversions, which would cap the kernel below HBM speed.
//
// kB: chunks a lane holds at once (kBatch, or more for long int8 rows: see launch_gemv).
// kRowScale: int8 weights with one scale a row (per channel): one scale load a batch, not kB.
// kPair: ffn_block's w13 (GemvArgs::pair_half), a template flag so that the other instances
// keep their registers (as a run-time branch it gave them up to 112 bytes of stack).
template <typename T, typename W, typename S, Act kAct, int kB = kBatch, bool kRowScale = false,
          bool kPair = false>
__global__ void __launch_bounds__(kWarps * 32, kB <= kSmallBatch ? 4 : kB <= kLongRowBatch ? 3 : 2) gemv_kernel(GemvArgs a) {
  extern __shared__ int4 staged[];  // act(x), see gemv_smem_bytes
  unsigned char* smem = reinterpret_cast<unsigned char*>(staged);
  constexpr int E = 16 / sizeof(W);  // weights per 16-byte chunk
  constexpr bool kQ8 = sizeof(W) == 1;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int chunks = a.K / E;
  const int warps = gridDim.x * kWarps;
  const int L = a.row_lanes, per_warp = 32 / L, sub = lane / L, col = lane % L;
  // This lane's row in the warp's r-th group of rows.
  auto row_of = [&](int r) { return ((blockIdx.x * kWarps + warp) + r * warps) * per_warp + sub; };

  int4 wv[kB];
  float sv[kRowScale ? 1 : kB];
  auto load_batch = [&](int n, int c0) {
    const int64_t w_row = weight_row<kPair>(a, n);
    const int4* row = reinterpret_cast<const int4*>(static_cast<const W*>(a.w) + w_row * a.K);
    const S* srow = kQ8 ? static_cast<const S*>(a.scales) + w_row * (a.K / a.group) : nullptr;
#pragma unroll
    for (int u = 0; u < kB; ++u) {
      const int c = c0 + u * L;
      const bool ok = n < a.N && c < chunks;
      wv[u] = ok ? __ldcs(row + c) : make_int4(0, 0, 0, 0);  // streamed: read once
      if constexpr (kQ8 && kRowScale) {
        if (u == 0) sv[0] = ok ? to_float(srow[0]) : 0.f;  // chunk 0 is the lowest: past it, all are
      } else if constexpr (kQ8) {
        sv[u] = ok ? to_float(srow[c * E / a.group]) : 0.f;
      }
    }
  };
  // The first weights before waiting: no kernel writes them, so these loads overlap the tail
  // of the previous kernel.
  load_batch(row_of(0), col);
  if (a.trigger_early) allow_next_launch();  // see attention_block_cuda
  wait_for_inputs();
  if (!a.trigger_early) allow_next_launch();  // only after the wait: see attention_decode_kernel
  // The first row's residual now (see early_residual; rmsnorm_linear has none).
  const bool early_res = kAct != Act::kRmsNorm && a.M == 1;
  const float res0 = early_res && col == 0 ? early_residual<T>(a, 0, row_of(0)) : 0.f;
  stage_block<T, W, kAct>(a, smem);

  for (int r = 0; r < a.rows_per_warp; ++r) {
    const int n = row_of(r);
    if (n - sub >= a.N) break;  // the warp's whole group is past the end
    float acc[kMaxRows];
#pragma unroll
    for (int m = 0; m < kMaxRows; ++m) acc[m] = 0.f;
    for (int c0 = col; c0 < chunks; c0 += L * kB) {
      if (r > 0 || c0 != col) load_batch(n, c0);  // the first batch is already in flight
#pragma unroll
      for (int u = 0; u < kB; ++u) {
        const int c = c0 + u * L;
        if (c >= chunks) break;
#pragma unroll
        for (int m = 0; m < kMaxRows; ++m) {
          if (m >= a.M) break;
          acc[m] += chunk_dot<T, W>(wv[u], kQ8 ? sv[kRowScale ? 0 : u] : 1.f, smem, a.M, a.K, m, c);
        }
      }
    }
#pragma unroll
    for (int m = 0; m < kMaxRows; ++m) {
      if (m >= a.M) break;
      float v = acc[m];
      for (int off = L / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffff, v, off);
      if constexpr (kPair) {  // an even row is a gate, the next lanes' row its up
        const float up = __shfl_down_sync(0xffffffff, v, L);
        if (col == 0 && (sub & 1) == 0 && n < a.N) store_swiglu<T>(a, m, n >> 1, v, up);
      } else if (col == 0 && n < a.N) {
        store_output<T>(a, m, n, v, early_res && r == 0, res0);
      }
    }
  }
}

// ------------------------------------------------------------------ streamed GEMV (Hopper)
//
// The same product as gemv_kernel, for int8 matrices of 2 MB and up, with the weights brought
// in by the bulk-copy engine (TMA) instead of by the threads' own loads. Opt-in
// (BABYRT_GEMV=stream): see "Measured" below.
//
// One block per SM takes a contiguous slice of rows (slices differ by at most one row, so every
// SM reads the same bytes). A producer warp copies the slice into a ring of 16 KB pieces in
// shared memory: the first ring-full before the kernel waits for its inputs, then each piece
// as soon as every consumer warp has released its slot. The copies hold the bytes in flight
// without registers, so a block keeps ~100 KB on the way, and the ring leaves room on the SM
// for the next kernel's block, which under PDL starts its own copies while this one drains.
// Consumer warps take rows whole (8, 16 or 32 lanes a row; one reduction per row, as in
// gemv_kernel) and read them from the ring.
//
// Measured on the H200 (benchmarks/int8_gemv_cuda.py, a CUDA graph of 200 calls, copy
// bandwidth ~4.0 TB/s): the copies alone (the math left out) stream a 2048x5632 int8 matrix
// at 81% of the copy bandwidth. With the math: 2048x5632 4.06-4.34 us (66-72%) and 5632x2048
// 4.36 us (66%) against gemv_kernel's 4.99 / 5.27 us; 32000x768 9.3 vs 16.3 us; 32000x288
// 6.1 vs 13.9 us; 2560x2048 3.2 vs 2.6 us (slower). Yet inside a decode step it is slower end
// to end (stories110M int8 3,417 vs 4,001 tok/s, 1B 1,160-1,173 vs 1,386-1,399), and asking
// every kernel for the same L1/shared split did not change that. Nor did one block per SM
// (a ring above half an SM's shared memory: 1B int8 1,140 vs 1,350 tok/s, stories110M 3,254
// vs 3,726), so two slices sharing an SM beside a neighbour is not the cause. A first version
// that spread 16-byte chunks over all threads and summed each warp's 32 chunks by row was bound
// by that reduction's instructions (9 us).
constexpr int kStreamWarps = 16;                          // consumer warps
constexpr int kStreamThreads = (kStreamWarps + 1) * 32;  // and one producer warp
constexpr int64_t kStreamMinBytes = 2 << 20;  // smaller matrices: gemv_kernel's lower fixed cost

// Where the streamed GEMV keeps what in its dynamic shared memory (byte offsets), for a block
// of at most rows_max rows; the same on the host (sizing) and on the device.
struct StreamLayout {
  size_t ring, scales, barriers, total;
};
template <typename T, typename W, typename S>
__host__ __device__ StreamLayout stream_layout(int M, int K, int group, int rows_max, int slots) {
  auto up = [](size_t v) { return (v + 127) / 128 * 128; };
  StreamLayout l;
  l.ring = up(gemv_smem_bytes<T, W>(M, K));  // act(x) first
  l.scales = l.ring + static_cast<size_t>(slots) * kPieceBytes;
  const size_t scale_bytes = sizeof(W) == 1 ? static_cast<size_t>(rows_max) * (K / group) * sizeof(S) : 0;
  l.barriers = up(l.scales + scale_bytes);
  l.total = l.barriers + 2 * static_cast<size_t>(slots) * sizeof(uint64_t);  // full, then empty
  return l;
}

// At most 60 registers a thread: two blocks fit on an SM (this one and the next kernel's).
template <typename T, typename W, typename S, Act kAct>
__global__ void __launch_bounds__(kStreamThreads, 2) gemv_stream_kernel(GemvArgs a) {
  extern __shared__ int4 dynamic_smem[];
  unsigned char* smem = reinterpret_cast<unsigned char*>(dynamic_smem);
  constexpr int E = 16 / sizeof(W);
  constexpr bool kQ8 = sizeof(W) == 1;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int chunks = a.K / E, slots = a.ring_slots;
  const int rows_max = (a.N + gridDim.x - 1) / gridDim.x;
  const StreamLayout lay = stream_layout<T, W, S>(a.M, a.K, a.group, rows_max, slots);
  const int r0 = static_cast<int>(static_cast<int64_t>(blockIdx.x) * a.N / gridDim.x);
  const int rows = static_cast<int>(static_cast<int64_t>(blockIdx.x + 1) * a.N / gridDim.x) - r0;
  const int slice_chunks = rows * chunks;  // the host keeps this below 2^30
  const int pieces = (slice_chunks + kPieceChunks - 1) / kPieceChunks;
  const int4* slice = reinterpret_cast<const int4*>(static_cast<const W*>(a.w) + static_cast<int64_t>(r0) * a.K);
  const int4* ring = reinterpret_cast<const int4*>(smem + lay.ring);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + lay.barriers);
  uint64_t* empty = full + slots;
  auto issue = [&](int p) {
    const int n = min(kPieceChunks, slice_chunks - p * kPieceChunks);
    bulk_copy(smem + lay.ring + static_cast<size_t>(p % slots) * kPieceBytes,
              slice + static_cast<int64_t>(p) * kPieceChunks, n * 16, &full[p % slots]);
  };
  // The weights and their scales before waiting: no kernel writes them.
  if (threadIdx.x == 0) {
    for (int s = 0; s < slots; ++s) {
      barrier_init(&full[s], 1);
      barrier_init(&empty[s], kStreamWarps);
    }
    fence_barrier_init();
  }
  __syncthreads();
  if (threadIdx.x == 0)
    for (int p = 0; p < min(pieces, slots); ++p) issue(p);
  const int groups = a.K / a.group;
  S* scales = reinterpret_cast<S*>(smem + lay.scales);
  if constexpr (kQ8) {
    const S* src = static_cast<const S*>(a.scales) + static_cast<int64_t>(r0) * groups;
    for (int i = threadIdx.x; i < rows * groups; i += blockDim.x) scales[i] = src[i];
  }
  wait_for_inputs();
  allow_next_launch();  // only after the wait: see attention_decode_kernel
  stage_activations<T, W, kAct>(a, smem);  // ends with __syncthreads: the scales are in too

  if (warp == kStreamWarps) {  // the producer: each further piece once its slot is released
    if (lane == 0)
      for (int p = slots; p < pieces; ++p) {
        barrier_wait(&empty[p % slots], (p / slots - 1) & 1);
        issue(p);
      }
    return;
  }
  // A consumer warp takes row_lanes lanes per row, 32 / row_lanes rows at a time (short rows:
  // several rows' loads and reductions overlap), the groups of rows warp, warp + kStreamWarps,
  // ... It walks the pieces in order: before a group it releases the pieces below the group,
  // each once it has landed (so that an arrival always counts for the piece its slot holds),
  // then waits for the pieces the group lies in. A group spans at most `slots` pieces (the
  // host checks), so the pieces of the lowest group all fit in the ring at once: its warp can
  // always go on, and the ring cannot deadlock.
  int released = 0;
  auto release_below = [&](int p_end) {
    __syncwarp();  // every lane's reads of those pieces are done
    for (; released < p_end; ++released) {
      barrier_wait(&full[released % slots], (released / slots) & 1);
      if (lane == 0) barrier_arrive(&empty[released % slots]);
    }
  };
  const int ring_chunks = slots * kPieceChunks;
  const int L = a.row_lanes, per_warp = 32 / L;
  const int sub = lane / L, col = lane % L;
  for (int first = warp * per_warp; first < rows; first += kStreamWarps * per_warp) {
    const int group_end = min(first + per_warp, rows);
    release_below(first * chunks / kPieceChunks);
    for (int p = first * chunks / kPieceChunks; p <= (group_end * chunks - 1) / kPieceChunks; ++p)
      barrier_wait(&full[p % slots], (p / slots) & 1);
    const int r = first + sub;
    const bool has_row = r < rows;
    float acc[kMaxRows];
#pragma unroll
    for (int m = 0; m < kMaxRows; ++m) acc[m] = 0.f;
    if (has_row) {
      int pos = (r * chunks + col) % ring_chunks;  // the chunk's place in the ring
      const S* row_scales = scales + r * groups;
      const float row_scale = kQ8 ? to_float(row_scales[0]) : 1.f;
      for (int c = col; c < chunks; c += L) {
        const int4 wv = ring[pos];
        const float ws = !kQ8 ? 1.f : groups == 1 ? row_scale : to_float(row_scales[c * E / a.group]);
#pragma unroll
        for (int m = 0; m < kMaxRows; ++m) {
          if (m >= a.M) break;
          acc[m] += chunk_dot<T, W>(wv, ws, smem, a.M, a.K, m, c);
        }
        pos += L;
        if (pos >= ring_chunks) pos -= ring_chunks;
      }
    }
#pragma unroll
    for (int m = 0; m < kMaxRows; ++m) {
      if (m >= a.M) break;
      float v = acc[m];
      for (int off = L / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffff, v, off);
      if (col == 0 && has_row) store_output<T>(a, m, r0 + r, v);
    }
  }
  release_below(pieces);
}

// Launches the streamed GEMV; false where it does not apply: before Hopper, small matrices,
// or a slice whose scales leave no room for a ring that holds a row and a piece.
template <typename T, typename W, typename S, Act kAct>
bool launch_gemv_stream(GemvArgs& a) {
  auto kernel = gemv_stream_kernel<T, W, S, kAct>;
  // Room for this block and one of the next kernel, less 1 KB per block the driver keeps.
  // (Measured: a budget above half the SM, one block per SM whatever the neighbours, gave
  // 4.30 / 4.32 us on 2048x5632 / 5632x2048 but 11.3 us on 11264x2048, and was as slow end
  // to end.)
  static const KernelRoom info =
      kernel_room(kernel, [](int optin, int fixed) { return optin / 2 - fixed - 1024; });
  const int64_t chunks = a.K / (16 / sizeof(W));
  if (!info.hopper || static_cast<int64_t>(a.N) * chunks * 16 < kStreamMinBytes) return false;
  const int blocks = std::min(info.sms, a.N);
  const int rows_max = (a.N + blocks - 1) / blocks;
  const int64_t slice_chunks = rows_max * chunks;
  if (slice_chunks >= (int64_t{1} << 30)) return false;
  const int64_t pieces = (slice_chunks + kPieceChunks - 1) / kPieceChunks;
  // Rows per warp at once: 1 while the slice has a row per warp, up to 4 (8 lanes a row).
  const int64_t rows_per_warp = (rows_max + kStreamWarps - 1) / kStreamWarps;
  a.row_lanes = rows_per_warp >= 3 ? 8 : rows_per_warp == 2 ? 16 : 32;
  const int64_t group_chunks = (32 / a.row_lanes) * chunks;
  const int64_t min_slots = std::min<int64_t>(pieces, (group_chunks + kPieceChunks - 1) / kPieceChunks + 1);
  const size_t fixed = stream_layout<T, W, S>(a.M, a.K, a.group, rows_max, 0).total;
  const size_t per_slot = kPieceBytes + 2 * sizeof(uint64_t);
  if (fixed + min_slots * per_slot > static_cast<size_t>(info.smem)) return false;
  a.ring_slots = static_cast<int>(std::min<int64_t>(pieces, (info.smem - fixed) / per_slot));
  const size_t smem = stream_layout<T, W, S>(a.M, a.K, a.group, rows_max, a.ring_slots).total;
  launch(kernel, dim3(blocks), dim3(kStreamThreads), smem, a);
  return true;
}

// ------------------------------------------------------------------ row-buffer GEMV
//
// gemv_kernel's product for one row of 16-bit x against int8 rows with one scale each (the
// decode GEMVs of an int8 artifact), with each warp's rows copied into shared memory by
// cp.async instead of loaded into registers. The bytes in flight then hold no registers, so a
// call's whole grid fits in half the device, and under PDL the next kernel's grid is resident
// and issues all its copies while this one drains. (gemv_kernel's registers hold ~60% of an
// 11.5 MB call; the rest of the next call's blocks start only as this call's blocks leave.)
//
// Measured on the H200 (benchmarks/int8_gemv_cuda.py, then babyrt bench --no-peers): 2048x5632
// 4.00 us and 5632x2048 4.03 us (71% of copy) against gemv_kernel's 4.24 and 4.17; int8 decode
// end to end stories15M 9,750 -> 11,716-11,930 tok/s, stories110M 4,414 -> 4,960-5,021, 1B
// 1,422 -> 1,434-1,440. Over bf16 rows (twice the bytes) it was slower on all but stories15M
// (stories110M 4,123 -> 3,410 tok/s, 2304x768 2.15 -> 2.76 us), so float weights stay on
// gemv_kernel. BABYRT_GEMV=regs turns it off.
//
// kPair: ffn_block's w13 (GemvArgs::pair_half; at an even number of rows a warp, so that a warp
// holds whole pairs of gate and up rows, and writes silu(gate) * up). On gemv_kernel, which the
// pairs took at first, 1B int8's w13 cost 10.4 us a layer against 8.3 for the row-buffer
// rmsnorm_linear before it (the by-role profile, H200).
constexpr int kRowbufMaxRows = 4;  // rows a warp takes at most

// Where the warps' row buffers start in the dynamic shared memory: after act(x).
template <typename T>
__host__ __device__ constexpr size_t rowbuf_offset(int K) {
  return (gemv_smem_bytes<T, int8_t>(1, K) + 127) / 128 * 128;
}

template <typename T, typename S, Act kAct, bool kPair = false>
__global__ void __launch_bounds__(kWarps * 32, 4) gemv_rowbuf_kernel(GemvArgs a) {
  extern __shared__ int4 staged[];
  unsigned char* smem = reinterpret_cast<unsigned char*>(staged);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int chunks = a.K / 16, R = a.rows_per_warp;
  const int n0 = (blockIdx.x * kWarps + warp) * R;  // the warp's rows: n0 .. n0 + R - 1
  int4* rows = reinterpret_cast<int4*>(smem + rowbuf_offset<T>(a.K)) + static_cast<size_t>(warp) * R * chunks;
  // The warp's rows and scales before waiting: no kernel writes them. A lane copies the chunks
  // it later reads (lane, lane + 32, ...), so it needs only its own copies complete.
  const uint64_t policy = evict_first_policy();
  for (int r = 0; r < R && n0 + r < a.N; ++r) {
    const int4* src = reinterpret_cast<const int4*>(static_cast<const int8_t*>(a.w) + weight_row<kPair>(a, n0 + r) * a.K);
    for (int c = lane; c < chunks; c += 32) cp_async16(rows + r * chunks + c, src + c, policy);
  }
  // Lane r holds row r's scale.
  const float scale = lane < R && n0 + lane < a.N ? to_float(static_cast<const S*>(a.scales)[weight_row<kPair>(a, n0 + lane)]) : 0.f;
  if (a.trigger_early) allow_next_launch();  // see attention_block_cuda
  wait_for_inputs();
  if (!a.trigger_early) allow_next_launch();  // only after the wait: see attention_decode_kernel
  // Lane r holds row r's residual (see early_residual).
  const float res = lane < R ? early_residual<T>(a, 0, n0 + lane) : 0.f;
  stage_block<T, int8_t, kAct>(a, smem);
  cp_async_wait_all();
  float gate = 0.f;  // kPair: the last even row's sum
  for (int r = 0; r < R && n0 + r < a.N; ++r) {
    const float row_scale = __shfl_sync(0xffffffff, scale, r);
    float v = 0.f;
    for (int c = lane; c < chunks; c += 32) v += chunk_dot<T, int8_t>(rows[r * chunks + c], row_scale, smem, 1, a.K, 0, c);
    for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffff, v, off);
    const float row_res = __shfl_sync(0xffffffff, res, r);
    if constexpr (kPair) {  // n0 is even (R is): an even r is a gate, the next row its up
      if (r % 2 == 0)
        gate = v;
      else if (lane == 0)
        store_swiglu<T>(a, 0, (n0 + r) >> 1, gate, v);
    } else if (lane == 0) {
      store_output<T>(a, 0, n0 + r, v, true, row_res);
    }
  }
}

// Launches the row-buffer GEMV; false where it does not fit (nothing run). A warp takes one row
// where two calls' grids then fit at once, else two rows where one grid fits. Measured on the
// H200 (benchmarks/int8_gemv_cuda.py): 5632x2048 4.02 us at two rows a warp (352 blocks, one
// grid fits), 4.18 at three (two grids fit), 4.15 at four; 2048x5632 3.92-3.98 at one or two,
// 4.45 at four; 64x256 1.26 at one, 1.56 at two. Rows of 2,048 bytes and longer also take three
// or four rows a warp where only that fits one grid (1B's 11264x2048 w13 and 32000x2048
// classifier: 1B int8 1,428 -> 1,484 tok/s; stories110M's 32000x768 classifier was 1% slower, so
// shorter rows stay on gemv_kernel). BABYRT_ROWBUF_ROWS=R (to measure) asks for R rows a warp
// (up to kRowbufMaxRows) wherever one grid fits. kPair: 2 rows a warp where one grid fits, else
// 4 (an even count: whole pairs), or BABYRT_ROWBUF_ROWS where it is even.
template <typename T, typename S, Act kAct, bool kPair = false>
bool launch_gemv_rowbuf(GemvArgs a) {
  auto kernel = gemv_rowbuf_kernel<T, S, kAct, kPair>;
  static const KernelRoom room = kernel_room(kernel, [](int optin, int fixed) { return optin - fixed; });
  static const int forced = std::min(env_count("BABYRT_ROWBUF_ROWS"), kRowbufMaxRows);
  const bool tall = a.K >= 2048;
  auto smem_of = [&](int R) { return rowbuf_offset<T>(a.K) + static_cast<size_t>(kWarps) * R * a.K; };
  // Blocks at R rows a warp, if `grids` of them fit on the device at once (else 0).
  auto fitting_blocks = [&](int R, int grids) -> int64_t {
    const size_t smem = smem_of(R);
    if (smem > static_cast<size_t>(room.smem)) return 0;
    const int per_sm = blocks_per_sm(reinterpret_cast<const void*>(kernel), kWarps * 32, smem);
    const int64_t blocks = (a.N + kWarps * R - 1) / (kWarps * R);
    return grids * blocks <= static_cast<int64_t>(per_sm) * room.sms ? blocks : 0;
  };
  int R = forced;
  int64_t blocks = 0;
  if (kPair) {
    if (forced && forced % 2 == 0)
      blocks = fitting_blocks(forced, 1);
    else if ((blocks = fitting_blocks(R = 2, 1)) == 0)
      blocks = fitting_blocks(R = 4, 1);
  } else if (forced)
    blocks = fitting_blocks(forced, 1);
  else if ((blocks = fitting_blocks(1, 2)) > 0)
    R = 1;
  else if ((blocks = fitting_blocks(2, 1)) > 0)
    R = 2;
  else if (tall && (blocks = fitting_blocks(3, 1)) > 0)
    R = 3;
  else if (tall && (blocks = fitting_blocks(4, 1)) > 0)
    R = 4;
  if (blocks == 0) return false;
  a.rows_per_warp = R;
  launch(kernel, dim3(blocks), dim3(kWarps * 32), smem_of(R), a);
  return true;
}

// Launches one GEMV instance over a grid sized to what fits on the device at once, so that
// act(x) is staged once per resident block and every warp takes the same number of rows.
// one_round: only where every warp then has a single group of rows (else false, nothing run).
template <typename T, typename W, typename S, Act kAct, int kB, bool kRowScale = false, bool kPair = false>
bool launch_gemv_grid(GemvArgs a, bool one_round) {
  auto kernel = gemv_kernel<T, W, S, kAct, kB, kRowScale, kPair>;
  const size_t smem = gemv_smem_bytes<T, W>(a.M, a.K);
  // The dynamic shared memory a block may take: the device's opt-in limit less the kernel's
  // static shared memory (set once per kernel; the default limit is 48 KB).
  static const KernelRoom room = kernel_room(kernel, [](int optin, int fixed) { return optin - fixed; });
  if (smem > static_cast<size_t>(room.smem) / 2) return false;  // two blocks per SM at least
  const int per_sm = blocks_per_sm(reinterpret_cast<const void*>(kernel), kWarps * 32, smem);
  // As many blocks as fit at once. Capping them at 2 or 1 per SM, so that the next kernel's
  // blocks could start early under PDL, was slower on the H200 (fifth session; again in the
  // seventeenth at 2 an SM: stories110M bf16 4,458 -> 4,338 tok/s, 1B 1,131 -> 994).
  const int64_t resident = static_cast<int64_t>(std::max(per_sm, 1)) * room.sms;
  const int chunks = a.K / (16 / static_cast<int>(sizeof(W)));
  // Blocks if each warp took one group of 32 / lanes rows, and the groups each warp then takes.
  auto row_groups = [&](int lanes) { return (a.N + kWarps * (32 / lanes) - 1) / (kWarps * (32 / lanes)); };
  auto rows_per_warp = [&](int lanes) { return (row_groups(lanes) + resident - 1) / resident; };
  // Fewer lanes a row (down to 4) while a warp has more than one group of rows to take and
  // half the lanes still cover a row in one batch.
  a.row_lanes = 32;
  // A grid that fits at once keeps 32 lanes a row, though short rows then leave most of a
  // lane's kB chunk slots empty (stories110M's 768-wide bf16 rows: 3 of 8). As few lanes as
  // cover a row in one batch (its QKV in 144 blocks, not 288) was no faster (H200, seventeenth
  // session: stories110M bf16 4,458 -> 4,363 tok/s, int8 5,714 -> 5,774, 1B unchanged).
  while (a.row_lanes > 4 && rows_per_warp(a.row_lanes) > 1 && chunks <= (a.row_lanes / 2) * kB)
    a.row_lanes /= 2;
  if (kPair && a.row_lanes > 16) a.row_lanes = 16;  // a group of rows holds a whole pair
  a.rows_per_warp = static_cast<int>(rows_per_warp(a.row_lanes));
  if (one_round && a.rows_per_warp > 1) return false;
  if constexpr (sizeof(W) == 1 && !kRowScale && kB == kBatch) {
    // Per-channel int8 rows that take a warp more than one round trip to HBM: one scale load a
    // batch, not kB (H200: 2048x5632 5.30 -> 4.96 us, 11264x2048 7.74 -> 7.42). Rows of one
    // round trip were 3-4% slower with it (5632x2048 4.15 -> 4.28 us), so they keep a scale a chunk.
    if (a.group == a.K && (a.rows_per_warp > 1 || chunks > a.row_lanes * kB))
      return launch_gemv_grid<T, W, S, kAct, kB, true, kPair>(a, one_round);
  }
  const int64_t blocks = (row_groups(a.row_lanes) + a.rows_per_warp - 1) / a.rows_per_warp;
  launch(kernel, dim3(blocks), dim3(kWarps * 32), smem, a);
  return true;
}

template <typename T, typename W, typename S, Act kAct>
bool launch_gemv(GemvArgs a) {
  // BABYRT_GEMV=stream: the streamed kernel where it applies (int8 from 2 MB, Hopper). Not the
  // default: faster alone, slower inside a decode step (see the comment above it).
  // BABYRT_GEMV=wide (opt-in; no faster end to end): int8 rows of 9 to 16 chunks a lane (K
  // 4,097 to 8,192) take 16 chunks a lane at 2 blocks an SM where that gives every warp one
  // row: 2048x5632 in 4.81-5.04 us, against 5.29 at 8 chunks a lane (two round trips).
  // BABYRT_GEMV=regs: gemv_kernel where the row-buffer kernel would run (to measure it).
  static const bool stream = env_is("BABYRT_GEMV", "stream");
  static const bool wide = env_is("BABYRT_GEMV", "wide");
  static const bool regs = env_is("BABYRT_GEMV", "regs");
  static const bool small = env_is("BABYRT_GEMV", "small");
  if constexpr (sizeof(W) == sizeof(T) && sizeof(T) == 2) {
    const int chunks = a.K / (16 / sizeof(W));  // 16-byte chunks a row
    if (small && !a.pair_half && a.M == 1 && chunks <= 32 * kSmallBatch &&
        launch_gemv_grid<T, W, S, kAct, kSmallBatch>(a, true))
      return true;
  }
  if (a.pair_half) {  // pairs: RMSNorm only (try_gemv checks); the row buffer as below
    if constexpr (kAct == Act::kRmsNorm) {
      if constexpr (sizeof(W) == 1 && sizeof(T) == 2)
        if (!regs && a.M == 1 && a.group == a.K && launch_gemv_rowbuf<T, S, kAct, true>(a)) return true;
      return launch_gemv_grid<T, W, S, kAct, kBatch, false, true>(a, false);
    }
    return false;
  }
  if constexpr (sizeof(W) == 1) {
    // int8 weights only: with float weights (twice the chunks a row) the consumers' math did
    // not keep up (H200: bf16 2048x5632 9.35 vs gemv_kernel's 7.97 us).
    if (stream && launch_gemv_stream<T, W, S, kAct>(a)) return true;
    if constexpr (sizeof(T) == 2) {
      const int chunks = a.K / 16;
      if (wide && a.M == 1 && chunks > 32 * kBatch && chunks <= 64 * kBatch &&
          launch_gemv_grid<T, W, S, kAct, 2 * kBatch>(a, true))
        return true;
      // One row of x against per-channel rows: the row-buffer kernel where its grid fits.
      if (!regs && a.M == 1 && a.group == a.K && launch_gemv_rowbuf<T, S, kAct>(a)) return true;
      // Where it does not (or with BABYRT_GEMV=regs): per-channel rows of 257 to 384 chunks,
      // one row of x, take kLongRowBatch chunks a lane. 2048x5632 (H200): 4.25 us (69% of
      // copy) against 5.30 at 8 chunks a lane (two round trips a warp) and 4.81 wide (one round
      // trip at 2 blocks an SM).
      if (a.M == 1 && a.group == a.K && chunks > 32 * kBatch && chunks <= 32 * kLongRowBatch &&
          launch_gemv_grid<T, W, S, kAct, kLongRowBatch, true>(a, true))
        return true;
    }
  }
  return launch_gemv_grid<T, W, S, kAct, kBatch>(a, false);
}

// Runs the GEMV kernel when it covers the call; false otherwise (the caller falls back).
// x: [M, K] (or [M, 2K] for SwiGLU), contiguous.
// pair_half (ffn_block's w13, RMSNorm only): hidden, where W stacks gate on up rows and y is
// [M, hidden] of silu(gate) * up (GemvArgs::pair_half).
bool try_gemv(Act act, const at::Tensor& x, const at::Tensor& w, const OptTensor& scales,
              const at::Tensor* norm, double eps, const OptTensor& residual, at::Tensor& y,
              int64_t pair_half = 0, bool trigger_early = false) {
  const int64_t K = w.size(1), N = w.size(0), y_cols = pair_half ? pair_half : N;
  const int64_t M = x.numel() / x.size(-1);
  if (M < 1 || M > kMaxGemvRows || N == 0 || K == 0 || K >= (int64_t{1} << 30) ||
      N >= (int64_t{1} << 30) || !x.is_contiguous() || !w.is_contiguous() || !aligned16(x) ||
      !aligned16(w))
    return false;
  const auto T = x.scalar_type();
  if (T != at::kFloat && T != at::kHalf && T != at::kBFloat16) return false;
  const bool q8 = scales.has_value();
  int64_t group = K;
  if (q8) {
    if (!scales->is_contiguous() ||
        (scales->scalar_type() != at::kFloat && scales->scalar_type() != at::kBFloat16))
      return false;
    group = K / scales->size(1);
    if (group % 16) return false;
  } else if (w.scalar_type() != T) {
    return false;
  }
  // Whole groups of 16 values (the staging and int8 unit; also whole 16-byte chunks).
  if (K % 16) return false;
  if (norm && (norm->scalar_type() != T || !norm->is_contiguous() || !aligned16(*norm))) return false;
  if (residual && (!residual->is_contiguous() || residual->scalar_type() != T)) return false;
  if (pair_half && (act != Act::kRmsNorm || residual || 2 * pair_half != N || y.scalar_type() != T))
    return false;

  const c10::cuda::CUDAGuard guard(x.device());
  bool launched = false;
  // kMaxRows rows of x (and of y and the residual) a launch. The first launch takes the most
  // shared memory: if it runs, the others do.
  for (int64_t m0 = 0; m0 < M && (m0 == 0 || launched); m0 += kMaxRows) {
    const int64_t rows = std::min<int64_t>(kMaxRows, M - m0);
    const GemvArgs a{
        w.const_data_ptr(), q8 ? scales->const_data_ptr() : nullptr,
        static_cast<const char*>(x.const_data_ptr()) + m0 * x.size(-1) * x.element_size(),
        norm ? norm->const_data_ptr() : nullptr,
        residual ? static_cast<const char*>(residual->const_data_ptr()) + m0 * N * residual->element_size()
                 : nullptr,
        static_cast<char*>(y.mutable_data_ptr()) + m0 * y_cols * y.element_size(),
        static_cast<float>(eps), static_cast<int>(rows), static_cast<int>(N),
        static_cast<int>(K), static_cast<int>(group), 1, 0, 32,
        y.scalar_type() == at::kFloat && T != at::kFloat, static_cast<int>(pair_half), trigger_early};
    dispatch_float(T, [&](auto ttag) {
      using CT = decltype(ttag);
      auto run = [&](auto wtag, auto stag) {
        using WT = decltype(wtag);
        using ST = decltype(stag);
        switch (act) {
          case Act::kNone: launched = launch_gemv<CT, WT, ST, Act::kNone>(a); break;
          case Act::kRmsNorm: launched = launch_gemv<CT, WT, ST, Act::kRmsNorm>(a); break;
          case Act::kSwiGlu: launched = launch_gemv<CT, WT, ST, Act::kSwiGlu>(a); break;
        }
      };
      dispatch_weights<CT>(scales, run);
    });
  }
  return launched;
}

at::Tensor new_output(const at::Tensor& x, int64_t last, std::optional<at::ScalarType> dtype = {}) {
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = last;
  return at::empty(shape, x.options().dtype(dtype.value_or(x.scalar_type())));
}

// trigger_early: see GemvArgs::trigger_early.
at::Tensor linear_launch(const at::Tensor& x, const at::Tensor& w, const OptTensor& scales,
                         const OptTensor& residual, bool trigger_early) {
  check_linear(x, w, scales, residual);
  at::Tensor y = new_output(x, w.size(0));
  if (x.numel() && try_gemv(Act::kNone, x, w, scales, nullptr, 0, residual, y, 0, trigger_early)) return y;
  return linear_reference(x, w, scales, residual);
}

at::Tensor linear_cuda(const at::Tensor& x, const at::Tensor& w, const OptTensor& scales,
                       const OptTensor& residual) {
  return linear_launch(x, w, scales, residual, false);
}

at::Tensor rmsnorm_linear_cuda(const at::Tensor& x, const at::Tensor& norm_weight, double eps,
                               const at::Tensor& w, const OptTensor& scales,
                               std::optional<at::ScalarType> out_dtype) {
  check_linear(x, w, scales, std::nullopt);
  check_norm(x, norm_weight);
  // The kernel writes x's dtype, or fp32 (the classifier's logits) without a cast kernel.
  const auto dt = out_dtype.value_or(x.scalar_type());
  if (dt == x.scalar_type() || dt == at::kFloat) {
    at::Tensor y = new_output(x, w.size(0), dt);
    if (x.numel() && try_gemv(Act::kRmsNorm, x, w, scales, &norm_weight, eps, std::nullopt, y))
      return y;
  }
  return rmsnorm_linear_reference(x, norm_weight, eps, w, scales, out_dtype);
}

at::Tensor swiglu_linear_cuda(const at::Tensor& gate_up, const at::Tensor& w,
                              const OptTensor& scales, const OptTensor& residual) {
  TORCH_CHECK(gate_up.dim() >= 1 && gate_up.size(-1) == 2 * w.size(1),
              "swiglu_linear: gate_up's last dimension must be twice the weight's input size");
  at::Tensor y = new_output(gate_up, w.size(0));
  if (gate_up.numel() && (!residual || residual->sizes() == y.sizes()) &&
      try_gemv(Act::kSwiGlu, gate_up, w, scales, nullptr, 0, residual, y))
    return y;
  return swiglu_linear_reference(gate_up, w, scales, residual);
}

// ffn_block: the w13 GEMV computes each gate and up row in the same warp and writes
// silu(gate) * up, so that the w2 GEMV stages a plain row of x and SwiGLU is computed once a
// step, not once a w2 block (H200, bf16 / int8 tok/s: stories110M 4,230 / 5,284 -> 4,487 /
// 5,637; 1B 1,062 / 1,579 -> 1,132 / 1,725; then int8 pairs on the row-buffer kernel: 5,774,
// 1,807). BABYRT_FFN_FUSED=0, and calls the kernels do not cover (more than kMaxRows rows), run
// the two ops instead.
at::Tensor ffn_block_cuda(const at::Tensor& x, const at::Tensor& norm_weight, double eps,
                          const at::Tensor& w13, const OptTensor& w13_scales, const at::Tensor& w2,
                          const OptTensor& w2_scales) {
  check_ffn_block(x, norm_weight, w13, w13_scales, w2, w2_scales);
  static const bool fused = !env_is("BABYRT_FFN_FUSED", "0");
  // BABYRT_FFN_EARLY=1 (opt-in): both GEMVs let the next kernel launch before their own PDL
  // wait, as attention_block's wo GEMV does. Safe as the wo GEMV's is: what follows either is a
  // GEMV (w2; the next layer's QKV GEMV or the classifier), which reads only weights before its
  // wait. Slower (H200, nineteenth session, bf16 / int8 tok/s): stories110M 4,578-4,587 /
  // 5,933-5,963 -> 4,313 / 5,961, 1B 1,121-1,125 / 1,866-1,873 -> 1,098 / 1,818.
  static const bool early = env_is("BABYRT_FFN_EARLY", "1");
  const int64_t hidden = w13.size(0) / 2;
  if (fused && x.numel() && x.numel() / x.size(-1) <= kMaxRows) {
    at::Tensor h = new_output(x, hidden);
    if (try_gemv(Act::kRmsNorm, x, w13, w13_scales, &norm_weight, eps, std::nullopt, h, hidden, early)) {
      at::Tensor y = new_output(x, w2.size(0));
      if (try_gemv(Act::kNone, h, w2, w2_scales, nullptr, 0, x, y, 0, early)) return y;
      return linear_reference(h, w2, w2_scales, x);
    }
  }
  return ffn_block_unfused(x, norm_weight, eps, w13, w13_scales, w2, w2_scales);
}

// ------------------------------------------------------------------ attention at decode
// The K and V rows of sequence b's slots 0..p-1 (kv head kvh) into shared memory at rows, by
// cp.async: K rows a.k_stride apart, then a.early_slots K rows further the V rows (D apart).
// Returns rows, or null where the slots do not fit (attend then reads the cache).
template <typename T>
__device__ T* copy_early_rows(const AttnArgs& a, int b, int kvh, int64_t p, T* rows) {
  constexpr int E = 16 / sizeof(T);
  if (p < 0 || p >= a.S || p >= a.early_slots) return nullptr;
  const int64_t off = (static_cast<int64_t>(b) * a.KV + kvh) * a.S * a.D;
  const int4* k_src = reinterpret_cast<const int4*>(static_cast<const T*>(a.k_cache) + off);
  const int4* v_src = reinterpret_cast<const int4*>(static_cast<const T*>(a.v_cache) + off);
  int4* k_dst = reinterpret_cast<int4*>(rows);
  int4* v_dst = reinterpret_cast<int4*>(rows + static_cast<int64_t>(a.early_slots) * a.k_stride);
  const int n = static_cast<int>(p * a.D / E);  // 16-byte chunks of slots 0..p-1
  const int vecs = a.D / E, k_vecs = a.k_stride / E;
  for (int i = threadIdx.x; i < n; i += kAttnThreads) {
    cp_async16(k_dst + (i / vecs) * k_vecs + i % vecs, k_src + i);
    cp_async16(v_dst + i, v_src + i);
  }
  return rows;
}

// One block per (head, sequence).
//
// Attention at decode is a chain of round trips to L2 (q, k and v; K rows; V rows; ~5 us
// whatever the context), but the K and V rows of the slots before the position were written by
// earlier steps. So before its PDL wait the block copies them into shared memory (cp.async), and
// after the wait only q, k and v are read from L2 (H200: stories15M 8,900 -> 9,460 tok/s,
// stories110M 3,456 -> 3,960). Reading the position and the cache before the wait is safe only
// because the GEMV before it (the QKV projection) lets this kernel launch after its own wait
// (only attention_block's wo GEMV launches its successor early, and that is never attention):
// by then every kernel before that GEMV has finished, the previous step's
// sampler (which wrote the position) and attention (which wrote the last slot) included. Any
// other kernel before this one (cuBLAS, a copy) does not trigger early launches at all.
//
// At most 80 registers (3 blocks an SM in the bounds; no spills), as many as the kernel held
// before the one-pass attend_slots, which takes 104 unbounded: a block of 256 threads then
// still fits beside two of a bf16 GEMV's blocks. (Measured with the bound only.)
template <typename T>
__global__ void __launch_bounds__(kAttnThreads, 3) attention_decode_kernel(AttnArgs a) {
  extern __shared__ float smem[];  // see attend_smem_bytes, then the early rows
  const int b = blockIdx.y, kvh = blockIdx.x / (a.H / a.KV);
  const int64_t p = __ldcg(a.positions + b);
  T* rows = copy_early_rows<T>(
      a, b, kvh, p, reinterpret_cast<T*>(reinterpret_cast<char*>(smem) + early_rows_offset(a.D)));
  // This thread's pair of the RoPE row too (the tables never change), so that after the wait
  // the position, q, k and v come in one round trip to L2 and nothing waits on the position.
  EarlyReads early{p, false, 0.f, 0.f};
  const int half = a.D / 2;
  if (a.cos && p >= 0 && p < a.P && threadIdx.x < half)
    early = EarlyReads{p, true, a.cos[p * half + threadIdx.x], a.sin[p * half + threadIdx.x]};
  if (!a.trigger_late) allow_next_launch();
  wait_for_inputs();
  if (a.trigger_late) allow_next_launch();
  cp_async_wait_all();  // attend's first sync publishes all the copies
  // Defensive: if the position moved since these reads (a caller that breaks the launch order
  // above), attend reads the cache and the tables instead.
  attend<T, kAttnThreads, WholeBlock, true>(a, blockIdx.x, b, smem, rows, nullptr, early);
}

// ------------------------------------------------------------------ attention, then wo
// attention_linear at decode (one token per sequence), opt-in (BABYRT_ATTN_LINEAR=1):
// linear(attention(qkv), W, residual) in one kernel, where attention and the wo GEMV take two,
// and a kernel boundary costs a decode step ~2-3 us whatever its bytes. A cluster of H blocks,
// one per head, computes every head's output (attend, as attention_decode_kernel does, early
// K/V copy included); after a cluster barrier each block gathers all H outputs from its peers'
// shared memory and takes its own rows of W, which it copied into shared memory before the
// PDL wait. Several clusters per sequence split W's rows between them, so that W is read by as
// many SMs as there are; each cluster recomputes the heads (attention reads a few KB of cache
// per head, copied early).
// The output rows are exact dot products over all of K, one warp a row: no partial sums
// cross blocks, so the result is the same bits every run.
//
// Measured on the H200, it is slower than the two kernels (thirteenth session). Alone after the
// QKV GEMV (benchmarks/attention_cuda.py, QKV + attention + wo): stories110M 9.26 vs 9.18 us at
// position 16, 12.26 vs 11.81 at 272; stories15M 7.67 vs 8.09 at 16, 9.88 vs 8.85 at 272. End to
// end (babyrt bench --no-peers, bf16 / int8 tok/s): stories110M 3,867 / 4,299 against 4,162 /
// 5,010, stories15M 9,714 / 10,337 against 10,192 / 11,772. Fewer clusters (1, 2 or 4,
// BABYRT_ATTN_LINEAR_CLUSTERS) were slower still. Likely causes, not yet separated: each
// cluster copies every head's K/V rows again (132 blocks, not 12), a cluster must find H free
// block slots in one GPC at once, and its blocks' ~110 KB of shared memory leave the next GEMV
// no room to start early.
struct AttnLinearArgs {
  const void* w;         // [N, K], T or int8
  const void* scales;    // [N, K / group] (int8 only)
  const void* residual;  // [B, 1, N]
  void* y;               // [B, 1, N]
  int N, K, group, rows_per_block;
  int y_own, y_all, w_rows, w_scales, res, early;  // byte offsets in dynamic shared memory
};

template <typename T, typename W, typename S>
__global__ void __launch_bounds__(kAttnThreads) attention_linear_kernel(AttnArgs a, AttnLinearArgs l) {
  extern __shared__ float smem[];  // attend's, y_own, y_all, W's rows, scales and residuals, early rows
  constexpr int EW = 16 / sizeof(W);  // weights per 16-byte chunk
  unsigned char* base = reinterpret_cast<unsigned char*>(smem);
  const int h = blockIdx.x % a.H, b = blockIdx.y, kvh = h / (a.H / a.KV);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int r0 = (blockIdx.x / a.H * a.H + h) * l.rows_per_block;
  const int rows = max(0, min(l.rows_per_block, l.N - r0));
  const int row_chunks = l.K / EW, groups = l.K / l.group;
  // This block's rows of W and their scales: no kernel writes them, so they load before the wait.
  int4* w_rows = reinterpret_cast<int4*>(base + l.w_rows);
  const int4* w_src = reinterpret_cast<const int4*>(static_cast<const W*>(l.w) + static_cast<int64_t>(r0) * l.K);
  const uint64_t policy = evict_first_policy();  // read once a step
  for (int i = threadIdx.x; i < rows * row_chunks; i += kAttnThreads) cp_async16(w_rows + i, w_src + i, policy);
  S* w_scales = reinterpret_cast<S*>(base + l.w_scales);
  if constexpr (sizeof(W) == 1)
    for (int i = threadIdx.x; i < rows * groups; i += kAttnThreads)
      w_scales[i] = static_cast<const S*>(l.scales)[static_cast<int64_t>(r0) * groups + i];
  // The residual rows too: the kernels that wrote them ran before the QKV GEMV, which lets this
  // kernel launch only after its own wait (see attention_decode_kernel).
  float* res = reinterpret_cast<float*>(base + l.res);
  const int64_t out0 = static_cast<int64_t>(b) * l.N + r0;
  for (int i = threadIdx.x; i < rows; i += kAttnThreads)
    res[i] = to_float(__ldcg(static_cast<const T*>(l.residual) + out0 + i));
  const int64_t p = __ldcg(a.positions + b);
  T* kv_rows = copy_early_rows<T>(a, b, kvh, p, reinterpret_cast<T*>(base + l.early));
  allow_next_launch();
  wait_for_inputs();
  cp_async_wait_all();  // attend's first sync publishes all the copies
  float* y_own = reinterpret_cast<float*>(base + l.y_own);
  attend<T, kAttnThreads, WholeBlock, true>(a, h, b, smem, kv_rows, y_own, EarlyReads{p, false, 0.f, 0.f});
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();  // every head's output is in its block's shared memory
  float* y_all = reinterpret_cast<float*>(base + l.y_all);
  for (int i = threadIdx.x; i < l.K; i += kAttnThreads)
    y_all[i] = cluster.map_shared_rank(y_own, i / a.D)[i % a.D];
  cluster.sync();  // y_all is whole here, and no block leaves while a peer still reads it
  for (int r = warp; r < rows; r += kAttnThreads / 32) {
    float v = 0.f;
    for (int c = lane; c < row_chunks; c += 32) {
      const int4 chunk = w_rows[r * row_chunks + c];
      const W* wv = reinterpret_cast<const W*>(&chunk);
      const float4* yv = reinterpret_cast<const float4*>(y_all + c * EW);
      float dot = 0.f;
#pragma unroll
      for (int e = 0; e < EW / 4; ++e) {
        const float4 y4 = yv[e];
        dot += to_float(wv[4 * e]) * y4.x + to_float(wv[4 * e + 1]) * y4.y +
               to_float(wv[4 * e + 2]) * y4.z + to_float(wv[4 * e + 3]) * y4.w;
      }
      if constexpr (sizeof(W) == 1) dot *= to_float(w_scales[r * groups + c * EW / l.group]);
      v += dot;
    }
    for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffff, v, off);
    if (lane == 0) static_cast<T*>(l.y)[out0 + r] = from_float<T>(round_to<T>(v) + res[r]);
  }
#endif
}

// ------------------------------------------------------------------ attention at prefill
// Several tokens per sequence: RoPE on q and k of every token, k and v into the cache at the
// token's position, q (rotated) into a.out as [B, T, H, D]; at::scaled_dot_product_attention
// then attends over the cache. One block per token. (The decode kernel cannot take these: a
// token would read slots that the same launch's other tokens are writing.) The roundings are
// the decode kernel's.
template <typename T>
__global__ void __launch_bounds__(128) rope_cache_write_kernel(AttnArgs a, int tokens) {
  wait_for_inputs();
  const int64_t bt = blockIdx.x, b = bt / tokens, p = a.positions[bt];
  const int D = a.D, half = D / 2;
  const bool ok = p >= 0 && p < a.S && (!a.cos || p < a.P);  // the runtime never asks otherwise
  const T* row = static_cast<const T*>(a.qkv) + bt * (a.H + 2 * a.KV) * D;
  T* q = static_cast<T*>(a.out) + bt * a.H * D;
  auto slot = [&](void* cache, int kvh) {
    return static_cast<T*>(cache) + ((b * a.KV + kvh) * a.S + p) * D;
  };
  for (int i = threadIdx.x; i < (a.H + a.KV) * half; i += blockDim.x) {
    const int head = i / half, j = i % half;
    const float x0 = to_float(row[head * D + 2 * j]), x1 = to_float(row[head * D + 2 * j + 1]);
    float y0 = x0, y1 = x1;
    if (a.cos && ok) {
      const float c = a.cos[p * half + j], s = a.sin[p * half + j];
      y0 = x0 * c - x1 * s;
      y1 = x0 * s + x1 * c;
    }
    T* dst = head < a.H ? q + head * D : ok ? slot(a.k_cache, head - a.H) : nullptr;
    if (dst) dst[2 * j] = from_float<T>(y0), dst[2 * j + 1] = from_float<T>(y1);
  }
  if (ok)
    for (int i = threadIdx.x; i < a.KV * D; i += blockDim.x)
      slot(a.v_cache, i / D)[i % D] = row[(a.H + a.KV) * D + i];
}

at::Tensor attention_prefill_cuda(const at::Tensor& qkv, const at::Tensor& positions,
                                  const OptTensor& cos, const OptTensor& sin, at::Tensor& k_cache,
                                  at::Tensor& v_cache, int64_t H, int64_t KV) {
  const int64_t B = qkv.size(0), T = qkv.size(1), D = k_cache.size(3), S = k_cache.size(2);
  at::Tensor q = at::empty({B, T, H, D}, qkv.options());
  const c10::cuda::CUDAGuard guard(qkv.device());
  dispatch_float(qkv.scalar_type(), [&](auto ttag) {
    using CT = decltype(ttag);
    AttnArgs a{qkv.const_data_ptr(), positions.const_data_ptr<int64_t>(),
               cos ? cos->const_data_ptr<float>() : nullptr,
               sin ? sin->const_data_ptr<float>() : nullptr, k_cache.mutable_data_ptr(),
               v_cache.mutable_data_ptr(), q.mutable_data_ptr(), static_cast<int>(H),
               static_cast<int>(KV), static_cast<int>(D), static_cast<int>(S),
               cos ? static_cast<int>(cos->size(0)) : 0, 0};
    launch(rope_cache_write_kernel<CT>, dim3(B * T), dim3(128), 0, a, static_cast<int>(T));
  });
  // Slots up to each token's position; grouped heads share their kv head (no repeated cache).
  const at::Tensor mask =
      at::arange(S, positions.options()).view({1, 1, 1, S}) <= positions.view({B, 1, T, 1});
  const at::Tensor y = at::scaled_dot_product_attention(q.transpose(1, 2), k_cache, v_cache, mask,
                                                        0.0, false, std::nullopt, H != KV);
  return y.transpose(1, 2).reshape({B, T, H * D});
}

// Whether the attention kernels take a (checked) call: kDecode, the decode kernel (and
// attention_linear_kernel), else the prefill kernel.
enum class AttnKernel { kPrefill, kDecode };
bool attention_fits(AttnKernel kind, const at::Tensor& qkv, const at::Tensor& positions,
                    const OptTensor& cos, const OptTensor& sin, const at::Tensor& k_cache,
                    const at::Tensor& v_cache) {
  const int64_t B = qkv.size(0), T = qkv.size(1), D = k_cache.size(3), S = k_cache.size(2);
  const auto dt = qkv.scalar_type();
  // What both kernels need; the decode kernel also bounds the head size and the batch (its
  // grid's y), and reads the cache in 16-byte vectors.
  const bool common =
      (dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16) && D % 2 == 0 &&
      qkv.is_contiguous() && positions.is_contiguous() && k_cache.is_contiguous() &&
      v_cache.is_contiguous() &&
      (!cos || (cos->scalar_type() == at::kFloat && sin->scalar_type() == at::kFloat &&
                cos->is_contiguous() && sin->is_contiguous()));
  if (kind == AttnKernel::kPrefill) return common && T > 1 && B * T < (int64_t{1} << 31);
  const int64_t E = 16 / qkv.element_size();
  return common && T == 1 && D % E == 0 && D <= kMaxHeadDim && B < 65536 &&
         aligned16(k_cache) && aligned16(v_cache);
}

// trigger_late: the decode kernel lets the next kernel launch after its PDL wait, not before
// (attention_block_cuda).
at::Tensor attention_launch(const at::Tensor& qkv, const at::Tensor& positions, const OptTensor& cos,
                            const OptTensor& sin, at::Tensor& k_cache, at::Tensor& v_cache,
                            int64_t H, int64_t KV, bool trigger_late) {
  check_attention(qkv, positions, cos, sin, k_cache, v_cache, H, KV);
  const int64_t B = qkv.size(0), D = k_cache.size(3), S = k_cache.size(2);
  const auto dt = qkv.scalar_type();
  if (attention_fits(AttnKernel::kPrefill, qkv, positions, cos, sin, k_cache, v_cache))
    return attention_prefill_cuda(qkv, positions, cos, sin, k_cache, v_cache, H, KV);
  if (!attention_fits(AttnKernel::kDecode, qkv, positions, cos, sin, k_cache, v_cache))
    return attention_reference(qkv, positions, cos, sin, k_cache, v_cache, H, KV);
  at::Tensor out = at::empty({B, 1, H * D}, qkv.options());
  const c10::cuda::CUDAGuard guard(qkv.device());
  dispatch_float(dt, [&](auto ttag) {
    using CT = decltype(ttag);
    auto kernel = attention_decode_kernel<CT>;
    static const int max_smem =
        kernel_room(kernel, [](int optin, int fixed) { return optin - fixed; }).smem;
    // Early K and V rows: as many slots as fit in kEarlyRowsBytes and on the device (at a
    // position past them, attend reads every slot from the cache).
    const int64_t k_stride = early_k_stride(D, qkv.element_size());
    const int64_t slot_bytes = (k_stride + D) * qkv.element_size();
    const int64_t offset = early_rows_offset(D);
    const int64_t room = std::min<int64_t>(kEarlyRowsBytes, max_smem - offset);
    const int early_slots = static_cast<int>(std::clamp<int64_t>(room / slot_bytes, 0, S));
    const size_t smem = early_slots > 0 ? offset + static_cast<size_t>(early_slots) * slot_bytes
                                        : attend_smem_bytes(D, kAttnThreads);
    AttnArgs a{qkv.const_data_ptr(), positions.const_data_ptr<int64_t>(),
               cos ? cos->const_data_ptr<float>() : nullptr,
               sin ? sin->const_data_ptr<float>() : nullptr, k_cache.mutable_data_ptr(),
               v_cache.mutable_data_ptr(), out.mutable_data_ptr(), static_cast<int>(H),
               static_cast<int>(KV), static_cast<int>(D), static_cast<int>(S),
               cos ? static_cast<int>(cos->size(0)) : 0, early_slots, static_cast<int>(k_stride)};
    a.trigger_late = trigger_late;
    launch(kernel, dim3(H, B), dim3(kAttnThreads), smem, a);
  });
  return out;
}

at::Tensor attention_cuda(const at::Tensor& qkv, const at::Tensor& positions, const OptTensor& cos,
                          const OptTensor& sin, at::Tensor& k_cache, at::Tensor& v_cache,
                          int64_t H, int64_t KV) {
  return attention_launch(qkv, positions, cos, sin, k_cache, v_cache, H, KV, false);
}

// Launches attention_linear_kernel; false where its clusters cannot run (nothing launched).
// Clusters per sequence: one block an SM's worth, fewer where fewer clusters fit at once (a
// cluster lies within one GPC); each block takes an equal share of W's rows, whole rows. A block
// takes at most half an SM's shared memory (the early K/V copy gives way), so that two fit.
template <typename T, typename W, typename S>
bool launch_attention_linear(const at::Tensor& qkv, const at::Tensor& positions,
                             const OptTensor& cos, const OptTensor& sin, at::Tensor& k_cache,
                             at::Tensor& v_cache, int64_t H, int64_t KV, const at::Tensor& w,
                             const OptTensor& scales, const at::Tensor& residual, at::Tensor& out) {
  auto kernel = attention_linear_kernel<T, W, S>;
  struct Room {
    KernelRoom room;
    int64_t budget;  // shared memory a block may take
  };
  static const Room sized = [&] {
    const KernelRoom r = kernel_room(kernel, [](int optin, int fixed) { return optin - fixed; });
    int device = 0, per_sm = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
    cudaFuncAttributes attr;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
    if (r.hopper)  // clusters of up to 16 blocks (the portable limit is 8)
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    const int half = per_sm / 2 - static_cast<int>(attr.sharedSizeBytes) - 1024;  // 1 KB reserved a block
    return Room{r, std::min<int64_t>(r.smem, half)};
  }();
  const KernelRoom& room = sized.room;
  const int64_t budget = sized.budget;
  if (!room.hopper) return false;
  const int64_t B = qkv.size(0), D = k_cache.size(3), slots = k_cache.size(2), N = w.size(0), K = w.size(1);
  const int64_t groups = scales ? scales->size(1) : 1;
  const int64_t k_stride = early_k_stride(D, sizeof(T));
  const int64_t slot_bytes = (k_stride + D) * static_cast<int64_t>(sizeof(T));
  auto up16 = [](int64_t v) { return (v + 15) / 16 * 16; };
  struct Layout {
    int64_t clusters, rows_per_block, y_own, y_all, w_rows, w_scales, res, early, early_slots, smem;
  };
  auto layout = [&](int64_t clusters) {
    Layout l;
    l.rows_per_block = (N + clusters * H - 1) / (clusters * H);
    l.clusters = (N + l.rows_per_block * H - 1) / (l.rows_per_block * H);  // none left empty
    l.y_own = up16(static_cast<int64_t>(attend_smem_bytes(D, kAttnThreads)));
    l.y_all = l.y_own + up16(D * 4);
    l.w_rows = l.y_all + up16(K * 4);
    l.w_scales = l.w_rows + up16(l.rows_per_block * K * static_cast<int64_t>(sizeof(W)));
    l.res = l.w_scales + up16(scales ? l.rows_per_block * groups * static_cast<int64_t>(sizeof(S)) : 0);
    l.early = l.res + up16(l.rows_per_block * 4);
    const int64_t rows_room = std::clamp<int64_t>(budget - l.early, 0, kEarlyRowsBytes);
    l.early_slots = std::min<int64_t>(rows_room / slot_bytes, slots);
    l.smem = l.early + l.early_slots * slot_bytes;
    return l;
  };
  auto active_clusters = [&](int64_t smem) {
    return clusters_that_fit(reinterpret_cast<const void*>(kernel), static_cast<int>(H), kAttnThreads,
                             static_cast<size_t>(smem));
  };
  // BABYRT_ATTN_LINEAR_CLUSTERS=n: n clusters (to measure)
  static const int64_t forced = env_count("BABYRT_ATTN_LINEAR_CLUSTERS");
  Layout l = layout(std::clamp<int64_t>(forced ? forced : room.sms / H, 1, std::max<int64_t>(N / H, 1)));
  if (l.early > budget) return false;
  const int fit = active_clusters(l.smem);
  if (fit == 0) return false;
  if (fit < l.clusters) {
    l = layout(fit);
    if (l.early > budget || active_clusters(l.smem) == 0) return false;
  }
  AttnArgs a{qkv.const_data_ptr(), positions.const_data_ptr<int64_t>(),
             cos ? cos->const_data_ptr<float>() : nullptr, sin ? sin->const_data_ptr<float>() : nullptr,
             k_cache.mutable_data_ptr(), v_cache.mutable_data_ptr(), nullptr, static_cast<int>(H),
             static_cast<int>(KV), static_cast<int>(D), static_cast<int>(slots),
             cos ? static_cast<int>(cos->size(0)) : 0, static_cast<int>(l.early_slots),
             static_cast<int>(k_stride)};
  AttnLinearArgs args{w.const_data_ptr(), scales ? scales->const_data_ptr() : nullptr,
                      residual.const_data_ptr(), out.mutable_data_ptr(), static_cast<int>(N),
                      static_cast<int>(K), static_cast<int>(K / groups), static_cast<int>(l.rows_per_block),
                      static_cast<int>(l.y_own), static_cast<int>(l.y_all), static_cast<int>(l.w_rows),
                      static_cast<int>(l.w_scales), static_cast<int>(l.res), static_cast<int>(l.early)};
  launch_clustered(kernel, dim3(H * l.clusters, B), dim3(kAttnThreads), static_cast<size_t>(l.smem),
                   static_cast<int>(H), a, args);
  return true;
}

// attention_cuda then linear_cuda; with BABYRT_ATTN_LINEAR=1, attention_linear_kernel where
// it covers the call.
// wo_early: attention lets the wo GEMV launch after attention's wait, and the wo GEMV lets the
// next kernel launch before its own (attention_block_cuda).
at::Tensor attention_linear_launch(const at::Tensor& qkv, const at::Tensor& positions,
                                   const OptTensor& cos, const OptTensor& sin, at::Tensor& k_cache,
                                   at::Tensor& v_cache, int64_t H, int64_t KV, const at::Tensor& w,
                                   const OptTensor& scales, const OptTensor& residual, bool wo_early) {
  check_attention_linear(qkv, positions, cos, sin, k_cache, v_cache, H, KV, w, scales, residual);
  const int64_t B = qkv.size(0), N = w.size(0), K = w.size(1);
  const auto dt = qkv.scalar_type();
  const bool q8 = scales.has_value();
  const int64_t group = q8 ? K / scales->size(1) : K;
  static const bool fused = env_is("BABYRT_ATTN_LINEAR", "1");  // opt-in: slower, see above
  const bool fits =
      fused && residual && H <= kMaxAttnCluster &&
      attention_fits(AttnKernel::kDecode, qkv, positions, cos, sin, k_cache, v_cache) &&
      w.is_contiguous() && aligned16(w) && residual->is_contiguous() && N < (int64_t{1} << 30) &&
      (q8 ? group % 16 == 0 && scales->is_contiguous() &&
                (scales->scalar_type() == at::kFloat || scales->scalar_type() == at::kBFloat16)
          : K * w.element_size() % 16 == 0);
  bool done = false;
  at::Tensor out;
  if (fits) {
    out = at::empty({B, 1, N}, qkv.options());
    const c10::cuda::CUDAGuard guard(qkv.device());
    dispatch_float(dt, [&](auto ttag) {
      using CT = decltype(ttag);
      auto run = [&](auto wtag, auto stag) {
        using WT = decltype(wtag);
        using ST = decltype(stag);
        done = launch_attention_linear<CT, WT, ST>(qkv, positions, cos, sin, k_cache, v_cache, H,
                                                   KV, w, scales, *residual, out);
      };
      dispatch_weights<CT>(scales, run);
    });
  }
  if (done) return out;
  at::Tensor y = attention_launch(qkv, positions, cos, sin, k_cache, v_cache, H, KV, wo_early);
  return linear_launch(y, w, scales, residual, wo_early);
}

at::Tensor attention_linear_cuda(const at::Tensor& qkv, const at::Tensor& positions,
                                 const OptTensor& cos, const OptTensor& sin, at::Tensor& k_cache,
                                 at::Tensor& v_cache, int64_t H, int64_t KV, const at::Tensor& w,
                                 const OptTensor& scales, const OptTensor& residual) {
  return attention_linear_launch(qkv, positions, cos, sin, k_cache, v_cache, H, KV, w, scales,
                                 residual, false);
}

// The layer's attention half: the QKV GEMV (RMSNorm fused), attention, then the wo GEMV. Two
// launch orders differ from the plain ops': the wo GEMV lets the next kernel launch before its
// own PDL wait, and attention lets the wo GEMV launch only after attention's wait. The next
// kernel is the layer's feed-forward GEMV (ffn_block), which reads only its weights before its
// wait, so it launches while attention runs and loads its weights then (HBM is otherwise idle
// during attention); attention's later trigger keeps the wo GEMV's blocks from taking the SMs
// sooner. With toy kernels of stories110M's shapes (benchmarks/kernel_chain.cu, "layer", H200)
// the wo GEMV's early launch took a layer from 16.8 to 14.2 us, and the early launch of any
// other of the layer's kernels gained nothing on its own. End to end (babyrt bench --no-peers,
// H200, eighteenth session, two runs against one; bf16 / int8 tok/s): stories110M 4,445 / 5,757
// -> 4,574-4,577 / 5,905-5,967, 1B 1,140 / 1,819 -> 1,127-1,128 / 1,870-1,872, stories15M 11,610
// / 13,469 -> 11,412-11,424 / 13,595-13,616. The wo GEMV's early launch alone, attention's as
// before: stories110M 4,436-4,511 / 5,870-5,908, stories15M 10,905-10,983 bf16.
// Safe for what can follow attention_block: a GEMV (ffn_block, or the next layer's QKV GEMV)
// reads only weights before its wait, and the kernels that read more before theirs (decode
// attention: the position and the cache) only ever follow a GEMV that lets them launch after
// its wait. BABYRT_WO_EARLY=0 keeps the plain ops' order (to measure).
at::Tensor attention_block_cuda(const at::Tensor& x, const at::Tensor& norm_weight, double eps,
                                const at::Tensor& wqkv, const OptTensor& qkv_scales,
                                const at::Tensor& positions, const OptTensor& cos, const OptTensor& sin,
                                at::Tensor& k_cache, at::Tensor& v_cache, int64_t H, int64_t KV,
                                const at::Tensor& wo, const OptTensor& wo_scales) {
  check_attention_block(x, norm_weight, wqkv, qkv_scales, positions, cos, sin, k_cache, v_cache, H,
                        KV, wo, wo_scales);
  static const bool wo_early = !env_is("BABYRT_WO_EARLY", "0");
  const at::Tensor qkv = rmsnorm_linear_cuda(x, norm_weight, eps, wqkv, qkv_scales, std::nullopt);
  return attention_linear_launch(qkv, positions, cos, sin, k_cache, v_cache, H, KV, wo, wo_scales, x,
                                 wo_early);
}

// ------------------------------------------------------------------ embedding
// One block per token: its row of W (dequantized when int8), as T. One kernel where the
// reference takes up to four (two gathers, the dequantize and the cast).
template <typename T, typename W, typename S>
__global__ void __launch_bounds__(256)
    embedding_kernel(const int64_t* tokens, const W* w, const S* scales, T* out, int64_t rows,
                     int K, int groups) {
  const int64_t t = blockIdx.x;
  allow_next_launch();
  wait_for_inputs();  // the token ids come from the previous step
  const int64_t id = tokens[t];
  T* o = out + t * K;
  const bool ok = id >= 0 && id < rows;  // the runtime checks ids first; stay in bounds anyway
  const W* row = w + (ok ? id : 0) * K;
  const int group = K / groups;
  for (int k = threadIdx.x; k < K; k += blockDim.x) {
    float v = to_float(row[k]);
    if constexpr (sizeof(W) == 1) v *= to_float(scales[(ok ? id : 0) * groups + k / group]);
    o[k] = from_float<T>(ok ? v : 0.f);
  }
}

at::Tensor embedding_cuda(const at::Tensor& tokens, const at::Tensor& w, const OptTensor& scales,
                          at::ScalarType dtype) {
  const bool q8 = scales.has_value();
  const bool fits =
      w.dim() == 2 && w.is_contiguous() && tokens.scalar_type() == at::kLong &&
      tokens.is_contiguous() && tokens.numel() > 0 && tokens.numel() < (int64_t{1} << 31) &&
      w.size(1) < (int64_t{1} << 30) &&
      (dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16) &&
      (q8 ? w.scalar_type() == at::kChar && scales->is_contiguous() && scales->dim() == 2 &&
                scales->size(0) == w.size(0) && scales->size(1) > 0 &&
                w.size(1) % scales->size(1) == 0 &&
                (scales->scalar_type() == at::kFloat || scales->scalar_type() == at::kBFloat16)
          : w.scalar_type() == dtype);
  if (!fits) return embedding_reference(tokens, w, scales, dtype);
  std::vector<int64_t> shape = tokens.sizes().vec();
  shape.push_back(w.size(1));
  at::Tensor out = at::empty(shape, w.options().dtype(dtype));
  const c10::cuda::CUDAGuard guard(w.device());
  const int K = static_cast<int>(w.size(1)), groups = q8 ? static_cast<int>(scales->size(1)) : 1;
  dispatch_float(dtype, [&](auto ttag) {
    using CT = decltype(ttag);
    auto run = [&](auto wtag, auto stag) {
      using WT = decltype(wtag);
      using ST = decltype(stag);
      launch(embedding_kernel<CT, WT, ST>, dim3(tokens.numel()), dim3(256), 0,
             tokens.const_data_ptr<int64_t>(), static_cast<const WT*>(w.const_data_ptr()),
             q8 ? static_cast<const ST*>(scales->const_data_ptr()) : nullptr,
             static_cast<CT*>(out.mutable_data_ptr()), w.size(0), K, groups);
    };
    dispatch_weights<CT>(scales, run);
  });
  return out;
}

// ------------------------------------------------------------------ greedy step bookkeeping
constexpr int kArgmaxThreads = 512;
constexpr int kArgmaxCluster = 8;  // blocks per sequence (one cluster), each a slice of the vocabulary

// Whether (v, i) beats (best, bi) for torch.argmax: NaN is the largest value, ties go to the
// first index.
__device__ __forceinline__ bool beats(float v, int i, float best, int bi) {
  if (isnan(v)) return !isnan(best) || i < bi;
  if (isnan(best)) return false;
  return v > best || (v == best && i < bi);
}

// A cluster of blocks per sequence (blockIdx.y), each taking a slice of the vocabulary; the
// first block of the cluster reads the others' results from their shared memory and writes
// token = argmax, position += 1, history[position] = token. One kernel instead of at::argmax's
// single-block reduction plus three small ops.
__global__ void __launch_bounds__(kArgmaxThreads)
    greedy_advance_kernel(const float* logits, int V, int64_t* token, int64_t* position,
                          int64_t* history, int64_t history_len) {
  __shared__ float warp_best[kArgmaxThreads / 32];
  __shared__ int warp_index[kArgmaxThreads / 32];
  const int part = blockIdx.x, parts = gridDim.x, b = blockIdx.y;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  allow_next_launch();
  wait_for_inputs();
  const float* row = logits + static_cast<int64_t>(b) * V;
  float best = -INFINITY;
  int bi = INT_MAX;
  const bool vec = V % 4 == 0 && reinterpret_cast<uintptr_t>(row) % 16 == 0;
  const int items = vec ? V / 4 : V, per = (items + parts - 1) / parts;
  const int lo = part * per, hi = min(items, lo + per);
  if (vec) {
#pragma unroll 4
    for (int i = lo + threadIdx.x; i < hi; i += kArgmaxThreads) {
      const float4 f = reinterpret_cast<const float4*>(row)[i];
      const float v[4] = {f.x, f.y, f.z, f.w};
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (beats(v[j], 4 * i + j, best, bi)) best = v[j], bi = 4 * i + j;
    }
  } else {
    for (int i = lo + threadIdx.x; i < hi; i += kArgmaxThreads)
      if (beats(row[i], i, best, bi)) best = row[i], bi = i;
  }
  auto warp_reduce = [&] {
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {
      const float v = __shfl_xor_sync(0xffffffff, best, off);
      const int i = __shfl_xor_sync(0xffffffff, bi, off);
      if (beats(v, i, best, bi)) best = v, bi = i;
    }
  };
  warp_reduce();
  if (lane == 0) warp_best[warp] = best, warp_index[warp] = bi;
  __syncthreads();
  if (warp == 0) {
    best = lane < kArgmaxThreads / 32 ? warp_best[lane] : -INFINITY;
    bi = lane < kArgmaxThreads / 32 ? warp_index[lane] : INT_MAX;
    warp_reduce();
    if (lane == 0) warp_best[0] = best, warp_index[0] = bi;
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (parts > 1) {
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();  // every block's result is in its shared memory
    if (part == 0 && warp == 0) {
      best = lane < parts ? *cluster.map_shared_rank(&warp_best[0], lane) : -INFINITY;
      bi = lane < parts ? *cluster.map_shared_rank(&warp_index[0], lane) : INT_MAX;
      warp_reduce();
    }
    cluster.sync();  // the others' shared memory lives until the first block has read it
  }
#endif
  if (part == 0 && threadIdx.x == 0) {
    const int64_t p = position[b] + 1;
    token[b] = bi;
    position[b] = p;
    if (p >= 0 && p < history_len) history[b * history_len + p] = bi;
  }
}

void greedy_advance_cuda(const at::Tensor& logits, const at::Tensor& token,
                         const at::Tensor& position, const at::Tensor& history) {
  check_greedy_advance(logits, token, position, history);
  const bool fits = logits.scalar_type() == at::kFloat && logits.is_contiguous() &&
                    logits.size(1) < (int64_t{1} << 30) && logits.size(0) < 65536 &&
                    token.is_contiguous() && position.is_contiguous() && history.is_contiguous();
  if (!fits || logits.size(0) == 0) return greedy_advance_reference(logits, token, position, history);
  const c10::cuda::CUDAGuard guard(logits.device());
  static const int cluster = runs_clusters(greedy_advance_kernel) ? kArgmaxCluster : 1;
  launch_clustered(greedy_advance_kernel, dim3(cluster, logits.size(0)), dim3(kArgmaxThreads), 0,
                   cluster, logits.const_data_ptr<float>(), static_cast<int>(logits.size(1)),
                   token.mutable_data_ptr<int64_t>(), position.mutable_data_ptr<int64_t>(),
                   history.mutable_data_ptr<int64_t>(), history.size(1));
}

}  // namespace
}  // namespace babyrt::ops

TORCH_LIBRARY_IMPL(babyrt, CUDA, m) {
  using namespace babyrt::ops;
  m.impl("linear", linear_cuda);
  m.impl("rmsnorm_linear", rmsnorm_linear_cuda);
  m.impl("swiglu_linear", swiglu_linear_cuda);
  m.impl("attention", attention_cuda);
  m.impl("attention_linear", attention_linear_cuda);
  m.impl("attention_block", attention_block_cuda);
  m.impl("ffn_block", ffn_block_cuda);
  m.impl("greedy_advance", greedy_advance_cuda);
  m.impl("embedding", embedding_cuda);
}
