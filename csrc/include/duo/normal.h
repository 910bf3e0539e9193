// Standard normal helpers shared by the CPU and CUDA kernels: Box-Muller, the normal quantile
// (ndtri), the scaled complementary error function (erfcx) and log Phi (log_ndtr), all in double.
//
// ndtri follows Cephes (Moshier), as torch.special.ndtri does, so the kernels and the reference
// agree to an ulp or so; erfcx uses W. J. Cody's rational Chebyshev approximations (netlib specfun
// CALERF), accurate to ~1e-16 relative; log_ndtr is expressed through erfcx as torch's and SciPy's.
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

// Horner's rule, highest-degree coefficient first: horner(x, c0, c1, c2) = (c0 x + c1) x + c2.
DUO_HD double horner(double, double c) { return c; }
template <typename... Rest>
DUO_HD double horner(double x, double c0, double c1, Rest... rest) {
  return horner(x, c0 * x + c1, rest...);
}

// Phi^-1(y) for y in [0, 1] (-inf at 0, +inf at 1, NaN outside). Cephes' three rational
// approximations: |y - 1/2| <= 3/8 directly, else in z = sqrt(-2 log y') with y' = min(y, 1 - y).
DUO_HD double ndtri(double y0) {
  const double exp_m2 = 0.13533528323661269189;  // exp(-2)
  if (!(y0 > 0.0 && y0 < 1.0)) {
    if (y0 == 0.0) return -HUGE_VAL;
    if (y0 == 1.0) return HUGE_VAL;
    return NAN;
  }
  bool lower = true;
  double y = y0;
  if (y > 1.0 - exp_m2) {
    y = 1.0 - y;
    lower = false;
  }
  if (y > exp_m2) {
    y -= 0.5;
    const double y2 = y * y;
    const double p = horner(y2, -5.99633501014107895267E1, 9.80010754185999661536E1, -5.66762857469070293439E1,
                            1.39312609387279679503E1, -1.23916583867381258016E0);
    const double q = horner(y2, 1.0, 1.95448858338141759834E0, 4.67627912898881538453E0, 8.63602421390890590575E1,
                            -2.25462687854119370527E2, 2.00260212380060660359E2, -8.20372256168333339912E1,
                            1.59056225126211695515E1, -1.18331621121330003142E0);
    return (y + y * (y2 * p / q)) * 2.50662827463100050242E0;
  }
  const double x = sqrt(-2.0 * log(y));
  const double x0 = x - log(x) / x;
  const double z = 1.0 / x;
  double x1;
  if (x < 8.0) {  // y > exp(-32)
    x1 = z *
         horner(z, 4.05544892305962419923E0, 3.15251094599893866154E1, 5.71628192246421288162E1,
                4.40805073893200834700E1, 1.46849561928858024014E1, 2.18663306850790267539E0,
                -1.40256079171354495875E-1, -3.50424626827848203418E-2, -8.57456785154685413611E-4) /
         horner(z, 1.0, 1.57799883256466749731E1, 4.53907635128879210584E1, 4.13172038254672030440E1,
                1.50425385692907503408E1, 2.50464946208309415979E0, -1.42182922854787788574E-1,
                -3.80806407691578277194E-2, -9.33259480895457427372E-4);
  } else {
    x1 = z *
         horner(z, 3.23774891776946035970E0, 6.91522889068984211695E0, 3.93881025292474443415E0,
                1.33303460815807542389E0, 2.01485389549179081538E-1, 1.23716634817820021358E-2,
                3.01581553508235416007E-4, 2.65806974686737550832E-6, 6.23974539184983293730E-9) /
         horner(z, 1.0, 6.02427039364742014255E0, 3.67983563856160859403E0, 1.37702099489081330271E0,
                2.16236993594496635890E-1, 1.34204006088543189037E-2, 3.28014464682127739104E-4,
                2.89247864745380683936E-6, 6.79019408009981274425E-9);
  }
  return lower ? x1 - x0 : x0 - x1;
}

// erfcx(x) = exp(x^2) erfc(x) for x >= 0, by Cody's three intervals: erf's rational form below
// 0.46875, then rational forms of erfcx itself in x (up to 4) and in 1/x^2 (beyond). Negative x use
// erfcx(x) = 2 exp(x^2) - erfcx(-x).
DUO_HD double erfcx_nonnegative(double y) {
  if (y <= 0.46875) {
    const double ysq = y * y;
    const double erf_y = y *
                         horner(ysq, 1.85777706184603153e-1, 3.16112374387056560e00, 1.13864154151050156e02,
                                3.77485237685302021e02, 3.20937758913846947e03) /
                         horner(ysq, 1.0, 2.36012909523441209e01, 2.44024637934444173e02,
                                1.28261652607737228e03, 2.84423683343917062e03);
    return exp(ysq) * (1.0 - erf_y);
  }
  if (y <= 4.0) {
    return horner(y, 2.15311535474403846e-8, 5.64188496988670089e-1, 8.88314979438837594e00,
                  6.61191906371416295e01, 2.98635138197400131e02, 8.81952221241769090e02,
                  1.71204761263407058e03, 2.05107837782607147e03, 1.23033935479799725e03) /
           horner(y, 1.0, 1.57449261107098347e01, 1.17693950891312499e02, 5.37181101862009858e02,
                  1.62138957456669019e03, 3.29079923573345963e03, 4.36261909014324716e03,
                  3.43936767414372164e03, 1.23033935480374942e03);
  }
  const double inv_sqrt_pi = 5.6418958354775628695e-1;
  if (y >= 6.71e7) return inv_sqrt_pi / y;  // the 1/x^2 correction is below an ulp
  const double z = 1.0 / (y * y);
  const double r = z *
                   horner(z, 1.63153871373020978e-2, 3.05326634961232344e-1, 3.60344899949804439e-1,
                          1.25781726111229246e-1, 1.60837851487422766e-2, 6.58749161529837803e-4) /
                   horner(z, 1.0, 2.56852019228982242e00, 1.87295284992346047e00, 5.27905102951428412e-1,
                          6.05183413124413191e-2, 2.33520497626869185e-3);
  return (inv_sqrt_pi - r) / y;
}

DUO_HD double erfcx(double x) {
  if (x >= 0.0) return erfcx_nonnegative(x);
  return 2.0 * exp(x * x) - erfcx_nonnegative(-x);
}

// log Phi(x): log(erfcx(-x/sqrt 2) / 2) - x^2/2 below -1 (no underflow), log1p(-erfc(x/sqrt 2)/2)
// above (no cancellation near 0).
DUO_HD double log_ndtr(double x) {
  const double t = x * 0.70710678118654752440;
  if (x < -1.0) return log(erfcx(-t) / 2.0) - t * t;
  return log1p(-erfc(t) / 2.0);
}

}  // namespace duo
