// Attention dispatch: the ISA level is read once per call. Prefill forward runs on AMX tiles where
// the CPU has them (bf16, and fp32 as three bf16 products), else bf16 takes the AVX512-BF16
// dot-product path and everything else the fp32-accumulating blocked kernels.
#include "attention/attention.h"

#include "common/dispatch.h"

namespace quark {

static FamilyRegistration reg("attention", Isa::amx);

void attention_forward(const AttentionFwdArgs& a) {
  if (a.B == 0 || a.Hq == 0 || a.Sq == 0) return;
#if QUARK_X86
  switch (family_isa(Isa::amx)) {
    case Isa::scalar: return attention_forward_scalar(a);
    case Isa::avx2: return attention_forward_avx2(a);
    case Isa::avx512: return attention_forward_avx512(a);
    case Isa::avx512_bf16:
      if (a.dtype == DType::bf16) return attention_forward_bf16_avx512_bf16(a);
      return attention_forward_avx512(a);
    default: return attention_forward_amx(a);
  }
#else
  attention_forward_scalar(a);
#endif
}

void attention_backward(const AttentionBwdArgs& a) {
#if QUARK_X86
  switch (family_isa(Isa::avx512)) {
    case Isa::scalar: return attention_backward_scalar(a);
    case Isa::avx2: return attention_backward_avx2(a);
    default: return attention_backward_avx512(a);
  }
#else
  attention_backward_scalar(a);
#endif
}

void decode_attention(const DecodeArgs& a) {
  if (a.B == 0 || a.Hq == 0) return;
#if QUARK_X86
  switch (family_isa(Isa::avx512_bf16)) {
    case Isa::scalar: return decode_attention_scalar(a);
    case Isa::avx2: return decode_attention_avx2(a);
    case Isa::avx512: return decode_attention_avx512(a);
    default:
      if (a.kv_dtype != DType::f32 && a.D <= 256) return decode_attention_avx512_bf16(a);
      return decode_attention_avx512(a);
  }
#else
  decode_attention_scalar(a);
#endif
}

}  // namespace quark
