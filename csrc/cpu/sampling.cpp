// The fused sampling step on CPU (duo_kernels/ops/sampling.py, README-sampling.md): one ancestral /
// Psi-sampler step with nucleus filtering, one token (logits row) per iteration. The same Philox
// counters, float32 row statistics, nucleus rule, float64 mixture weights and float32 Gumbel as the
// Triton kernel (duo_kernels/triton/sampling.py); the nucleus threshold is found by a quickselect
// over the row's logit values instead of the kernel's bucketed search.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/kernels.h"
#include "duo/common.h"
#include "duo/philox.h"

namespace duo::cpu {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
// The largest Gumbel -log E of exponential53: E >= 2^-53 (1 - U >= 2^-53), so -log E <= 36.74. An
// entry whose logit is more than this below the best key so far cannot win: its Philox draw is
// skipped (exact: the skipped key is below the best).
constexpr float kMaxGumbel = 38.0f;

// E = -log U in float32 for U = uniform53(w_hi, w_lo): ops.sampling's and the Triton kernel's
// exponential53, operation for operation (README-sampling.md, "Gumbel precision").
inline float exponential53_of(double u) {
  if (u > 0.75) {
    const float d = static_cast<float>(1.0 - u);
    const float s = d / (2.0f - d);
    const float s2 = s * s;
    return 2.0f * s * (1.0f + s2 * (0.33333334f + s2 * (0.2f + s2 * (0.14285715f + s2 * 0.11111111f))));
  }
  return -std::log(static_cast<float>(u));
}

struct Entry {
  float x;  // logit
  float p;  // exp(x - max) / sum
};

// Nucleus of one row (duo-math §6.3): tau, the smallest logit value whose mass strictly above,
// F(tau), is <= top_p; F(tau) and the number of entries equal to tau. Quickselect over the logit
// values in [0, n) of `c` (reordered), with `f_above` the mass above all of them and the invariant
// F(max of the candidates) <= top_p. If tau lies below every candidate and `last` is false, returns
// false with f_above the mass of all candidates (the search goes on over the entries below them);
// with `last`, the smallest value is then tau.
struct Threshold {
  float tau;
  double f_tau;
  int64_t n_tau;
};

bool select_threshold(Entry* c, int64_t n, double& f_above, double top_p, bool last, Threshold& out) {
  for (int rounds = 0; n > 0; ++rounds) {
    if (rounds == 96) {
      // pivots that keep missing (an adversarial order): sort the rest and scan its distinct values
      std::sort(c, c + n, [](const Entry& l, const Entry& r) { return l.x > r.x; });
      for (int64_t i = 0; i < n;) {
        int64_t j = i;
        double mass = 0.0;
        for (; j < n && c[j].x == c[i].x; ++j) mass += static_cast<double>(c[j].p);
        if (f_above + mass <= top_p && (j < n || !last)) {
          f_above += mass;
          i = j;
          continue;
        }
        out = Threshold{c[i].x, f_above, j - i};
        return true;
      }
      return false;
    }
    // median of three values as the pivot
    float a = c[0].x, b = c[n / 2].x, d = c[n - 1].x;
    const float q = std::max(std::min(a, b), std::min(std::max(a, b), d));
    // three-way partition: [0, g) > q, [g, e) == q, [e, n) < q
    int64_t g = 0, i = 0, e = n;
    double mass_g = 0.0, mass_e = 0.0;
    int64_t count_e = 0;
    while (i < e) {
      const float x = c[i].x;
      if (x > q) {
        mass_g += static_cast<double>(c[i].p);
        std::swap(c[i], c[g]);
        ++g;
        ++i;
      } else if (x < q) {
        --e;
        std::swap(c[i], c[e]);
      } else {
        mass_e += static_cast<double>(c[i].p);
        ++count_e;
        ++i;
      }
    }
    const double f_q = f_above + mass_g;
    if (f_q > top_p) {  // tau > q: among the greater ones (not empty: F(max) <= top_p)
      n = g;
      continue;
    }
    if (f_q + mass_e <= top_p) {  // the largest value below q also qualifies: tau < q
      if (e < n) {
        f_above = f_q + mass_e;
        c += e;
        n -= e;
        continue;
      }
      if (!last) {
        f_above = f_q + mass_e;
        return false;
      }
    }
    out = Threshold{q, f_q, count_e};
    return true;
  }
  return false;
}

template <typename scalar_t>
struct Row {
  const scalar_t* p;
  int64_t stride_v;
  float operator[](int64_t v) const { return static_cast<float>(p[v * stride_v]); }
};

struct StepArgs {
  const int64_t* z_t;
  PerToken alpha_t, alpha_s, kappa;
  int64_t* z_s;
  double* stats;  // (N, 2) or null
  int64_t length, vocab_size;
  double top_p;
  uint64_t seed;
};

enum : int { kBadValue = 1, kNoFiniteEntry = 2 };

template <typename scalar_t>
void ancestral_step_rows(const at::Tensor& logits, const StepArgs& a, int64_t begin, int64_t end,
                         std::atomic<int>& errors) {
  const int64_t vocab = a.vocab_size;
  const int64_t n_rows = logits.size(0) * logits.size(1);
  const scalar_t* base = logits.data_ptr<scalar_t>();
  const int64_t sb = logits.stride(0), sl = logits.stride(1), sv = logits.stride(2);
  const bool filter = a.top_p < 1.0;
  std::vector<float> x(vocab), e(vocab);
  std::vector<Entry> cand(filter ? vocab : 0);
  PerTokenCursor c_t(a.alpha_t, begin, a.length), c_s(a.alpha_s, begin, a.length), c_k(a.kappa, begin, a.length);
  for (int64_t t = begin; t < end; ++t, c_t.next(), c_s.next(), c_k.next()) {
    const Row<scalar_t> row{base + (t / a.length) * sb + (t % a.length) * sl, sv};
    const int64_t z = a.z_t[t];
    // ---- 1. row statistics in float32: max, sum exp(x - max); NaN / +inf flagged
    float m = -kInf;
    bool bad = false;
    for (int64_t v = 0; v < vocab; ++v) {
      const float xv = row[v];
      x[v] = xv;
      bad |= !(xv < kInf);  // NaN or +inf
      m = std::max(m, xv);
    }
    if (bad || m == -kInf) {
      errors.fetch_or(bad ? kBadValue : kNoFiniteEntry);
      a.z_s[t] = z;
      continue;
    }
    float s = 0.0f;
    for (int64_t v = 0; v < vocab; ++v) {
      e[v] = std::exp(x[v] - m);
      s += e[v];
    }
    const float l_z = x[z];
    // ---- 2. nucleus (top_p < 1): tau and how many of its ties are kept (the first k_tau by index)
    float tau = -kInf;
    int64_t k_tau = vocab;
    double x_z, z_p = 1.0;
    if (filter) {
      const double lse = static_cast<double>(m) + std::log(static_cast<double>(s));
      // tau >= lse + log((1 - top_p) / V) (README); candidates from one nat below, the rest only if needed
      const double c_lo = lse + std::log((1.0 - a.top_p) / static_cast<double>(vocab)) - 1.0;
      int64_t n = 0;
      for (int64_t v = 0; v < vocab; ++v) {
        if (static_cast<double>(x[v]) >= c_lo) cand[n++] = Entry{x[v], e[v] / s};
      }
      double f_above = 0.0;
      Threshold th{};
      if (!select_threshold(cand.data(), n, f_above, a.top_p, n == vocab, th)) {
        int64_t k = 0;
        for (int64_t v = 0; v < vocab; ++v) {
          if (!(static_cast<double>(x[v]) >= c_lo)) cand[k++] = Entry{x[v], e[v] / s};
        }
        select_threshold(cand.data(), k, f_above, a.top_p, true, th);
      }
      tau = th.tau;
      const double p_tau = static_cast<double>(std::exp(tau - m) / s);
      const double room = std::floor((a.top_p - th.f_tau) / p_tau) + 1.0;
      k_tau = p_tau > 0.0 && room < static_cast<double>(th.n_tau) ? static_cast<int64_t>(room) : th.n_tau;
      z_p = th.f_tau + static_cast<double>(k_tau) * p_tau;
      bool kept_z = l_z > tau;
      if (l_z == tau) {
        int64_t rank = 0;
        for (int64_t v = 0; v < z; ++v) rank += x[v] == tau;
        kept_z = rank < k_tau;
      }
      x_z = kept_z ? static_cast<double>(e[z] / s) / z_p : 0.0;
    } else {
      x_z = std::exp(static_cast<double>(l_z) - static_cast<double>(m) - std::log(static_cast<double>(s)));
    }
    if (a.stats != nullptr) {
      a.stats[2 * t] = x_z;
      a.stats[2 * t + 1] = z_p;
    }
    // ---- 3. mixture weights (3.4)/(6.2) in float64 and the component from counter N V + t
    const double alpha_t = c_t.value(), alpha_s = c_s.value(), kappa = c_k.value();
    const double denom = static_cast<double>(vocab) * alpha_t * x_z + 1 - alpha_t;
    const double alpha_ts = alpha_t / alpha_s;
    const double c_p = kappa * ((alpha_s - alpha_t) / denom) + (1 - kappa) * alpha_s * ((1 - alpha_t) / denom);
    const double c_u = kappa * ((1 - alpha_ts) * (1 - alpha_s) / denom) + (1 - kappa) * (1 - alpha_s);
    const Words w = philox(a.seed, static_cast<uint64_t>(n_rows * vocab + t));
    const double u = uniform53(w.w0, w.w1);
    if (!(u < c_p)) {
      a.z_s[t] = u < c_p + c_u ? randint32_below(w.w2, vocab) : z;
      continue;
    }
    // ---- 4. Gumbel-max over the kept entries: argmax_v x_v - log E_v, the first index on ties.
    // Most entries are rejected without a logarithm: E >= 1 - U, so 1 - U > exp(x_v - best + delta)
    // = e_v exp(m - best + delta) proves key_v < best - delta; delta covers the float32 rounding of
    // e_v and of the key (exact: such an entry could not win). Not used where e_v is denormal / 0.
    float best = -kInf;
    double reject = std::numeric_limits<double>::infinity();  // exp(m - best + delta)
    int64_t best_v = 0, ties = 0;
    const uint64_t counter = static_cast<uint64_t>(t * vocab);
    for (int64_t v = 0; v < vocab; ++v) {
      const float xv = x[v];
      if (xv < tau) continue;
      if (xv == tau && filter && ties++ >= k_tau) continue;
      if (!(xv + kMaxGumbel > best)) continue;  // cannot beat best (nor can a -inf entry)
      const Words g = philox(a.seed, counter + static_cast<uint64_t>(v));
      const double u_v = uniform53(g.w0, g.w1);
      if (e[v] >= std::numeric_limits<float>::min() && 1.0 - u_v > static_cast<double>(e[v]) * reject) continue;
      const float key = xv - std::log(exponential53_of(u_v));
      if (key > best) {
        best = key;
        best_v = v;
        const double delta = 1e-4 + 1e-6 * std::fabs(static_cast<double>(best));
        reject = std::exp(static_cast<double>(m) - static_cast<double>(best) + delta);
      }
    }
    a.z_s[t] = best_v;
  }
}

}  // namespace

int64_t sampling_ancestral_step(at::Tensor& z_s, at::Tensor& stats, const at::Tensor& logits, const at::Tensor& z_t,
                                const at::Tensor& alpha_t, const at::Tensor& alpha_s, const at::Tensor& kappa,
                                double top_p, uint64_t seed) {
  const auto view = [](const at::Tensor& t) { return PerToken{t.data_ptr<double>(), t.stride(0), t.stride(1)}; };
  const int64_t vocab = logits.size(2);
  const StepArgs args{z_t.data_ptr<int64_t>(), view(alpha_t), view(alpha_s), view(kappa), z_s.data_ptr<int64_t>(),
                      stats.numel() ? stats.data_ptr<double>() : nullptr, logits.size(1), vocab, top_p, seed};
  std::atomic<int> errors{0};
  const int64_t grain = std::max<int64_t>(1, 65536 / vocab);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sampling_ancestral_step", [&] {
    at::parallel_for(0, z_t.numel(), grain, [&](int64_t begin, int64_t end) {
      ancestral_step_rows<scalar_t>(logits, args, begin, end, errors);
    });
  });
  return errors.load();
}

void sampling_exponential53(at::Tensor& out, const at::Tensor& u) {
  const double* src = u.data_ptr<double>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, u.numel(), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) dst[i] = exponential53_of(src[i]);
  });
}

}  // namespace duo::cpu
