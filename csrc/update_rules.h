// momentum_fused: the elementwise update rules, written once for the CPU and the CUDA kernels.
//
// Each rule is `<rule>_math<T, FLAGS...>(p, g, state..., scalars)`, with the same name and the same
// order of operations as momentum_fused/reference.py::<rule>_ref (docs/algorithms.md has the conventions).
// T is the math type: float for fp32/bf16/fp16 storage, double for fp64. Loads and stores (storage.h)
// stay outside this file. Scalars arrive as the rule's float64 host pack (specs.py scalar_names, last
// entry grad_mult); `<Rule>Scalars<T>::make(pack)` derives the per-tensor constants in double (like the
// Python floats torch.optim passes as `alpha=`/`value=`) and rounds them once to T.
//
// Rule ids, flag bits and the scalar-pack columns (s[pack::adam::eps]) come from csrc/generated/tables.h, which
// momentum_fused/_codegen.py writes from the specs; the backends check rule_id()/num_states() at load time.
#pragma once

#include "mf_common.h"

#if !defined(__CUDACC__)
#include <cmath>
#endif

namespace mf {

// Rule ids, flag bits and pack columns: generated/tables.h (from momentum_fused/specs.py), via mf_common.h.

// ------------------------------------------------------------------------------------------ helpers
MF_HD MF_INLINE float mf_sqrt(float x) { return sqrtf(x); }
MF_HD MF_INLINE double mf_sqrt(double x) { return sqrt(x); }
MF_HD MF_INLINE float mf_abs(float x) { return fabsf(x); }
MF_HD MF_INLINE double mf_abs(double x) { return fabs(x); }

// torch.sign: sign(0) = 0, sign(NaN) = 0 (as torch 2.x on CPU).
template <typename T>
MF_HD MF_INLINE T mf_sign(T x) {
  return static_cast<T>(x > T(0)) - static_cast<T>(x < T(0));
}

// torch.maximum: NaN propagates.
template <typename T>
MF_HD MF_INLINE T mf_maximum(T a, T b) {
  return (a != a || b != b) ? a + b : (a > b ? a : b);
}

// torch.lerp (c10/util/lerp.h): a + w (b - a) for |w| < 0.5, else b - (b - a)(1 - w).
template <typename T>
MF_HD MF_INLINE T mf_lerp(T a, T b, T w) {
  return mf_abs(w) < T(0.5) ? a + w * (b - a) : b - (b - a) * (T(1) - w);
}

// torch.addcmul(self, t1, t2, value=v) as torch's CPU kernels compute it on every FMA machine: one
// rounding, fma(v * t1, t2, self). Used where the rounding decides the outcome (RMSprop's centered
// variance sq - ga * ga cancels to 0 or a tiny negative number: its NaNs must be torch's).
MF_HD MF_INLINE float mf_fma(float a, float b, float c) { return fmaf(a, b, c); }
MF_HD MF_INLINE double mf_fma(double a, double b, double c) { return fma(a, b, c); }

// =============================================================================================== sgd
// pack: lr, weight_decay, momentum, dampening, first, grad_mult
template <typename T>
struct SgdScalars {
  T wd, momentum, one_minus_dampening, neg_lr, grad_mult;
  T has_wd, first;  // 1 or 0 (a T, not a bool: gcc then vectorizes the uniform selects)
  static constexpr int kPack = pack::sgd::size;
  MF_HD static SgdScalars make(const double* s) {
    SgdScalars r;
    r.neg_lr = static_cast<T>(-s[pack::sgd::lr]);
    r.wd = static_cast<T>(s[pack::sgd::weight_decay]);
    r.momentum = static_cast<T>(s[pack::sgd::momentum]);
    r.one_minus_dampening = static_cast<T>(1.0 - s[pack::sgd::dampening]);
    r.first = s[pack::sgd::first] != 0.0 ? T(1) : T(0);
    r.grad_mult = static_cast<T>(s[pack::sgd::grad_mult]);
    r.has_wd = s[pack::sgd::weight_decay] != 0.0 ? T(1) : T(0);
    return r;
  }
};

template <typename T, bool MOMENTUM, bool NESTEROV>
MF_HD MF_INLINE void sgd_math(T& p, T g, T& buf, const SgdScalars<T>& s) {
  g = g * s.grad_mult;
  if (s.has_wd != T(0)) g = g + s.wd * p;
  if (MOMENTUM) {
    buf = s.first != T(0) ? g : buf * s.momentum + s.one_minus_dampening * g;
    g = NESTEROV ? g + s.momentum * buf : buf;
  }
  p = p + s.neg_lr * g;
}

// =============================================================================================== qhm
// pack: lr, weight_decay, momentum, nu, grad_mult
template <typename T>
struct QhmScalars {
  T wd, decay, momentum, one_minus_momentum, neg_lr_nu, neg_lr_one_minus_nu, grad_mult;
  T has_wd;  // 1 or 0
  static constexpr int kPack = pack::qhm::size;
  MF_HD static QhmScalars make(const double* s) {
    QhmScalars r;
    r.wd = static_cast<T>(s[pack::qhm::weight_decay]);
    r.decay = static_cast<T>(1.0 - s[pack::qhm::lr] * s[pack::qhm::weight_decay]);
    r.momentum = static_cast<T>(s[pack::qhm::momentum]);
    r.one_minus_momentum = static_cast<T>(1.0 - s[pack::qhm::momentum]);
    r.neg_lr_nu = static_cast<T>(-s[pack::qhm::lr] * s[pack::qhm::nu]);
    r.neg_lr_one_minus_nu = static_cast<T>(-s[pack::qhm::lr] * (1.0 - s[pack::qhm::nu]));
    r.grad_mult = static_cast<T>(s[pack::qhm::grad_mult]);
    r.has_wd = s[pack::qhm::weight_decay] != 0.0 ? T(1) : T(0);
    return r;
  }
};

template <typename T, bool DIRECT_DECAY>
MF_HD MF_INLINE void qhm_math(T& p, T g, T& buf, const QhmScalars<T>& s) {
  g = g * s.grad_mult;
  if (s.has_wd != T(0)) {
    if (DIRECT_DECAY)
      p = p * s.decay;
    else
      g = g + s.wd * p;
  }
  buf = buf * s.momentum + s.one_minus_momentum * g;
  p = p + s.neg_lr_nu * buf;
  p = p + s.neg_lr_one_minus_nu * g;
}

// ============================================================================== adam (AdamW, AMSGrad)
// pack: lr, weight_decay, beta1, beta2, eps, step_size, bc2_sqrt, grad_mult
template <typename T>
struct AdamScalars {
  T wd, decay, w1, beta2, one_minus_beta2, eps, neg_step_size, bc2_sqrt, grad_mult;
  T has_wd;  // 1 or 0
  static constexpr int kPack = pack::adam::size;
  MF_HD static AdamScalars make(const double* s) {
    AdamScalars r;
    r.wd = static_cast<T>(s[pack::adam::weight_decay]);
    r.decay = static_cast<T>(1.0 - s[pack::adam::lr] * s[pack::adam::weight_decay]);
    r.w1 = static_cast<T>(1.0 - s[pack::adam::beta1]);
    r.beta2 = static_cast<T>(s[pack::adam::beta2]);
    r.one_minus_beta2 = static_cast<T>(1.0 - s[pack::adam::beta2]);
    r.eps = static_cast<T>(s[pack::adam::eps]);
    r.neg_step_size = static_cast<T>(-s[pack::adam::step_size]);
    r.bc2_sqrt = static_cast<T>(s[pack::adam::bc2_sqrt]);
    r.grad_mult = static_cast<T>(s[pack::adam::grad_mult]);
    r.has_wd = s[pack::adam::weight_decay] != 0.0 ? T(1) : T(0);
    return r;
  }
};

template <typename T, bool DECOUPLED, bool AMSGRAD>
MF_HD MF_INLINE void adam_math(T& p, T g, T& m, T& v, T& vmax, const AdamScalars<T>& s) {
  g = g * s.grad_mult;
  if (s.has_wd != T(0)) {
    if (DECOUPLED)
      p = p * s.decay;
    else
      g = g + s.wd * p;
  }
  m = mf_lerp(m, g, s.w1);
  v = v * s.beta2 + s.one_minus_beta2 * g * g;
  T vv = v;
  if (AMSGRAD) {
    vmax = mf_maximum(vmax, v);
    vv = vmax;
  }
  const T denom = mf_sqrt(vv) / s.bc2_sqrt + s.eps;  // eps after the sqrt bias correction
  p = p + s.neg_step_size * m / denom;
}

// ============================================================================================= nadam
// pack: lr, weight_decay, beta1, beta2, eps, bc2, grad_coef, exp_avg_coef, grad_mult
template <typename T>
struct NadamScalars {
  T wd, decay, w1, beta2, one_minus_beta2, eps, bc2, grad_coef, exp_avg_coef, grad_mult;
  T has_wd;  // 1 or 0
  static constexpr int kPack = pack::nadam::size;
  MF_HD static NadamScalars make(const double* s) {
    NadamScalars r;
    r.wd = static_cast<T>(s[pack::nadam::weight_decay]);
    r.decay = static_cast<T>(1.0 - s[pack::nadam::lr] * s[pack::nadam::weight_decay]);
    r.w1 = static_cast<T>(1.0 - s[pack::nadam::beta1]);
    r.beta2 = static_cast<T>(s[pack::nadam::beta2]);
    r.one_minus_beta2 = static_cast<T>(1.0 - s[pack::nadam::beta2]);
    r.eps = static_cast<T>(s[pack::nadam::eps]);
    r.bc2 = static_cast<T>(s[pack::nadam::bc2]);
    r.grad_coef = static_cast<T>(s[pack::nadam::grad_coef]);
    r.exp_avg_coef = static_cast<T>(s[pack::nadam::exp_avg_coef]);
    r.grad_mult = static_cast<T>(s[pack::nadam::grad_mult]);
    r.has_wd = s[pack::nadam::weight_decay] != 0.0 ? T(1) : T(0);
    return r;
  }
};

template <typename T, bool DECOUPLED>
MF_HD MF_INLINE void nadam_math(T& p, T g, T& m, T& v, const NadamScalars<T>& s) {
  g = g * s.grad_mult;
  if (s.has_wd != T(0)) {
    if (DECOUPLED)
      p = p * s.decay;
    else
      g = g + s.wd * p;
  }
  m = mf_lerp(m, g, s.w1);
  v = v * s.beta2 + s.one_minus_beta2 * g * g;
  const T denom = mf_sqrt(v / s.bc2) + s.eps;
  p = p + s.grad_coef * g / denom;
  p = p + s.exp_avg_coef * m / denom;
}

// =========================================================================================== rmsprop
// pack: lr, weight_decay, alpha, eps, momentum, grad_mult. State order: square_avg[, momentum_buffer]
// [, grad_avg].
template <typename T>
struct RmspropScalars {
  T wd, alpha, one_minus_alpha, eps, momentum, neg_lr, grad_mult;
  T has_wd;  // 1 or 0
  static constexpr int kPack = pack::rmsprop::size;
  MF_HD static RmspropScalars make(const double* s) {
    RmspropScalars r;
    r.neg_lr = static_cast<T>(-s[pack::rmsprop::lr]);
    r.wd = static_cast<T>(s[pack::rmsprop::weight_decay]);
    r.alpha = static_cast<T>(s[pack::rmsprop::alpha]);
    r.one_minus_alpha = static_cast<T>(1.0 - s[pack::rmsprop::alpha]);
    r.eps = static_cast<T>(s[pack::rmsprop::eps]);
    r.momentum = static_cast<T>(s[pack::rmsprop::momentum]);
    r.grad_mult = static_cast<T>(s[pack::rmsprop::grad_mult]);
    r.has_wd = s[pack::rmsprop::weight_decay] != 0.0 ? T(1) : T(0);
    return r;
  }
};

template <typename T, bool MOMENTUM, bool CENTERED>
MF_HD MF_INLINE void rmsprop_math(T& p, T g, T& sq, T& buf, T& ga, const RmspropScalars<T>& s) {
  g = g * s.grad_mult;
  if (s.has_wd != T(0)) g = g + s.wd * p;
  sq = sq * s.alpha + s.one_minus_alpha * g * g;
  T avg;
  if (CENTERED) {
    ga = mf_lerp(ga, g, s.one_minus_alpha);
    avg = mf_sqrt(mf_fma(-ga, ga, sq));  // torch: sq.addcmul(ga, ga, value=-1), one rounding
  } else {
    avg = mf_sqrt(sq);
  }
  avg = avg + s.eps;
  if (MOMENTUM) {
    buf = buf * s.momentum + g / avg;
    p = p + s.neg_lr * buf;
  } else {
    p = p + s.neg_lr * g / avg;
  }
}

// ==================================================================================== signum/signSGD
// pack: lr, weight_decay, momentum, grad_mult. momentum flag off: signSGD (no state).
template <typename T>
struct SignumScalars {
  T decay, momentum, one_minus_momentum, neg_lr, grad_mult;
  T has_wd;  // 1 or 0
  static constexpr int kPack = pack::signum::size;
  MF_HD static SignumScalars make(const double* s) {
    SignumScalars r;
    r.neg_lr = static_cast<T>(-s[pack::signum::lr]);
    r.decay = static_cast<T>(1.0 - s[pack::signum::lr] * s[pack::signum::weight_decay]);
    r.momentum = static_cast<T>(s[pack::signum::momentum]);
    r.one_minus_momentum = static_cast<T>(1.0 - s[pack::signum::momentum]);
    r.grad_mult = static_cast<T>(s[pack::signum::grad_mult]);
    r.has_wd = s[pack::signum::weight_decay] != 0.0 ? T(1) : T(0);
    return r;
  }
};

template <typename T, bool MOMENTUM>
MF_HD MF_INLINE void signum_math(T& p, T g, T& m, const SignumScalars<T>& s) {
  g = g * s.grad_mult;
  if (s.has_wd != T(0)) p = p * s.decay;
  if (MOMENTUM) {
    m = m * s.momentum + s.one_minus_momentum * g;
    g = m;
  }
  p = p + s.neg_lr * mf_sign(g);
}

// ============================================================================================== lion
// pack: lr, weight_decay, beta1, beta2, grad_mult
template <typename T>
struct LionScalars {
  T decay, beta1, one_minus_beta1, beta2, one_minus_beta2, neg_lr, grad_mult;
  T has_wd;  // 1 or 0
  static constexpr int kPack = pack::lion::size;
  MF_HD static LionScalars make(const double* s) {
    LionScalars r;
    r.neg_lr = static_cast<T>(-s[pack::lion::lr]);
    r.decay = static_cast<T>(1.0 - s[pack::lion::lr] * s[pack::lion::weight_decay]);
    r.beta1 = static_cast<T>(s[pack::lion::beta1]);
    r.one_minus_beta1 = static_cast<T>(1.0 - s[pack::lion::beta1]);
    r.beta2 = static_cast<T>(s[pack::lion::beta2]);
    r.one_minus_beta2 = static_cast<T>(1.0 - s[pack::lion::beta2]);
    r.grad_mult = static_cast<T>(s[pack::lion::grad_mult]);
    r.has_wd = s[pack::lion::weight_decay] != 0.0 ? T(1) : T(0);
    return r;
  }
};

template <typename T>
MF_HD MF_INLINE void lion_math(T& p, T g, T& m, const LionScalars<T>& s) {
  g = g * s.grad_mult;
  if (s.has_wd != T(0)) p = p * s.decay;
  const T c = m * s.beta1 + s.one_minus_beta1 * g;
  p = p + s.neg_lr * mf_sign(c);
  m = m * s.beta2 + s.one_minus_beta2 * g;
}

// ============================================================================================= fsgdm
// pack: lr, weight_decay, u, v, first, grad_mult
template <typename T>
struct FsgdmScalars {
  T wd, u, v, neg_lr, grad_mult;
  T has_wd, first;  // 1 or 0 (a T, not a bool: gcc then vectorizes the uniform selects)
  static constexpr int kPack = pack::fsgdm::size;
  MF_HD static FsgdmScalars make(const double* s) {
    FsgdmScalars r;
    r.neg_lr = static_cast<T>(-s[pack::fsgdm::lr]);
    r.wd = static_cast<T>(s[pack::fsgdm::weight_decay]);
    r.u = static_cast<T>(s[pack::fsgdm::u]);
    r.v = static_cast<T>(s[pack::fsgdm::v]);
    r.first = s[pack::fsgdm::first] != 0.0 ? T(1) : T(0);
    r.grad_mult = static_cast<T>(s[pack::fsgdm::grad_mult]);
    r.has_wd = s[pack::fsgdm::weight_decay] != 0.0 ? T(1) : T(0);
    return r;
  }
};

template <typename T>
MF_HD MF_INLINE void fsgdm_math(T& p, T g, T& buf, const FsgdmScalars<T>& s) {
  g = g * s.grad_mult;
  if (s.has_wd != T(0)) g = g + s.wd * p;
  buf = s.first != T(0) ? g : buf * s.u + s.v * g;
  p = p + s.neg_lr * buf;
}

// ============================================================== schedule-free SGD (memory-efficient)
// p holds y; state z. pack: lr, c, beta, y_coef, weight_decay, grad_mult
template <typename T>
struct SgdSfScalars {
  T neg_lr, c, y_coef, wd, grad_mult;
  T has_wd;  // 1 or 0
  static constexpr int kPack = pack::sgd_sf::size;
  MF_HD static SgdSfScalars make(const double* s) {
    SgdSfScalars r;
    r.neg_lr = static_cast<T>(-s[pack::sgd_sf::lr]);
    r.c = static_cast<T>(s[pack::sgd_sf::c]);
    r.y_coef = static_cast<T>(s[pack::sgd_sf::y_coef]);
    r.wd = static_cast<T>(s[pack::sgd_sf::weight_decay]);
    r.grad_mult = static_cast<T>(s[pack::sgd_sf::grad_mult]);
    r.has_wd = s[pack::sgd_sf::weight_decay] != 0.0 ? T(1) : T(0);
    return r;
  }
};

template <typename T>
MF_HD MF_INLINE void sgd_sf_math(T& p, T g, T& z, const SgdSfScalars<T>& s) {
  g = g * s.grad_mult;
  if (s.has_wd != T(0)) g = g + s.wd * p;  // decay evaluated at y
  p = mf_lerp(p, z, s.c);                  // y <- y + c (z - y)
  p = p + s.y_coef * g;                    // y_coef = lr (beta (1 - c) - 1)
  z = z + s.neg_lr * g;
}

// ============================================================ schedule-free AdamW (memory-efficient)
// states: z, exp_avg_sq[, exp_avg]. pack: lr, c, beta, y_coef, weight_decay, beta2, bc2, eps,
// inner_momentum, inner_bc, grad_mult
template <typename T>
struct AdamwSfScalars {
  T neg_lr, c, y_coef, wd, beta2, one_minus_beta2, bc2, eps, w_inner, inner_bc, grad_mult;
  T has_wd;  // 1 or 0
  static constexpr int kPack = pack::adamw_sf::size;
  MF_HD static AdamwSfScalars make(const double* s) {
    AdamwSfScalars r;
    r.neg_lr = static_cast<T>(-s[pack::adamw_sf::lr]);
    r.c = static_cast<T>(s[pack::adamw_sf::c]);
    r.y_coef = static_cast<T>(s[pack::adamw_sf::y_coef]);
    r.wd = static_cast<T>(s[pack::adamw_sf::weight_decay]);
    r.beta2 = static_cast<T>(s[pack::adamw_sf::beta2]);
    r.one_minus_beta2 = static_cast<T>(1.0 - s[pack::adamw_sf::beta2]);
    r.bc2 = static_cast<T>(s[pack::adamw_sf::bc2]);
    r.eps = static_cast<T>(s[pack::adamw_sf::eps]);
    r.w_inner = static_cast<T>(1.0 - s[pack::adamw_sf::inner_momentum]);
    r.inner_bc = static_cast<T>(s[pack::adamw_sf::inner_bc]);
    r.grad_mult = static_cast<T>(s[pack::adamw_sf::grad_mult]);
    r.has_wd = s[pack::adamw_sf::weight_decay] != 0.0 ? T(1) : T(0);
    return r;
  }
};

template <typename T, bool INNER_MOMENTUM>
MF_HD MF_INLINE void adamw_sf_math(T& p, T g, T& z, T& v, T& m, const AdamwSfScalars<T>& s) {
  g = g * s.grad_mult;
  v = v * s.beta2 + s.one_minus_beta2 * g * g;
  const T denom = mf_sqrt(v / s.bc2) + s.eps;  // bias correction inside the denominator
  T d = g / denom;
  if (INNER_MOMENTUM) {
    m = mf_lerp(m, d, s.w_inner);
    d = m / s.inner_bc;
  }
  if (s.has_wd != T(0)) d = d + s.wd * p;  // decay evaluated at y, not preconditioned
  p = mf_lerp(p, z, s.c);
  p = p + s.y_coef * d;
  z = z + s.neg_lr * d;
}

// ============================================================================================== muon
// The two elementwise passes of Muon (a multi-phase rule, momentum_fused/specs_muon.py; the Newton-Schulz phase
// between them runs with torch ops). Their lerps and the final add use torch's CPU vector forms, one rounding
// each (fused multiply-add), so that an fp32 step equals torch.optim.Muon's bit for bit:
// torch.lerp(a, b, w) = |w| < 0.5 ? fma(w, b - a, a) : fma(w - 1, b - a, b); p.add_(u, alpha) = fma(alpha, u, p).
template <typename T>
MF_HD MF_INLINE T mf_lerp_fma(T a, T b, T w) {
  const T d = b - a;
  return mf_abs(w) < T(0.5) ? mf_fma(w, d, a) : mf_fma(w - T(1), d, b);
}

// muon_momentum: buf <- lerp(buf, g, 1 - mu); update <- lerp(g, buf, mu) (nesterov) or buf. The pass runs with
// the momentum buffer in the param slot (it does not touch the param; specs_muon.py, ElementwisePass.param_slot)
// and the update, a work buffer it writes without reading, as its one state: in the buffer's dtype, or bf16 under
// the bf16_state layout when the Newton-Schulz phase computes in bf16 (rounded once, as that phase's first op).
// pack: lr (unused: every pack starts with lr), momentum, grad_mult
template <typename T>
struct MuonMomentumScalars {
  T momentum, one_minus_momentum, grad_mult;
  static constexpr int kPack = pack::muon_momentum::size;
  MF_HD static MuonMomentumScalars make(const double* s) {
    MuonMomentumScalars r;
    r.momentum = static_cast<T>(s[pack::muon_momentum::momentum]);
    r.one_minus_momentum = static_cast<T>(1.0 - s[pack::muon_momentum::momentum]);
    r.grad_mult = static_cast<T>(s[pack::muon_momentum::grad_mult]);
    return r;
  }
};

template <typename T, bool NESTEROV>
MF_HD MF_INLINE void muon_momentum_math(T g, T& buf, T& update, const MuonMomentumScalars<T>& s) {
  g = g * s.grad_mult;
  buf = mf_lerp_fma(buf, g, s.one_minus_momentum);
  update = NESTEROV ? mf_lerp_fma(g, buf, s.momentum) : buf;
}

// muon_apply: p <- p (1 - lr wd) (unadjusted lr, as torch); p <- p - adjusted_lr * update. Reads the update (the
// Newton-Schulz result) without writing it; the gradient is not read.
// pack: lr, weight_decay, adjusted_lr (lr times the shape factor), grad_mult
template <typename T>
struct MuonApplyScalars {
  T decay, neg_adjusted_lr;
  T has_wd;  // 1 or 0
  static constexpr int kPack = pack::muon_apply::size;
  MF_HD static MuonApplyScalars make(const double* s) {
    MuonApplyScalars r;
    r.decay = static_cast<T>(1.0 - s[pack::muon_apply::lr] * s[pack::muon_apply::weight_decay]);
    r.neg_adjusted_lr = static_cast<T>(-s[pack::muon_apply::adjusted_lr]);
    r.has_wd = s[pack::muon_apply::weight_decay] != 0.0 ? T(1) : T(0);
    return r;
  }
};

template <typename T>
MF_HD MF_INLINE void muon_apply_math(T& p, T update, const MuonApplyScalars<T>& s) {
  if (s.has_wd != T(0)) p = p * s.decay;
  p = mf_fma(s.neg_adjusted_lr, update, p);
}

// ================================================================================ generic rule table
// RuleOp<RULE, FLAGS>: state count, scalar pack type, and apply(p, g, s0, s1, s2, scalars) -- the one
// interface the CPU loop and the CUDA functor use. s0..s2 are the states in spec.state_names order
// (unused ones are dummies). Its memory traffic is op_io<RuleOp> below: generated/tables.h's RuleTraffic, from
// spec.traffic (reads_param, writes_param, reads_grad, and the bit masks states_read / states_written, bit j:
// state j). A loop may skip what a rule declares it does not read or write (the value it then passes is 0); one
// that ignores the traits is still correct, as long as it stores the values apply() leaves (an unread state is
// then written from 0 only when the rule writes it, and then apply() wrote it).
template <int RULE, int FLAGS>
struct RuleOp;

template <int F>
struct RuleOp<RULE_SGD, F> {
  static constexpr bool kMomentum = (F & SGD_MOMENTUM) != 0;
  static constexpr int kStates = kMomentum ? 1 : 0;
  template <typename T>
  using Scalars = SgdScalars<T>;
  template <typename T>
  MF_HD static MF_INLINE void apply(T& p, T g, T& s0, T& s1, T& s2, const SgdScalars<T>& s) {
    sgd_math<T, kMomentum, kMomentum && (F & SGD_NESTEROV) != 0>(p, g, s0, s);
  }
};

template <int F>
struct RuleOp<RULE_QHM, F> {
  static constexpr int kStates = 1;
  template <typename T>
  using Scalars = QhmScalars<T>;
  template <typename T>
  MF_HD static MF_INLINE void apply(T& p, T g, T& s0, T& s1, T& s2, const QhmScalars<T>& s) {
    qhm_math<T, (F & QHM_DIRECT_DECAY) != 0>(p, g, s0, s);
  }
};

template <int F>
struct RuleOp<RULE_ADAM, F> {
  static constexpr bool kAmsgrad = (F & ADAM_AMSGRAD) != 0;
  static constexpr int kStates = kAmsgrad ? 3 : 2;
  template <typename T>
  using Scalars = AdamScalars<T>;
  template <typename T>
  MF_HD static MF_INLINE void apply(T& p, T g, T& s0, T& s1, T& s2, const AdamScalars<T>& s) {
    adam_math<T, (F & ADAM_DECOUPLED) != 0, kAmsgrad>(p, g, s0, s1, s2, s);
  }
};

template <int F>
struct RuleOp<RULE_NADAM, F> {
  static constexpr int kStates = 2;
  template <typename T>
  using Scalars = NadamScalars<T>;
  template <typename T>
  MF_HD static MF_INLINE void apply(T& p, T g, T& s0, T& s1, T& s2, const NadamScalars<T>& s) {
    nadam_math<T, (F & NADAM_DECOUPLED) != 0>(p, g, s0, s1, s);
  }
};

template <int F>
struct RuleOp<RULE_RMSPROP, F> {
  static constexpr bool kMomentum = (F & RMSPROP_MOMENTUM) != 0;
  static constexpr bool kCentered = (F & RMSPROP_CENTERED) != 0;
  static constexpr int kStates = 1 + kMomentum + kCentered;
  template <typename T>
  using Scalars = RmspropScalars<T>;
  template <typename T>
  MF_HD static MF_INLINE void apply(T& p, T g, T& s0, T& s1, T& s2, const RmspropScalars<T>& s) {
    // square_avg, then momentum_buffer if any, then grad_avg if centered
    rmsprop_math<T, kMomentum, kCentered>(p, g, s0, s1, kMomentum ? s2 : s1, s);
  }
};

template <int F>
struct RuleOp<RULE_SIGNUM, F> {
  static constexpr bool kMomentum = (F & SIGNUM_MOMENTUM) != 0;
  static constexpr int kStates = kMomentum ? 1 : 0;
  template <typename T>
  using Scalars = SignumScalars<T>;
  template <typename T>
  MF_HD static MF_INLINE void apply(T& p, T g, T& s0, T& s1, T& s2, const SignumScalars<T>& s) {
    signum_math<T, kMomentum>(p, g, s0, s);
  }
};

template <int F>
struct RuleOp<RULE_LION, F> {
  static constexpr int kStates = 1;
  template <typename T>
  using Scalars = LionScalars<T>;
  template <typename T>
  MF_HD static MF_INLINE void apply(T& p, T g, T& s0, T& s1, T& s2, const LionScalars<T>& s) {
    lion_math<T>(p, g, s0, s);
  }
};

template <int F>
struct RuleOp<RULE_FSGDM, F> {
  static constexpr int kStates = 1;
  template <typename T>
  using Scalars = FsgdmScalars<T>;
  template <typename T>
  MF_HD static MF_INLINE void apply(T& p, T g, T& s0, T& s1, T& s2, const FsgdmScalars<T>& s) {
    fsgdm_math<T>(p, g, s0, s);
  }
};

template <int F>
struct RuleOp<RULE_SGD_SF, F> {
  static constexpr int kStates = 1;
  template <typename T>
  using Scalars = SgdSfScalars<T>;
  template <typename T>
  MF_HD static MF_INLINE void apply(T& p, T g, T& s0, T& s1, T& s2, const SgdSfScalars<T>& s) {
    sgd_sf_math<T>(p, g, s0, s);
  }
};

template <int F>
struct RuleOp<RULE_ADAMW_SF, F> {
  static constexpr bool kInner = (F & ADAMW_SF_INNER_MOMENTUM) != 0;
  static constexpr int kStates = kInner ? 3 : 2;
  template <typename T>
  using Scalars = AdamwSfScalars<T>;
  template <typename T>
  MF_HD static MF_INLINE void apply(T& p, T g, T& s0, T& s1, T& s2, const AdamwSfScalars<T>& s) {
    adamw_sf_math<T, kInner>(p, g, s0, s1, s2, s);
  }
};

template <int F>
struct RuleOp<RULE_MUON_MOMENTUM, F> {
  static constexpr int kStates = 1;  // p: the momentum buffer; s0: the update (a work buffer: written, never read)
  template <typename T>
  using Scalars = MuonMomentumScalars<T>;
  template <typename T>
  MF_HD static MF_INLINE void apply(T& p, T g, T& s0, T& s1, T& s2, const MuonMomentumScalars<T>& s) {
    muon_momentum_math<T, (F & MUON_MOMENTUM_NESTEROV) != 0>(g, p, s0, s);
  }
};

template <int F>
struct RuleOp<RULE_MUON_APPLY, F> {
  static constexpr int kStates = 1;  // update (read only)
  template <typename T>
  using Scalars = MuonApplyScalars<T>;
  template <typename T>
  MF_HD static MF_INLINE void apply(T& p, T g, T& s0, T& s1, T& s2, const MuonApplyScalars<T>& s) {
    muon_apply_math<T>(p, s0, s);
  }
};

// The memory traffic of a RuleOp (spec.traffic, generated/tables.h's RuleTraffic).
template <class Op>
struct op_io;
template <int RULE, int FLAGS>
struct op_io<RuleOp<RULE, FLAGS>> : RuleTraffic<RULE> {};

// State counts per (rule, flags), for checks (the Python backends compare them with spec.state_names).
MF_HD inline int rule_num_states(int rule, int f) {
  switch (rule) {
    case RULE_SGD: return (f & SGD_MOMENTUM) ? 1 : 0;
    case RULE_QHM: return 1;
    case RULE_ADAM: return (f & ADAM_AMSGRAD) ? 3 : 2;
    case RULE_NADAM: return 2;
    case RULE_RMSPROP: return 1 + ((f & RMSPROP_MOMENTUM) ? 1 : 0) + ((f & RMSPROP_CENTERED) ? 1 : 0);
    case RULE_SIGNUM: return (f & SIGNUM_MOMENTUM) ? 1 : 0;
    case RULE_LION: return 1;
    case RULE_FSGDM: return 1;
    case RULE_SGD_SF: return 1;
    case RULE_ADAMW_SF: return (f & ADAMW_SF_INNER_MOMENTUM) ? 3 : 2;
    case RULE_MUON_MOMENTUM: return 1;
    case RULE_MUON_APPLY: return 1;
    default: return -1;
  }
}

// Expands X(RULE, FLAGS) for every (rule, flags) combination a kernel is instantiated for.
#define MF_FOR_EACH_RULE_FLAGS(X)                                                                  \
  X(RULE_SGD, 0) X(RULE_SGD, 1) X(RULE_SGD, 3)                                                     \
  X(RULE_QHM, 0) X(RULE_QHM, 1)                                                                    \
  X(RULE_ADAM, 0) X(RULE_ADAM, 1) X(RULE_ADAM, 2) X(RULE_ADAM, 3)                                  \
  X(RULE_NADAM, 0) X(RULE_NADAM, 1)                                                                \
  X(RULE_RMSPROP, 0) X(RULE_RMSPROP, 1) X(RULE_RMSPROP, 2) X(RULE_RMSPROP, 3)                      \
  X(RULE_SIGNUM, 0) X(RULE_SIGNUM, 1)                                                              \
  X(RULE_LION, 0)                                                                                  \
  X(RULE_FSGDM, 0)                                                                                 \
  X(RULE_SGD_SF, 0)                                                                                \
  X(RULE_ADAMW_SF, 0) X(RULE_ADAMW_SF, 1)                                                         \
  X(RULE_MUON_MOMENTUM, 0) X(RULE_MUON_MOMENTUM, 1)                                                \
  X(RULE_MUON_APPLY, 0)

// Normalizes flags to an instantiated combination (SGD nesterov without momentum is plain SGD:
// the spec forbids it, and the math ignores it).
MF_HD inline int normalize_flags(int rule, int f) {
  if (rule == RULE_SGD && !(f & SGD_MOMENTUM)) return 0;
  return f;
}

}  // namespace mf
