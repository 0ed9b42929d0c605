// Per-element cost of the parts of the cpu int8_state block loop (AdamW, avx512 variant, one thread), measured
// side by side in one process: the whole loop (run_piece_int8's earlier plain order: decode both states, the rule with p and g
// streamed from memory, the absmax, encode both states), the loop without the encode or without the decode, and a
// plain fp32 AdamW over the same arrays (the native kernel's work, 28 bytes per element); the loop with the
// forms that run where the fast ones do not apply (the computed decode of a CPU without VBMI, the element-wise encode
// of blocks holding NaN or inf, and of the portable kernel); and the avx2 variant's loop in its earlier plain order (its forms, the absmax inside
// the rule's loop; the kernel now takes it after the loop and pipelines as the avx512 one); and int8_sr's loop with
// its stochastic encode after each block and pipelined as the kernel runs it since 2026-12-06. Needs an AVX-512 CPU
// (the lookup decode also AVX512-VBMI; without it the computed decode is timed). Not a test: times move with the
// machine; compare the rows of one run.
//
//   g++ -O3 -fopenmp -fno-math-errno -fno-trapping-math -ffp-contract=off -Icsrc -Wno-maybe-uninitialized \
//       -Wno-uninitialized bench/int8_block_cost.cpp -o /tmp/int8_cost && /tmp/int8_cost [Melements=4] [rounds=15]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <immintrin.h>
#include "mf_common.h"
#include "compressed.h"
#include "update_rules.h"
#define MF_COST_TARGET "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c,bmi2"
namespace mf { namespace cpu { namespace t {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c,bmi2")
#include "cpu/cpu_simd_avx512.inc"
#include "cpu/cpu_simd_avx2_int8.inc"
#pragma GCC pop_options
}}}  // namespace mf::cpu::t
using namespace mf;
using Op = RuleOp<RULE_ADAM, ADAM_DECOUPLED>;
using Sc = Op::Scalars<float>;

// kFallback: the computed decode, the element-wise encode; kAvx2: the avx2 variant's forms (absmax in the rule's loop);
// kSr: the stochastic encode (layout int8_sr, key 0)
enum Parts { kDecode = 1, kEncode = 2, kFallback = 4, kAvx2 = 8, kSr = 16 };

// a block's stochastic codes, 64 at a time (what run_piece_int8 runs for int8_sr, all at once here)
__attribute__((target(MF_COST_TARGET), always_inline)) inline void encode_sr_block(const float* x, bool sgn,
                                                                                   const cpu::t::Int8SrBlock& b,
                                                                                   void* codes, int l0, int len) {
  for (int l = l0; l < l0 + len; l += 64)
    cpu::t::int8_encode64_sr_avx512(x + l, sgn, b, static_cast<char*>(codes) + l, l);
}

// run_piece_int8's block loop for AdamW (2 states) with the avx512 variant's functions; `parts` drops the decode
// or the encode (the buffers then keep the last block's values: the rule's cost does not depend on them).
template <int PARTS>
__attribute__((target(MF_COST_TARGET), noinline)) void int8_loop(float* __restrict p, const float* __restrict g,
                                                                int8_t* cm, uint8_t* cv, float* sm, float* sv,
                                                                int64_t n, const Sc& sc_in) {
  constexpr bool kA2 = (PARTS & kAvx2) != 0;
  const Sc sc = sc_in;
  alignas(64) static float b0[INT8_BLOCK], b1[INT8_BLOCK];
  for (int64_t blk = 0; blk < n / INT8_BLOCK; ++blk) {
    const int64_t e0 = blk * INT8_BLOCK;
    if (PARTS & kDecode) {
      if (kA2) {
        cpu::t::int8_decode_block_avx2(cm + e0, true, sm[blk], b0);
        cpu::t::int8_decode_block_avx2(cv + e0, false, sv[blk], b1);
      } else if (PARTS & kFallback) {
        cpu::t::int8_decode_block_avx512(cm + e0, true, sm[blk], b0);
        cpu::t::int8_decode_block_avx512(cv + e0, false, sv[blk], b1);
      } else {
        cpu::t::int8_decode_block_avx512_best(cm + e0, true, sm[blk], b0);
        cpu::t::int8_decode_block_avx512_best(cv + e0, false, sv[blk], b1);
      }
    }
    float* __restrict pp = p + e0;
    const float* __restrict gg = g + e0;
    float m0 = 0.0f, m1 = 0.0f;
    int n0 = 0, n1 = 0;
#pragma omp simd reduction(max : m0, m1) reduction(| : n0, n1)
    for (int l = 0; l < INT8_BLOCK; ++l) {
      float pv = pp[l], a = b0[l], b = b1[l], c = 0.0f;
      Op::apply<float>(pv, gg[l], a, b, c, sc);
      pp[l] = pv;
      b0[l] = a;
      b1[l] = b;
      if (kA2) {  // run_piece_int8's in-loop absmax (the avx2 and baseline variants)
        const float a0 = fabsf(a), a1 = fabsf(b);
        m0 = a0 > m0 ? a0 : m0;
        m1 = a1 > m1 ? a1 : m1;
        n0 |= a != a;
        n1 |= b != b;
      }
    }
    if (kA2) {
      const float nan = f32_from_bits(0x7FC00000u);
      sm[blk] = n0 ? nan : m0;
      sv[blk] = n1 ? nan : m1;
    } else {
      sm[blk] = cpu::t::int8_absmax_block_avx512(b0);
      sv[blk] = cpu::t::int8_absmax_block_avx512(b1);
    }
    if (PARTS & kEncode) {
      if (PARTS & kSr) {
        encode_sr_block(b0, true, cpu::t::Int8SrBlock(sm[blk], true, 1u, e0), cm + e0, 0, INT8_BLOCK);
        encode_sr_block(b1, false, cpu::t::Int8SrBlock(sv[blk], false, 2u, e0), cv + e0, 0, INT8_BLOCK);
      } else if (kA2) {
        cpu::t::int8_encode_block_avx2_of_absmax(b0, true, sm[blk], cm + e0);
        cpu::t::int8_encode_block_avx2_of_absmax(b1, false, sv[blk], cv + e0);
      } else if (PARTS & kFallback) {
        int8_encode_block_elementwise(b0, true, sm[blk], cm + e0);
        int8_encode_block_elementwise(b1, false, sv[blk], cv + e0);
      } else {
        cpu::t::int8_encode_block_avx512_of_absmax(b0, true, sm[blk], cm + e0);
        cpu::t::int8_encode_block_avx512_of_absmax(b1, false, sv[blk], cv + e0);
      }
    }
  }
}

// run_piece_int8's pipelined order (the avx512 variant's, MF_INT8_PIPELINE): the rule in pieces of PIECE elements,
// and between them the same piece of the previous block's encode, both states (the encode of a block waits for the
// next block's rule; two sets of buffers alternate). Tried on the EPYC (2026-12-04): pieces of 64 elements 7% less
// time than the plain loop, 32 4%, 16 and 128 none, a rule piece of 32 with one state's 64 codes 4%. SR: the
// stochastic encode, deferred for every block (run_piece_int8's int8_sr order since 2026-12-06).
struct Due {
  cpu::t::Int8Scaled qm{1.0f, true}, qv{1.0f, false};
  cpu::t::Int8SrBlock bm, bv;
};

template <bool SR>
__attribute__((target(MF_COST_TARGET), always_inline)) inline void encode_both(const float* x0, const float* x1,
                                                                               const Due& q, int8_t* cm, uint8_t* cv,
                                                                               int64_t at, int l0, int len) {
  if (SR) {
    encode_sr_block(x0, true, q.bm, cm + at, l0, len);
    encode_sr_block(x1, false, q.bv, cv + at, l0, len);
    return;
  }
  for (int l = l0; l < l0 + len; l += 64) {
    cpu::t::int8_encode64_of_absmax(x0 + l, true, q.qm, reinterpret_cast<char*>(cm) + at + l);
    cpu::t::int8_encode64_of_absmax(x1 + l, false, q.qv, reinterpret_cast<char*>(cv) + at + l);
  }
}

template <int PIECE, bool SR = false>
__attribute__((target(MF_COST_TARGET), noinline)) void int8_loop_pipelined(float* __restrict p, const float* __restrict g,
                                                                          int8_t* cm, uint8_t* cv, float* sm, float* sv,
                                                                          int64_t n, const Sc& sc_in) {
  static_assert(PIECE % 64 == 0, "int8_encode64_of_absmax takes 64 elements");
  const Sc sc = sc_in;
  alignas(64) static float buf[2][2][INT8_BLOCK];
  const int64_t nb = n / INT8_BLOCK;
  Due q;
  bool due = false;
  for (int64_t blk = 0; blk < nb; ++blk) {
    const int64_t e0 = blk * INT8_BLOCK;
    float* __restrict b0 = buf[blk & 1][0];
    float* __restrict b1 = buf[blk & 1][1];
    cpu::t::int8_decode_block_avx512_best(cm + e0, true, sm[blk], b0);
    cpu::t::int8_decode_block_avx512_best(cv + e0, false, sv[blk], b1);
    float* __restrict pp = p + e0;
    const float* __restrict gg = g + e0;
    for (int l0 = 0; l0 < INT8_BLOCK; l0 += PIECE) {
#pragma omp simd
      for (int l = l0; l < l0 + PIECE; ++l) {
        float pv = pp[l], a = b0[l], b = b1[l], c = 0.0f;
        Op::apply<float>(pv, gg[l], a, b, c, sc);
        pp[l] = pv;
        b0[l] = a;
        b1[l] = b;
      }
      if (due) encode_both<SR>(buf[(blk & 1) ^ 1][0], buf[(blk & 1) ^ 1][1], q, cm, cv, e0 - INT8_BLOCK, l0, PIECE);
    }
    sm[blk] = cpu::t::int8_absmax_block_avx512(b0);
    sv[blk] = cpu::t::int8_absmax_block_avx512(b1);
    due = SR || (int8_fast_scale(sm[blk]) && int8_fast_scale(sv[blk]));
    if (SR) {
      q.bm = cpu::t::Int8SrBlock(sm[blk], true, 1u, e0);
      q.bv = cpu::t::Int8SrBlock(sv[blk], false, 2u, e0);
    } else if (due) {
      q.qm = cpu::t::Int8Scaled(sm[blk], true);
      q.qv = cpu::t::Int8Scaled(sv[blk], false);
    } else {
      cpu::t::int8_encode_block_avx512_of_absmax(b0, true, sm[blk], cm + e0);
      cpu::t::int8_encode_block_avx512_of_absmax(b1, false, sv[blk], cv + e0);
    }
  }
  if (due) encode_both<SR>(buf[(nb - 1) & 1][0], buf[(nb - 1) & 1][1], q, cm, cv, (nb - 1) * INT8_BLOCK, 0, INT8_BLOCK);
}

__attribute__((target(MF_COST_TARGET), noinline)) void fp32_loop(float* __restrict p, const float* __restrict g,
                                                                float* __restrict m, float* __restrict v, int64_t n,
                                                                const Sc& sc_in) {
  const Sc sc = sc_in;
#pragma omp simd
  for (int64_t l = 0; l < n; ++l) {
    float pv = p[l], a = m[l], b = v[l], c = 0.0f;
    Op::apply<float>(pv, g[l], a, b, c, sc);
    p[l] = pv;
    m[l] = a;
    v[l] = b;
  }
}

template <class T>
static T* aligned(int64_t n) { return static_cast<T*>(std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64)); }

int main(int argc, char** argv) {
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") || !__builtin_cpu_supports("avx512dq")) {
    std::printf("needs an AVX-512 CPU\n");
    return 1;
  }
  const int64_t n = (argc > 1 ? std::atoll(argv[1]) : 4) << 20;
  const int rounds = argc > 2 ? std::atoi(argv[2]) : 15;
  float *p = aligned<float>(n), *g = aligned<float>(n), *m = aligned<float>(n), *v = aligned<float>(n);
  int8_t* cm = aligned<int8_t>(n);
  uint8_t* cv = aligned<uint8_t>(n);
  float *sm = aligned<float>(n / INT8_BLOCK), *sv = aligned<float>(n / INT8_BLOCK);
  std::srand(1);
  auto uni = [] { return std::rand() / static_cast<float>(RAND_MAX); };
  for (int64_t i = 0; i < n; ++i) {
    p[i] = uni() - 0.5f;
    g[i] = (uni() - 0.5f) * 1e-2f;
    m[i] = 0.3f * g[i];
    v[i] = g[i] * g[i] * (0.5f + uni());
  }
  std::memset(cm, 0, n);
  std::memset(cv, 0, n);
  for (int64_t b = 0; b < n / INT8_BLOCK; ++b) sm[b] = sv[b] = 0.0f;
  double pk[16] = {};
  pk[pack::adam::lr] = 1e-3;
  pk[pack::adam::weight_decay] = 0.01;
  pk[pack::adam::beta1] = 0.9;
  pk[pack::adam::beta2] = 0.999;
  pk[pack::adam::eps] = 1e-8;
  pk[pack::adam::step_size] = 1e-2;
  pk[pack::adam::bc2_sqrt] = 0.03;
  pk[pack::adam::grad_mult] = 1.0;
  const Sc sc = Sc::make(pk);
  struct Row { const char* name; void (*f)(float*, const float*, int8_t*, uint8_t*, float*, float*, float*, float*, int64_t, const Sc&); };
  const Row rows[] = {
      {"fp32 AdamW (p, g, m, v streamed)", [](float* p, const float* g, int8_t*, uint8_t*, float*, float*, float* m, float* v, int64_t n, const Sc& s) { fp32_loop(p, g, m, v, n, s); }},
      {"int8 block loop", [](float* p, const float* g, int8_t* cm, uint8_t* cv, float* sm, float* sv, float*, float*, int64_t n, const Sc& s) { int8_loop<kDecode | kEncode>(p, g, cm, cv, sm, sv, n, s); }},
      {"int8 block loop, pipelined (the kernel)", [](float* p, const float* g, int8_t* cm, uint8_t* cv, float* sm, float* sv, float*, float*, int64_t n, const Sc& s) { int8_loop_pipelined<64>(p, g, cm, cv, sm, sv, n, s); }},
      {"  with the fallback decode and encode", [](float* p, const float* g, int8_t* cm, uint8_t* cv, float* sm, float* sv, float*, float*, int64_t n, const Sc& s) { int8_loop<kDecode | kEncode | kFallback>(p, g, cm, cv, sm, sv, n, s); }},
      {"  without the encode", [](float* p, const float* g, int8_t* cm, uint8_t* cv, float* sm, float* sv, float*, float*, int64_t n, const Sc& s) { int8_loop<kDecode>(p, g, cm, cv, sm, sv, n, s); }},
      {"  without the decode", [](float* p, const float* g, int8_t* cm, uint8_t* cv, float* sm, float* sv, float*, float*, int64_t n, const Sc& s) { int8_loop<kEncode>(p, g, cm, cv, sm, sv, n, s); }},
      {"int8_sr block loop (encode after each block)", [](float* p, const float* g, int8_t* cm, uint8_t* cv, float* sm, float* sv, float*, float*, int64_t n, const Sc& s) { int8_loop<kDecode | kEncode | kSr>(p, g, cm, cv, sm, sv, n, s); }},
      {"int8_sr block loop, pipelined (the kernel)", [](float* p, const float* g, int8_t* cm, uint8_t* cv, float* sm, float* sv, float*, float*, int64_t n, const Sc& s) { int8_loop_pipelined<64, true>(p, g, cm, cv, sm, sv, n, s); }},
      {"  rule + absmax only", [](float* p, const float* g, int8_t* cm, uint8_t* cv, float* sm, float* sv, float*, float*, int64_t n, const Sc& s) { int8_loop<0>(p, g, cm, cv, sm, sv, n, s); }},
      {"int8 block loop, avx2 variant", [](float* p, const float* g, int8_t* cm, uint8_t* cv, float* sm, float* sv, float*, float*, int64_t n, const Sc& s) { int8_loop<kAvx2 | kDecode | kEncode>(p, g, cm, cv, sm, sv, n, s); }},
      {"  without the encode", [](float* p, const float* g, int8_t* cm, uint8_t* cv, float* sm, float* sv, float*, float*, int64_t n, const Sc& s) { int8_loop<kAvx2 | kDecode>(p, g, cm, cv, sm, sv, n, s); }},
      {"  without the decode", [](float* p, const float* g, int8_t* cm, uint8_t* cv, float* sm, float* sv, float*, float*, int64_t n, const Sc& s) { int8_loop<kAvx2 | kEncode>(p, g, cm, cv, sm, sv, n, s); }},
  };
  constexpr int R = sizeof(rows) / sizeof(rows[0]);
  for (const Row& r : rows) r.f(p, g, cm, cv, sm, sv, m, v, n, sc);  // warm up, and state that is not all zero
  std::vector<double> t[R];
  for (int k = 0; k < rounds; ++k)
    for (int r = 0; r < R; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      rows[r].f(p, g, cm, cv, sm, sv, m, v, n, sc);
      t[r].push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / n * 1e9);
    }
  std::printf("%lld elements, %d interleaved rounds, one thread, decode: %s\n", static_cast<long long>(n), rounds,
              cpu::t::int8_cpu_has_vbmi() ? "VBMI lookup" : "computed");
  for (int r = 0; r < R; ++r) {
    std::sort(t[r].begin(), t[r].end());
    std::printf("%-40s median %.3f  min %.3f ns/element\n", rows[r].name, t[r][t[r].size() / 2], t[r][0]);
  }
  return 0;
}
