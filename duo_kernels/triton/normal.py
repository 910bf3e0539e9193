"""Standard normal special functions in Triton, float64: the twins of ``csrc/include/duo/normal.h``
and ``order_stats.h``.

Triton has no ``expm1``, ``log1p``, ``erfc``, ``erfcx`` or ``ndtri`` (and the interpreter runs no
libdevice calls), so they are built here from ``exp``, ``log`` and ``sqrt``: ``expm1`` and ``log1p``
by Kahan's compensation, ``ndtri`` by Cephes' rational approximations (as ``torch.special.ndtri``),
``erfcx`` by W. J. Cody's (netlib specfun CALERF). Branches are ``tl.where`` selections with every
branch evaluated on an argument kept inside its domain. Inputs are float64 tensors of any shape.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def expm1(x):
    """exp(x) - 1 to a few ulp: (u - 1) x / log(u) with u = exp(x) (Kahan), exact where u rounds to
    1 and where u - 1 = -1."""
    u = tl.exp(x)
    um1 = u - 1.0
    edge = (u == 1.0) | (um1 == -1.0)
    r = um1 * x / tl.log(tl.where(edge, 2.0, u))
    return tl.where(u == 1.0, x, tl.where(um1 == -1.0, -1.0, r))


@triton.jit
def log1p(x):
    """log(1 + x) for x > -1 to a few ulp: log(u) x / (u - 1) with u = 1 + x (Kahan)."""
    u = 1.0 + x
    d = u - 1.0
    return tl.where(d == 0.0, x, tl.log(u) * (x / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def ndtri(y0):
    """Phi^-1(y0) for y0 in (0, 1) (+-inf at 1 and 0), Cephes' three rational approximations."""
    flip = y0 > 1.0 - 0.13533528323661269189  # exp(-2)
    y = tl.where(flip, 1.0 - y0, y0)
    central = y > 0.13533528323661269189
    # |y - 1/2| <= 3/8
    yc = tl.where(central, y, 0.5) - 0.5
    y2 = yc * yc
    p0 = (((-5.99633501014107895267E1 * y2 + 9.80010754185999661536E1) * y2 - 5.66762857469070293439E1) * y2
          + 1.39312609387279679503E1) * y2 - 1.23916583867381258016E0
    q0 = (((((((y2 + 1.95448858338141759834E0) * y2 + 4.67627912898881538453E0) * y2 + 8.63602421390890590575E1)
              * y2 - 2.25462687854119370527E2) * y2 + 2.00260212380060660359E2) * y2 - 8.20372256168333339912E1)
          * y2 + 1.59056225126211695515E1) * y2 - 1.18331621121330003142E0
    x_central = (yc + yc * (y2 * p0 / q0)) * 2.50662827463100050242E0
    # the tails, in x = sqrt(-2 log y)
    yt = tl.where(central | (y <= 0.0), 0.01, y)
    x = tl.sqrt(-2.0 * tl.log(yt))
    x0 = x - tl.log(x) / x
    z = 1.0 / x
    p1 = (((((((4.05544892305962419923E0 * z + 3.15251094599893866154E1) * z + 5.71628192246421288162E1) * z
               + 4.40805073893200834700E1) * z + 1.46849561928858024014E1) * z + 2.18663306850790267539E0) * z
            - 1.40256079171354495875E-1) * z - 3.50424626827848203418E-2) * z - 8.57456785154685413611E-4
    q1 = (((((((z + 1.57799883256466749731E1) * z + 4.53907635128879210584E1) * z + 4.13172038254672030440E1) * z
             + 1.50425385692907503408E1) * z + 2.50464946208309415979E0) * z - 1.42182922854787788574E-1) * z
          - 3.80806407691578277194E-2) * z - 9.33259480895457427372E-4
    p2 = (((((((3.23774891776946035970E0 * z + 6.91522889068984211695E0) * z + 3.93881025292474443415E0) * z
               + 1.33303460815807542389E0) * z + 2.01485389549179081538E-1) * z + 1.23716634817820021358E-2) * z
            + 3.01581553508235416007E-4) * z + 2.65806974686737550832E-6) * z + 6.23974539184983293730E-9
    q2 = (((((((z + 6.02427039364742014255E0) * z + 3.67983563856160859403E0) * z + 1.37702099489081330271E0) * z
             + 2.16236993594496635890E-1) * z + 1.34204006088543189037E-2) * z + 3.28014464682127739104E-4) * z
          + 2.89247864745380683936E-6) * z + 6.79019408009981274425E-9
    x1 = tl.where(x < 8.0, z * p1 / q1, z * p2 / q2)
    x_tail = tl.where(flip, x0 - x1, x1 - x0)
    out = tl.where(central, x_central, x_tail)
    out = tl.where(y0 <= 0.0, -float("inf"), out)
    return tl.where(y0 >= 1.0, float("inf"), out)


@triton.jit
def erfcx_nonnegative(y):
    """exp(y^2) erfc(y) for y >= 0: Cody's rational forms of erf (y <= 0.46875), of erfcx in y
    (y <= 4) and in 1/y^2 (beyond)."""
    ys = tl.where(y <= 0.46875, y, 0.0)
    s = ys * ys
    num = (((1.85777706184603153e-1 * s + 3.16112374387056560e00) * s + 1.13864154151050156e02) * s
           + 3.77485237685302021e02) * s + 3.20937758913846947e03
    den = (((s + 2.36012909523441209e01) * s + 2.44024637934444173e02) * s + 1.28261652607737228e03) * s \
        + 2.84423683343917062e03
    small = tl.exp(s) * (1.0 - ys * num / den)
    ym = tl.minimum(y, 4.0)
    num = (((((((2.15311535474403846e-8 * ym + 5.64188496988670089e-1) * ym + 8.88314979438837594e00) * ym
               + 6.61191906371416295e01) * ym + 2.98635138197400131e02) * ym + 8.81952221241769090e02) * ym
            + 1.71204761263407058e03) * ym + 2.05107837782607147e03) * ym + 1.23033935479799725e03
    den = (((((((ym + 1.57449261107098347e01) * ym + 1.17693950891312499e02) * ym + 5.37181101862009858e02) * ym
             + 1.62138957456669019e03) * ym + 3.29079923573345963e03) * ym + 4.36261909014324716e03) * ym
           + 3.43936767414372164e03) * ym + 1.23033935480374942e03
    middle = num / den
    yl = tl.maximum(y, 4.0)
    z = 1.0 / (yl * yl)
    num = ((((1.63153871373020978e-2 * z + 3.05326634961232344e-1) * z + 3.60344899949804439e-1) * z
            + 1.25781726111229246e-1) * z + 1.60837851487422766e-2) * z + 6.58749161529837803e-4
    den = ((((z + 2.56852019228982242e00) * z + 1.87295284992346047e00) * z + 5.27905102951428412e-1) * z
           + 6.05183413124413191e-2) * z + 2.33520497626869185e-3
    # (a float literal bound to a local name would become a float32 tensor: constants stay inline)
    large = tl.where(yl >= 6.71e7, 5.6418958354775628695e-1 / yl, (5.6418958354775628695e-1 - z * num / den) / yl)
    return tl.where(y <= 0.46875, small, tl.where(y <= 4.0, middle, large))


@triton.jit
def log_ndtr(x):
    """log Phi(x): log(erfcx(-x/sqrt 2) / 2) - x^2/2 below -1, log1p(-erfc(x/sqrt 2) / 2) above."""
    t = x * 0.70710678118654752440
    e = erfcx_nonnegative(tl.abs(t))
    low = tl.log(e / 2.0) - t * t
    erfc_abs = tl.exp(-t * t) * e
    erfc_t = tl.where(t >= 0.0, erfc_abs, 2.0 - erfc_abs)
    return tl.where(x < -1.0, low, log1p(-erfc_t / 2.0))


@triton.jit
def normal_order_statistic(cum_log_u):
    """The descending order statistic -Phi^-1(-expm1(C)) of iid N(0, 1) from C = sum log(U_i)/(n - i)."""
    return -ndtri(-expm1(cum_log_u))


@triton.jit
def log_truncated_mean_exp(c, s, inv_tau):
    """log E[exp(Y / tau) | Y < c], Y ~ N(0, s^2), with the squares of the closed form cancelled
    analytically where a = c/s < b = s/tau (duo-math §4.4 step 5)."""
    a = c / s
    b = s * inv_tau
    cancelled = a * (b - a / 2) + tl.log(erfcx_nonnegative(tl.maximum(b - a, 0.0) / 1.4142135623730951) / 2)
    direct = b * b / 2 + log_ndtr(tl.maximum(a - b, 0.0))
    return tl.where(a < b, cancelled, direct) - log_ndtr(a)
