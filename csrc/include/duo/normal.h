// Standard normal helpers shared by the CPU and CUDA kernels.
#pragma once

#include <cmath>

#include "duo/common.h"

namespace duo {

// cos(2 pi u) for u in (0, 1), reduced exactly by quarter turns (each subtraction is exact on the
// uniform grid) so that values near the zeros keep full relative precision.
DUO_HD double cos_2pi(double u) {
  const double two_pi = 6.283185307179586;
  double a = u < 1.0 - u ? u : 1.0 - u;
  double sign = 1.0;
  if (a > 0.25) {
    sign = -1.0;
    a = 0.5 - a;
  }
  return sign * (a <= 0.125 ? cos(two_pi * a) : sin(two_pi * (0.25 - a)));
}

// Box-Muller: sqrt(-2 log u1) cos(2 pi u2), in double.
DUO_HD double box_muller(double u1, double u2) { return sqrt(-2.0 * log(u1)) * cos_2pi(u2); }

}  // namespace duo
