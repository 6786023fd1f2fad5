// Attention kernels (private interface): causal / non-causal prefill forward and backward with GQA,
// and decode of one new token per sequence over a KV cache of ragged lengths.
//
// Conventions shared by every ISA variant:
//   q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D), row-major contiguous; query head h reads kv head h / (Hq / Hkv).
//   Causal masking aligns the last query with the last key: query i sees keys j <= i + (Sk - Sq), so a
//   query block continues a prefix when Sq < Sk. A query that sees no key (fully masked row, Sk == 0,
//   or a cache length of 0) gets an all-zero output and zero gradients, never NaN.
//   lse[b, h, i] = log(sum_j exp(scale * q_i . k_j)) over the visible keys (natural log), -inf when none.
// Inputs may be fp32 or bf16 (decode caches also int8 with per-token, per-head scales); every path
// accumulates in fp32. Gradients are written in fp32 (the Python layer casts them back).
#pragma once
#include <cstdint>

namespace quark {

enum class DType : int { f32 = 0, bf16 = 1, i8 = 2 };

struct AttentionFwdArgs {
  const void* q;        // (B, Hq, Sq, D)
  const void* k;        // (B, Hkv, Sk, D)
  const void* v;        // (B, Hkv, Sk, D)
  DType dtype;          // of q, k, v and out
  int64_t B, Hq, Hkv, Sq, Sk, D;
  float scale;
  bool causal;
  void* out;            // (B, Hq, Sq, D)
  float* lse;           // (B, Hq, Sq) or nullptr when not needed (inference)
};

struct AttentionBwdArgs {
  const void* q;        // (B, Hq, Sq, D)
  const void* k;        // (B, Hkv, Sk, D)
  const void* v;        // (B, Hkv, Sk, D)
  const void* out;      // (B, Hq, Sq, D) forward output
  const void* dout;     // (B, Hq, Sq, D) gradient of the loss w.r.t. out
  DType dtype;          // of q, k, v, out, dout
  const float* lse;     // (B, Hq, Sq) from the forward
  int64_t B, Hq, Hkv, Sq, Sk, D;
  float scale;
  bool causal;
  float* dq;            // (B, Hq, Sq, D)
  float* dk;            // (B, Hkv, Sk, D)
  float* dv;            // (B, Hkv, Sk, D)
};

struct DecodeArgs {
  const void* q;        // (B, Hq, D), fp32 or bf16
  DType q_dtype;        // also the dtype of out
  const void* k;        // (B, Hkv, Smax, D) cache
  const void* v;        // (B, Hkv, Smax, D) cache
  DType kv_dtype;       // f32, bf16 or i8
  const float* k_scale; // (B, Hkv, Smax) dequantization scales when kv_dtype == i8, else nullptr
  const float* v_scale;
  const int64_t* lengths;  // (B,) valid positions per sequence, 0 <= len <= Smax
  int64_t B, Hq, Hkv, Smax, D;
  float scale;
  void* out;            // (B, Hq, D)
};

// Dispatch on current_isa(); threads from the pool (common/threading.h).
void attention_forward(const AttentionFwdArgs& a);
void attention_backward(const AttentionBwdArgs& a);
void decode_attention(const DecodeArgs& a);

void attention_forward_scalar(const AttentionFwdArgs& a);
void attention_backward_scalar(const AttentionBwdArgs& a);
void decode_attention_scalar(const DecodeArgs& a);
void attention_forward_avx2(const AttentionFwdArgs& a);
void attention_backward_avx2(const AttentionBwdArgs& a);
void decode_attention_avx2(const DecodeArgs& a);
void attention_forward_avx512(const AttentionFwdArgs& a);
void attention_backward_avx512(const AttentionBwdArgs& a);
void decode_attention_avx512(const DecodeArgs& a);
// bf16 prefill forward with AVX512-BF16 dot products (vdpbf16ps); fp32 inputs never come here.
void attention_forward_bf16_avx512_bf16(const AttentionFwdArgs& a);
// bf16 and fp32 prefill forward on AMX tiles (fp32 as three bf16 products).
void attention_forward_amx(const AttentionFwdArgs& a);
// Decode over an int8 (AVX512-VNNI) or bf16 (AVX512-BF16) cache; D <= 256.
void decode_attention_avx512_bf16(const DecodeArgs& a);

}  // namespace quark
