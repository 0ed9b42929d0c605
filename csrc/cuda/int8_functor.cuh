// momentum_fused CUDA kernels: the int8_state functor, and its master16_int8 form (layouts.py is the spec; the codecs
// are ../compressed.h's).
// Included by fused_step.cu, and by the host emulation of tests/test_cuda_sources.py (csrc/cuda/host_emulation.h
// gives threadIdx, blockDim, __syncthreads, __shfl_xor_sync, __shared__ and min on the host, threads for
// lanes), so that its indexing, warp reduction and codes are checked bit for bit without a GPU. Needs, declared
// before: mf::cuda::kChunk (elements per CUDA block), mf::cuda::kMinBlocksPerSM and kInt8MinBlocksPerSM,
// ../update_rules.h's RuleOp; the table argument is any type with ptr[list][slot], numel[slot] and row[slot]
// (TensorTable<NL>).
// The code map: generated/tables.h's INT8_*_TABLE, which must be readable where this runs (fused_step.cu
// defines MF_INT8_TABLE_ATTR as `static __device__`).
#pragma once

#include <cstdint>
#include <type_traits>

#include "../compressed.h"
#include "../storage.h"
#include "vec.cuh"

namespace mf {
namespace cuda {

// A quantized tensor (compressed.h int8_quantized: its size a multiple of INT8_BLOCK): each warp takes one block of
// INT8_BLOCK = 256 elements at a time, lane l its elements 8l .. 8l + 7 (two 128-bit accesses of the fp32 param
// and grad, 64 bits of each code list): decode (table value times the block's scale), the fp32 rule, then per
// state the block's absmax (the lane's 8 values, then warp shuffles; NaN propagates as torch.amax), the codes
// (compressed.h's integer-space encode: one division per block, none and no table read per element), and lane 0
// writes the scale. The decode table lives in shared memory (copied from generated/tables.h's device arrays once
// per CUDA block). Lists: param, grad, NS code
// lists (int8 or uint8: bit j of `code_unsigned`), NS fp32 scale lists. REM (layout master16_int8): bf16 param and
// grad (128-bit accesses of 8 elements), the param value the fp32 master decoded from the param and the int16
// remainder (list 2 + NS, before the scales), encoded back into both (compressed.h's master16 codec).
constexpr int kInt8Lane = INT8_BLOCK / 32;
static_assert(INT8_BLOCK % 32 == 0 && kInt8Lane == 8 && kChunk % INT8_BLOCK == 0, "int8 block shape");

// The param of one element as the rule's fp32 value, and back: int8_state's fp32 param (the remainder unused), or
// master16_int8's bf16 param with its remainder.
__device__ __forceinline__ float int8_param_load(float p, uint16_t) { return p; }
__device__ __forceinline__ float int8_param_load(bf16 p, uint16_t r) { return master16_decode(p.bits, r); }
__device__ __forceinline__ void int8_param_store(float& p, uint16_t&, float a) { p = a; }
__device__ __forceinline__ void int8_param_store(bf16& p, uint16_t& r, float a) {
  p.bits = master16_param_bits(a);
  r = master16_remainder_bits(a);
}

// SRQ (layouts int8_sr, master16_int8_sr): each code rounded stochastically (compressed.h's int8_code_sr) with the
// bits of its element index in the tensor (base + i0 + k) under the tensor's key (sr_keys[row], the bf16_sr
// convention: buffer 1 + j for state j).
template <class Op, bool REM = false, bool SRQ = false>
struct Int8Functor {
  using P = typename std::conditional<REM, bf16, float>::type;  // param and grad storage
  static constexpr int R = REM ? 1 : 0;                          // the remainder list (2 + NS) before the scales'

  // two or three states: 8 values of each live per thread until the block's absmax is known; with 64 registers
  // ptxas spilled 8-78 bytes with the earlier encode (since the integer-space one, sm_90 stores: AdamW none, Adam +
  // AMSGrad 30 bytes, AdamW + AMSGrad 54; the master16_int8 forms 8-54, AdamW 24; ptxas log of 2026-12-05).
  // These compile for kInt8MinBlocksPerSM blocks of 512 threads per SM: 2 (64 registers) by default, faster on the
  // H200 than 1 (128 registers, no spills): AdamW 6.22 vs 8.10 ms on 1e9 params (2026-12-04, the earlier encode);
  // bench/device_check.sh's kernels-int8 phase builds and times both
  static constexpr int kMinBlocks = Op::kStates >= 2 ? kInt8MinBlocksPerSM : kMinBlocksPerSM;
  const double* packs;
  const float* found_inf;
  const float* grad_scale;
  int code_unsigned;  // bit j: state j has uint8 codes (a non-negative state), else int8
  const int64_t* sr_keys = nullptr;  // SRQ: one uint32 key per tensor (as int64), indexed by the pack row

  template <class Table>
  __device__ __forceinline__ void operator()(const Table& tt, int slot, int chunk) const {
    using Sc = typename Op::template Scalars<float>;
    constexpr int NS = Op::kStates;
    constexpr int K = Sc::kPack;
    static_assert(NS >= 1, "int8_state compresses states: a rule without state runs the native functor");
    if (found_inf != nullptr && *found_inf != 0.0f) return;  // uniform across the block (before the barrier)
    __shared__ float tab_s[INT8_SIGNED_COUNT], tab_u[INT8_UNSIGNED_COUNT];
    for (int i = threadIdx.x; i < INT8_UNSIGNED_COUNT; i += blockDim.x) {
      tab_u[i] = INT8_UNSIGNED_TABLE[i];
      if (i < INT8_SIGNED_COUNT) tab_s[i] = INT8_SIGNED_TABLE[i];
    }
    __syncthreads();

    const Sc sc = load_pack<Sc, K>(packs, static_cast<int64_t>(tt.row[slot]), grad_scale);
    const uint32_t key = SRQ ? static_cast<uint32_t>(sr_keys[tt.row[slot]]) : 0u;

    const int64_t base = static_cast<int64_t>(chunk) * kChunk;
    // a multiple of INT8_BLOCK, at most kChunk: 32-bit indices from here on
    const int len = static_cast<int>(min(static_cast<int64_t>(kChunk), tt.numel[slot] - base));
    P* p = static_cast<P*>(tt.ptr[0][slot]) + base;
    const P* g = static_cast<const P*>(tt.ptr[1][slot]) + base;
    uint16_t* r = REM ? static_cast<uint16_t*>(tt.ptr[2 + NS][slot]) + base : nullptr;
    uint8_t* code[NS];
    float* scale[NS];
#pragma unroll
    for (int j = 0; j < NS; ++j) {
      code[j] = static_cast<uint8_t*>(tt.ptr[2 + j][slot]) + base;
      scale[j] = static_cast<float*>(tt.ptr[2 + NS + R + j][slot]) + base / INT8_BLOCK;
    }
    bool aligned = vec_aligned<P, kInt8Lane>(p) && vec_aligned<P, kInt8Lane>(g);
    if (REM) aligned = aligned && vec_aligned<uint16_t, kInt8Lane>(r);
#pragma unroll
    for (int j = 0; j < NS; ++j) aligned = aligned && vec_aligned<uint8_t, kInt8Lane>(code[j]);
    const int lane = threadIdx.x & 31;
    const int warps = blockDim.x >> 5;
    for (int blk = threadIdx.x >> 5; blk * INT8_BLOCK < len; blk += warps) {
      const int i0 = blk * INT8_BLOCK + lane * kInt8Lane;
      Vec<P, kInt8Lane> vp, vg;
      Vec<uint16_t, kInt8Lane> vr;  // (master16_int8 only)
      Vec<uint8_t, kInt8Lane> vc[NS];
      if (aligned) {
        vp = *reinterpret_cast<const Vec<P, kInt8Lane>*>(p + i0);
        vg = *reinterpret_cast<const Vec<P, kInt8Lane>*>(g + i0);
        if constexpr (REM) vr = *reinterpret_cast<const Vec<uint16_t, kInt8Lane>*>(r + i0);
#pragma unroll
        for (int j = 0; j < NS; ++j) vc[j] = *reinterpret_cast<const Vec<uint8_t, kInt8Lane>*>(code[j] + i0);
      } else {
#pragma unroll
        for (int k = 0; k < kInt8Lane; ++k) {
          vp.v[k] = p[i0 + k];
          vg.v[k] = g[i0 + k];
          if constexpr (REM) vr.v[k] = r[i0 + k];
#pragma unroll
          for (int j = 0; j < NS; ++j) vc[j].v[k] = code[j][i0 + k];
        }
      }
      float s_scale[NS];
#pragma unroll
      for (int j = 0; j < NS; ++j) s_scale[j] = scale[j][blk];
      float st[NS][kInt8Lane];
#pragma unroll
      for (int k = 0; k < kInt8Lane; ++k) {
        float b[3] = {0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int j = 0; j < NS; ++j) {
          const uint8_t c = vc[j].v[k];
          b[j] = (code_unsigned >> j) & 1 ? int8_decode(tab_u, int8_unsigned_index(c), s_scale[j])
                                          : int8_decode(tab_s, int8_signed_index(static_cast<int8_t>(c)), s_scale[j]);
        }
        float a = int8_param_load(vp.v[k], REM ? vr.v[k] : uint16_t(0));
        Op::template apply<float>(a, load<float>(vg.v[k]), b[0], b[1], b[2], sc);
        int8_param_store(vp.v[k], vr.v[k], a);
#pragma unroll
        for (int j = 0; j < NS; ++j) st[j][k] = b[j];
      }
      if (aligned) {
        *reinterpret_cast<Vec<P, kInt8Lane>*>(p + i0) = vp;
        if constexpr (REM) *reinterpret_cast<Vec<uint16_t, kInt8Lane>*>(r + i0) = vr;
      } else {
#pragma unroll
        for (int k = 0; k < kInt8Lane; ++k) {
          p[i0 + k] = vp.v[k];
          if constexpr (REM) r[i0 + k] = vr.v[k];
        }
      }
#pragma unroll
      for (int j = 0; j < NS; ++j) {
        float m = 0.0f;
#pragma unroll
        for (int k = 0; k < kInt8Lane; ++k) m = int8_absmax(m, st[j][k]);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) m = int8_absmax(m, __shfl_xor_sync(0xFFFFFFFFu, m, o));
        const bool uns = (code_unsigned >> j) & 1;
        // compressed.h's integer-space encode (m is the warp's absmax: the factors are uniform)
        const Int8Factor f = int8_factor(m, !uns);
        if constexpr (SRQ) {
          const uint32_t kb = sr_key_b(key, 1 + j);
#pragma unroll
          for (int k = 0; k < kInt8Lane; ++k)
            vc[j].v[k] = static_cast<uint8_t>(
                int8_code_sr((st[j][k] * f.u) * f.k, sr_bits(kb, base + i0 + k), !uns));
        } else {
#pragma unroll
          for (int k = 0; k < kInt8Lane; ++k) vc[j].v[k] = static_cast<uint8_t>(int8_encode_code(st[j][k], f, !uns));
        }
        if (aligned) {
          *reinterpret_cast<Vec<uint8_t, kInt8Lane>*>(code[j] + i0) = vc[j];
        } else {
#pragma unroll
          for (int k = 0; k < kInt8Lane; ++k) code[j][i0 + k] = vc[j].v[k];
        }
        if (lane == 0) scale[j][blk] = m;
      }
    }
  }
};

}  // namespace cuda
}  // namespace mf
