// The scalar kernels of the C++ core against plain double-precision references, without Python.
// CI cross-compiles this program for aarch64, where the scalar variants are the only ones built, and
// runs it under qemu-user (.ci/wheel_check); on x86-64 it caps the dispatch at scalar and runs as well.
// Build: cmake -S . -B build/cpp -DQUARK_PYTHON=OFF && cmake --build build/cpp -j2
// Exit status: the number of failed checks (0: all passed).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <set>
#include <string>
#include <vector>

#include "attention/attention.h"
#include "common/bf16.h"
#include "common/dispatch.h"
#include "common/threading.h"
#include "quant/gemv_f32.h"
#include "quant/qlinear.h"
#include "search/distance.h"
#include "search/gather_distance.h"
#include "search/index.h"
#include "text/minhash.h"

using namespace quark;

static int failures = 0;

static void check(bool ok, const std::string& what) {
  if (!ok) {
    std::printf("FAIL %s\n", what.c_str());
    ++failures;
  }
}

// max |got - want| relative to max(1, max |want|): float kernels against double references.
static void check_close(const float* got, const std::vector<double>& want, double tol, const std::string& what) {
  double err = 0, scale = 1;
  for (size_t i = 0; i < want.size(); ++i) {
    err = std::max(err, std::fabs(got[i] - want[i]));
    scale = std::max(scale, std::fabs(want[i]));
  }
  check(err / scale <= tol, what + ": error " + std::to_string(err / scale) + " > " + std::to_string(tol));
}

static std::vector<float> randn(int64_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist;
  std::vector<float> v(n);
  for (float& x : v) x = dist(gen);
  return v;
}

static double dot(const float* a, const float* b, int64_t d) {
  double s = 0;
  for (int64_t k = 0; k < d; ++k) s += double(a[k]) * b[k];
  return s;
}

static void test_dispatch() {
#if !QUARK_X86
  check(detected_isa() == Isa::scalar, "detected_isa is scalar off x86-64");
#endif
  std::set<std::string> names;
  for (auto& [family, max_isa] : registered_families()) {
    names.insert(family);
    check(family_isa(max_isa) == Isa::scalar, "family " + family + " runs scalar");
  }
  for (const char* f : {"attention", "distance", "gather_distance", "gemv_f32", "quant", "minhash"})
    check(names.count(f) == 1, std::string("family registered: ") + f);
}

static void test_pairwise_distance() {
  const int64_t nq = 5, nb = 19, d = 37, ldo = nb + 3;
  auto x = randn(nq * d, 1), y = randn(nb * d, 2);
  for (Metric m : {Metric::l2, Metric::ip, Metric::cosine}) {
    std::vector<float> out(nq * ldo);
    pairwise_distance({x.data(), nq, y.data(), nb, d, m, nullptr, out.data(), ldo});
    std::vector<double> want;
    std::vector<float> got;
    for (int64_t i = 0; i < nq; ++i)
      for (int64_t j = 0; j < nb; ++j) {
        const float *a = &x[i * d], *b = &y[j * d];
        double v = 0;
        if (m == Metric::l2) {
          for (int64_t k = 0; k < d; ++k) v += (double(a[k]) - b[k]) * (double(a[k]) - b[k]);
        } else if (m == Metric::ip) {
          v = -dot(a, b, d);
        } else {
          v = 1 - dot(a, b, d) / std::sqrt(dot(a, a, d) * dot(b, b, d));
        }
        want.push_back(v);
        got.push_back(out[i * ldo + j]);
      }
    check_close(got.data(), want, 1e-5, "pairwise_distance metric " + std::to_string(int(m)));
  }
}

static void test_gather_distance() {
  const int64_t rows = 23, d = 19;
  const int n = 6;
  const uint32_t idx[n] = {22, 0, 7, 7, 13, 4};
  auto base = randn(rows * d, 3), q = randn(d, 4), w = randn(d, 5);
  std::vector<uint8_t> codes(rows * d);
  for (int64_t i = 0; i < rows * d; ++i) codes[i] = uint8_t((i * 37 + 11) % 256);
  const GatherKernels& g = gather_kernels();
  std::vector<float> out(n);
  std::vector<double> l2(n), ip(n), l2q(n), ipq(n);
  const float bias = 0.75f;
  for (int i = 0; i < n; ++i) {
    const float* r = &base[idx[i] * d];
    const uint8_t* c = &codes[idx[i] * d];
    for (int64_t k = 0; k < d; ++k) {
      l2[i] += (double(q[k]) - r[k]) * (double(q[k]) - r[k]);
      l2q[i] += double(w[k]) * (double(q[k]) - c[k]) * (double(q[k]) - c[k]);
      ipq[i] += double(q[k]) * c[k];
    }
    ip[i] = -dot(q.data(), r, d);
    ipq[i] = -(ipq[i] + bias);
  }
  g.l2_f32({q.data(), nullptr, 0.f}, base.data(), d, idx, n, out.data());
  check_close(out.data(), l2, 1e-5, "gather l2_f32");
  g.ip_f32({q.data(), nullptr, 0.f}, base.data(), d, idx, n, out.data());
  check_close(out.data(), ip, 1e-5, "gather ip_f32");
  g.l2_sq8({q.data(), w.data(), 0.f}, codes.data(), d, idx, n, out.data());
  check_close(out.data(), l2q, 1e-5, "gather l2_sq8");
  g.ip_sq8({q.data(), nullptr, bias}, codes.data(), d, idx, n, out.data());
  check_close(out.data(), ipq, 1e-5, "gather ip_sq8");
}

static void test_gemv_f32() {
  const int64_t M = 3, N = 29, K = 67;
  auto x = randn(M * K, 6), w = randn(N * K, 7), bias = randn(N, 8);
  std::vector<float> out(M * N);
  gemv_f32({x.data(), w.data(), bias.data(), out.data(), M, N, K});
  std::vector<double> want(M * N);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) want[m * N + n] = dot(&x[m * K], &w[n * K], K) + bias[n];
  check_close(out.data(), want, 1e-5, "gemv_f32");
}

// want (M, N) = x . W^T + bias for a dense double W (N, K).
static std::vector<double> linear_ref(const std::vector<float>& x, const std::vector<double>& w, const float* bias,
                                      int64_t M, int64_t N, int64_t K) {
  std::vector<double> want(M * N);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double s = bias ? bias[n] : 0.0;
      for (int64_t k = 0; k < K; ++k) s += x[m * K + k] * w[n * K + k];
      want[m * N + n] = s;
    }
  return want;
}

static void test_qlinear() {
  const int64_t M = 3, N = 13, K = 96, G = 32;
  std::mt19937 gen(9);
  auto x = randn(M * K, 10), bias = randn(N, 11);
  // int8: W[n, k] = data[n, k] * scales[n]
  std::vector<int8_t> w8(N * K);
  std::vector<float> s8(N);
  std::vector<double> dense8(N * K);
  for (int64_t n = 0; n < N; ++n) {
    s8[n] = 0.01f + 0.001f * n;
    for (int64_t k = 0; k < K; ++k) {
      w8[n * K + k] = int8_t(int(gen() % 255) - 127);
      dense8[n * K + k] = double(w8[n * K + k]) * s8[n];
    }
  }
  QWeight q8{QScheme::int8, reinterpret_cast<const uint8_t*>(w8.data()), s8.data(), nullptr, nullptr, N, K, K};
  std::vector<float> out(M * N);
  QLinearArgs a{x.data(), M, q8, bias.data(), out.data()};
  qlinear_f32(a);
  check_close(out.data(), linear_ref(x, dense8, bias.data(), M, N, K), 1e-5, "qlinear int8");

  // int4: byte 16b + j of a row holds q[32b + j] (low nibble) and q[32b + j + 16] (high nibble);
  // W[n, k] = (q - zeros[n, k/G]) * scales[n, k/G], the scales in bf16.
  std::vector<uint8_t> packed(N * K / 2, 0), zeros(N * K / G);
  std::vector<uint16_t> scales(N * K / G);
  std::vector<double> dense4(N * K);
  for (int64_t i = 0; i < N * K / G; ++i) {
    zeros[i] = uint8_t(gen() % 16);
    scales[i] = f32_to_bf16(0.02f + 0.003f * float(i % 7));
  }
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) {
      const uint8_t qv = uint8_t(gen() % 16);
      const int64_t b = k / 32, j = k % 32;
      packed[n * K / 2 + 16 * b + j % 16] |= j < 16 ? qv : uint8_t(qv << 4);
      const int64_t gi = n * K / G + k / G;
      dense4[n * K + k] = (double(qv) - zeros[gi]) * bf16_to_f32(scales[gi]);
    }
  QWeight q4{QScheme::int4, packed.data(), nullptr, scales.data(), zeros.data(), N, K, G};
  a.w = q4;
  qlinear_f32(a);
  check_close(out.data(), linear_ref(x, dense4, bias.data(), M, N, K), 1e-5, "qlinear int4");

  // W8A8: x rows quantized to round_half_even(x * 127 / max|x|), exact integer dots, then scales.
  std::vector<double> want(M * N);
  for (int64_t m = 0; m < M; ++m) {
    double amax = 0;
    for (int64_t k = 0; k < K; ++k) amax = std::max(amax, double(std::fabs(x[m * K + k])));
    const float inv = 127.f / float(amax);
    for (int64_t n = 0; n < N; ++n) {
      int64_t acc = 0;
      for (int64_t k = 0; k < K; ++k) acc += int64_t(std::nearbyint(x[m * K + k] * inv)) * w8[n * K + k];
      want[m * N + n] = double(acc) * (float(amax) / 127.f) * s8[n] + bias[n];
    }
  }
  a.w = q8;
  qlinear_w8a8(a);
  check_close(out.data(), want, 1e-5, "qlinear_w8a8");
}

// Softmax attention in double for one (b, h): rows i of q against keys j < visible(i).
struct AttnRef {
  std::vector<double> out, lse, dq, dk, dv;
};

static AttnRef attention_ref(const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v,
                             const std::vector<float>& dout, int64_t B, int64_t Hq, int64_t Hkv, int64_t Sq,
                             int64_t Sk, int64_t D, double scale, bool causal) {
  AttnRef r{std::vector<double>(B * Hq * Sq * D), std::vector<double>(B * Hq * Sq),
            std::vector<double>(B * Hq * Sq * D), std::vector<double>(B * Hkv * Sk * D),
            std::vector<double>(B * Hkv * Sk * D)};
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t hk = h / (Hq / Hkv);
      const float* K = &k[(b * Hkv + hk) * Sk * D];
      const float* V = &v[(b * Hkv + hk) * Sk * D];
      for (int64_t i = 0; i < Sq; ++i) {
        const int64_t row = (b * Hq + h) * Sq + i;
        const float* Q = &q[row * D];
        const float* dO = &dout[row * D];
        const int64_t n = causal ? std::min(Sk, i + (Sk - Sq) + 1) : Sk;
        if (n <= 0) {
          r.lse[row] = -INFINITY;
          continue;
        }
        std::vector<double> p(n), dp(n);
        double mx = -INFINITY, sum = 0, delta = 0;
        for (int64_t j = 0; j < n; ++j) mx = std::max(mx, p[j] = scale * dot(Q, K + j * D, D));
        for (int64_t j = 0; j < n; ++j) sum += (p[j] = std::exp(p[j] - mx));
        r.lse[row] = mx + std::log(sum);
        for (int64_t j = 0; j < n; ++j) {
          p[j] /= sum;
          for (int64_t e = 0; e < D; ++e) r.out[row * D + e] += p[j] * V[j * D + e];
        }
        for (int64_t e = 0; e < D; ++e) delta += double(dO[e]) * r.out[row * D + e];
        for (int64_t j = 0; j < n; ++j) {
          dp[j] = p[j] * (dot(dO, V + j * D, D) - delta);   // dS = P * (dP - rowsum(dO * O))
          for (int64_t e = 0; e < D; ++e) {
            r.dq[row * D + e] += scale * dp[j] * K[j * D + e];
            r.dk[((b * Hkv + hk) * Sk + j) * D + e] += scale * dp[j] * Q[e];
            r.dv[((b * Hkv + hk) * Sk + j) * D + e] += p[j] * dO[e];
          }
        }
      }
    }
  return r;
}

static void test_attention() {
  const int64_t B = 2, Hq = 4, Hkv = 2, Sq = 5, Sk = 7, D = 16;
  auto q = randn(B * Hq * Sq * D, 12), k = randn(B * Hkv * Sk * D, 13), v = randn(B * Hkv * Sk * D, 14);
  auto dout = randn(B * Hq * Sq * D, 15);
  const float scale = 1.f / std::sqrt(float(D));
  for (bool causal : {false, true}) {
    const std::string tag = causal ? " causal" : " full";
    AttnRef r = attention_ref(q, k, v, dout, B, Hq, Hkv, Sq, Sk, D, scale, causal);
    std::vector<float> out(B * Hq * Sq * D), lse(B * Hq * Sq);
    attention_forward({q.data(), k.data(), v.data(), DType::f32, B, Hq, Hkv, Sq, Sk, D, scale, causal, out.data(),
                       lse.data()});
    check_close(out.data(), r.out, 1e-5, "attention forward" + tag);
    check_close(lse.data(), r.lse, 1e-5, "attention lse" + tag);
    std::vector<float> dq(q.size()), dk(k.size()), dv(v.size());
    attention_backward({q.data(), k.data(), v.data(), out.data(), dout.data(), DType::f32, lse.data(), B, Hq, Hkv,
                        Sq, Sk, D, scale, causal, dq.data(), dk.data(), dv.data()});
    check_close(dq.data(), r.dq, 1e-4, "attention dq" + tag);
    check_close(dk.data(), r.dk, 1e-4, "attention dk" + tag);
    check_close(dv.data(), r.dv, 1e-4, "attention dv" + tag);
  }
}

static void test_decode_attention() {
  const int64_t B = 3, Hq = 4, Hkv = 2, Smax = 9, D = 24;
  const int64_t lengths[B] = {9, 0, 4};
  auto q = randn(B * Hq * D, 16), k = randn(B * Hkv * Smax * D, 17), v = randn(B * Hkv * Smax * D, 18);
  const float scale = 1.f / std::sqrt(float(D));
  // int8 cache: per (b, h, position) scales; the reference attends over the dequantized values.
  std::vector<int8_t> k8(k.size()), v8(v.size());
  std::vector<float> ks(B * Hkv * Smax), vs(B * Hkv * Smax), kd(k.size()), vd(v.size());
  for (int64_t t = 0; t < B * Hkv * Smax; ++t) {
    ks[t] = 0.02f + 0.001f * float(t % 5);
    vs[t] = 0.03f - 0.001f * float(t % 3);
    for (int64_t e = 0; e < D; ++e) {
      k8[t * D + e] = int8_t(std::lrint(std::max(-127.f, std::min(127.f, k[t * D + e] / ks[t]))));
      v8[t * D + e] = int8_t(std::lrint(std::max(-127.f, std::min(127.f, v[t * D + e] / vs[t]))));
      kd[t * D + e] = k8[t * D + e] * ks[t];
      vd[t * D + e] = v8[t * D + e] * vs[t];
    }
  }
  for (bool i8 : {false, true}) {
    const std::vector<float>& K = i8 ? kd : k;
    const std::vector<float>& V = i8 ? vd : v;
    std::vector<double> want(B * Hq * D);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < Hq; ++h) {
        const int64_t base = (b * Hkv + h / (Hq / Hkv)) * Smax;
        std::vector<double> p(lengths[b]);
        double mx = -INFINITY, sum = 0;
        for (int64_t j = 0; j < lengths[b]; ++j)
          mx = std::max(mx, p[j] = scale * dot(&q[(b * Hq + h) * D], &K[(base + j) * D], D));
        for (double& x : p) sum += (x = std::exp(x - mx));
        for (int64_t j = 0; j < lengths[b]; ++j)
          for (int64_t e = 0; e < D; ++e) want[(b * Hq + h) * D + e] += p[j] / sum * V[(base + j) * D + e];
      }
    std::vector<float> out(B * Hq * D, NAN);
    DecodeArgs a{q.data(), DType::f32, i8 ? (const void*)k8.data() : k.data(), i8 ? (const void*)v8.data() : v.data(),
                 i8 ? DType::i8 : DType::f32, i8 ? ks.data() : nullptr, i8 ? vs.data() : nullptr, lengths,
                 B, Hq, Hkv, Smax, D, scale, out.data()};
    decode_attention(a);
    check_close(out.data(), want, 1e-5, i8 ? "decode_attention int8 cache" : "decode_attention fp32 cache");
  }
}

// The hashes of text/minhash.h, written out from its description.
static uint64_t fmix64(uint64_t k) {
  k ^= k >> 33, k *= 0xff51afd7ed558ccdULL, k ^= k >> 33, k *= 0xc4ceb9fe1a85ec53ULL;
  return k ^ (k >> 33);
}

static uint64_t splitmix64(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ULL);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

static uint64_t bytes_hash(const std::string& s) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (size_t i = 0; i < s.size(); i += 8) {
    uint64_t v = 0;
    for (size_t j = 0; j < 8 && i + j < s.size(); ++j) v |= uint64_t((unsigned char)s[i + j]) << (8 * j);
    h = (h ^ v) * 0x9FB21C651E98DF25ULL;
    h ^= h >> 32;
  }
  return fmix64(h ^ s.size());
}

static std::vector<uint64_t> run_minhash(const std::vector<std::string>& docs, int num_perm, int ngram,
                                         ShingleUnit unit, uint64_t seed) {
  std::vector<const char*> ptrs;
  std::vector<int64_t> lens;
  for (auto& d : docs) ptrs.push_back(d.data()), lens.push_back(int64_t(d.size()));
  std::vector<uint64_t> out(docs.size() * num_perm);
  minhash({ptrs.data(), lens.data(), int64_t(docs.size()), num_perm, ngram, unit, seed, out.data()});
  return out;
}

static void test_minhash() {
  const int P = 40;   // not a multiple of the 32-lane block: the padding is dropped
  const uint64_t seed = 7;
  // Character shingles longer than the text: one shingle, the bytes hash of the whole text, so
  // sig[i] = a_i * h + b_i mod 2^64 with (a_i, b_i) drawn from splitmix64(seed).
  const std::string text = "Quark on every CPU: \xc3\xa9t\xc3\xa9, hash me";
  auto sig = run_minhash({text, ""}, P, 64, ShingleUnit::chr, seed);
  uint64_t state = seed;
  const uint64_t h = bytes_hash(text);
  bool exact = true, empty = true;
  for (int i = 0; i < P; ++i) {
    const uint64_t a = splitmix64(state) | 1, b = splitmix64(state);
    exact &= sig[i] == a * h + b;
    empty &= sig[P + i] == std::numeric_limits<uint64_t>::max();
  }
  check(exact, "minhash of one shingle is a_i * hash + b_i");
  check(empty, "minhash of an empty document is all UINT64_MAX");
  // Word unigrams: the signature of {alpha, beta} is the elementwise min of those of {alpha}, {beta}.
  auto w = run_minhash({"alpha, Beta!", "ALPHA", "beta", "beta alpha alpha"}, P, 1, ShingleUnit::word, seed);
  bool union_min = true, same_set = true;
  for (int i = 0; i < P; ++i) {
    union_min &= w[i] == std::min(w[P + i], w[2 * P + i]);
    same_set &= w[3 * P + i] == w[i];
  }
  check(union_min, "minhash of a union is the min of the parts");
  check(same_set, "minhash depends on the shingle set only (case, order, repeats)");
}

static void test_index() {
  const int64_t dim = 12, n = 200, nq = 4, k = 5;
  auto x = randn(n * dim, 19), q = randn(nq * dim, 20);
  // brute-force top-k (squared l2) for the queries
  std::vector<std::vector<std::pair<double, int64_t>>> truth(nq);
  for (int64_t i = 0; i < nq; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (int64_t e = 0; e < dim; ++e) s += (double(q[i * dim + e]) - x[j * dim + e]) * (double(q[i * dim + e]) - x[j * dim + e]);
      truth[i].push_back({s, 100 + j});
    }
    std::sort(truth[i].begin(), truth[i].end());
  }
  std::vector<int64_t> ids(n), ids_out(n);
  for (int64_t j = 0; j < n; ++j) ids[j] = 100 + j;
  IndexConfig flat_cfg;
  flat_cfg.dim = dim, flat_cfg.kind = IndexKind::flat;
  VectorIndex flat(flat_cfg);
  flat.add(x.data(), n, ids.data(), ids_out.data());
  check(flat.size() == n, "flat index holds every row");
  std::vector<float> dist(nq * k);
  std::vector<int64_t> got(nq * k);
  flat.search(q.data(), nq, k, 0, 0, nullptr, 0, dist.data(), got.data());
  std::vector<double> want_d;
  bool ids_ok = true;
  for (int64_t i = 0; i < nq; ++i)
    for (int64_t r = 0; r < k; ++r) {
      want_d.push_back(truth[i][r].first);
      ids_ok &= got[i * k + r] == truth[i][r].second;
    }
  check(ids_ok, "flat search returns the exact nearest ids in order");
  check_close(dist.data(), want_d, 1e-5, "flat search distances");

  // HNSW: every stored row finds itself at distance 0.
  IndexConfig hnsw_cfg;
  hnsw_cfg.dim = dim, hnsw_cfg.M = 8, hnsw_cfg.ef_construction = 64;
  VectorIndex hnsw(hnsw_cfg);
  hnsw.add(x.data(), n, ids.data(), ids_out.data());
  std::vector<float> d1(n);
  std::vector<int64_t> i1(n);
  hnsw.search(x.data(), n, 1, 64, 0, nullptr, 0, d1.data(), i1.data());
  int64_t self = 0;
  for (int64_t j = 0; j < n; ++j) self += i1[j] == 100 + j && d1[j] == 0.f;
  check(self == n, "hnsw finds every stored row itself: " + std::to_string(self) + " of " + std::to_string(n));
}

// The kernels' thread pool (the Python side, tests/test_threading.py, covers more): every item once
// at odd sizes and thread counts, nested calls inline, a chunk's exception rethrown.
static void test_thread_pool() {
  for (int threads : {1, 2, 3}) {
    set_num_threads(threads);
    for (int64_t n : {0, 1, 2, 7, 1000, 100003}) {
      std::vector<std::atomic<int>> runs(n);
      std::atomic<bool> nested_inline{true};
      parallel_for(n, 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) runs[i].fetch_add(1);
        int calls = 0;
        parallel_for(10, 1, [&](int64_t b, int64_t e) { calls += b == 0 && e == 10; });
        if (calls != 1 && n > 1) nested_inline = false;   // n = 1 runs inline, not on the pool
      });
      bool once = true;
      for (auto& r : runs) once &= r.load() == 1;
      const std::string where = " (n " + std::to_string(n) + ", threads " + std::to_string(threads) + ")";
      check(once, "parallel_for runs every item exactly once" + where);
      check(nested_inline, "a nested parallel_for runs inline" + where);
    }
    bool thrown = false;
    try {
      parallel_for(5000, 1, [&](int64_t begin, int64_t end) {
        if (begin <= 4321 && 4321 < end) throw std::runtime_error("item 4321");
      });
    } catch (const std::runtime_error& e) {
      thrown = std::string(e.what()) == "item 4321";
    }
    check(thrown, "a chunk's exception reaches the caller (threads " + std::to_string(threads) + ")");
  }
  set_num_threads(2);
}

int main() {
  set_isa(Isa::scalar);
  test_dispatch();
  test_pairwise_distance();
  test_gather_distance();
  test_gemv_f32();
  test_qlinear();
  test_attention();
  test_decode_attention();
  test_minhash();
  test_index();
  test_thread_pool();
  std::printf("%s: scalar kernels (%s build): %d failed checks\n", failures ? "FAIL" : "OK",
#if QUARK_X86
              "x86-64",
#else
              "non-x86",
#endif
              failures);
  return failures;
}
