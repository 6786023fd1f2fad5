// AVX-512 path: the blocked driver (attention_blocked.h) on 16-lane zmm registers.
#include "attention/attention_blocked.h"
#include "attention/attention_vec_avx512.h"

namespace quark {

void attention_forward_avx512(const AttentionFwdArgs& a) { Blocked<VecAvx512>::forward(a); }
void attention_backward_avx512(const AttentionBwdArgs& a) { Blocked<VecAvx512>::backward(a); }
void decode_attention_avx512(const DecodeArgs& a) { Blocked<VecAvx512>::decode(a); }

}  // namespace quark
