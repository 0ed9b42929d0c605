// momentum_fused: a generic multi-tensor launcher (the apex / PyTorch multi_tensor_apply design), free of
// torch headers: raw pointers, sizes and a cudaStream_t.
//
// The tensors of a bucket are cut into chunks of kChunk elements; each CUDA block handles one chunk.
// A TensorTable (passed by value as the kernel argument, < 4 KB) maps block -> (tensor slot, chunk) and
// holds the pointers of up to kMaxTensors tensors; when the table is full (tensors or blocks) it is
// launched and refilled, so any number of tensors costs ceil(chunks / kMaxBlocks) launches at most.
// Inside a chunk every thread handles kILP elements per iteration: a vectorized load/store path when
// all pointers are aligned to kILP elements and the chunk length is a multiple of kILP, a bounds-checked
// strided path (the scalar tail) otherwise. The functor knows the rule; this file knows none.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace mf {
namespace cuda {

constexpr int kMaxLists = 6;    // param, grad, up to 3 states, the fp32 master (layout master)
constexpr int kMaxTensors = 36;
constexpr int kMaxBlocks = 320;
constexpr int kChunk = 65536;
constexpr int kBlock = 512;
constexpr int kILP = 4;

struct TensorTable {
  void* ptr[kMaxLists][kMaxTensors];
  int64_t numel[kMaxTensors];
  int32_t row[kMaxTensors];  // global tensor index: the row of the scalar-pack table
  uint8_t block_to_tensor[kMaxBlocks];
  int32_t block_to_chunk[kMaxBlocks];
};

template <class Functor>
__global__ void __launch_bounds__(kBlock) multi_tensor_kernel(TensorTable tt, Functor f) {
  const int slot = tt.block_to_tensor[blockIdx.x];
  const int chunk = tt.block_to_chunk[blockIdx.x];
  f(tt, slot, chunk);
}

// Host side: launches `f` over n tensors given by lists[l][i] (l < nlists) and numel[i].
// Returns cudaSuccess or the first launch error.
template <class Functor>
cudaError_t multi_tensor_apply(int nlists, int64_t n, void* const* const* lists, const int64_t* numel, Functor f,
                               cudaStream_t stream) {
  TensorTable tt;
  int nt = 0, nb = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (numel[i] == 0) continue;
    for (int l = 0; l < nlists; ++l) tt.ptr[l][nt] = lists[l][i];
    tt.numel[nt] = numel[i];
    tt.row[nt] = static_cast<int32_t>(i);
    const int64_t chunks = (numel[i] + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      tt.block_to_tensor[nb] = static_cast<uint8_t>(nt);
      tt.block_to_chunk[nb] = static_cast<int32_t>(c);
      ++nb;
      const bool blocks_full = nb == kMaxBlocks;
      const bool tensors_full = nt + 1 == kMaxTensors && c == chunks - 1;
      if (blocks_full || tensors_full) {
        multi_tensor_kernel<<<nb, kBlock, 0, stream>>>(tt, f);
        const cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess) return err;
        nb = 0;
        if (c == chunks - 1) {
          nt = -1;  // the tensor is done: start a fresh table
        } else {   // the tensor continues: keep it as slot 0 of the next table
          for (int l = 0; l < nlists; ++l) tt.ptr[l][0] = tt.ptr[l][nt];
          tt.numel[0] = tt.numel[nt];
          tt.row[0] = tt.row[nt];
          nt = 0;
        }
      }
    }
    ++nt;
  }
  if (nb > 0) {
    multi_tensor_kernel<<<nb, kBlock, 0, stream>>>(tt, f);
    return cudaGetLastError();
  }
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace mf
