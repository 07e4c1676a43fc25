// CPU kernels behind babyrt's ops (ops.cpp), on raw pointers so that this file compiles without
// torch. Decode at batch 1 is bound by memory bandwidth: each kernel reads every weight byte once,
// in row order, with AVX-512 or AVX2 chosen at run time from what the CPU offers.
#pragma once
#include <cstdint>

namespace babyrt::cpu {

// "avx512-vnni", "avx512", "avx2" or "scalar": the instruction set the kernels below run with
// (the best the CPU has, or lower if the environment variable BABYRT_CPU_ISA caps it).
const char* isa();

// y[n] = dot(W[n, :], x) (+ residual[n]) for rows n in [n0, n1). W is row-major [N, K].
void gemv_f32(const float* W, const float* x, const float* residual, float* y, int64_t K,
              int64_t n0, int64_t n1);

// Same with int8 weights and one float scale per group of `group` columns:
// scales is [N, K / group]; group divides K. With AVX512-VNNI (group a multiple of 16) x is
// quantized to int8 per block of up to 512 columns first: each block's error is at most half a
// step of its max|x| / 127.
void gemv_q8(const int8_t* W, const float* scales, int64_t group, const float* x,
             const float* residual, float* y, int64_t K, int64_t n0, int64_t n1);

// Attention of one query row against a cache, with RoPE applied to q (interleaved pairs):
// out[d] = sum_s softmax_s(q . k_s / sqrt(D)) v_s over slots s in [0, n_slots).
// q is rotated in place when cos/sin are given. scores holds n_slots floats.
void attend_one(float* q, const float* cos, const float* sin, const float* k, const float* v,
                int64_t n_slots, int64_t D, float* scores, float* out);

// Rotates interleaved pairs (x[2i], x[2i+1]) of each of n_heads heads of size D.
void rope(float* x, const float* cos, const float* sin, int64_t n_heads, int64_t D);

}  // namespace babyrt::cpu
