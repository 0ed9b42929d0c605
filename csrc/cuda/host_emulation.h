// momentum_fused: just enough of CUDA's device environment to run a functor of csrc/cuda on the host, one
// std::thread per CUDA thread of one block (tests only: tests/test_cuda_sources.py runs int8_functor.cuh this way,
// so that its warp-level indexing and reduction run somewhere without a GPU). threadIdx / blockDim, __syncthreads
// (a block barrier), __shfl_xor_sync (a warp exchange through a buffer between two warp barriers: every lane of a
// warp must call it the same number of times, as on the device), __shared__ (static storage: one block at a time).
// Include it before any csrc header; compile with -std=c++20 -pthread.
#pragma once

#if defined(__CUDACC__)
#error "host_emulation.h is for host compilers only"
#endif

#include <algorithm>
#include <barrier>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __shared__ static

namespace mf_emu {
struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local Dim3 thread_idx;
inline Dim3 block_dim;
struct Warp {
  explicit Warp(int n) : bar(n) {}
  std::barrier<> bar;
  float buf[32] = {};
};
inline std::unique_ptr<std::barrier<>> block_bar;
inline std::vector<std::unique_ptr<Warp>> warps;

// Runs body() as one block of `threads` threads (a multiple of 32).
template <class Body>
void run_block(int threads, Body body) {
  block_dim.x = static_cast<unsigned>(threads);
  block_bar = std::make_unique<std::barrier<>>(threads);
  warps.clear();
  for (int w = 0; w < threads / 32; ++w) warps.push_back(std::make_unique<Warp>(32));
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; ++t)
    ts.emplace_back([t, &body] {
      thread_idx.x = static_cast<unsigned>(t);
      body();
    });
  for (auto& t : ts) t.join();
}
}  // namespace mf_emu

#define threadIdx (mf_emu::thread_idx)
#define blockDim (mf_emu::block_dim)

inline void __syncthreads() { mf_emu::block_bar->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  const int t = static_cast<int>(threadIdx.x);
  mf_emu::Warp& w = *mf_emu::warps[t / 32];
  w.buf[t % 32] = v;
  w.bar.arrive_and_wait();
  const float r = w.buf[(t % 32) ^ lane_mask];
  w.bar.arrive_and_wait();
  return r;
}

namespace mf {
namespace cuda {
using std::min;
}  // namespace cuda
}  // namespace mf
