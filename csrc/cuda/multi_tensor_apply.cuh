// momentum_fused: a generic multi-tensor launcher (the apex / PyTorch multi_tensor_apply design), free of
// torch headers: raw pointers, sizes and a cudaStream_t.
//
// The tensors of a bucket are cut into chunks of kChunk elements; each CUDA block handles one chunk. A
// TensorTable<NL> (passed by value as the kernel argument) maps block -> (tensor slot, chunk) and holds the NL
// pointers of each of its tensors. launch_plan.h decides which tensors and chunks go into which launch (tested
// on the CPU); its capacity comes from the kernel-argument limit: 32,764 bytes with CUDA >= 12.1 (256 tensors
// and ~3,400-5,100 blocks per launch, by the number of lists), 4 KB before (36 tensors, 320 blocks). The
// environment variables MOMENTUM_FUSED_CUDA_MAX_BLOCKS / MOMENTUM_FUSED_CUDA_MAX_TENSORS lower the limits at
// run time (for A/B timings: bench/device_check.sh). The functor knows the rule; this file knows none.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>

#include "launch_plan.h"

// Blocks of kBlock threads the compiler must fit on one SM (__launch_bounds__): 2 -> at most 64 registers.
#ifndef MF_CUDA_MIN_BLOCKS
#define MF_CUDA_MIN_BLOCKS 2
#endif
// The same for the int8_state functor with two or three states (int8_functor.cuh): 2 (64 registers, a few bytes of
// spills) by default: on the H200 that ran 1.30x faster than 1 block at 128 registers without spills (2026-12-04).
#ifndef MF_CUDA_INT8_MIN_BLOCKS
#define MF_CUDA_INT8_MIN_BLOCKS 2
#endif
// The same for the master layout's functor (16-bit params, fp32 states and masters): 1 (the compiler's
// register choice) by default: on the H200 AdamW master-bf16 ran 7.01 ms that way against 7.46 at 2 (1e9 params,
// 2026-12-04). bench/device_check.sh's kernels-cuda builds set it with MF_CUDA_MIN_BLOCKS for the A/B.
#ifndef MF_CUDA_MASTER_MIN_BLOCKS
#define MF_CUDA_MASTER_MIN_BLOCKS 1
#endif

namespace mf {
namespace cuda {

constexpr int kMaxLists = 9;  // param, grad, up to 3 states, the fp32 master (master) or the remainder (master16);
                              // int8_state: param, grad, up to 3 code lists and their 3 scale lists;
                              // master16_int8: those and the remainder
constexpr int kChunk = 65536;
constexpr int kBlock = 512;
constexpr int kMinBlocksPerSM = MF_CUDA_MIN_BLOCKS;
constexpr int kInt8MinBlocksPerSM = MF_CUDA_INT8_MIN_BLOCKS;
constexpr int kMasterMinBlocksPerSM = MF_CUDA_MASTER_MIN_BLOCKS;

#if defined(MF_CUDA_SMALL_TABLE) || !defined(CUDART_VERSION) || CUDART_VERSION < 12010
constexpr int kKernelArgBytes = 4096;
#else
constexpr int kKernelArgBytes = 32764;  // CUDA 12.1+: large kernel parameters (Volta and newer)
#endif
constexpr int kFunctorArgBytes = 128;  // room left for the functor (the step's device pointers)

template <int NL>
struct TableShape {
  static constexpr TableCapacity cap = table_capacity(NL, kKernelArgBytes - kFunctorArgBytes);
  static constexpr int kTensors = cap.tensors;
  static constexpr int kBlocks = cap.blocks;
};

template <int NL>
struct TensorTable {
  static constexpr int kTensors = TableShape<NL>::kTensors;
  static constexpr int kBlocks = TableShape<NL>::kBlocks;
  void* ptr[NL][kTensors];
  int64_t numel[kTensors];
  int32_t row[kTensors];  // global tensor index: the row of the scalar-pack table
  int32_t block_to_chunk[kBlocks];
  uint8_t block_to_tensor[kBlocks];
};
static_assert(TableShape<kMaxLists>::kTensors <= 256, "block_to_tensor is a uint8");

// Blocks per SM a functor's kernel is compiled for: kMinBlocksPerSM (64 registers), unless the functor says
// otherwise (kMinBlocks: the int8 functor's kInt8MinBlocksPerSM with two or three states, the master layout's
// kMasterMinBlocksPerSM).
template <class Functor, class = void>
struct MinBlocksOf {
  static constexpr int value = kMinBlocksPerSM;
};
template <class Functor>
struct MinBlocksOf<Functor, decltype(void(Functor::kMinBlocks))> {
  static constexpr int value = Functor::kMinBlocks;
};

template <int NL, class Functor>
__global__ void __launch_bounds__(kBlock, MinBlocksOf<Functor>::value) multi_tensor_kernel(TensorTable<NL> tt,
                                                                                          Functor f) {
  const int slot = tt.block_to_tensor[blockIdx.x];
  const int chunk = tt.block_to_chunk[blockIdx.x];
  f(tt, slot, chunk);
}

// Run-time limit from the environment (a positive integer below the table's capacity), else the capacity.
inline int env_limit(const char* name, int capacity) {
  const char* s = std::getenv(name);
  if (s == nullptr) return capacity;
  const long v = std::strtol(s, nullptr, 10);
  return v >= 1 && v < capacity ? static_cast<int>(v) : capacity;
}

template <int NL, class Functor>
struct TableSink {
  void* const* const* lists;
  const int64_t* numel;
  Functor f;
  cudaStream_t stream;
  TensorTable<NL> tt;
  cudaError_t err = cudaSuccess;
  void add_tensor(int slot, int64_t i) {
    for (int l = 0; l < NL; ++l) tt.ptr[l][slot] = lists[l][i];
    tt.numel[slot] = numel[i];
    tt.row[slot] = static_cast<int32_t>(i);
  }
  void add_block(int b, int slot, int64_t chunk) {
    tt.block_to_tensor[b] = static_cast<uint8_t>(slot);
    tt.block_to_chunk[b] = static_cast<int32_t>(chunk);
  }
  bool launch(int, int nb) {
    multi_tensor_kernel<NL, Functor><<<nb, kBlock, 0, stream>>>(tt, f);
    err = cudaGetLastError();
    return err == cudaSuccess;
  }
};

// Host side: launches `f` over n tensors given by lists[l][i] (l < NL) and numel[i].
// Returns cudaSuccess or the first launch error.
template <int NL, class Functor>
cudaError_t multi_tensor_apply(int64_t n, void* const* const* lists, const int64_t* numel, Functor f,
                               cudaStream_t stream) {
  static_assert(sizeof(TensorTable<NL>) + sizeof(Functor) <= kKernelArgBytes, "kernel argument too large");
  static_assert(sizeof(Functor) <= kFunctorArgBytes, "the functor outgrew its share of the kernel argument");
  static const int max_tensors = env_limit("MOMENTUM_FUSED_CUDA_MAX_TENSORS", TensorTable<NL>::kTensors);
  static const int max_blocks = env_limit("MOMENTUM_FUSED_CUDA_MAX_BLOCKS", TensorTable<NL>::kBlocks);
  auto* sink = new TableSink<NL, Functor>{lists, numel, f, stream};  // ~32 KB: not on the host stack
  plan_launches(n, numel, kChunk, max_tensors, max_blocks, *sink);
  const cudaError_t err = sink->err;
  delete sink;
  return err;
}

}  // namespace cuda
}  // namespace mf
