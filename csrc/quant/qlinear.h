// Quantized linear layers: out (M, N) = x (M, K) . dequant(W)^T + bias, W stored packed.
//
// Weight formats (made by quark.ops.quantize, python/quark/ops/quant.py):
//   int8  data (N, K) int8, scales (N,) fp32                     W[n,k] = data[n,k] * scales[n]
//   int4  data (N, K/2) uint8, scales (N, K/G) bf16, zeros (N, K/G) uint8, G in {32, 64, 128}, K % G == 0
//                                                                W[n,k] = (q[n,k] - zeros[n,k/G]) * scales[n,k/G]
//         bf16 scales (widened exactly to fp32 in the kernels) keep fp32's range and cut a g32 row from
//         21 to 19 bytes per 32 weights: at M = 1 the GEMV's time is its bytes.
//         q is packed in blocks of 32 along K: byte 16*b + j of a row holds q[32b + j] in its low nibble
//         and q[32b + j + 16] in its high nibble, so one 16-byte load unpacks into two runs of 16
//         consecutive values with an AND and a shift (no interleaving shuffles).
//
// Paths (all exact up to fp32 rounding against dequant(W) @ x):
//   GEMV  small M: stream each packed weight row once, dequantize in registers, FMA with the M rows of x;
//         threads over N. Memory bound at M = 1: speed is bytes of weights per second. Weight-only M up to
//         8 (amx; 5 with bf16 compute), 16 (avx2) or 32 (avx512) runs it in passes of up to 8 rows
//         (avx2: 4): the GEMMs unpack all of W per call, which costs more there (qlinear.cpp).
//   GEMM  above: dequantize a (kc x nc) block of W into k-major fp32 panels that stay in L1/L2 and run
//         a register-tiled FMA microkernel over them; threads over N blocks x M chunks.
//   W8A8  int8 weights, activations quantized per row (token) to int8 (scale max|x|/127, round half to
//         even). Kernels return exact int32 dots; the driver applies sx[m] * sw[n] (+ bias) so every
//         ISA path gives bit-identical results. VNNI (vpdpbusd) on avx512_bf16, int16 madd below.
//   AMX   the GEMM on amx (W8A8: M > 4): tiles (qlinear_amx.cpp), AMX-BF16 for weight-only (exact products:
//         integer weights and activations split into exact bf16 parts) and AMX-INT8 for W8A8. The one
//         inexact mode: int4 with bf16_compute (bf16 activations) rounds the dequantized weights to
//         bf16, as torch's bf16 linear does; the exact form needs a scaling pass per group.
#pragma once
#include <cstdint>

namespace quark {

enum class QScheme : int { int8 = 0, int4 = 1 };

struct QWeight {
  QScheme scheme;
  const uint8_t* data;    // int8: (N, K) int8 bytes; int4: (N, K/2) packed nibbles
  const float* scales;    // int8: (N,) fp32; int4: nullptr
  const uint16_t* scales16;  // int4: (N, K/G) bf16 bits; int8: nullptr
  const uint8_t* zeros;   // int4: (N, K/G); int8: nullptr
  int64_t n, k, group;    // group = K for int8 (one scale per row)
};

struct QLinearArgs {
  const float* x;         // (M, K) row-major fp32 (nullptr when x16 holds the activations)
  int64_t m;
  QWeight w;
  const float* bias;      // (N,) or nullptr
  float* out;             // (M, N) row-major fp32 (nullptr when the result goes to out16)
  bool bf16_compute = false;  // bf16 activations, result rounded to bf16: the amx GEMM may then round
                              // dequantized int4 weights to bf16 too
  // bf16 I/O (M, K) / (M, N) instead of x / out: the amx GEMM reads and writes bf16 itself; the
  // dispatcher widens and rounds around every other path. Rounding is to nearest even, as torch's.
  const uint16_t* x16 = nullptr;
  uint16_t* out16 = nullptr;
};

// W8A8 after activation quantization: the kernels fill dots (M, N) = xq . wq^T exactly.
struct W8A8Args {
  const int8_t* xq;       // (M, kp) row-major, zero-padded to kp = round_up(K, 64)
  const int16_t* xq16;    // the same values widened to int16, (M, kp); only built for the madd kernels
                          // (the VNNI and AMX GEMMs for M > 4 read xq)
  int64_t m, kp;
  QWeight w;              // scheme int8
  int32_t* dots;          // (M, N)
};

constexpr int64_t kGemvMaxRows = 4;   // rows per GEMV pass; W8A8 above this takes its GEMMs

void qlinear_f32(const QLinearArgs& a);    // dispatches on M and current_isa(); threads: common/threading.h
void qlinear_w8a8(const QLinearArgs& a);   // a.w.scheme must be int8
                                           // both take fp32 or bf16 I/O (x or x16, out or out16)

void qgemv_f32_scalar(const QLinearArgs& a);   // scalar handles any M
void qgemv_f32_avx2(const QLinearArgs& a);
void qgemv_f32_avx512(const QLinearArgs& a);
void qgemm_f32_avx2(const QLinearArgs& a);
void qgemm_f32_avx512(const QLinearArgs& a);
void qgemm_f32_amx(const QLinearArgs& a);

void w8a8_dots_scalar(const W8A8Args& a);
void w8a8_dots_avx2(const W8A8Args& a);
void w8a8_dots_avx512(const W8A8Args& a);
void w8a8_dots_avx512_bf16(const W8A8Args& a);   // VNNI panels for M > 4, else the avx512 row dots
void w8a8_dots_amx(const W8A8Args& a);           // AMX-INT8 tiles, any M (dispatched for M > 4)

}  // namespace quark
