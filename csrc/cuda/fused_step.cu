// momentum_fused CUDA kernels: one functor for every rule family and dtype layout, math from ../update_rules.h (the same
// header the CPU kernels compile), storage conversions from ../storage.h (bit-identical to the CPU's).
// No torch headers. Build with --fmad=false to get the CPU backend's bits (it compiles with
// -ffp-contract=off); with FMA contraction results differ from the CPU in the last bits only.
// The int8 code map of generated/tables.h as device arrays (read once per block into shared memory).
#define MF_INT8_TABLE_ATTR static __device__
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../compressed.h"
#include "../storage.h"
#include "../update_rules.h"
#include "fused_step.h"
#include "multi_tensor_apply.cuh"
#include "int8_functor.cuh"
#include "vec.cuh"

namespace mf {
namespace cuda {

namespace {

constexpr int kMaxPack = 16;

// Elements per thread and iteration of the vector path: 16 bytes of the narrowest storage type, so every
// list is read and written in 128-bit accesses (fp32: 4; bf16/fp16 and the layouts mixing them with fp32: 8, the
// fp32 lists then in two 128-bit accesses), within 64 registers without spills (kernel_report checks it):
// the rules with many live values (three states, or schedule-free AdamW) mixed with fp32 (bf16_state, master)
// take 4 (the 16-bit lists then in 64-bit accesses), fp64 2, or 1 with two or more states (its scalars and math
// take twice the registers).
template <class Op>
struct ManyLiveValues {
  static constexpr bool value = Op::kStates == 3;
};
template <int F>
struct ManyLiveValues<RuleOp<RULE_ADAMW_SF, F>> {
  static constexpr bool value = true;
};

template <typename P, typename S, int NS, bool MANY>
struct VecElems {
  static constexpr int kMin = sizeof(P) < sizeof(S) ? sizeof(P) : sizeof(S);
  static constexpr int kMax = sizeof(P) < sizeof(S) ? sizeof(S) : sizeof(P);
  static constexpr int value = kMax == 8 ? (NS >= 2 ? 1 : 2) : kMin == 2 ? (MANY && kMax == 4 ? 4 : 8) : 4;
};

// RNE stores of the 16-bit types through the hardware conversion (cvt.rn.bf16.f32 / cvt.rn.f16.f32): for every
// non-NaN value the bits of storage.h's bit arithmetic (the CPU's), overflow to inf and subnormals included, in
// fewer instructions (bf16 AdamW was instruction-bound); a NaN becomes the conversion's canonical NaN instead of
// keeping its sign and payload: the NaN rule of docs/csrc.md leaves a NaN's sign and payload unspecified.
template <typename T>
__device__ __forceinline__ void dstore(bf16& d, T v) {
  d.bits = __bfloat16_as_ushort(__float2bfloat16_rn(static_cast<float>(v)));
}
template <typename T>
__device__ __forceinline__ void dstore(fp16& d, T v) {
  d.bits = __half_as_ushort(__float2half_rn(static_cast<float>(v)));
}
template <typename D, typename T>
__device__ __forceinline__ void dstore(D& d, T v) {
  store(d, v);
}

// One store: RNE (dstore) or stochastic rounding (store_sr, element e, buffer key kb).
template <bool SR, typename D, typename T>
__device__ __forceinline__ void put(D& d, T v, uint32_t kb, int64_t e) {
  if constexpr (SR)
    store_sr(d, v, kb, e);
  else
    dstore(d, v);
}

// master16 (REM): the fp32 master as the bf16 param and an int16 remainder (list 2 + NS), compressed.h's codec.
__device__ __forceinline__ float m16_load(bf16 p, uint16_t r) { return master16_decode(p.bits, r); }
__device__ __forceinline__ void m16_store(bf16& p, uint16_t& r, float a) {
  p.bits = master16_param_bits(a);
  r = master16_remainder_bits(a);
}

// Layouts (fused_step.h): P param/grad storage, S state storage, MASTER: an fp32 master (list 2 + NS) is
// the param value the rule reads and writes, the param is written from it; SR: stochastic stores; REM (master16,
// P = bf16): the master is decoded from the param and the int16 remainder (list 2 + NS) and encoded back.
template <class Op, typename P, typename S, bool MASTER, bool SR, bool REM = false>
struct StepFunctor {
  static constexpr int kMinBlocks = MASTER ? kMasterMinBlocksPerSM : kMinBlocksPerSM;  // (multi_tensor_apply.cuh)
  const double* packs;
  const float* found_inf;
  const float* grad_scale;
  const int64_t* sr_keys;

  template <int NL>
  __device__ __forceinline__ void operator()(const TensorTable<NL>& tt, int slot, int chunk) const {
    using T = typename MathType<P>::type;
    using Sc = typename Op::template Scalars<T>;
    using IO = op_io<Op>;  // what the rule reads and writes (spec.traffic): the other loads and stores are skipped
    constexpr int NS = Op::kStates;
    constexpr bool RD0 = NS > 0 && (IO::states_read & 1), RD1 = NS > 1 && (IO::states_read & 2),
                   RD2 = NS > 2 && (IO::states_read & 4);
    constexpr bool WR0 = NS > 0 && (IO::states_written & 1), WR1 = NS > 1 && (IO::states_written & 2),
                   WR2 = NS > 2 && (IO::states_written & 4);
    constexpr bool WRP = IO::writes_param || MASTER || REM;  // (the master layouts: always, as before)
    constexpr int K = Sc::kPack;  // the pack size is the rule's: a compile-time constant (no local array)
    constexpr int E = VecElems<P, S, NS, ManyLiveValues<Op>::value>::value;
    static_assert(NL == 2 + NS + (MASTER || REM ? 1 : 0), "list count");
    static_assert(!REM || (!MASTER && !SR && sizeof(P) == 2), "master16: bf16 params, no master copy, RNE-free");
    if (found_inf != nullptr && *found_inf != 0.0f) return;  // GradScaler: skip every write

    const Sc sc = load_pack<Sc, K>(packs, static_cast<int64_t>(tt.row[slot]), grad_scale);
    // stochastic rounding: buffer b = 0 for the param, 1 + j for state j
    const uint32_t key = SR ? static_cast<uint32_t>(sr_keys[tt.row[slot]]) : 0u;
    const uint32_t k0 = sr_key_b(key, 0), k1 = sr_key_b(key, 1), k2 = sr_key_b(key, 2), k3 = sr_key_b(key, 3);

    const int64_t base = static_cast<int64_t>(chunk) * kChunk;
    const int64_t len = min(static_cast<int64_t>(kChunk), tt.numel[slot] - base);
    P* p = static_cast<P*>(tt.ptr[0][slot]) + base;
    const P* g = static_cast<const P*>(tt.ptr[1][slot]) + base;
    S* s0 = NS > 0 ? static_cast<S*>(tt.ptr[2][slot]) + base : nullptr;
    S* s1 = NS > 1 ? static_cast<S*>(tt.ptr[3][slot]) + base : nullptr;
    S* s2 = NS > 2 ? static_cast<S*>(tt.ptr[NS > 2 ? 4 : 0][slot]) + base : nullptr;
    float* m = MASTER ? static_cast<float*>(tt.ptr[MASTER ? 2 + NS : 0][slot]) + base : nullptr;
    uint16_t* r = REM ? static_cast<uint16_t*>(tt.ptr[REM ? 2 + NS : 0][slot]) + base : nullptr;

    // one element, bounds known: the vector path's tail and the unaligned path share the same loads and stores
    auto one = [&](int64_t i) {
      T a;
      if constexpr (REM)
        a = m16_load(p[i], r[i]);
      else
        a = MASTER ? load<T>(m[i]) : load<T>(p[i]);
      T b0 = RD0 ? load<T>(s0[i]) : T(0);
      T b1 = RD1 ? load<T>(s1[i]) : T(0);
      T b2 = RD2 ? load<T>(s2[i]) : T(0);
      Op::template apply<T>(a, IO::reads_grad ? load<T>(g[i]) : T(0), b0, b1, b2, sc);
      const int64_t e = base + i;
      if (MASTER) store(m[i], a);
      if constexpr (REM)
        m16_store(p[i], r[i], a);
      else if constexpr (WRP)
        put<SR>(p[i], a, k0, e);
      if constexpr (WR0) put<SR>(s0[i], b0, k1, e);
      if constexpr (WR1) put<SR>(s1[i], b1, k2, e);
      if constexpr (WR2) put<SR>(s2[i], b2, k3, e);
    };

    // every pointer aligned for its own vector type (P, S and float may differ in size)
    bool aligned = vec_aligned<P, E>(p) && vec_aligned<P, E>(g);
    if (NS > 0) aligned = aligned && vec_aligned<S, E>(s0);
    if (NS > 1) aligned = aligned && vec_aligned<S, E>(s1);
    if (NS > 2) aligned = aligned && vec_aligned<S, E>(s2);
    if (MASTER) aligned = aligned && vec_aligned<float, E>(m);
    if (REM) aligned = aligned && vec_aligned<uint16_t, E>(r);

    if (aligned) {  // vector loads/stores of E elements per list, then the < E elements of the tail
      using VP = Vec<P, E>;
      using VS = Vec<S, E>;
      using VM = Vec<float, E>;
      using VR = Vec<uint16_t, E>;
      const int64_t len_v = len - len % E;
      for (int64_t i = static_cast<int64_t>(threadIdx.x) * E; i < len_v; i += static_cast<int64_t>(blockDim.x) * E) {
        VP vp;
        VM vm;
        VR vr;
        if (MASTER)
          vm = *reinterpret_cast<const VM*>(m + i);
        else
          vp = *reinterpret_cast<const VP*>(p + i);
        if (REM) vr = *reinterpret_cast<const VR*>(r + i);
        VP vg;
        if constexpr (IO::reads_grad) vg = *reinterpret_cast<const VP*>(g + i);
        VS v0, v1, v2;
        if constexpr (RD0) v0 = *reinterpret_cast<const VS*>(s0 + i);
        if constexpr (RD1) v1 = *reinterpret_cast<const VS*>(s1 + i);
        if constexpr (RD2) v2 = *reinterpret_cast<const VS*>(s2 + i);
#pragma unroll
        for (int j = 0; j < E; ++j) {
          const int64_t e = base + i + j;  // element index in the tensor
          T a;
          if constexpr (REM)
            a = m16_load(vp.v[j], vr.v[j]);
          else
            a = MASTER ? load<T>(vm.v[j]) : load<T>(vp.v[j]);
          T b0 = RD0 ? load<T>(v0.v[j]) : T(0);
          T b1 = RD1 ? load<T>(v1.v[j]) : T(0);
          T b2 = RD2 ? load<T>(v2.v[j]) : T(0);
          Op::template apply<T>(a, IO::reads_grad ? load<T>(vg.v[j]) : T(0), b0, b1, b2, sc);
          if (MASTER) store(vm.v[j], a);
          if constexpr (REM)
            m16_store(vp.v[j], vr.v[j], a);
          else if constexpr (WRP)
            put<SR>(vp.v[j], a, k0, e);
          if constexpr (WR0) put<SR>(v0.v[j], b0, k1, e);
          if constexpr (WR1) put<SR>(v1.v[j], b1, k2, e);
          if constexpr (WR2) put<SR>(v2.v[j], b2, k3, e);
        }
        if constexpr (WRP) *reinterpret_cast<VP*>(p + i) = vp;
        if (MASTER) *reinterpret_cast<VM*>(m + i) = vm;
        if (REM) *reinterpret_cast<VR*>(r + i) = vr;
        if constexpr (WR0) *reinterpret_cast<VS*>(s0 + i) = v0;
        if constexpr (WR1) *reinterpret_cast<VS*>(s1 + i) = v1;
        if constexpr (WR2) *reinterpret_cast<VS*>(s2 + i) = v2;
      }
      if (static_cast<int64_t>(threadIdx.x) < len - len_v) one(len_v + threadIdx.x);
    } else {  // unaligned tensors: one element per thread and iteration (a fallback: views at odd offsets)
      for (int64_t i = threadIdx.x; i < len; i += blockDim.x) one(i);
    }
  }
};

// The pointer lists of a launch: lists[l][i] for l < NL, from the tables of fused_step.h (states tensor-major).
template <int NL>
struct Lists {
  void** lists[NL];
  void** storage;
  explicit Lists(int64_t n) : storage(new void*[static_cast<size_t>(n) * NL + 1]) {
    for (int l = 0; l < NL; ++l) lists[l] = storage + static_cast<size_t>(l) * n;
  }
  ~Lists() { delete[] storage; }
};

template <class Op, typename P, typename S, bool MASTER, bool SR, bool REM = false>
cudaError_t launch(int64_t n, void* const* params, const void* const* grads, void* const* states,
                   void* const* masters, const int64_t* numel, const double* packs, const float* found_inf,
                   const float* grad_scale, const int64_t* sr_keys, cudaStream_t stream) {
  constexpr int NS = Op::kStates;
  constexpr int NL = 2 + NS + (MASTER || REM ? 1 : 0);  // param, grad, states, master (or remainder)
  static_assert(NL <= kMaxLists, "too many lists for the tensor table");
  static_assert(Op::template Scalars<float>::kPack <= kMaxPack, "pack size");
  // per-list pointer arrays (states arrive tensor-major; the masters / remainders in a table of their own)
  Lists<NL> l(n);
  for (int64_t i = 0; i < n; ++i) {
    l.lists[0][i] = params[i];
    l.lists[1][i] = const_cast<void*>(grads[i]);
    for (int j = 0; j < NS; ++j) l.lists[2 + j][i] = states[i * NS + j];
    if (MASTER || REM) l.lists[2 + NS][i] = masters[i];
  }
  StepFunctor<Op, P, S, MASTER, SR, REM> f{packs, found_inf, grad_scale, sr_keys};
  return multi_tensor_apply<NL>(n, l.lists, numel, f, stream);
}

// int8_state: the quantized tensors through Int8Functor, the others (fp32 state) through the native fp32 functor:
// one launch sequence each (a bucket holding both kinds takes two: the functors differ in lists and block shape).
// states: n * NS pointers (codes or fp32 states), scales: n * NS (nullptr for an fp32-state tensor).
// REM (master16_int8): bf16 params, `remainders` n int16 remainders (list 2 + NS of both functors, before the
// scales); the fp32-state tensors run the master16 functor.
// SRQ (int8_sr, master16_int8_sr): the quantized tensors' codes rounded stochastically (sr_keys: device, n keys).
template <class Op, bool REM = false, bool SRQ = false>
cudaError_t launch_int8(int64_t n, void* const* params, const void* const* grads, void* const* states,
                        void* const* scales, void* const* remainders, const int64_t* numel, const double* packs,
                        const float* found_inf, const float* grad_scale, int code_unsigned, const int64_t* sr_keys,
                        cudaStream_t stream) {
  constexpr int NS = Op::kStates;
  using P = typename std::conditional<REM, bf16, float>::type;
  if constexpr (NS == 0) {  // no state to compress: the native fp32 kernel (master16's)
    return launch<Op, P, float, false, false, REM>(n, params, grads, states, remainders, numel, packs, found_inf,
                                                   grad_scale, nullptr, stream);
  } else {
    constexpr int R = REM ? 1 : 0;
    constexpr int NQ = 2 + 2 * NS + R, NF = 2 + NS + R;
    static_assert(NQ <= kMaxLists, "too many lists for the tensor table");
    // quantized: the tensors with scales (the binding's checks decided, csrc/step_args.h)
    auto quantized = [&](int64_t i) { return scales[i * NS] != nullptr; };
    int64_t nq = 0;
    for (int64_t i = 0; i < n; ++i) nq += quantized(i) ? 1 : 0;
    // the pack row of a tensor is its index in the bucket: keep it (TableSink's row) by listing the tensors of
    // each kind with their numel, and zero-sized placeholders for the others (they get no block)
    Lists<NQ> q(n);
    Lists<NF> f(n);
    int64_t* nq_numel = new int64_t[static_cast<size_t>(2 * n) + 1];
    int64_t* nf_numel = nq_numel + n;
    for (int64_t i = 0; i < n; ++i) {
      const bool isq = quantized(i);
      nq_numel[i] = isq ? numel[i] : 0;
      nf_numel[i] = isq ? 0 : numel[i];
      q.lists[0][i] = f.lists[0][i] = params[i];
      q.lists[1][i] = f.lists[1][i] = const_cast<void*>(grads[i]);
      for (int j = 0; j < NS; ++j) {
        q.lists[2 + j][i] = f.lists[2 + j][i] = states[i * NS + j];
        q.lists[2 + NS + R + j][i] = scales[i * NS + j];
      }
      if (REM) q.lists[2 + NS][i] = f.lists[2 + NS][i] = remainders[i];
    }
    cudaError_t err = cudaSuccess;
    if (nq > 0) {
      Int8Functor<Op, REM, SRQ> fq{packs, found_inf, grad_scale, code_unsigned, sr_keys};
      err = multi_tensor_apply<NQ>(n, q.lists, nq_numel, fq, stream);
    }
    if (err == cudaSuccess && nq < n) {
      StepFunctor<Op, P, float, false, false, REM> ff{packs, found_inf, grad_scale, nullptr};
      err = multi_tensor_apply<NF>(n, f.lists, nf_numel, ff, stream);
    }
    delete[] nq_numel;
    return err;
  }
}

template <typename P, typename S, bool MASTER, bool SR, bool REM = false>
cudaError_t dispatch_rule(int rule, int flags, int64_t n, void* const* params, const void* const* grads,
                          void* const* states, void* const* masters, const int64_t* numel, const double* packs,
                          const float* found_inf, const float* grad_scale, const int64_t* sr_keys, cudaStream_t stream) {
#define MF_CASE(R, F)                                                                                   \
  if (rule == R && flags == F)                                                                          \
    return launch<RuleOp<R, F>, P, S, MASTER, SR, REM>(n, params, grads, states, masters, numel, packs,   \
                                                       found_inf, grad_scale, sr_keys, stream);
  MF_FOR_EACH_RULE_FLAGS(MF_CASE)
#undef MF_CASE
  return cudaErrorInvalidValue;
}

template <bool REM, bool SRQ = false>
cudaError_t dispatch_int8(int rule, int flags, int64_t n, void* const* params, const void* const* grads,
                          void* const* states, void* const* scales, void* const* remainders, const int64_t* numel,
                          const double* packs, const float* found_inf, const float* grad_scale, int code_unsigned,
                          const int64_t* sr_keys, cudaStream_t stream) {
  // schedule-free rules refuse int8_state and master16_int8 (their z is an iterate): no kernel
#define MF_CASE(R, F)                                                                                            \
  if constexpr (R != RULE_SGD_SF && R != RULE_ADAMW_SF)                                                          \
    if (rule == R && flags == F)                                                                                 \
      return launch_int8<RuleOp<R, F>, REM, SRQ>(n, params, grads, states, scales, remainders, numel, packs,      \
                                                 found_inf, grad_scale, code_unsigned, sr_keys, stream);
  MF_FOR_EACH_RULE_FLAGS(MF_CASE)
#undef MF_CASE
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t step(int rule, int flags, int layout, int dtype, int64_t n, void* const* params,
                 const void* const* grads, void* const* states, void* const* masters, const int64_t* numel,
                 const double* packs, const float* found_inf, const float* grad_scale, const int64_t* sr_keys,
                 cudaStream_t stream, void* const* scales, int code_unsigned) {
  if (rule < 0 || rule >= RULE_COUNT || rule_num_scalars(rule) > kMaxPack) return cudaErrorInvalidValue;
  if (flags < 0 || flags >= (1 << rule_num_flag_bits(rule))) return cudaErrorInvalidValue;
  if (layout_stochastic(layout) && sr_keys == nullptr) return cudaErrorInvalidValue;
  if ((layout_master(layout) || layout_remainder(layout)) && masters == nullptr && n > 0) return cudaErrorInvalidValue;
  // (a rule without state, signSGD, has no scales to point at: its int8 layouts run the uncompressed kernel)
  if (layout_int8(layout) && scales == nullptr && n > 0 && rule_num_states(rule, flags) > 0)
    return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  flags = normalize_flags(rule, flags);
#define MF_ARGS \
  rule, flags, n, params, grads, states, masters, numel, packs, found_inf, grad_scale, sr_keys, stream
  // the layout table: (layout, param dtype) -> (P, S, MASTER, SR); anything else has no kernel
  switch (layout) {
    case LAYOUT_NATIVE:
      switch (dtype) {
        case DT_F32: return dispatch_rule<float, float, false, false>(MF_ARGS);
        case DT_F64: return dispatch_rule<double, double, false, false>(MF_ARGS);
        case DT_BF16: return dispatch_rule<bf16, bf16, false, false>(MF_ARGS);
        case DT_F16: return dispatch_rule<fp16, fp16, false, false>(MF_ARGS);
        default: return cudaErrorInvalidValue;
      }
    case LAYOUT_BF16_STATE:
      return dtype == DT_F32 ? dispatch_rule<float, bf16, false, false>(MF_ARGS) : cudaErrorInvalidValue;
    case LAYOUT_MASTER:
      if (dtype == DT_BF16) return dispatch_rule<bf16, float, true, false>(MF_ARGS);
      if (dtype == DT_F16) return dispatch_rule<fp16, float, true, false>(MF_ARGS);
      return cudaErrorInvalidValue;
    case LAYOUT_BF16_SR:
      return dtype == DT_BF16 ? dispatch_rule<bf16, bf16, false, true>(MF_ARGS) : cudaErrorInvalidValue;
    case LAYOUT_MASTER16:  // `masters`: the int16 remainders
      return dtype == DT_BF16 ? dispatch_rule<bf16, float, false, false, true>(MF_ARGS) : cudaErrorInvalidValue;
    case LAYOUT_INT8_STATE:
      return dtype == DT_F32 ? dispatch_int8<false>(rule, flags, n, params, grads, states, scales, nullptr, numel,
                                                    packs, found_inf, grad_scale, code_unsigned, nullptr, stream)
                             : cudaErrorInvalidValue;
    case LAYOUT_MASTER16_INT8:  // `masters`: the int16 remainders
      return dtype == DT_BF16 ? dispatch_int8<true>(rule, flags, n, params, grads, states, scales, masters, numel,
                                                    packs, found_inf, grad_scale, code_unsigned, nullptr, stream)
                              : cudaErrorInvalidValue;
    case LAYOUT_INT8_SR:  // int8_state with stochastic codes
      return dtype == DT_F32 ? dispatch_int8<false, true>(rule, flags, n, params, grads, states, scales, nullptr,
                                                          numel, packs, found_inf, grad_scale, code_unsigned, sr_keys,
                                                          stream)
                             : cudaErrorInvalidValue;
    case LAYOUT_MASTER16_INT8_SR:
      return dtype == DT_BF16 ? dispatch_int8<true, true>(rule, flags, n, params, grads, states, scales, masters,
                                                          numel, packs, found_inf, grad_scale, code_unsigned, sr_keys,
                                                          stream)
                              : cudaErrorInvalidValue;
    default: return cudaErrorInvalidValue;
  }
#undef MF_ARGS
}

}  // namespace cuda
}  // namespace mf
