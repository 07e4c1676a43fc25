#include "ops/cpu_kernels.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string_view>
#include <vector>

namespace babyrt::cpu {
namespace {

#define BABYRT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define BABYRT_AVX2 __attribute__((target("avx2,fma,f16c")))
#define BABYRT_VNNI \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma")))

// Prefetch of `lines` cache lines from p on, into L2.
// The SIMD kernels walk their block of rows (contiguous) a few lines per step and prefetch the
// same stretch kAheadBytes further on. From DRAM (2 threads) this lifts int8 GEMVs from
// 12-16 to 21-28 GB/s and the stories15M fp32 step from ~3.0 to ~2.1 ms; prefetching per row, or
// the next rows' same column, kept too few lines in flight. Into L2 rather than L1 (T1, not T0):
// one thread 15 -> 18 GB/s, the stories110M int8 step ~6.5 -> ~5.4 ms, since L1's few miss
// buffers no longer cap the lines in flight. 16-64 KB ahead measured alike; cached weights are
// not slowed by it. Streamed matrices too: a non-temporal prefetch of the stories15M fp32
// classifier (to keep the layers in L3) made the step ~5% slower (2.0 against 1.85 ms).
constexpr int64_t kAheadBytes = 32768;
inline void prefetch_lines(const char* p, int lines) {
  for (int j = 0; j < lines; ++j) _mm_prefetch(p + 64 * j, _MM_HINT_T1);
}

// The first kAheadBytes of a thread's block of `bytes` bytes: its loop prefetches that far
// ahead, so without this the start of every call would wait on memory line by line.
inline void prefetch_start(const void* block, int64_t bytes) {
  prefetch_lines(static_cast<const char*>(block),
                 static_cast<int>(std::min<int64_t>(kAheadBytes, bytes) / 64));
}

enum class Isa { kScalar, kAvx2, kAvx512, kAvx512Vnni };

// BABYRT_CPU_ISA=avx2|scalar caps the choice, so that every variant can be tested on one CPU.
Isa detect() {
  __builtin_cpu_init();
  const char* cap = std::getenv("BABYRT_CPU_ISA");
  if (cap && std::string_view(cap) == "scalar") return Isa::kScalar;
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (cap && std::string_view(cap) == "avx512") return avx512 ? Isa::kAvx512 : Isa::kScalar;
  if (cap && std::string_view(cap) == "avx2")
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? Isa::kAvx2 : Isa::kScalar;
  if (avx512) return __builtin_cpu_supports("avx512vnni") ? Isa::kAvx512Vnni : Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
  return Isa::kScalar;
}

const Isa kIsa = detect();

// ---------------------------------------------------------------------------- scalar
void gemv_f32_scalar(const float* W, const float* x, const float* residual, float* y, int64_t K,
                     int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* w = W + n * K;
    float acc = 0;
    for (int64_t k = 0; k < K; ++k) acc += w[k] * x[k];
    y[n] = acc + (residual ? residual[n] : 0.f);
  }
}

void gemv_q8_scalar(const int8_t* W, const float* scales, int64_t group, const float* x,
                    const float* residual, float* y, int64_t K, int64_t n0, int64_t n1) {
  const int64_t G = K / group;
  for (int64_t n = n0; n < n1; ++n) {
    float acc = 0;
    for (int64_t g = 0; g < G; ++g) {
      const int8_t* w = W + n * K + g * group;
      const float* xg = x + g * group;
      float part = 0;
      for (int64_t k = 0; k < group; ++k) part += static_cast<float>(w[k]) * xg[k];
      acc += part * scales[n * G + g];
    }
    y[n] = acc + (residual ? residual[n] : 0.f);
  }
}

// ---------------------------------------------------------------------------- AVX-512
BABYRT_AVX512 inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}

// Four rows at a time share each load of x.
BABYRT_AVX512 void gemv_f32_avx512(const float* W, const float* x, const float* residual,
                                   float* y, int64_t K, int64_t n0, int64_t n1) {
  prefetch_start(W + n0 * K, (n1 - n0) * K * static_cast<int64_t>(sizeof(float)));
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const float* w0 = W + n * K;
    const float* w1 = w0 + K;
    const float* w2 = w1 + K;
    const float* w3 = w2 + K;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 m = tail_mask(K - k);
      // The 4-row block's stretch kAheadBytes on (4 lines per step).
      prefetch_lines(reinterpret_cast<const char*>(w0 + 4 * k) + kAheadBytes, 4);
      const __m512 xv = _mm512_maskz_loadu_ps(m, x + k);
      a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w0 + k), xv, a0);
      a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w1 + k), xv, a1);
      a2 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w2 + k), xv, a2);
      a3 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w3 + k), xv, a3);
    }
    y[n] = _mm512_reduce_add_ps(a0) + (residual ? residual[n] : 0.f);
    y[n + 1] = _mm512_reduce_add_ps(a1) + (residual ? residual[n + 1] : 0.f);
    y[n + 2] = _mm512_reduce_add_ps(a2) + (residual ? residual[n + 2] : 0.f);
    y[n + 3] = _mm512_reduce_add_ps(a3) + (residual ? residual[n + 3] : 0.f);
  }
  for (; n < n1; ++n) {
    const float* w = W + n * K;
    __m512 a = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 m = tail_mask(K - k);
      a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w + k), _mm512_maskz_loadu_ps(m, x + k), a);
    }
    y[n] = _mm512_reduce_add_ps(a) + (residual ? residual[n] : 0.f);
  }
}

BABYRT_AVX512 inline __m512 load_q8(const int8_t* p, __mmask16 m) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}

BABYRT_AVX512 void gemv_q8_avx512(const int8_t* W, const float* scales, int64_t group,
                                  const float* x, const float* residual, float* y, int64_t K,
                                  int64_t n0, int64_t n1) {
  const int64_t G = K / group;
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const int8_t* w0 = W + n * K;
    const int8_t* w1 = w0 + K;
    const int8_t* w2 = w1 + K;
    const int8_t* w3 = w2 + K;
    const float* s = scales + n * G;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t g = 0; g < G; ++g) {
      __m512 p0 = _mm512_setzero_ps(), p1 = p0, p2 = p0, p3 = p0;
      const int64_t end = (g + 1) * group;
      for (int64_t k = g * group; k < end; k += 16) {
        const __mmask16 m = tail_mask(end - k);
        if ((k & 63) == 0) prefetch_lines(reinterpret_cast<const char*>(w0 + 4 * k) + kAheadBytes, 4);
        const __m512 xv = _mm512_maskz_loadu_ps(m, x + k);
        p0 = _mm512_fmadd_ps(load_q8(w0 + k, m), xv, p0);
        p1 = _mm512_fmadd_ps(load_q8(w1 + k, m), xv, p1);
        p2 = _mm512_fmadd_ps(load_q8(w2 + k, m), xv, p2);
        p3 = _mm512_fmadd_ps(load_q8(w3 + k, m), xv, p3);
      }
      a0 = _mm512_fmadd_ps(p0, _mm512_set1_ps(s[g]), a0);
      a1 = _mm512_fmadd_ps(p1, _mm512_set1_ps(s[G + g]), a1);
      a2 = _mm512_fmadd_ps(p2, _mm512_set1_ps(s[2 * G + g]), a2);
      a3 = _mm512_fmadd_ps(p3, _mm512_set1_ps(s[3 * G + g]), a3);
    }
    y[n] = _mm512_reduce_add_ps(a0) + (residual ? residual[n] : 0.f);
    y[n + 1] = _mm512_reduce_add_ps(a1) + (residual ? residual[n + 1] : 0.f);
    y[n + 2] = _mm512_reduce_add_ps(a2) + (residual ? residual[n + 2] : 0.f);
    y[n + 3] = _mm512_reduce_add_ps(a3) + (residual ? residual[n + 3] : 0.f);
  }
  for (; n < n1; ++n) {
    const int8_t* w = W + n * K;
    __m512 a = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      __m512 p = _mm512_setzero_ps();
      const int64_t end = (g + 1) * group;
      for (int64_t k = g * group; k < end; k += 16) {
        const __mmask16 m = tail_mask(end - k);
        p = _mm512_fmadd_ps(load_q8(w + k, m), _mm512_maskz_loadu_ps(m, x + k), p);
      }
      a = _mm512_fmadd_ps(p, _mm512_set1_ps(scales[n * G + g]), a);
    }
    y[n] = _mm512_reduce_add_ps(a) + (residual ? residual[n] : 0.f);
  }
}

// int8 weights times activations quantized to int8, with one scale per block of x: the blocks
// are the runs of up to 512 columns inside each weight group, so a block's error is at most half
// a step of its own max|x| / 127. (256-column blocks cost a block's worth of conversions more
// per 256 columns, and a half-empty step at K = 288: one core, 4096 rows, K = 288 / 768 went
// from 22 / 37 to 27 / 44 GB/s with 512.) VPDPBUSD does 64 multiply-adds per instruction and needs no
// widening (int16 activations cost a widen per 32 weights: 1.5-1.75x slower from cache). Its
// first operand is unsigned: the weights go in as w + 128 (an XOR), and the 128 * sum(xq) this
// adds is taken off once per group, the same for every row. Partial sums stay within int32: at
// most 512 x 255 x 127 per block.
constexpr int64_t kXBlock = 512;

BABYRT_VNNI inline __mmask64 byte_mask(int64_t left) {
  return left >= 64 ? ~__mmask64{0} : (__mmask64{1} << left) - 1;
}

// The eight horizontal sums of a[0..7], as one vector (a transpose-and-add tree: ~24
// instructions instead of eight separate reductions of ~8 each).
BABYRT_VNNI inline __m256 sum_rows8(const __m512 (&a)[8]) {
  __m512 t[4];
  for (int p = 0; p < 4; ++p)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] of rows 2p, 2p+1
    t[p] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * p], a[2 * p + 1]),
                         _mm512_unpackhi_ps(a[2 * p], a[2 * p + 1]));
  __m512 u[2];
  for (int h = 0; h < 2; ++h)  // per 128-bit lane: partial sums of rows 4h .. 4h+3
    u[h] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * h], t[2 * h + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(t[2 * h], t[2 * h + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // lanes: [u0.L0+u0.L1, u0.L2+u0.L3, u1.L0+u1.L1, u1.L2+u1.L3]
  const __m512 v = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 r = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm512_castps512_ps128(r)),
                              _mm512_extractf32x4_ps(r, 2), 1);
}

BABYRT_VNNI void gemv_q8_vnni(const int8_t* W, const float* scales, int64_t group, const float* x,
                              const float* residual, float* y, int64_t K, int64_t n0, int64_t n1) {
  const int64_t G = K / group, blocks_per_group = (group + kXBlock - 1) / kXBlock;
  thread_local std::vector<int8_t> xq_buf;
  thread_local std::vector<float> block_scale, group_shift;
  xq_buf.resize(K);
  block_scale.resize(G * blocks_per_group);
  group_shift.resize(G);
  int8_t* xq = xq_buf.data();
  for (int64_t g = 0; g < G; ++g) {
    float shift = 0;
    for (int64_t j = 0; j < blocks_per_group; ++j) {
      const int64_t c0 = g * group + j * kXBlock, c1 = std::min((g + 1) * group, c0 + kXBlock);
      __m512 mx = _mm512_setzero_ps();
      for (int64_t k = c0; k < c1; k += 16)
        mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_maskz_loadu_ps(tail_mask(c1 - k), x + k)));
      const float amax = _mm512_reduce_max_ps(mx);
      const float step = amax > 0 ? amax / 127.0f : 1.0f;
      const __m512 inv = _mm512_set1_ps(1.0f / step);
      __m512i sum = _mm512_setzero_si512();
      for (int64_t k = c0; k < c1; k += 16) {
        const __mmask16 m = tail_mask(c1 - k);
        const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + k), inv));
        sum = _mm512_add_epi32(sum, q);
        _mm_mask_storeu_epi8(xq + k, m, _mm512_cvtsepi32_epi8(q));
      }
      block_scale[g * blocks_per_group + j] = step;
      shift += 128.0f * step * static_cast<float>(_mm512_reduce_add_epi32(sum));
    }
    group_shift[g] = shift;
  }
  prefetch_start(W + n0 * K, (n1 - n0) * K);
  // Eight rows at a time: eight independent DPBUSD chains hide its latency, and x's bytes,
  // the masks and the loop are shared by eight rows.
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t n = n0; n < n1; n += 8) {
    const int rows = static_cast<int>(std::min<int64_t>(8, n1 - n));
    const int8_t* w[8];
    int64_t row[8];
    for (int r = 0; r < 8; ++r) {
      row[r] = n + std::min(r, rows - 1);  // pad with the last row
      w[r] = W + row[r] * K;
    }
    __m512 acc[8];
    float shift[8];
    for (int r = 0; r < 8; ++r) acc[r] = _mm512_setzero_ps(), shift[r] = 0.f;
    for (int64_t g = 0; g < G; ++g) {
      float s[8];
      for (int r = 0; r < 8; ++r) {
        s[r] = scales[row[r] * G + g];
        shift[r] += s[r] * group_shift[g];
      }
      for (int64_t j = 0; j < blocks_per_group; ++j) {
        const int64_t c0 = g * group + j * kXBlock, c1 = std::min((g + 1) * group, c0 + kXBlock);
        __m512i i[8];
        for (int r = 0; r < 8; ++r) i[r] = _mm512_setzero_si512();
        // Whole 64-byte steps unmasked, then the remainder masked: in cache the loop is bound
        // by its instruction count (one thread, 4096x768: 43-45 -> 47 GB/s).
        int64_t k = c0;
        for (; k + 64 <= c1; k += 64) {
          prefetch_lines(reinterpret_cast<const char*>(W + n * K) + 8 * k + kAheadBytes, 8);
          const __m512i xv = _mm512_loadu_si512(xq + k);
          for (int r = 0; r < 8; ++r)
            i[r] = _mm512_dpbusd_epi32(i[r], _mm512_xor_si512(_mm512_loadu_si512(w[r] + k), flip), xv);
        }
        if (k < c1) {
          prefetch_lines(reinterpret_cast<const char*>(W + n * K) + 8 * k + kAheadBytes, 8);
          const __mmask64 m = byte_mask(c1 - k);
          const __m512i xv = _mm512_maskz_loadu_epi8(m, xq + k);  // masked-off lanes: x = 0
          for (int r = 0; r < 8; ++r)
            i[r] = _mm512_dpbusd_epi32(i[r], _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, w[r] + k), flip), xv);
        }
        const float step = block_scale[g * blocks_per_group + j];
        for (int r = 0; r < 8; ++r)
          acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i[r]), _mm512_set1_ps(step * s[r]), acc[r]);
      }
    }
    alignas(32) float out[8];
    _mm256_store_ps(out, sum_rows8(acc));
    for (int r = 0; r < rows; ++r) y[n + r] = out[r] - shift[r] + (residual ? residual[n + r] : 0.f);
  }
}

// ---------------------------------------------------------------------------- AVX2
BABYRT_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

BABYRT_AVX2 void gemv_f32_avx2(const float* W, const float* x, const float* residual, float* y,
                               int64_t K, int64_t n0, int64_t n1) {
  const int64_t K8 = K & ~int64_t{7};
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const float* w0 = W + n * K;
    const float* w1 = w0 + K;
    const float* w2 = w1 + K;
    const float* w3 = w2 + K;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < K8; k += 8) {
      if ((k & 15) == 0) prefetch_lines(reinterpret_cast<const char*>(w0 + 4 * k) + kAheadBytes, 4);
      const __m256 xv = _mm256_loadu_ps(x + k);
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + k), xv, a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + k), xv, a1);
      a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + k), xv, a2);
      a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + k), xv, a3);
    }
    float r[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
    for (int64_t k = K8; k < K; ++k) {
      r[0] += w0[k] * x[k];
      r[1] += w1[k] * x[k];
      r[2] += w2[k] * x[k];
      r[3] += w3[k] * x[k];
    }
    for (int i = 0; i < 4; ++i) y[n + i] = r[i] + (residual ? residual[n + i] : 0.f);
  }
  gemv_f32_scalar(W, x, residual, y, K, n, n1);
}

BABYRT_AVX2 inline __m256 load_q8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

BABYRT_AVX2 void gemv_q8_avx2(const int8_t* W, const float* scales, int64_t group, const float* x,
                              const float* residual, float* y, int64_t K, int64_t n0, int64_t n1) {
  if (group % 8) return gemv_q8_scalar(W, scales, group, x, residual, y, K, n0, n1);
  const int64_t G = K / group;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* w = W + n * K;
    __m256 a = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      __m256 p = _mm256_setzero_ps();
      for (int64_t k = g * group; k < (g + 1) * group; k += 8) {
        if ((k & 63) == 0) prefetch_lines(reinterpret_cast<const char*>(w + k) + kAheadBytes, 1);
        p = _mm256_fmadd_ps(load_q8(w + k), _mm256_loadu_ps(x + k), p);
      }
      a = _mm256_fmadd_ps(p, _mm256_set1_ps(scales[n * G + g]), a);
    }
    y[n] = hsum(a) + (residual ? residual[n] : 0.f);
  }
}

}  // namespace

const char* isa() {
  switch (kIsa) {
    case Isa::kAvx512Vnni: return "avx512-vnni";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

void gemv_f32(const float* W, const float* x, const float* residual, float* y, int64_t K,
              int64_t n0, int64_t n1) {
  switch (kIsa) {
    case Isa::kAvx512Vnni:
    case Isa::kAvx512: return gemv_f32_avx512(W, x, residual, y, K, n0, n1);
    case Isa::kAvx2: return gemv_f32_avx2(W, x, residual, y, K, n0, n1);
    default: return gemv_f32_scalar(W, x, residual, y, K, n0, n1);
  }
}

void gemv_q8(const int8_t* W, const float* scales, int64_t group, const float* x,
             const float* residual, float* y, int64_t K, int64_t n0, int64_t n1) {
  switch (kIsa) {
    case Isa::kAvx512Vnni:
      if (group % 16 == 0)
        return gemv_q8_vnni(W, scales, group, x, residual, y, K, n0, n1);
      [[fallthrough]];
    case Isa::kAvx512: return gemv_q8_avx512(W, scales, group, x, residual, y, K, n0, n1);
    case Isa::kAvx2: return gemv_q8_avx2(W, scales, group, x, residual, y, K, n0, n1);
    default: return gemv_q8_scalar(W, scales, group, x, residual, y, K, n0, n1);
  }
}

// target_clones: the compiler vectorises these loops once per instruction set and picks at load.
__attribute__((target_clones("avx512f", "avx2", "default")))
void rope(float* x, const float* cos, const float* sin, int64_t n_heads, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < n_heads; ++h) {
    float* p = x + h * D;
    for (int64_t i = 0; i < half; ++i) {
      const float x0 = p[2 * i], x1 = p[2 * i + 1];
      p[2 * i] = x0 * cos[i] - x1 * sin[i];
      p[2 * i + 1] = x0 * sin[i] + x1 * cos[i];
    }
  }
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void attend_one_generic(float* q, const float* cos, const float* sin, const float* k,
                        const float* v, int64_t n_slots, int64_t D, float* scores, float* out) {
  if (cos) rope(q, cos, sin, 1, D);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  float max_score = -INFINITY;
  for (int64_t s = 0; s < n_slots; ++s) {
    const float* ks = k + s * D;
    float dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t d = 0; d < D; ++d) dot += q[d] * ks[d];
    scores[s] = dot * scale;
    max_score = std::max(max_score, scores[s]);
  }
  float total = 0;
  for (int64_t s = 0; s < n_slots; ++s) {
    scores[s] = std::exp(scores[s] - max_score);
    total += scores[s];
  }
  for (int64_t d = 0; d < D; ++d) out[d] = 0;
  const float inv = 1.0f / total;
  for (int64_t s = 0; s < n_slots; ++s) {
    const float p = scores[s] * inv;
    const float* vs = v + s * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) out[d] += p * vs[d];
  }
}

namespace {

// exp(x) for x <= 0 (scores less their maximum): 2^(x log2 e) as 2^i * 2^f, f in [-1/2, 1/2],
// 2^f by its Taylor series to degree 7 (relative error ~1e-8, below fp32's rounding).
BABYRT_AVX512 inline __m512 exp_nonpositive(__m512 x) {
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.f)), _mm512_set1_ps(1.44269504f));
  const __m512 i = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, i), _mm512_set1_ps(0.693147181f));  // f ln 2
  __m512 p = _mm512_set1_ps(1.f / 5040);
  for (const float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f})
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, i);
}

// One query against slots 0..n_slots-1, head size 16 * NV: q and the output stay in registers;
// scores of 16 slots go through the exponential at once.
template <int NV>
BABYRT_AVX512 void attend_one_avx512(float* q, const float* cos, const float* sin, const float* k,
                                     const float* v, int64_t n_slots, float* scores, float* out) {
  constexpr int64_t D = 16 * NV;
  if (cos) rope(q, cos, sin, 1, D);
  const __m512 scale = _mm512_set1_ps(1.0f / std::sqrt(static_cast<float>(D)));
  __m512 qv[NV];
  for (int j = 0; j < NV; ++j) qv[j] = _mm512_mul_ps(_mm512_loadu_ps(q + 16 * j), scale);
  float max_score = -INFINITY;
  for (int64_t s = 0; s < n_slots; ++s) {
    const float* ks = k + s * D;
    __m512 acc = _mm512_mul_ps(qv[0], _mm512_loadu_ps(ks));
    for (int j = 1; j < NV; ++j) acc = _mm512_fmadd_ps(qv[j], _mm512_loadu_ps(ks + 16 * j), acc);
    scores[s] = _mm512_reduce_add_ps(acc);
    max_score = std::max(max_score, scores[s]);
  }
  const __m512 mx = _mm512_set1_ps(max_score);
  __m512 total = _mm512_setzero_ps();
  for (int64_t s = 0; s < n_slots; s += 16) {
    const __mmask16 m = tail_mask(n_slots - s);
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, scores + s), mx));
    total = _mm512_add_ps(total, _mm512_maskz_mov_ps(m, e));
    _mm512_mask_storeu_ps(scores + s, m, e);
  }
  const float inv = 1.0f / _mm512_reduce_add_ps(total);
  __m512 o[NV];
  for (int j = 0; j < NV; ++j) o[j] = _mm512_setzero_ps();
  for (int64_t s = 0; s < n_slots; ++s) {
    const __m512 p = _mm512_set1_ps(scores[s]);
    const float* vs = v + s * D;
    for (int j = 0; j < NV; ++j) o[j] = _mm512_fmadd_ps(p, _mm512_loadu_ps(vs + 16 * j), o[j]);
  }
  for (int j = 0; j < NV; ++j) _mm512_storeu_ps(out + 16 * j, _mm512_mul_ps(o[j], _mm512_set1_ps(inv)));
}

}  // namespace

void attend_one(float* q, const float* cos, const float* sin, const float* k, const float* v,
                int64_t n_slots, int64_t D, float* scores, float* out) {
  if (kIsa == Isa::kAvx512 || kIsa == Isa::kAvx512Vnni) {
    switch (D) {
      case 16: return attend_one_avx512<1>(q, cos, sin, k, v, n_slots, scores, out);
      case 32: return attend_one_avx512<2>(q, cos, sin, k, v, n_slots, scores, out);
      case 48: return attend_one_avx512<3>(q, cos, sin, k, v, n_slots, scores, out);
      case 64: return attend_one_avx512<4>(q, cos, sin, k, v, n_slots, scores, out);
      case 96: return attend_one_avx512<6>(q, cos, sin, k, v, n_slots, scores, out);
      case 128: return attend_one_avx512<8>(q, cos, sin, k, v, n_slots, scores, out);
      default: break;
    }
  }
  attend_one_generic(q, cos, sin, k, v, n_slots, D, scores, out);
}

}  // namespace babyrt::cpu
