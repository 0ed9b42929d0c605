// momentum_fused CUDA kernels: one functor for every rule family, math from ../update_rules.h (the same
// header the CPU kernels compile), storage conversions from ../storage.h (bit-identical to the CPU's).
// No torch headers. Build with --fmad=false to get the CPU backend's bits (it compiles with
// -ffp-contract=off); with FMA contraction results differ from the CPU in the last bits only.
#include "../storage.h"
#include "../update_rules.h"
#include "fused_step.h"
#include "multi_tensor_apply.cuh"

namespace mf {
namespace cuda {

namespace {

constexpr int kMaxPack = 16;

template <typename S, int N>
struct alignas(sizeof(S) * N) Vec {
  S v[N];
};

template <class Op, typename S>
struct StepFunctor {
  const double* packs;
  int k;
  const float* found_inf;
  const float* grad_scale;
  const double* lr;

  __device__ __forceinline__ void operator()(const TensorTable& tt, int slot, int chunk) const {
    using T = typename MathType<S>::type;
    using Sc = typename Op::template Scalars<T>;
    constexpr int NS = Op::kStates;
    if (found_inf != nullptr && *found_inf != 0.0f) return;  // GradScaler: skip every write

    double pk[kMaxPack];
    const double* row = packs + static_cast<int64_t>(tt.row[slot]) * k;
#pragma unroll
    for (int i = 0; i < kMaxPack; ++i)
      if (i < k) pk[i] = row[i];
    if (grad_scale != nullptr) pk[k - 1] = pk[k - 1] / static_cast<double>(*grad_scale);
    if (lr != nullptr) pk[0] = *lr;
    const Sc sc = Sc::make(pk);

    const int64_t base = static_cast<int64_t>(chunk) * kChunk;
    const int64_t len = min(static_cast<int64_t>(kChunk), tt.numel[slot] - base);
    S* p = static_cast<S*>(tt.ptr[0][slot]) + base;
    const S* g = static_cast<const S*>(tt.ptr[1][slot]) + base;
    S* s0 = NS > 0 ? static_cast<S*>(tt.ptr[2][slot]) + base : nullptr;
    S* s1 = NS > 1 ? static_cast<S*>(tt.ptr[3][slot]) + base : nullptr;
    S* s2 = NS > 2 ? static_cast<S*>(tt.ptr[4][slot]) + base : nullptr;

    const uintptr_t mask = sizeof(S) * kILP - 1;
    bool aligned = (len % kILP) == 0 && ((reinterpret_cast<uintptr_t>(p) | reinterpret_cast<uintptr_t>(g)) & mask) == 0;
    if (NS > 0) aligned = aligned && (reinterpret_cast<uintptr_t>(s0) & mask) == 0;
    if (NS > 1) aligned = aligned && (reinterpret_cast<uintptr_t>(s1) & mask) == 0;
    if (NS > 2) aligned = aligned && (reinterpret_cast<uintptr_t>(s2) & mask) == 0;

    if (aligned) {  // vector loads/stores of kILP elements
      using V = Vec<S, kILP>;
      for (int64_t i = static_cast<int64_t>(threadIdx.x) * kILP; i < len; i += static_cast<int64_t>(blockDim.x) * kILP) {
        V vp = *reinterpret_cast<const V*>(p + i);
        const V vg = *reinterpret_cast<const V*>(g + i);
        V v0, v1, v2;
        if (NS > 0) v0 = *reinterpret_cast<const V*>(s0 + i);
        if (NS > 1) v1 = *reinterpret_cast<const V*>(s1 + i);
        if (NS > 2) v2 = *reinterpret_cast<const V*>(s2 + i);
#pragma unroll
        for (int j = 0; j < kILP; ++j) {
          T a = load<T>(vp.v[j]);
          T b0 = NS > 0 ? load<T>(v0.v[j]) : T(0);
          T b1 = NS > 1 ? load<T>(v1.v[j]) : T(0);
          T b2 = NS > 2 ? load<T>(v2.v[j]) : T(0);
          Op::template apply<T>(a, load<T>(vg.v[j]), b0, b1, b2, sc);
          store(vp.v[j], a);
          if (NS > 0) store(v0.v[j], b0);
          if (NS > 1) store(v1.v[j], b1);
          if (NS > 2) store(v2.v[j], b2);
        }
        *reinterpret_cast<V*>(p + i) = vp;
        if (NS > 0) *reinterpret_cast<V*>(s0 + i) = v0;
        if (NS > 1) *reinterpret_cast<V*>(s1 + i) = v1;
        if (NS > 2) *reinterpret_cast<V*>(s2 + i) = v2;
      }
    } else {  // strided ILP with bounds checks: unaligned tensors and the scalar tail
      for (int64_t i0 = 0; i0 < len; i0 += static_cast<int64_t>(blockDim.x) * kILP) {
        T rp[kILP], rg[kILP], r0[kILP], r1[kILP], r2[kILP];
#pragma unroll
        for (int j = 0; j < kILP; ++j) {
          const int64_t i = i0 + threadIdx.x + static_cast<int64_t>(j) * blockDim.x;
          rp[j] = rg[j] = r0[j] = r1[j] = r2[j] = T(0);
          if (i < len) {
            rp[j] = load<T>(p[i]);
            rg[j] = load<T>(g[i]);
            if (NS > 0) r0[j] = load<T>(s0[i]);
            if (NS > 1) r1[j] = load<T>(s1[i]);
            if (NS > 2) r2[j] = load<T>(s2[i]);
          }
        }
#pragma unroll
        for (int j = 0; j < kILP; ++j) Op::template apply<T>(rp[j], rg[j], r0[j], r1[j], r2[j], sc);
#pragma unroll
        for (int j = 0; j < kILP; ++j) {
          const int64_t i = i0 + threadIdx.x + static_cast<int64_t>(j) * blockDim.x;
          if (i < len) {
            store(p[i], rp[j]);
            if (NS > 0) store(s0[i], r0[j]);
            if (NS > 1) store(s1[i], r1[j]);
            if (NS > 2) store(s2[i], r2[j]);
          }
        }
      }
    }
  }
};

template <class Op, typename S>
cudaError_t launch(int64_t n, void* const* params, const void* const* grads, void* const* states,
                   const int64_t* numel, const double* packs, int k, const float* found_inf,
                   const float* grad_scale, const double* lr, cudaStream_t stream) {
  constexpr int NS = Op::kStates;
  // per-list pointer arrays (states arrive tensor-major)
  void** lists[kMaxLists];
  void** storage = new void*[static_cast<size_t>(n) * (2 + NS) + 1];
  for (int l = 0; l < 2 + NS; ++l) lists[l] = storage + static_cast<size_t>(l) * n;
  for (int64_t i = 0; i < n; ++i) {
    lists[0][i] = params[i];
    lists[1][i] = const_cast<void*>(grads[i]);
    for (int j = 0; j < NS; ++j) lists[2 + j][i] = states[i * NS + j];
  }
  StepFunctor<Op, S> f{packs, k, found_inf, grad_scale, lr};
  const cudaError_t err = multi_tensor_apply(2 + NS, n, lists, numel, f, stream);
  delete[] storage;
  return err;
}

template <typename S>
cudaError_t dispatch_rule(int rule, int flags, int64_t n, void* const* params, const void* const* grads,
                          void* const* states, const int64_t* numel, const double* packs, const float* found_inf,
                          const float* grad_scale, const double* lr, cudaStream_t stream) {
  const int k = rule_num_scalars(rule);
#define MF_CASE(R, F)                                                                                   \
  if (rule == R && flags == F)                                                                          \
    return launch<RuleOp<R, F>, S>(n, params, grads, states, numel, packs, k, found_inf, grad_scale, lr, \
                                   stream);
  MF_FOR_EACH_RULE_FLAGS(MF_CASE)
#undef MF_CASE
  return cudaErrorInvalidValue;
}

}  // namespace

bool lr_pointer_supported(int rule) {
  switch (rule) {
    case RULE_SGD:
    case RULE_QHM:
    case RULE_RMSPROP:
    case RULE_SIGNUM:
    case RULE_LION:
    case RULE_FSGDM: return true;
    default: return false;  // adam/nadam/schedule-free fold lr into other pack entries on the host
  }
}

cudaError_t step(int rule, int flags, int dtype, int64_t n, void* const* params, const void* const* grads,
                 void* const* states, const int64_t* numel, const double* packs, const float* found_inf,
                 const float* grad_scale, const double* lr, cudaStream_t stream) {
  if (rule < 0 || rule >= RULE_COUNT || rule_num_scalars(rule) > kMaxPack) return cudaErrorInvalidValue;
  if (flags < 0 || flags >= (1 << rule_num_flag_bits(rule))) return cudaErrorInvalidValue;
  if (lr != nullptr && !lr_pointer_supported(rule)) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  flags = normalize_flags(rule, flags);
  switch (dtype) {
    case 0: return dispatch_rule<float>(rule, flags, n, params, grads, states, numel, packs, found_inf, grad_scale, lr, stream);
    case 1: return dispatch_rule<double>(rule, flags, n, params, grads, states, numel, packs, found_inf, grad_scale, lr, stream);
    case 2: return dispatch_rule<bf16>(rule, flags, n, params, grads, states, numel, packs, found_inf, grad_scale, lr, stream);
    case 3: return dispatch_rule<fp16>(rule, flags, n, params, grads, states, numel, packs, found_inf, grad_scale, lr, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace mf
