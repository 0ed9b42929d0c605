// Kernel-only timing of mf::cuda::step, without torch or Python: bench/device_check.sh (phase kernels-cuda) builds
// it next to fused_step.cu, twice for the launch-bounds A/B (-DMF_CUDA_MIN_BLOCKS=2, the default, and 1), and runs
// it with and without the 4 KB-table limits (MOMENTUM_FUSED_CUDA_MAX_BLOCKS=320 MOMENTUM_FUSED_CUDA_MAX_TENSORS=36).
//
//   nvcc -O3 -std=c++17 --fmad=false -arch=sm_90 -Icsrc csrc/cuda/tools/step_timing.cu csrc/cuda/fused_step.cu \
//        -o step_timing
//   python3 -c "..." | ./step_timing RULE FLAGS LAYOUT DTYPE ITERS [CODE_UNSIGNED]  (stdin: n numel_0 ... numel_{n-1})
//
// RULE, FLAGS, LAYOUT, DTYPE: the codes of csrc/update_rules.h and csrc/mf_common.h (adam = 2, flags 1 = AdamW;
// layout 0 native, 5 int8_state; dtype 0 fp32, 2 bf16). Every tensor gets its own 256-byte aligned slice of one
// allocation per list, filled with small values. int8_state (fp32 params): the tensors of at least 4096 elements
// and a multiple of 256 get codes (every byte 16: a valid code of both maps) and block scales, the others fp32
// state; CODE_UNSIGNED: bit j set when state j has uint8 codes (AdamW: 2, its exp_avg_sq). Built with
// -DMF_CUDA_INT8_MIN_BLOCKS=2 it times the int8 functor at 64 registers (the A/B of csrc/cuda/int8_functor.cuh).
// Each iteration is one step() call between two CUDA events; the output is one
// JSON line: the median and minimum ms, the launches per step (the same planner, counted on the host), the bytes
// the step moves and the copy bandwidth of the device (a device-to-device cudaMemcpy of 2 GiB, the same events).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "../../compressed.h"
#include "../../mf_common.h"
#include "../../update_rules.h"
#include "../fused_step.h"
#include "../multi_tensor_apply.cuh"

#define CHECK(x)                                                                       \
  do {                                                                                 \
    cudaError_t e_ = (x);                                                              \
    if (e_ != cudaSuccess) {                                                           \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                    \
    }                                                                                  \
  } while (0)

__global__ void fill(uint8_t* p, int64_t bytes, int elem, int kind) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i * elem < bytes;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float v = 0.01f + 0.001f * static_cast<float>(i % 97);  // positive: a valid second moment too
    if (elem == 4) reinterpret_cast<float*>(p)[i] = v;
    else if (elem == 8) reinterpret_cast<double*>(p)[i] = v;
    else if (kind == mf::DT_F16) reinterpret_cast<uint16_t*>(p)[i] = 0x2000;  // fp16 ~0.0078
    else reinterpret_cast<uint16_t*>(p)[i] = static_cast<uint16_t>(mf::f32_bits(v) >> 16);
  }
}

struct Count {
  int64_t launches = 0;
  void add_tensor(int, int64_t) {}
  void add_block(int, int, int64_t) {}
  bool launch(int, int) { return true; }
};

int main(int argc, char** argv) {
  if (argc < 6) {
    std::fprintf(stderr, "usage: %s RULE FLAGS LAYOUT DTYPE ITERS < numels\n", argv[0]);
    return 2;
  }
  const int rule = std::atoi(argv[1]), flags = std::atoi(argv[2]), layout = std::atoi(argv[3]),
            dtype = std::atoi(argv[4]), iters = std::atoi(argv[5]), code_unsigned = argc > 6 ? std::atoi(argv[6]) : 0;
  const bool int8 = layout == mf::LAYOUT_INT8_STATE;
  if (int8 && dtype != mf::DT_F32) {
    std::fprintf(stderr, "int8_state takes fp32 params\n");
    return 2;
  }
  long long n = 0;
  if (std::scanf("%lld", &n) != 1 || n <= 0) return 2;
  std::vector<int64_t> numel(n);
  for (auto& x : numel) {
    long long v;
    if (std::scanf("%lld", &v) != 1) return 2;
    x = v;
  }
  const int ns = mf::rule_num_states(rule, flags), k = mf::rule_num_scalars(rule);
  const int psize = dtype == mf::DT_F64 ? 8 : dtype == mf::DT_F32 ? 4 : 2;
  // (int8_state: 4 bytes per element of room, the fp32 states of the tensors it does not quantize)
  const int ssize = layout == mf::LAYOUT_BF16_STATE ? 2 : layout == mf::LAYOUT_MASTER ? 4 : psize;
  std::vector<uint8_t> quantized(n, 0);
  for (int64_t i = 0; i < n && int8; ++i) quantized[i] = mf::int8_quantized(numel[i]) ? 1 : 0;
  const bool master = layout == mf::LAYOUT_MASTER;
  // one allocation per list, each tensor 256-byte aligned in it
  std::vector<int64_t> off(n);
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    off[i] = total;
    total += (numel[i] + 127) / 128 * 128;
  }
  const int nlists = 2 + ns + (master ? 1 : 0);
  std::vector<uint8_t*> base(nlists);
  for (int l = 0; l < nlists; ++l) {
    const int size = l < 2 ? psize : (master && l == nlists - 1) ? 4 : ssize;
    CHECK(cudaMalloc(&base[l], total * size));
    fill<<<1024, 256>>>(base[l], total * size, size, l < 2 ? dtype : (size == 2 ? mf::DT_BF16 : mf::DT_F32));
  }
  // int8_state: the codes of a quantized tensor overwrite the start of its state slice; one scale list per state
  std::vector<float*> scale_base(int8 ? ns : 0);
  for (int j = 0; j < static_cast<int>(scale_base.size()); ++j) {
    CHECK(cudaMalloc(&scale_base[j], (total / mf::INT8_BLOCK + 1) * sizeof(float)));
    fill<<<1024, 256>>>(reinterpret_cast<uint8_t*>(scale_base[j]), (total / mf::INT8_BLOCK + 1) * 4, 4, mf::DT_F32);
    for (int64_t i = 0; i < n; ++i)
      if (quantized[i]) CHECK(cudaMemset(base[2 + j] + off[i] * ssize, 16, numel[i]));
  }
  std::vector<void*> params(n), states(n * ns), masters(master ? n : 0);
  std::vector<const void*> grads(n);
  for (int64_t i = 0; i < n; ++i) {
    params[i] = base[0] + off[i] * psize;
    grads[i] = base[1] + off[i] * psize;
    for (int j = 0; j < ns; ++j) states[i * ns + j] = base[2 + j] + off[i] * ssize;
    if (master) masters[i] = base[nlists - 1] + off[i] * 4;
  }
  std::vector<void*> scales(int8 ? n * ns : 0, nullptr);
  for (int64_t i = 0; i < n && int8; ++i)
    for (int j = 0; j < ns && quantized[i]; ++j) scales[i * ns + j] = scale_base[j] + off[i] / mf::INT8_BLOCK;
  // packs: lr 1e-3, wd 0.01, then 0.9 / 0.999 / 1e-8-like values, grad_mult 1 (last)
  std::vector<double> pk(static_cast<size_t>(n) * k);
  const double row[16] = {1e-3, 0.01, 0.9, 0.999, 1e-8, 1e-3, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0};
  for (int64_t i = 0; i < n; ++i)
    for (int j = 0; j < k; ++j)  // sgd: dampening 0, first 0 (the momentum buffer in use)
      pk[i * k + j] = j == k - 1 ? 1.0 : (rule == mf::RULE_SGD && (j == 3 || j == 4)) ? 0.0 : row[j];
  double* packs;
  int64_t* nd;
  CHECK(cudaMalloc(&packs, pk.size() * sizeof(double)));
  CHECK(cudaMemcpy(packs, pk.data(), pk.size() * sizeof(double), cudaMemcpyHostToDevice));
  int64_t* sr_keys = nullptr;
  if (layout == mf::LAYOUT_BF16_SR) {
    CHECK(cudaMalloc(&nd, n * sizeof(int64_t)));
    CHECK(cudaMemset(nd, 0, n * sizeof(int64_t)));
    sr_keys = nd;
  }
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  std::vector<float> ms;
  for (int it = 0; it < iters + 3; ++it) {  // 3 warm-up calls
    CHECK(cudaEventRecord(a));
    CHECK(mf::cuda::step(rule, flags, layout, dtype, n, params.data(), grads.data(), states.data(),
                         master ? masters.data() : nullptr, numel.data(), packs, nullptr, nullptr, sr_keys,
                         0, int8 ? scales.data() : nullptr, code_unsigned));
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    float t;
    CHECK(cudaEventElapsedTime(&t, a, b));
    if (it >= 3) ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  // copy bandwidth: 2 GiB device to device, read + write counted
  const size_t cb = size_t(1) << 31;
  void *src, *dst;
  CHECK(cudaMalloc(&src, cb));
  CHECK(cudaMalloc(&dst, cb));
  std::vector<float> cms;
  for (int it = 0; it < 8; ++it) {
    CHECK(cudaEventRecord(a));
    CHECK(cudaMemcpyAsync(dst, src, cb, cudaMemcpyDeviceToDevice));
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    float t;
    CHECK(cudaEventElapsedTime(&t, a, b));
    if (it >= 2) cms.push_back(t);
  }
  std::sort(cms.begin(), cms.end());
  // launches per step: the same planner and limits as multi_tensor_apply (TensorTable<lists>); int8_state: a
  // sequence over its quantized tensors (2 + 2 ns lists) and one over the others (2 + ns), zero-sized placeholders
  // for the other kind, as launch_int8 lists them
  Count c;
  int cap_t = 0, cap_b = 0;
  auto caps = [&](int lists) {
    switch (lists) {
#define CAP(NL)                                                                                         \
  case NL:                                                                                              \
    cap_t = mf::cuda::env_limit("MOMENTUM_FUSED_CUDA_MAX_TENSORS", mf::cuda::TensorTable<NL>::kTensors); \
    cap_b = mf::cuda::env_limit("MOMENTUM_FUSED_CUDA_MAX_BLOCKS", mf::cuda::TensorTable<NL>::kBlocks);   \
    break;
      CAP(2) CAP(3) CAP(4) CAP(5) CAP(6) CAP(7) CAP(8)
#undef CAP
    }
  };
  int64_t launches = 0, elems = 0, qelems = 0;
  std::vector<int64_t> part(n);
  for (int kind = 0; kind < (int8 ? 2 : 1); ++kind) {  // int8: kind 1 the quantized tensors
    int64_t any = 0;
    for (int64_t i = 0; i < n; ++i) {
      part[i] = !int8 || quantized[i] == kind ? numel[i] : 0;
      any += part[i];
    }
    if (any == 0) continue;
    caps(kind == 1 ? 2 + 2 * ns : nlists);
    launches += mf::cuda::plan_launches(n, part.data(), mf::cuda::kChunk, cap_t, cap_b, c);
  }
  for (int64_t i = 0; i < n; ++i) {
    elems += numel[i];
    qelems += quantized[i] ? numel[i] : 0;
  }
  // bytes: read p (or the master), g, states; write p (and the master), states (int8: 1 byte a state element, 4 a
  // block scale, both ways)
  const int64_t full = (master ? 4 : psize) + psize + ns * ssize + psize + (master ? 4 : 0) + ns * ssize;
  const int64_t bytes =
      (elems - qelems) * full + qelems * (3 * psize + 2 * ns) + 2 * ns * 4 * (qelems / mf::INT8_BLOCK);
  const double med = ms[ms.size() / 2], copy_gbps = 2.0 * cb / (cms[cms.size() / 2] * 1e6);
  std::printf("{\"rule\": %d, \"flags\": %d, \"layout\": %d, \"dtype\": %d, \"tensors\": %lld, \"elements\": %lld, "
              "\"min_blocks_per_sm\": %d, \"int8_min_blocks\": %d, \"master_min_blocks\": %d, "
              "\"quantized_elements\": %lld, "
              "\"max_tensors\": %d, \"max_blocks\": %d, \"launches\": %lld, "
              "\"median_ms\": %.4f, \"min_ms\": %.4f, \"bytes\": %lld, \"GBps\": %.1f, \"copy_GBps\": %.1f, "
              "\"pct_copy\": %.1f}\n",
              rule, flags, layout, dtype, n, (long long)elems, mf::cuda::kMinBlocksPerSM, mf::cuda::kInt8MinBlocksPerSM,
              mf::cuda::kMasterMinBlocksPerSM,
              (long long)qelems, cap_t, cap_b,
              (long long)launches, med, ms[0], (long long)bytes, bytes / (med * 1e6), copy_gbps,
              100.0 * bytes / (med * 1e6) / copy_gbps);
  return 0;
}
