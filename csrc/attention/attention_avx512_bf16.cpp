#include "attention/attention_blocked.h"
#include "attention/attention_vec_avx512.h"

namespace quark {

void attention_forward_bf16_avx512_bf16(const AttentionFwdArgs& a) { Blocked<VecAvx512>::forward(a); }

}  // namespace quark
