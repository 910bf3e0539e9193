// AVX2 + FMA path of the CPU top-k relaxation (csrc/cpu/curriculum.cpp): 4 tokens at a time through
// every phase of duo::tempered_softmax_topk_token (block 0's Box-Muller, the k order statistics, the
// Fisher-Yates lookups, the slots, the tail and the exps of the normaliser) as 4-lane float64 vector
// code. CPU only: the CUDA kernel and the scalar CPU path use duo/order_stats.h as is. No torch
// headers and no -march flag: every function here carries target("avx2,fma") and the caller checks
// the CPU at run time (avx2_available()).
//
// Accuracy. The vector log (fdlibm's algorithm), exp (Cody-Waite reduction + Taylor series on
// |r| <= ln2/2), cos/sin (Taylor series on [0, pi/4]), Cephes' ndtri tail (with log(-expm1(c)) as
// log(-c) plus a series in c) and Cody's erfcx: log, exp, cos, sin within 1 ulp of libm, the order
// statistics within ~6 ulp of the scalar ones at worst (next to the edge of the fast domain), erfcx
// within ~8 (~1e-19 absolute in log Phi(a)). So ids agree with the reference's exactly, z_t up to
// ties, and the float32 weights to rounding (bit-identical in every check so far). Lanes outside the fast domains (|C_j| > 1/16 or ndtri beyond its x < 8 branch, exp
// beyond 709 or of NaN, the tail outside its usual branches) are recomputed with the scalar
// functions of duo/order_stats.h.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DUO_TOPK_AVX2 1

#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "duo/order_stats.h"

#define DUO_AVX2 __attribute__((target("avx2,fma"))) static inline

namespace duo::cpu::avx2 {

inline bool avx2_available() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

using vd = __m256d;
using vi = __m256i;

DUO_AVX2 vd set(double x) { return _mm256_set1_pd(x); }
DUO_AVX2 vi set_i(int64_t x) { return _mm256_set1_epi64x(x); }
DUO_AVX2 vd fma(vd a, vd b, vd c) { return _mm256_fmadd_pd(a, b, c); }
DUO_AVX2 vd as_d(vi x) { return _mm256_castsi256_pd(x); }
DUO_AVX2 vi as_i(vd x) { return _mm256_castpd_si256(x); }
DUO_AVX2 vd neg(vd x) { return _mm256_xor_pd(x, set(-0.0)); }
DUO_AVX2 vi load_i(const int64_t* p) { return _mm256_load_si256(reinterpret_cast<const vi*>(p)); }
DUO_AVX2 void store_i(int64_t* p, vi x) { _mm256_store_si256(reinterpret_cast<vi*>(p), x); }

// a * b rounded to a double: the empty asm keeps the compiler from contracting the product into a
// following addition (an FMA), which the reference's separately rounded operations do not do.
DUO_AVX2 vd scaled(vd a, vd b) {
  vd p = _mm256_mul_pd(a, b);
  __asm__("" : "+x"(p));
  return p;
}

// Horner's rule, highest-degree coefficient first (as duo::horner).
DUO_AVX2 vd horner(vd, vd acc) { return acc; }
template <typename... Rest>
__attribute__((target("avx2,fma"))) inline vd horner(vd x, vd acc, double c, Rest... rest) {
  return horner(x, fma(acc, x, set(c)), rest...);
}
template <typename... Rest>
__attribute__((target("avx2,fma"))) inline vd poly(vd x, double c0, Rest... rest) {
  return horner(x, set(c0), rest...);
}

// (m + 1/2) 2^-52 of 52-bit integers m < 2^52 held in 64-bit lanes: exact (2^52 + m is a double).
DUO_AVX2 vd odd_grid(vi m) {
  return _mm256_mul_pd(_mm256_sub_pd(as_d(_mm256_or_si256(m, set_i(0x4330000000000000))), set(4503599627370495.5)),
                       set(2.220446049250313e-16));
}

// log of positive normal doubles, fdlibm's e_log.c algorithm branch-free: v = 2^e m with
// m in [sqrt(2)/2, sqrt(2)), f = m - 1, s = f / (2 + f), log(1 + f) = f - hfsq + s (hfsq + R(s^2)).
DUO_AVX2 vd log(vd v) {
  const vi ix = as_i(v);
  // e + 1023 from the bits of v / (sqrt(2)/2): exponent field of ix + (0x3ff... - bits(sqrt(2)/2))
  const vi biased = _mm256_srli_epi64(_mm256_add_epi64(ix, set_i(0x3ff0000000000000 - 0x3fe6a09e667f3bcd)), 52);
  const vd m = as_d(_mm256_sub_epi64(ix, _mm256_slli_epi64(_mm256_sub_epi64(biased, set_i(1023)), 52)));
  const vd e = _mm256_sub_pd(_mm256_sub_pd(as_d(_mm256_or_si256(biased, set_i(0x4330000000000000))),
                                           set(4503599627370496.0)),
                             set(1023.0));
  const vd f = _mm256_sub_pd(m, set(1.0));
  const vd s = _mm256_div_pd(f, _mm256_add_pd(set(2.0), f));
  const vd z = _mm256_mul_pd(s, s);
  const vd w = _mm256_mul_pd(z, z);
  const vd t1 = _mm256_mul_pd(w, poly(w, 1.531383769920937332e-01, 2.222219843214978396e-01, 3.999999999940941908e-01));
  const vd t2 = _mm256_mul_pd(z, poly(w, 1.479819860511658591e-01, 1.818357216161805012e-01, 2.857142874366239149e-01,
                                      6.666666666666735130e-01));
  const vd r = _mm256_add_pd(t2, t1);
  const vd hfsq = _mm256_mul_pd(_mm256_mul_pd(set(0.5), f), f);
  // e ln2_hi - ((hfsq - (s (hfsq + R) + e ln2_lo)) - f)
  const vd inner = fma(s, _mm256_add_pd(hfsq, r), _mm256_mul_pd(e, set(1.90821492927058770002e-10)));
  return fma(e, set(6.93147180369123816490e-01), _mm256_sub_pd(f, _mm256_sub_pd(hfsq, inner)));
}

// exp(x) for x in [-746, 709]: n = round(x / ln2), r = x - n ln2 (Cody-Waite, FMA), exp(r) by its
// Taylor series to r^13 / 13! (|r| <= ln2/2), times 2^n through the exponent bits; below 2^-1020 as
// (p 2^(n + 600)) 2^-600, one rounding into the subnormals. Below -746 (and -inf) it returns 0, as
// exp does; the caller recomputes above 709 and NaN with the scalar exp.
DUO_AVX2 vd exp_finite(vd x) {
  const vd shifter = set(6755399441055744.0);  // 1.5 2^52: adding it rounds to an integer in the low bits
  const vd t = fma(x, set(1.4426950408889634), shifter);
  const vd n = _mm256_sub_pd(t, shifter);
  const vd r = fma(n, set(-1.90821492927058770002e-10), fma(n, set(-6.93147180369123816490e-01), x));
  const vd p = poly(r, 1.0 / 6227020800, 1.0 / 479001600, 1.0 / 39916800, 1.0 / 3628800, 1.0 / 362880, 1.0 / 40320,
                    1.0 / 5040, 1.0 / 720, 1.0 / 120, 1.0 / 24, 1.0 / 6, 0.5, 1.0, 1.0);
  const vd tiny = _mm256_cmp_pd(n, set(-1020.0), _CMP_LT_OQ);
  const vi bias = _mm256_castpd_si256(_mm256_blendv_pd(as_d(set_i(1023)), as_d(set_i(1023 + 600)), tiny));
  const vd scale = as_d(_mm256_slli_epi64(_mm256_add_epi64(as_i(t), bias), 52));
  const vd y = _mm256_mul_pd(_mm256_mul_pd(p, scale), _mm256_blendv_pd(set(1.0), set(0x1p-600), tiny));
  return _mm256_and_pd(y, _mm256_cmp_pd(x, set(-746.0), _CMP_GE_OQ));
}

// Lanes exp_finite leaves to the scalar exp (overflow, NaN).
DUO_AVX2 int exp_scalar_lanes(vd x) {
  return ~_mm256_movemask_pd(_mm256_cmp_pd(x, set(709.0), _CMP_LE_OQ)) & 0xF;
}

// cos(x) and sin(x) for x in [0, pi/4]: Taylor series to x^16 / 16! and x^17 / 17!.
DUO_AVX2 vd cos_quarter(vd x) {
  const vd x2 = _mm256_mul_pd(x, x);
  const vd p = poly(x2, 1.0 / 20922789888000, -1.0 / 87178291200, 1.0 / 479001600, -1.0 / 3628800, 1.0 / 40320,
                    -1.0 / 720, 1.0 / 24, -0.5);
  return fma(x2, p, set(1.0));
}
DUO_AVX2 vd sin_quarter(vd x) {
  const vd x2 = _mm256_mul_pd(x, x);
  const vd p = poly(x2, 1.0 / 355687428096000, -1.0 / 1307674368000, 1.0 / 6227020800, -1.0 / 39916800,
                    1.0 / 362880, -1.0 / 5040, 1.0 / 120, -1.0 / 6);
  return fma(_mm256_mul_pd(x, x2), p, x);
}

// duo::cos_2pi: the same exact quarter-turn reduction, then cos or sin on [0, pi/4].
DUO_AVX2 vd cos_2pi(vd u) {
  vd a = _mm256_min_pd(u, _mm256_sub_pd(set(1.0), u));
  const vd flip = _mm256_cmp_pd(a, set(0.25), _CMP_GT_OQ);
  a = _mm256_blendv_pd(a, _mm256_sub_pd(set(0.5), a), flip);
  const vd use_cos = _mm256_cmp_pd(a, set(0.125), _CMP_LE_OQ);
  const vd arg = _mm256_mul_pd(set(6.283185307179586), _mm256_blendv_pd(_mm256_sub_pd(set(0.25), a), a, use_cos));
  const vd c = _mm256_blendv_pd(sin_quarter(arg), cos_quarter(arg), use_cos);
  return _mm256_xor_pd(c, _mm256_and_pd(flip, set(-0.0)));
}

// Philox4x32-10 of 4 counters (64-bit lanes; each 32-bit word in the low half of a lane): the words
// come back with zero high halves. _mm256_mul_epu32 reads only the low halves, so the rounds leave
// garbage in the high halves of c1 / c3 and mask once at the end.
struct Words4 {
  vi w0, w1, w2, w3;
};

// The 10 round keys (k0, k1) of a seed, broadcast.
struct Keys {
  vi k[10][2];
};

DUO_AVX2 Keys round_keys(uint64_t seed) {
  Keys keys;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    keys.k[round][0] = set_i(k0);
    keys.k[round][1] = set_i(k1);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return keys;
}

DUO_AVX2 Words4 philox(const Keys& keys, vi counter) {
  vi c0 = counter, c1 = _mm256_srli_epi64(counter, 32), c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
  const vi m0 = set_i(0xD2511F53), m1 = set_i(0xCD9E8D57);
  for (int round = 0; round < 10; ++round) {
    const vi p0 = _mm256_mul_epu32(c0, m0);
    const vi p1 = _mm256_mul_epu32(c2, m1);
    c0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p1, 32), c1), keys.k[round][0]);
    c2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p0, 32), c3), keys.k[round][1]);
    c1 = p1;
    c3 = p0;
  }
  const vi lo = set_i(0xFFFFFFFF);
  return Words4{_mm256_and_si256(c0, lo), _mm256_and_si256(c1, lo), _mm256_and_si256(c2, lo),
                _mm256_and_si256(c3, lo)};
}

// duo::uniform53 and duo::randint_below (high < 2^31) lane by lane.
DUO_AVX2 vd uniform53(vi w_hi, vi w_lo) {
  return odd_grid(_mm256_or_si256(_mm256_slli_epi64(w_hi, 20), _mm256_srli_epi64(w_lo, 12)));
}
DUO_AVX2 vi randint_below(vi w_hi, vi w_lo, int64_t high) {
  const vi h = set_i(high);
  const vi t = _mm256_mul_epu32(w_lo, h);
  return _mm256_srli_epi64(_mm256_add_epi64(_mm256_mul_epu32(w_hi, h), _mm256_srli_epi64(t, 32)), 32);
}

// Block 0 of tokens t..t+3: w_x = a~ + s~ n, n = sqrt(-2 log u1) cos(2 pi u2) (duo::topk_begin).
DUO_AVX2 vd clean_coordinate(const Keys& keys, vi t, vd a_tilde, vd s_tilde) {
  const Words4 w = philox(keys, t);
  const vd u1 = uniform53(w.w0, w.w1), u2 = uniform53(w.w2, w.w3);
  const vd n = _mm256_mul_pd(_mm256_sqrt_pd(_mm256_mul_pd(set(-2.0), log(u1))), cos_2pi(u2));
  return fma(s_tilde, n, a_tilde);
}

// -ndtri(-expm1(c)) (duo::normal_order_statistic) where -expm1(c) is in Cephes' tail branch
// x = sqrt(-2 log y) < 8: x - log(x)/x - z P(z)/Q(z), z = 1/x. In three steps (order_statistic_x,
// then order_statistic_from_x) so that the caller can run each over all k statistics in turn.
// log y = log(-expm1(c)) = log(-c) + log(expm1(c) / c), the latter c/2 + log(sinh(c/2) / (c/2)) =
// c/2 + c^2/24 - c^4/2880 + c^6/181440 - c^8/9676800 + O(c^10) (below 2^-60 for |c| <= 1/16): no
// expm1 and y is never formed.
DUO_AVX2 vd order_statistic_x(vd c) {
  const vd c2 = _mm256_mul_pd(c, c);
  const vd even = _mm256_mul_pd(c2, poly(c2, -1.0 / 9676800, 1.0 / 181440, -1.0 / 2880, 1.0 / 24));
  const vd log_y = _mm256_add_pd(log(neg(c)), fma(c, set(0.5), even));
  return _mm256_sqrt_pd(_mm256_mul_pd(set(-2.0), log_y));
}

// *scalar gets the lanes outside the fast domain (|c| > 1/16 or x >= 8, NaN), for the scalar function.
DUO_AVX2 vd order_statistic_from_x(vd c, vd x, int* scalar) {
  const vd z = _mm256_div_pd(set(1.0), x);
  const vd x0 = _mm256_sub_pd(x, _mm256_mul_pd(log(x), z));
  const vd p = poly(z, 4.05544892305962419923E0, 3.15251094599893866154E1, 5.71628192246421288162E1,
                    4.40805073893200834700E1, 1.46849561928858024014E1, 2.18663306850790267539E0,
                    -1.40256079171354495875E-1, -3.50424626827848203418E-2, -8.57456785154685413611E-4);
  const vd q = poly(z, 1.0, 1.57799883256466749731E1, 4.53907635128879210584E1, 4.13172038254672030440E1,
                    1.50425385692907503408E1, 2.50464946208309415979E0, -1.42182922854787788574E-1,
                    -3.80806407691578277194E-2, -9.33259480895457427372E-4);
  const vd fast = _mm256_and_pd(_mm256_cmp_pd(c, set(-0.0625), _CMP_GE_OQ), _mm256_cmp_pd(x, set(8.0), _CMP_LT_OQ));
  *scalar = ~_mm256_movemask_pd(fast) & 0xF;
  return _mm256_sub_pd(x0, _mm256_div_pd(_mm256_mul_pd(z, p), q));
}

DUO_AVX2 vd normal_order_statistic(vd c, int* scalar) {
  return order_statistic_from_x(c, order_statistic_x(c), scalar);
}

// exp with the lanes exp_finite leaves out recomputed by the scalar exp.
DUO_AVX2 vd exp(vd x) {
  vd y = exp_finite(x);
  if (const int scalar = exp_scalar_lanes(x)) {
    alignas(32) double xs[4], ys[4];
    _mm256_store_pd(xs, x);
    _mm256_store_pd(ys, y);
    for (int l = 0; l < 4; ++l) {
      if (scalar >> l & 1) ys[l] = std::exp(xs[l]);
    }
    y = _mm256_load_pd(ys);
  }
  return y;
}

// duo::erfcx_nonnegative on (4, inf): Cody's rational form in z = 1/y^2, 1/(sqrt(pi) y) from 6.71e7.
DUO_AVX2 vd erfcx_large(vd y) {
  const vd inv_sqrt_pi = set(5.6418958354775628695e-1);
  const vd z = _mm256_div_pd(set(1.0), _mm256_mul_pd(y, y));
  const vd p = poly(z, 1.63153871373020978e-2, 3.05326634961232344e-1, 3.60344899949804439e-1,
                    1.25781726111229246e-1, 1.60837851487422766e-2, 6.58749161529837803e-4);
  const vd q = poly(z, 1.0, 2.56852019228982242e00, 1.87295284992346047e00, 5.27905102951428412e-1,
                    6.05183413124413191e-2, 2.33520497626869185e-3);
  const vd r = _mm256_div_pd(_mm256_mul_pd(z, p), q);
  return _mm256_div_pd(_mm256_blendv_pd(_mm256_sub_pd(inv_sqrt_pi, r), inv_sqrt_pi,
                                        _mm256_cmp_pd(y, set(6.71e7), _CMP_GE_OQ)),
                       y);
}

// duo::erfcx_nonnegative on (0.46875, 4]: Cody's rational form in y.
DUO_AVX2 vd erfcx_mid(vd y) {
  return _mm256_div_pd(poly(y, 2.15311535474403846e-8, 5.64188496988670089e-1, 8.88314979438837594e00,
                            6.61191906371416295e01, 2.98635138197400131e02, 8.81952221241769090e02,
                            1.71204761263407058e03, 2.05107837782607147e03, 1.23033935479799725e03),
                       poly(y, 1.0, 1.57449261107098347e01, 1.17693950891312499e02, 5.37181101862009858e02,
                            1.62138957456669019e03, 3.29079923573345963e03, 4.36261909014324716e03,
                            3.43936767414372164e03, 1.23033935480374942e03));
}

// duo::log_truncated_mean_exp(c, s, inv_tau) where a = c/s < b = s inv_tau, (b - a)/sqrt 2 > 4 and
// t = a/sqrt 2 in (0.5, 4] (the usual case; and y < 1e300); *scalar gets the other lanes. log Phi(a) =
// log1p(-q), q = exp(-t^2) erfcx(t) / 2 (~1e-15 relative in q: ~1e-16 absolute in log1p(-q)),
// log1p(u) = log(1 + u) + (u - ((1 + u) - 1)) / (1 + u).
DUO_AVX2 vd log_truncated_mean_exp(vd c, vd s, double inv_tau, int* scalar) {
  const vd a = _mm256_div_pd(c, s);
  const vd b = scaled(s, set(inv_tau));
  const vd y = _mm256_div_pd(_mm256_sub_pd(b, a), set(1.4142135623730951));
  const vd head = _mm256_add_pd(scaled(a, _mm256_sub_pd(b, _mm256_div_pd(a, set(2.0)))),
                                log(_mm256_div_pd(erfcx_large(y), set(2.0))));
  const vd t = _mm256_mul_pd(a, set(0.70710678118654752440));
  const vd q = _mm256_mul_pd(_mm256_mul_pd(exp_finite(_mm256_mul_pd(neg(t), t)), erfcx_mid(t)), set(0.5));
  const vd u = neg(q);
  const vd w = _mm256_add_pd(set(1.0), u);
  const vd log_phi_a = _mm256_add_pd(log(w), _mm256_div_pd(_mm256_sub_pd(u, _mm256_sub_pd(w, set(1.0))), w));
  // (y < 1e300: erfcx(y) / 2 stays a normal double, the domain of the vector log)
  const vd y_fast = _mm256_and_pd(_mm256_cmp_pd(y, set(4.0), _CMP_GT_OQ), _mm256_cmp_pd(y, set(1e300), _CMP_LT_OQ));
  const vd t_fast = _mm256_and_pd(_mm256_cmp_pd(t, set(0.5), _CMP_GT_OQ), _mm256_cmp_pd(t, set(4.0), _CMP_LE_OQ));
  const vd fast = _mm256_and_pd(y_fast, t_fast);
  *scalar = ~_mm256_movemask_pd(fast) & 0xF;
  return _mm256_sub_pd(head, log_phi_a);
}

// Terms of the normaliser below e^-kNegligible of its largest (1): they leave the float64 sum unchanged
// (below half an ulp of 1) and have float32 weights of 0 (below 2^-150).
constexpr double kNegligible = 110.0;

// m - kNegligible, less a relative margin for the rounding of huge scaled values at tiny tau.
DUO_AVX2 vd negligible_below(vd m) {
  return _mm256_sub_pd(m, _mm256_add_pd(set(kNegligible), _mm256_mul_pd(_mm256_andnot_pd(set(-0.0), m), set(1e-12))));
}

// Whether v < below in all 4 lanes.
DUO_AVX2 bool negligible(vd v, vd below) { return _mm256_movemask_pd(_mm256_cmp_pd(v, below, _CMP_LT_OQ)) == 0xF; }

// exp(v - m), or 0 without computing it where the term is negligible in all 4 lanes.
DUO_AVX2 vd shifted_exp(vd v, vd m, vd below) {
  return negligible(v, below) ? _mm256_setzero_pd() : exp(_mm256_sub_pd(v, m));
}

// Tokens [begin, end) of tempered_softmax_topk, 4 at a time (the last group padded with copies of
// its first token, whose results are dropped), every phase as vector code over the 4 tokens: block 0,
// the k order statistics, the Fisher-Yates lookups, the slots, the tail and the weights, in the
// order of operations of duo::tempered_softmax_topk_token. `scratch`: topk_scratch_doubles(k)
// doubles, 32-byte aligned. Returns bit 0 if an x0 is outside [0, V), bit 1 if a gamma is not finite
// (kBadId and kBadGamma of cpu/kernels.h).
__attribute__((target("avx2,fma"))) inline int tempered_softmax_topk_tokens(
    const TopkConfig& cfg, int64_t begin, int64_t end, const int64_t* x0, const PerToken& gamma, int64_t length,
    double* scratch, int64_t* out_ids, float* out_weights, int64_t* out_z) {
  const int k = cfg.k;
  // [j][lane] tables: order statistics (then their exps), swap targets, moved values, noise ids;
  // slot weights and ids
  double* o = scratch;
  int64_t* picks = reinterpret_cast<int64_t*>(scratch + 4 * k);
  int64_t* moved = reinterpret_cast<int64_t*>(scratch + 8 * k);
  int64_t* other_ids = reinterpret_cast<int64_t*>(scratch + 12 * k);
  int64_t* slot_ids = reinterpret_cast<int64_t*>(scratch + 16 * k);
  double* slot_terms = scratch + 20 * k;
  float* slot_weights = reinterpret_cast<float*>(scratch + 24 * k);
  double* cum = scratch + 28 * k;
  PerTokenCursor gamma_at(gamma, begin, length);
  double last_gamma = NAN;
  GaussianStd std_dev{0.0, 0.0};
  alignas(32) double a_tilde[4], s_tilde[4], lane_c[4], lane_v[4];
  alignas(32) int64_t lane_x[4];
  const vd inv_tau = set(cfg.inv_tau);
  const Keys keys = round_keys(cfg.seed);
  const bool compat = cfg.reference_compat;
  int bad = 0;
  for (int64_t t0 = begin; t0 < end; t0 += 4) {
    const int lanes = end - t0 < 4 ? static_cast<int>(end - t0) : 4;
    for (int l = 0; l < lanes; ++l, gamma_at.next()) {
      const double gamma_t = gamma_at.value();
      if (!(gamma_t == last_gamma)) {
        std_dev = gaussian_std(gamma_t);
        last_gamma = gamma_t;
        bad |= std::isfinite(gamma_t) ? 0 : 2;
      }
      a_tilde[l] = std_dev.a_tilde;
      s_tilde[l] = std_dev.s_tilde;
      lane_x[l] = x0[t0 + l];
      bad |= static_cast<uint64_t>(lane_x[l]) < static_cast<uint64_t>(cfg.vocab_size) ? 0 : 1;
    }
    for (int l = lanes; l < 4; ++l) {
      a_tilde[l] = a_tilde[0];
      s_tilde[l] = s_tilde[0];
      lane_x[l] = lane_x[0];
    }
    const vi t = _mm256_add_epi64(set_i(t0),
                                  _mm256_set_epi64x(lanes > 3 ? 3 : 0, lanes > 2 ? 2 : 0, lanes > 1 ? 1 : 0, 0));
    const vd s = _mm256_load_pd(s_tilde);
    const vd w_x = clean_coordinate(keys, t, _mm256_load_pd(a_tilde), s);

    // blocks 1..k: the swap targets and log(U_j) / (V - 1 - j), the running sums C_j, the order
    // statistics. Each step is a loop of k independent iterations, short enough for the CPU to
    // overlap several iterations' long log / sqrt / division chains.
    for (int j = 0; j < k; ++j) {
      const int64_t pool = cfg.vocab_size - 1 - j;
      const Words4 w = philox(keys, _mm256_add_epi64(t, set_i((1 + j) * cfg.num_tokens)));
      _mm256_store_pd(o + 4 * j, uniform53(w.w0, w.w1));
      store_i(picks + 4 * j, _mm256_add_epi64(randint_below(w.w2, w.w3, pool), set_i(j)));
    }
    vd c = _mm256_setzero_pd();
    for (int j = 0; j < k; ++j) {
      const vd pool = set(static_cast<double>(cfg.vocab_size - 1 - j));
      c = _mm256_add_pd(c, _mm256_div_pd(log(_mm256_load_pd(o + 4 * j)), pool));
      _mm256_store_pd(cum + 4 * j, c);
    }
    for (int j = 0; j < k; ++j) _mm256_store_pd(o + 4 * j, order_statistic_x(_mm256_load_pd(cum + 4 * j)));
    for (int j = 0; j < k; ++j) {
      const vd c_j = _mm256_load_pd(cum + 4 * j);
      int scalar;
      vd o_j = _mm256_mul_pd(s, order_statistic_from_x(c_j, _mm256_load_pd(o + 4 * j), &scalar));
      if (scalar) {
        _mm256_store_pd(lane_c, c_j);
        _mm256_store_pd(lane_v, o_j);
        for (int l = 0; l < 4; ++l) {
          if (scalar >> l & 1) lane_v[l] = s_tilde[l] * duo::normal_order_statistic(lane_c[l]);
        }
        o_j = _mm256_load_pd(lane_v);
      }
      _mm256_store_pd(o + 4 * j, o_j);
    }

    // ids of the noise slots (duo::topk_finish's Fisher-Yates lookups; later records win)
    const vi x = load_i(lane_x);
    const vi x_minus_1 = _mm256_sub_epi64(x, set_i(1));
    for (int j = 0; j < k; ++j) {
      const vi pick = load_i(picks + 4 * j);
      const vi jv = set_i(j);
      vi value = pick, mover = jv;
      for (int m = 0; m < j; ++m) {
        const vi pm = load_i(picks + 4 * m);
        const vi mm = load_i(moved + 4 * m);
        value = _mm256_blendv_epi8(value, mm, _mm256_cmpeq_epi64(pm, pick));
        mover = _mm256_blendv_epi8(mover, mm, _mm256_cmpeq_epi64(pm, jv));
      }
      store_i(moved + 4 * j, mover);
      // value + (value >= x)
      store_i(other_ids + 4 * j, _mm256_sub_epi64(value, _mm256_cmpgt_epi64(value, x_minus_1)));
    }

    // slots: rank of w_x (k if not visible), the hidden drawn value, the truncation point
    const vd o_last = _mm256_load_pd(o + 4 * (k - 1));
    vi rank;
    vd hidden, truncation, log_count;
    vd has_tail;
    if (!compat) {
      rank = _mm256_setzero_si256();
      for (int j = 0; j < k; ++j) {
        rank = _mm256_sub_epi64(rank, as_i(_mm256_cmp_pd(_mm256_load_pd(o + 4 * j), w_x, _CMP_GT_OQ)));
      }
      hidden = _mm256_blendv_pd(o_last, w_x, as_d(_mm256_cmpeq_epi64(rank, set_i(k))));
      truncation = o_last;
      log_count = set(cfg.log_tail_count[0]);
      has_tail = as_d(set_i(cfg.vocab_size - k - 1 > 0 ? -1 : 0));
    } else {
      const vd bigger = _mm256_cmp_pd(w_x, o_last, _CMP_GT_OQ);
      rank = _mm256_add_epi64(set_i(k), as_i(bigger));
      hidden = _mm256_blendv_pd(w_x, set(-HUGE_VAL), bigger);
      truncation = _mm256_blendv_pd(o_last, _mm256_load_pd(o + 4 * (k - 2)), bigger);
      log_count = _mm256_blendv_pd(set(cfg.log_tail_count[0]), set(cfg.log_tail_count[1]), bigger);
      has_tail = _mm256_or_pd(bigger, as_d(set_i(cfg.vocab_size - k - 1 > 0 ? -1 : 0)));
    }
    // log Z as torch.logsumexp: shift by the max m (0 if infinite), sum in slot order, then hidden and
    // tail. The coordinates in units of tau are rounded products, as in the reference: contracted into
    // an FMA, w / tau - m would keep the product's rounding error, up to ~1e3 at tau = 1e-19.
    const vd hidden_scaled = scaled(hidden, inv_tau);
    const vd clean_scaled = scaled(w_x, inv_tau);
    vd m = _mm256_max_pd(hidden_scaled, clean_scaled);
    for (int j = 0; j < k; ++j) {
      const vd v = scaled(_mm256_load_pd(o + 4 * j), inv_tau);
      _mm256_store_pd(o + 4 * j, v);
      m = _mm256_max_pd(m, v);
    }
    // Terms below e^-110 of the largest (which is 1) leave the float64 sum unchanged and give float32
    // weights of 0, so they are skipped where all 4 lanes have them: deep(v) says v - m < -110 (with a
    // relative margin for the rounding of huge v at tiny tau). The tail is below its bound
    // log(count) + truncation / tau (E[exp(Y / tau) | Y < c] < exp(c / tau)).
    const vd below = negligible_below(m);
    const int tail_lanes = _mm256_movemask_pd(has_tail);
    vd log_tail = set(-HUGE_VAL);
    const vd tail_bound = _mm256_add_pd(log_count, scaled(truncation, inv_tau));
    if (tail_lanes && !negligible(_mm256_blendv_pd(set(-HUGE_VAL), tail_bound, has_tail), below)) {
      int scalar;
      vd mean = log_truncated_mean_exp(truncation, s, cfg.inv_tau, &scalar);
      if ((scalar &= tail_lanes)) {
        _mm256_store_pd(lane_c, truncation);
        _mm256_store_pd(lane_v, mean);
        for (int l = 0; l < 4; ++l) {
          if (scalar >> l & 1) lane_v[l] = duo::log_truncated_mean_exp(lane_c[l], s_tilde[l], cfg.inv_tau);
        }
        mean = _mm256_load_pd(lane_v);
      }
      log_tail = _mm256_blendv_pd(log_tail, _mm256_add_pd(log_count, mean), has_tail);
      m = _mm256_max_pd(m, log_tail);
    }
    m = _mm256_andnot_pd(_mm256_cmp_pd(_mm256_andnot_pd(set(-0.0), m), set(HUGE_VAL), _CMP_EQ_OQ), m);
    const vd clean_term = shifted_exp(clean_scaled, m, below);
    for (int j = 0; j < k; ++j) _mm256_store_pd(o + 4 * j, shifted_exp(_mm256_load_pd(o + 4 * j), m, below));
    // slot s holds w_x if s == rank, else the exp of o[s - (s > rank)] (exact) or o[s] (compat)
    vd sum = _mm256_setzero_pd();
    for (int slot = 0; slot < k; ++slot) {
      const vi sv = set_i(slot);
      const vd is_clean = as_d(_mm256_cmpeq_epi64(rank, sv));
      vd term = _mm256_load_pd(o + 4 * slot);
      vi id = load_i(other_ids + 4 * slot);
      if (!compat && slot > 0) {
        const vi shifted = _mm256_cmpgt_epi64(sv, rank);
        term = _mm256_blendv_pd(term, _mm256_load_pd(o + 4 * (slot - 1)), as_d(shifted));
        id = _mm256_blendv_epi8(id, load_i(other_ids + 4 * (slot - 1)), shifted);
      }
      term = _mm256_blendv_pd(term, clean_term, is_clean);
      _mm256_store_pd(slot_terms + 4 * slot, term);
      store_i(slot_ids + 4 * slot, _mm256_blendv_epi8(id, x, as_i(is_clean)));
      sum = _mm256_add_pd(sum, term);
    }
    sum = _mm256_add_pd(sum, shifted_exp(hidden_scaled, m, below));
    sum = _mm256_add_pd(sum, shifted_exp(log_tail, m, below));
    const vd inv_sum = _mm256_div_pd(set(1.0), sum);
    for (int slot = 0; slot < k; ++slot) {
      const vd weight = _mm256_mul_pd(_mm256_load_pd(slot_terms + 4 * slot), inv_sum);
      _mm_store_ps(slot_weights + 4 * slot, _mm256_cvtpd_ps(weight));
    }
    // z_t: slot 0 (exact), x when visible else slot 0 (compat)
    const vi first = load_i(slot_ids);
    const vi z = compat ? _mm256_blendv_epi8(first, x, _mm256_cmpgt_epi64(set_i(k), rank)) : first;
    store_i(lane_x, z);
    for (int l = 0; l < lanes; ++l) {
      const int64_t tl = t0 + l;
      int64_t* ids_t = out_ids + tl * k;
      float* weights_t = out_weights + tl * k;
      for (int slot = 0; slot < k; ++slot) {
        ids_t[slot] = slot_ids[4 * slot + l];
        weights_t[slot] = slot_weights[4 * slot + l];
      }
      out_z[tl] = lane_x[l];
    }
  }
  return bad;
}

// Doubles of scratch tempered_softmax_topk_tokens needs at k.
inline int64_t topk_scratch_doubles(int k) { return 32 * static_cast<int64_t>(k); }

}  // namespace duo::cpu::avx2

#undef DUO_AVX2
#endif
