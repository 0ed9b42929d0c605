// momentum_fused: the CUDA launcher's plan, host only and free of CUDA and torch headers (so the CPU test suite
// compiles it with g++ and checks it: tests/test_cuda_sources.py).
//
// The tensors of a bucket are cut into chunks of `chunk` elements; a CUDA block updates one chunk. A launch
// takes a table (the kernel argument, by value) of at most `max_tensors` tensor slots and `max_blocks` blocks
// (block -> (slot, chunk)). plan_launches() walks the tensors in order and fills tables: when one is full (its
// blocks, or its slots at the end of a tensor) it is launched and a fresh one started; a tensor cut by a full
// table continues as slot 0 of the next, from its next chunk. So every chunk of every non-empty tensor is in
// exactly one block of one launch, and a bucket costs ceil(chunks / max_blocks) launches when the tensors are
// large, ceil(tensors / max_tensors) when they are tiny (one chunk each).
//
// The table's capacity comes from the kernel-argument limit: 4 KB before CUDA 12.1, 32,764 bytes since (on
// Volta and newer; torch's multi_tensor_apply uses the large table since PR 134373). table_capacity() gives
// (tensors, blocks) for a table of NL pointer lists in `bytes`.
#pragma once

#include <cstdint>

namespace mf {
namespace cuda {

struct TableCapacity {
  int tensors;
  int blocks;
};

// Bytes of a table of NL pointer lists, T slots and B blocks: NL*T pointers, T int64 numels, T int32 rows
// (the scalar-pack row), B int32 chunk indices and B uint8 slots (so T <= 256).
constexpr int64_t table_bytes(int nl, int tensors, int blocks) {
  return static_cast<int64_t>(nl) * tensors * 8 + static_cast<int64_t>(tensors) * 12 +
         static_cast<int64_t>(blocks) * 5;
}

// The table for NL lists in `bytes` (the kernel argument less the functor's share): 36 slots and 320 blocks in
// the 4 KB argument (the apex/torch numbers for up to 6 lists; 28 slots for 7 or 8: int8_state's codes and
// scales), else 256 slots (a uint8 slot index) and as many blocks as the rest allows, rounded down to a multiple
// of 32.
constexpr TableCapacity table_capacity(int nl, int64_t bytes) {
  return bytes < 8192 ? TableCapacity{nl <= 6 ? 36 : 28, 320}
                      : TableCapacity{256, static_cast<int>((bytes - table_bytes(nl, 256, 0)) / 5 / 32 * 32)};
}

// Sink: the table being filled and the launch.
//   void add_tensor(int slot, int64_t tensor);          slot `slot` of this table holds tensor `tensor`
//   void add_block(int block, int slot, int64_t chunk); block `block` updates chunk `chunk` of that slot's tensor
//   bool launch(int ntensors, int nblocks);             launch the table; false stops the plan (an error)
// Returns the number of launches, or -1 when a launch returned false. Tensors with numel <= 0 get nothing.
template <class Sink>
int64_t plan_launches(int64_t n, const int64_t* numel, int64_t chunk, int max_tensors, int max_blocks, Sink& sink) {
  int nt = 0, nb = 0;
  int64_t launches = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (numel[i] <= 0) continue;
    const int64_t chunks = (numel[i] + chunk - 1) / chunk;
    sink.add_tensor(nt, i);
    for (int64_t c = 0; c < chunks; ++c) {
      sink.add_block(nb, nt, c);
      ++nb;
      const bool last = c == chunks - 1;
      if (nb == max_blocks || (last && nt + 1 == max_tensors)) {
        if (!sink.launch(nt + 1, nb)) return -1;
        ++launches;
        nb = 0;
        if (last) {
          nt = -1;  // the tensor is done: a fresh table
        } else {   // the tensor continues as slot 0 of the next table
          nt = 0;
          sink.add_tensor(0, i);
        }
      }
    }
    ++nt;
  }
  if (nb > 0) {
    if (!sink.launch(nt, nb)) return -1;
    ++launches;
  }
  return launches;
}

}  // namespace cuda
}  // namespace mf
