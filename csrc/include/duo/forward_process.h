// The exact O(1)-per-token forward processes (duo-math §1.2, §3.1, §5.4), shared by the CPU and
// CUDA kernels. Stream layouts are those of duo_kernels/reference/forward_process.py: token t of the
// N = B L row-major tokens reads the Philox words of counter t.
#pragma once

#include <cmath>

#include "duo/normal.h"
#include "duo/order_stats.h"
#include "duo/philox.h"

namespace duo {

// What decides z_t (§1.2): the clean coordinate's own normal n, the maximum M of the V - 1 other
// normals, and the uniform winner j* in V \ {x} when the clean coordinate loses.
struct ArgmaxDraws {
  double n;
  double max_others;
  int64_t j_star;
};

DUO_HD ArgmaxDraws gaussian_argmax_draws(uint64_t seed, int64_t t, int64_t x, int64_t vocab_size) {
  const Words w = philox(seed, static_cast<uint64_t>(t));
  ArgmaxDraws d;
  d.n = box_muller(uniform24(w.w0), uniform24(w.w1));
  d.max_others = normal_order_statistic(log(static_cast<double>(uniform24(w.w2))) / static_cast<double>(vocab_size - 1));
  const int64_t j = randint32_below(w.w3, vocab_size - 1);
  d.j_star = j + (j >= x ? 1 : 0);
  return d;
}

// z = x iff n + mu > M with mu = a~/s~ = exp(-gamma/2), else j*.
DUO_HD int64_t gaussian_argmax_decide(const ArgmaxDraws& d, int64_t x, double gamma) {
  return d.n + exp(-gamma / 2) > d.max_others ? x : d.j_star;
}

// (3.1): with probability 1 - alpha replace x by a uniform id of [0, V).
DUO_HD int64_t usdm_forward_token(uint64_t seed, int64_t t, int64_t x, double alpha, int64_t vocab_size) {
  const Words w = philox(seed, static_cast<uint64_t>(t));
  return static_cast<double>(uniform24(w.w0)) < 1.0 - alpha ? randint32_below(w.w1, vocab_size) : x;
}

}  // namespace duo
