// Duo++'s sparse tempered softmax, one token at a time (duo-math §4.4): the k largest of the V - 1
// noise coordinates as order statistics, their ids by a partial Fisher-Yates shuffle, the clean
// coordinate, and the analytic tail of the softmax normaliser. Shared by the CPU and CUDA kernels;
// the stream layout and every formula are those of duo_kernels/reference/curriculum.py
// (tempered_softmax_topk), all in double.
#pragma once

#include <cmath>

#include "duo/normal.h"
#include "duo/philox.h"

namespace duo {

// The next descending order statistic of iid N(0, 1) from the running sum
// C = sum_i log(U_i) / (n - i): Phi^-1(exp(C)) in the complement form -Phi^-1(-expm1(C)), which
// keeps the ~1/n distance of exp(C) from 1 exact.
DUO_HD double normal_order_statistic(double cum_log_u) { return -ndtri(-expm1(cum_log_u)); }

// log E[exp(Y / tau) | Y < c] for Y ~ N(0, s^2): with a = c/s and b = s/tau, the closed form
// b^2/2 + log Phi(a - b) - log Phi(a) cancels catastrophically for a < b (each term ~6e4 at
// tau = 1e-3); there log Phi(y) = log(erfcx(-y/sqrt 2)/2) - y^2/2 turns the first two terms into
// a (b - a/2) + log(erfcx((b - a)/sqrt 2)/2), exact to rounding.
DUO_HD double log_truncated_mean_exp(double c, double s, double inv_tau) {
  const double a = c / s;
  const double b = s * inv_tau;
  double head;
  if (a < b) {
    head = a * (b - a / 2) + log(erfcx((b - a) / 1.4142135623730951) / 2);
  } else {
    head = b * b / 2 + log_ndtr(a - b);
  }
  return head - log_ndtr(a);
}

// The value at position `pos` of the virtual array [0, n) after the first `steps` swaps of a
// partial Fisher-Yates shuffle: step m put moved[m] at position picks[m]; the latest such record
// wins, else the position still holds itself.
DUO_HD int64_t fisher_yates_value(const int64_t* picks, const int64_t* moved, int steps, int64_t pos) {
  for (int m = steps - 1; m >= 0; --m) {
    if (picks[m] == pos) return moved[m];
  }
  return pos;
}

struct TopkConfig {
  uint64_t seed;
  int64_t num_tokens;  // N = B L: token t reads block b at counter b N + t
  int64_t vocab_size;
  int k;
  double inv_tau;
  bool reference_compat;
  double log_tail_count[2];  // log(V - k - 1), log(V - k): the tail sizes without / with w_x visible (compat)
};

DUO_HD TopkConfig make_topk_config(uint64_t seed, int64_t num_tokens, int64_t vocab_size, int k, double inv_tau,
                                   bool reference_compat) {
  return TopkConfig{seed, num_tokens, vocab_size, k, inv_tau, reference_compat,
                    {log(static_cast<double>(vocab_size - k - 1)), log(static_cast<double>(vocab_size - k))}};
}

// The state of one token between its three phases: begin, k order-statistic steps, finish.
struct TopkToken {
  double s_tilde;
  double w_x;        // the clean coordinate a~ + s~ n
  double cum_log_u;  // sum_{i < j} log(U_i) / (V - 1 - i) after j steps
};

// a~ = sqrt(sigmoid(-gamma)) and s~ = sqrt(sigmoid(gamma)) (1.2), sigmoid as torch.sigmoid.
struct GaussianStd {
  double a_tilde, s_tilde;
};

DUO_HD GaussianStd gaussian_std(double gamma) {
  return GaussianStd{sqrt(1.0 / (1.0 + exp(gamma))), sqrt(1.0 / (1.0 + exp(-gamma)))};
}

// Block 0: the clean coordinate w_x = a~ + s~ n, n the float64 normal of counter t.
DUO_HD TopkToken topk_begin(const TopkConfig& cfg, int64_t t, const GaussianStd& g) {
  const Words w = philox(cfg.seed, static_cast<uint64_t>(t));
  return TopkToken{g.s_tilde, g.a_tilde + g.s_tilde * box_muller(uniform53(w.w0, w.w1), uniform53(w.w2, w.w3)), 0.0};
}

// Block 1 + j: the order statistic o_j (returned) and the Fisher-Yates swap target r_j (*pick).
DUO_HD double topk_step(const TopkConfig& cfg, int64_t t, int j, TopkToken& tok, int64_t* pick) {
  const uint64_t counter = static_cast<uint64_t>(1 + j) * static_cast<uint64_t>(cfg.num_tokens) + static_cast<uint64_t>(t);
  const Words w = philox(cfg.seed, counter);
  const int64_t pool = cfg.vocab_size - 1 - j;
  tok.cum_log_u += log(uniform53(w.w0, w.w1)) / static_cast<double>(pool);
  *pick = j + randint_below(w.w2, w.w3, pool);
  return tok.s_tilde * normal_order_statistic(tok.cum_log_u);
}

// The ids of the k noise slots, the slot assignment of either mode, the tail and the weights:
// writes ids[0..k), weights[0..k) and *z_t from o[0..k) (overwritten) and picks[0..k). `moved` and
// `other_ids` are k-entry scratch.
DUO_HD void topk_finish(const TopkConfig& cfg, const TopkToken& tok, double* o, const int64_t* picks,
                        int64_t* moved, int64_t* other_ids, int64_t x, int64_t* ids, float* weights, int64_t* z_t) {
  const int k = cfg.k;
  for (int j = 0; j < k; ++j) {
    const int64_t pool = fisher_yates_value(picks, moved, j, picks[j]);
    moved[j] = fisher_yates_value(picks, moved, j, j);
    other_ids[j] = pool + (pool >= x ? 1 : 0);
  }
  const double w_x = tok.w_x;

  // Slots: exact mode sorts the k largest of the k + 1 drawn values (w_x at its rank); compat mode
  // overwrites the last slot when w_x beats o_{k-1}. `hidden` is the drawn value left out (if any),
  // the tail holds the undrawn noise coordinates below `truncation`.
  double hidden, truncation;
  int rank = k;  // the slot of w_x, k if not visible
  bool bigger_tail = false;  // compat with w_x visible: V - k tail members, else V - k - 1
  if (!cfg.reference_compat) {
    rank = 0;
    for (int j = 0; j < k; ++j) rank += o[j] > w_x ? 1 : 0;
    hidden = rank < k ? o[k - 1] : w_x;
    truncation = o[k - 1];
  } else {
    bigger_tail = w_x > o[k - 1];
    if (bigger_tail) rank = k - 1;
    hidden = bigger_tail ? -HUGE_VAL : w_x;
    truncation = bigger_tail ? o[k - 2] : o[k - 1];
  }
  // slot s holds w_x if s == rank, else o[s - (s > rank)] (exact) or o[s] (compat: rank is k - 1)
  const int shift = cfg.reference_compat ? 0 : 1;
  auto source = [&](int s) { return s - (s > rank ? shift : 0); };

  const double inv_tau = cfg.inv_tau;
  const bool has_tail = bigger_tail || cfg.vocab_size - k - 1 > 0;
  const double log_tail = has_tail ? cfg.log_tail_count[bigger_tail ? 1 : 0] +
                                         log_truncated_mean_exp(truncation, tok.s_tilde, inv_tau)
                                   : -HUGE_VAL;
  // log Z as torch.logsumexp (shift by the max, 0 if infinite, sum in slot order, then hidden and
  // tail); each weight exp(v - log Z) is then exp(v - m) / sum: one exp per slot, not two. The
  // shifted terms of the noise slots replace their o[j], which is read once per slot.
  double m = hidden * inv_tau > log_tail ? hidden * inv_tau : log_tail;
  m = w_x * inv_tau > m ? w_x * inv_tau : m;
  for (int j = 0; j < k; ++j) m = o[j] * inv_tau > m ? o[j] * inv_tau : m;
  if (m == HUGE_VAL || m == -HUGE_VAL) m = 0.0;
  const double clean_term = exp(w_x * inv_tau - m);
  double sum = 0.0;
  for (int s = 0; s < k; ++s) {
    if (s == rank) {
      sum += clean_term;
    } else {
      o[source(s)] = exp(o[source(s)] * inv_tau - m);
      sum += o[source(s)];
    }
  }
  sum += exp(hidden * inv_tau - m);
  sum += exp(log_tail - m);
  const double inv_sum = 1.0 / sum;
  for (int s = 0; s < k; ++s) {
    const bool clean = s == rank;
    ids[s] = clean ? x : other_ids[source(s)];
    weights[s] = static_cast<float>((clean ? clean_term : o[source(s)]) * inv_sum);
  }
  *z_t = cfg.reference_compat ? (rank < k ? x : ids[0]) : ids[0];
}

// Scratch of one token, k entries each (per-thread arrays on CUDA).
struct TopkScratch {
  double* others;     // o_0 > ... > o_{k-1}
  int64_t* picks;     // Fisher-Yates swap targets
  int64_t* moved;     // values moved by each swap
  int64_t* other_ids; // ids of the noise slots, in V \ {x}
};

// One token of tempered_softmax_topk: writes ids[0..k), weights[0..k) and *z_t.
DUO_HD void tempered_softmax_topk_token(const TopkConfig& cfg, const TopkScratch& scratch, int64_t t, int64_t x,
                                        const GaussianStd& g, int64_t* ids, float* weights, int64_t* z_t) {
  TopkToken tok = topk_begin(cfg, t, g);
  for (int j = 0; j < cfg.k; ++j) scratch.others[j] = topk_step(cfg, t, j, tok, scratch.picks + j);
  topk_finish(cfg, tok, scratch.others, scratch.picks, scratch.moved, scratch.other_ids, x, ids, weights, z_t);
}

}  // namespace duo
