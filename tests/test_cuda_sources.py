"""The CUDA extension's torch glue compiles on a machine without a GPU.

`.ci/run` compiles the kernels (csrc/cuda/*.cu, no torch headers) with nvcc; the binding files
(csrc/cuda/*.cpp: the registered op, the pybind eager entry, and the argument checks they share with the CPU
op, csrc/step_args.h and csrc/py_borrow.h) need torch's headers and are built only with a CUDA build of torch,
which this project's CPU machines do not have. Here each is compiled by the host compiler with
``-fsyntax-only`` against the installed torch's headers (a CPU wheel ships the c10/cuda headers) and the CUDA
toolkit's ``cuda_runtime.h``, with the flags torch's CUDAExtension passes: a binding that stops compiling
fails this test, not the next GPU session.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from backend_cases import host_cxx

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(os.path.dirname(HERE), "csrc")
BINDINGS = sorted(f for f in os.listdir(os.path.join(CSRC, "cuda")) if f.endswith(".cpp"))


def _cuda_include():
    """The CUDA toolkit's include folder (the one holding cuda_runtime.h), or None."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    roots.append("/usr/local/cuda")
    for root in filter(None, roots):
        for sub in ("include", os.path.join("targets", "x86_64-linux", "include")):
            inc = os.path.join(root, sub)
            if os.path.exists(os.path.join(inc, "cuda_runtime.h")):
                return inc
    return None


def _compile_command(source):
    from torch.utils.cpp_extension import include_paths

    cxx = host_cxx()
    flags = ["-std=c++20", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=_C_cuda", "-DTORCH_API_INCLUDE_EXTENSION_H",
             # the CPU wheel lacks the CUDA build's generated c10/cuda/impl/cuda_cmake_macros.h
             "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"]
    incs = [f"-I{p}" for p in include_paths()] + [f"-I{_cuda_include()}", f"-I{sysconfig.get_paths()['include']}",
                                                  f"-I{CSRC}"]
    return [cxx, *flags, *incs, os.path.join(CSRC, "cuda", source)]


def test_every_binding_file_is_checked():
    assert BINDINGS == ["cuda_ops.cpp", "cuda_python.cpp"], "a new binding file: check that setup.py builds it"


def test_cuda_bindings_compile():
    host_cxx()
    if _cuda_include() is None:
        pytest.skip("needs the CUDA toolkit headers (cuda_runtime.h; set CUDA_HOME)")
    # the files compile side by side (~10 and ~40 s)
    procs = {f: subprocess.Popen(_compile_command(f), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for f in BINDINGS}
    failed = {}
    for f, p in procs.items():
        out, _ = p.communicate(timeout=600)
        if p.returncode != 0:
            failed[f] = "\n".join(line for line in out.splitlines() if "error" in line)[:4000] or out[-4000:]
    assert not failed, "CUDA binding files do not compile:\n" + "\n\n".join(f"{f}:\n{e}" for f, e in failed.items())


if __name__ == "__main__":  # print the commands (to run them by hand)
    for f in BINDINGS:
        print(" ".join(_compile_command(f)), file=sys.stdout)


# ------------------------------------------------------------------------------ the launch planner (host C++)
_PLAN_DRIVER = r"""
#include <cstdio>
#include <vector>
#include "cuda/launch_plan.h"
using namespace mf::cuda;
struct Rec {
  int launch_no = 0;
  std::vector<long long> slots;
  void add_tensor(int slot, int64_t i) {
    if ((int)slots.size() <= slot) slots.resize(slot + 1, -1);
    slots[slot] = i;
    std::printf("T %d %d %lld\n", launch_no, slot, (long long)i);
  }
  void add_block(int b, int slot, int64_t c) {
    std::printf("B %d %d %d %lld %lld\n", launch_no, b, slot, (long long)slots.at(slot), (long long)c);
  }
  bool launch(int nt, int nb) { std::printf("L %d %d %d\n", launch_no, nt, nb); ++launch_no; slots.clear(); return true; }
};
int main(int argc, char** argv) {
  // stdin: chunk max_tensors max_blocks n numel...; or "caps": the table capacities
  if (argc > 1) {
    for (int nl = 2; nl <= 8; ++nl) {
      TableCapacity big = table_capacity(nl, 32764 - 128), small = table_capacity(nl, 4096 - 128);
      std::printf("C %d %d %d %lld %d %d %lld\n", nl, big.tensors, big.blocks,
                  (long long)table_bytes(nl, big.tensors, big.blocks), small.tensors, small.blocks,
                  (long long)table_bytes(nl, small.tensors, small.blocks));
    }
    return 0;
  }
  long long chunk, n;
  int mt, mb;
  if (std::scanf("%lld %d %d %lld", &chunk, &mt, &mb, &n) != 4) return 2;
  std::vector<int64_t> numel(n);
  for (auto& x : numel) { long long v; if (std::scanf("%lld", &v) != 1) return 2; x = v; }
  Rec r;
  long long launches = plan_launches(n, numel.data(), chunk, mt, mb, r);
  std::printf("N %lld\n", launches);
  return 0;
}
"""


@pytest.fixture(scope="module")
def plan_driver(tmp_path_factory):
    cxx = host_cxx()
    d = tmp_path_factory.mktemp("plan")
    src, exe = d / "plan.cpp", d / "plan"
    src.write_text(_PLAN_DRIVER)
    subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", "-Werror", f"-I{CSRC}", str(src), "-o", str(exe)], check=True)
    return str(exe)


def _plan(exe, numels, chunk=65536, max_tensors=256, max_blocks=4256):
    inp = f"{chunk} {max_tensors} {max_blocks} {len(numels)} " + " ".join(map(str, numels))
    out = subprocess.run([exe], input=inp, capture_output=True, text=True, check=True).stdout.split("\n")
    launches, blocks, tensors = {}, [], {}
    for line in filter(None, out):
        f = line.split()
        if f[0] == "L":
            launches[int(f[1])] = (int(f[2]), int(f[3]))
        elif f[0] == "B":
            blocks.append(tuple(map(int, f[1:])))
        elif f[0] == "T":
            tensors.setdefault(int(f[1]), {})[int(f[2])] = int(f[3])
        elif f[0] == "N":
            n = int(f[1])
    assert n == len(launches)
    return n, launches, blocks, tensors


def _check_plan(exe, numels, chunk=65536, max_tensors=256, max_blocks=4256):
    n, launches, blocks, tensors = _plan(exe, numels, chunk, max_tensors, max_blocks)
    seen = {}
    for launch, b, slot, tensor, c in blocks:
        assert 0 <= slot < launches[launch][0] <= max_tensors
        assert 0 <= b < launches[launch][1] <= max_blocks
        assert tensors[launch][slot] == tensor
        key = (tensor, c)
        assert key not in seen, f"chunk {key} in two blocks"
        seen[key] = launch
    for launch, (nt, nb) in launches.items():
        assert sorted(b for ln, b, *_ in blocks if ln == launch) == list(range(nb)), "blocks 0..nb-1, each once"
        assert sorted(tensors[launch]) == list(range(nt))
    want = {(t, c) for t, x in enumerate(numels) for c in range(-(-x // chunk)) if x > 0}
    assert set(seen) == want, "every chunk of every non-empty tensor exactly once"
    return n


def test_launch_plan_covers_every_chunk_once(plan_driver):
    import random
    rng = random.Random(0)
    cases = [[], [0], [1], [65536], [65537], [0, 5, 0], [65536 * 7 + 3] * 3,
             [rng.choice([0, 1, 100, 65535, 65536, 65537, 300000]) for _ in range(200)]]
    for numels in cases:
        for mt, mb in ((256, 4256), (36, 320), (2, 3), (1, 1), (3, 1000)):
            _check_plan(plan_driver, numels, max_tensors=mt, max_blocks=mb)


def _profile(name, total):
    """bench.core.profile_shapes's element counts (imported lazily: bench imports torch)."""
    import math

    from bench.core import profile_shapes
    return [math.prod(s) for s in profile_shapes(name, int(total))]


def test_launch_counts_llm_and_tiny_profiles(plan_driver):
    caps = {int(f[1]): tuple(map(int, f[2:]))
            for f in (line.split() for line in subprocess.run([plan_driver, "caps"], capture_output=True, text=True,
                                                               check=True).stdout.splitlines())}
    for nl, (bt, bb, bbytes, st, sb, sbytes) in caps.items():
        assert bbytes <= 32764 - 128 and sbytes <= 4096 - 128 and (st, sb) == (36 if nl <= 6 else 28, 320) and bt == 256
    llm, tiny = _profile("llm", 1e9), _profile("tiny", 5.4e6)
    assert (len(llm), len(tiny)) == (292, 4981)
    t4, b4 = caps[4][:2]  # AdamW: param, grad, exp_avg, exp_avg_sq
    # the 32 KB table: the 15,286 chunks of the llm profile (1e9 params, d = 1792) in 4 launches (48 with the 4 KB
    # table; 49 for d = 1800 before 2026-12-06), 4,981 tiny tensors in
    # 20 launches of 256 (139 of 36)
    assert _check_plan(plan_driver, llm, max_tensors=t4, max_blocks=b4) == 4
    assert _check_plan(plan_driver, llm, max_tensors=36, max_blocks=320) == 48
    assert _check_plan(plan_driver, tiny, max_tensors=t4, max_blocks=b4) == 20
    assert _check_plan(plan_driver, tiny, max_tensors=36, max_blocks=320) == 139


# ------------------------------------------------------------------- the int8_state functor, emulated on the host
# csrc/cuda/int8_functor.cuh (the CUDA kernel of int8_state's and master16_int8's quantized tensors) run by host
# threads, one per CUDA thread (csrc/cuda/host_emulation.h: warp shuffles through barriers), on one bucket of one
# tensor; compared bit
# for bit with layouts.py's encoding of the CPU backend's fp32 step on the decoded states (the same
# csrc/update_rules.h, no FMA contraction: the fp32 math agrees). The device's own arithmetic is not what this
# checks (its approximate root of the encode's guesses is sqrtf here; bench/int8_encoder_exhaustive.cpp checks the
# guesses' tolerance over every fp32 pattern): the indexing, the warp reduction, the integer-space decision of
# each code (compressed.h), the codes.
_INT8_DRIVER = r"""
#include "cuda/host_emulation.h"
#include "update_rules.h"
namespace mf { namespace cuda {
constexpr int kChunk = 65536; constexpr int kMinBlocksPerSM = 2; constexpr int kInt8MinBlocksPerSM = 1;
} }
#include "cuda/int8_functor.cuh"

#include <cstdio>
#include <vector>

using namespace mf;
struct Table {
  void* ptr[9][1];
  int64_t numel[1];
  int32_t row[1];
};

// stdin: the pack, the param and the grad (fp32; REM: bf16 bits), the remainder (REM: int16), the codes, the
// scales; stdout: the param, the remainder (REM), the codes, the scales
template <class Op, bool REM, bool SRQ>
int run(int64_t n, int threads, int code_unsigned, int64_t key) {
  constexpr int NS = Op::kStates;
  constexpr int K = Op::template Scalars<float>::kPack;
  using P = typename std::conditional<REM, bf16, float>::type;
  constexpr size_t PB = sizeof(P);
  std::vector<double> pack(K);
  std::vector<P> p(n), g(n);
  std::vector<uint16_t> r(REM ? n : 0);
  std::vector<float> scales(NS * (n / INT8_BLOCK));
  std::vector<uint8_t> codes(NS * n);
  if (std::fread(pack.data(), 8, K, stdin) != size_t(K) || std::fread(p.data(), PB, n, stdin) != size_t(n) ||
      std::fread(g.data(), PB, n, stdin) != size_t(n) || std::fread(r.data(), 2, r.size(), stdin) != r.size() ||
      std::fread(codes.data(), 1, NS * n, stdin) != size_t(NS * n) ||
      std::fread(scales.data(), 4, scales.size(), stdin) != scales.size())
    return 3;
  Table tt{};
  tt.ptr[0][0] = p.data();
  tt.ptr[1][0] = g.data();
  if (REM) tt.ptr[2 + NS][0] = r.data();
  for (int j = 0; j < NS; ++j) {
    tt.ptr[2 + j][0] = codes.data() + j * n;
    tt.ptr[2 + NS + (REM ? 1 : 0) + j][0] = scales.data() + j * (n / INT8_BLOCK);
  }
  tt.numel[0] = n;
  const int64_t keys[1] = {key};
  cuda::Int8Functor<Op, REM, SRQ> f{pack.data(), nullptr, nullptr, code_unsigned, keys};
  for (int chunk = 0; int64_t(chunk) * cuda::kChunk < n; ++chunk)
    mf_emu::run_block(threads, [&] { f(tt, 0, chunk); });
  std::fwrite(p.data(), PB, n, stdout);
  std::fwrite(r.data(), 2, r.size(), stdout);
  std::fwrite(codes.data(), 1, NS * n, stdout);
  std::fwrite(scales.data(), 4, scales.size(), stdout);
  return 0;
}

int main(int argc, char** argv) {
  if (argc != 8) return 2;
  const int rule = std::atoi(argv[1]), flags = std::atoi(argv[2]), threads = std::atoi(argv[4]);
  const int64_t n = std::atoll(argv[3]);
  const int code_unsigned = std::atoi(argv[5]);
  const bool rem = std::atoi(argv[6]) != 0;  // master16_int8's form
  const int64_t key = std::atoll(argv[7]);   // >= 0: the stochastic codes (int8_sr, master16_int8_sr) with this key
#define MF_CASE(R, F)                                                                          \
  if constexpr (RuleOp<R, F>::kStates > 0 && R != RULE_SGD_SF && R != RULE_ADAMW_SF)           \
    if (rule == R && flags == F) {                                                             \
      if (key >= 0)                                                                            \
        return rem ? run<RuleOp<R, F>, true, true>(n, threads, code_unsigned, key)             \
                   : run<RuleOp<R, F>, false, true>(n, threads, code_unsigned, key);           \
      return rem ? run<RuleOp<R, F>, true, false>(n, threads, code_unsigned, key)              \
                 : run<RuleOp<R, F>, false, false>(n, threads, code_unsigned, key);            \
    }
  MF_FOR_EACH_RULE_FLAGS(MF_CASE)
#undef MF_CASE
  return 4;
}
"""


@pytest.fixture(scope="module")
def int8_driver(tmp_path_factory):
    cxx = host_cxx()
    d = tmp_path_factory.mktemp("int8")
    src, exe = d / "int8.cpp", d / "int8"
    src.write_text(_INT8_DRIVER)
    r = subprocess.run([cxx, "-std=c++20", "-O1", "-pthread", "-ffp-contract=off", "-Wall", f"-I{CSRC}", str(src),
                        "-o", str(exe)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return str(exe)


def _int8_cases():
    import momentum_fused as mf
    return [("adamw", mf.AdamW, dict(lr=1e-2, weight_decay=0.1)),
            ("adamw-amsgrad", mf.AdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
            ("rmsprop-momentum", mf.RMSprop, dict(lr=1e-2, momentum=0.9)),
            ("nadam", mf.NAdam, dict(lr=1e-2)),
            ("sgd-nesterov", mf.SGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
            ("lion", mf.Lion, dict(lr=1e-3, weight_decay=0.1))]


@pytest.mark.parametrize("sr", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("rem", [False, True], ids=["int8_state", "master16_int8"])
@pytest.mark.parametrize("case", _int8_cases(), ids=lambda c: c[0])
def test_int8_functor_emulated_on_the_host_is_bit_exact(int8_driver, case, rem, sr):
    """int8_state's functor, and its master16_int8 form (bf16 param and grad, the int16 remainder: the oracle steps
    the decoded master in fp32 and encodes it with layouts.master16_encode); ``sr``: their stochastic forms
    (int8_sr, master16_int8_sr), the oracle's codes layouts.int8_encode with the key (two chunks: the element index
    crosses the chunk boundary)."""
    import torch

    import momentum_fused as mf
    from momentum_fused import _backend_cpu, backends, layouts
    if backends.status().get("cpu") != "available":
        pytest.skip("the cpu backend is not built here (the reference step of this test)")
    _, cls, kw = case
    n = 65536 + 3 * 256  # two chunks, the second partial
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(n, generator=gen).requires_grad_()
    p.grad = torch.randn(n, generator=gen)
    opt = cls([p], backend="cpu", **kw)
    opt.step()  # a state; the pack of the next step is captured below
    cpu = backends._REGISTRY["cpu"]
    got = {}

    def capture(spec, flags, params, grads, states, scalars, **k):
        got.update(spec=spec, flags=flags, pack=backends.pack_table(scalars, len(spec.scalar_names)))
        return cpu_apply(spec, flags, params, grads, states, scalars, **k)
    cpu_apply, cpu.apply = cpu.apply, capture
    try:
        p.grad = torch.randn(n, generator=gen)
        opt.step()
    finally:
        cpu.apply = cpu_apply
    spec, flags = got["spec"], got["flags"]
    names = spec.state_names(opt.param_groups[0])
    signed = [name not in layouts.INT8_UNSIGNED for name in names]
    # codes and scales from the run's states (a zero block and a NaN block included)
    st = [opt.state[p][name].clone() for name in names]
    st[0][256:512] = 0.0
    st[0][1024 + 7] = float("nan")
    for x in st:  # a block of scale ~1e-33, under the block form's range (2^-100): the general form throughout
        x[2048:2304] = x[2048:2304] * 1e-33
    enc = [layouts.int8_encode(x, sg) for x, sg in zip(st, signed)]
    g = torch.randn(n, generator=gen)
    g[2048:2304] *= 1e-33
    g[4096 + 5] = float("inf")  # an inf (or NaN) state in the block: the general form there too
    # master16_int8: the bf16 param and remainder of p's value (in bits that are not all zero), a bf16 grad
    hi, lo = layouts.master16_encode(p.detach() * (1 + 2 ** -12))
    if rem:
        g = g.bfloat16()
    # the oracle: decode, the CPU backend's fp32 step, encode
    dec = tuple(layouts.int8_decode(c, s, sg) for (c, s), sg in zip(enc, signed))
    q = layouts.master16_decode(hi, lo) if rem else p.detach().clone()
    cpu.apply(spec, flags, [q], [g.float()], [dec], got["pack"], layout=layouts.NATIVE)
    key = 0x9E3779B9 if sr else -1  # a key with the top bit set (a uint32 beyond int32)
    want = [layouts.int8_encode(x, sg, key if sr else None, 1 + j) for j, (x, sg) in enumerate(zip(dec, signed))]
    # the emulated CUDA functor: 64 threads (2 warps) per block
    ns = len(names)
    raw = lambda x: x.view(torch.int16 if x.element_size() == 2 else torch.int32).numpy().tobytes()  # noqa: E731
    inp = b"".join([got["pack"][0].double().numpy().tobytes(), raw(hi if rem else p.detach()), raw(g)]
                   + ([raw(lo)] if rem else [])
                   + [c.view(torch.uint8).numpy().tobytes() for c, _ in enc] + [s.numpy().tobytes() for _, s in enc])
    mask = sum(1 << j for j, sg in enumerate(signed) if not sg)
    out = subprocess.run([int8_driver, str(_backend_cpu.RULE_IDS[spec.name]),
                          str(_backend_cpu.flags_to_int(spec.name, flags)), str(n), "64", str(mask), str(int(rem)),
                          str(key)],
                         input=inp, capture_output=True, check=True, timeout=600).stdout
    at = 4 * n  # the fp32 param, or the bf16 param and the int16 remainder
    if rem:
        pp = torch.frombuffer(bytearray(out[:2 * n]), dtype=torch.int16)
        rr = torch.frombuffer(bytearray(out[2 * n:4 * n]), dtype=torch.int16)
        want_hi, want_lo = layouts.master16_encode(q)
        assert torch.equal(rr, want_lo), "remainders"
        assert torch.equal(pp, want_hi.view(torch.int16)), "params (bf16 bits)"
        assert not torch.equal(rr, lo), "the master moved"
    else:
        pp = torch.frombuffer(bytearray(out[:4 * n]), dtype=torch.float32)
        nan = torch.isnan(pp) & torch.isnan(q)
        assert torch.equal(pp.view(torch.int32)[~nan], q.view(torch.int32)[~nan]), "params"
    codes = torch.frombuffer(bytearray(out[at:at + ns * n]), dtype=torch.uint8).view(ns, n)
    scales = torch.frombuffer(bytearray(out[at + ns * n:]), dtype=torch.float32).view(ns, n // 256)
    bits = lambda x: x.view(torch.int32)  # noqa: E731
    for j, (c, s) in enumerate(want):
        assert torch.equal(codes[j], c.view(torch.uint8)), f"codes of state {names[j]}"
        both = torch.isnan(scales[j]) & torch.isnan(s)
        assert torch.equal(bits(scales[j])[~both], bits(s)[~both]), f"scales of state {names[j]}"
    assert torch.isnan(scales[0][4]) and (codes[0][1024:1280] == (127 if signed[0] else 255)).all()


# ------------------------------------------------------------- compressed.h's element form of the int8 encode
# The CUDA functor's and the portable CPU kernel's encode (int8_factor per block, int8_encode_code per element:
# a guess and one comparison) against the definition, the count of integer-space midpoints below |y'| by a binary
# search over midpoints computed in float64 (int8_count_below), where it is hardest: x = m / k and its 64 fp32
# neighbours on each side, for every midpoint m of both maps (and -x for the signed one), in blocks of absmax s
# (1, 0.7, 3, 2^100, 1e30, and the u = 2^64 form: 1e-35, 2^-126, a subnormal). bench/int8_encoder_exhaustive.cpp
# checks every fp32 pattern (minutes); this is its quick form for every test run.
_ELEMENT_FORM_DRIVER = r"""
#include <cmath>
#include <cstdio>
#include "mf_common.h"
#include "compressed.h"
using namespace mf;
int main() {
  const float scales[] = {1.0f, 0.7f, 3.0f, 0x1p100f, 1e30f, 1e-35f, 0x1p-126f, 0x1p-140f};
  long long bad = 0, checked = 0, ties = 0;
  for (float s : scales) {
    for (int sgn = 0; sgn < 2; ++sgn) {
      const Int8Factor f = int8_factor(s, sgn != 0);
      const int top = sgn ? 127 : 255;
      for (int j = 1; j <= top; ++j) {
        const double d = j;
        const float m = sgn ? static_cast<float>(d * (d - 1.0) + 0.5)
                            : static_cast<float>(((d - 1.0) * (d - 1.0) * (d - 1.0) * (d - 1.0) + d * d * d * d) / 2.0);
        for (int side = 0; side < (sgn ? 2 : 1); ++side) {
          const float x0 = (side ? -m : m) / f.k / f.u;
          for (int k = -64; k <= 64; ++k) {
            const float x = f32_from_bits(f32_bits(x0) + static_cast<uint32_t>(k));
            if (!(std::fabs(x) <= s)) continue;
            const float y = (x * f.u) * f.k;
            const int c = int8_count_below(std::fabs(y), sgn != 0);
            const int want = sgn ? (y < 0.0f ? -c : c) : (c == 0 && y > 0.0f ? 1 : c);  // (unsigned: the floor)
            const int got = int8_encode_code(x, f, sgn != 0);
            ++checked;
            ties += std::fabs(y) == m;
            if (got != want && bad++ < 5) std::printf("s=%a sgn=%d x=%a got %d want %d\n", s, sgn, x, got, want);
          }
        }
      }
    }
  }
  std::printf("checked %lld ties %lld bad %lld\n", checked, ties, bad);
  return bad == 0 ? 0 : 1;
}
"""


def test_int8_element_form_next_to_every_midpoint(tmp_path):
    cxx = host_cxx()
    src, exe = tmp_path / "element.cpp", tmp_path / "element"
    src.write_text(_ELEMENT_FORM_DRIVER)
    r = subprocess.run([cxx, "-std=c++17", "-O1", "-ffp-contract=off", "-Wall", f"-I{CSRC}", str(src), "-o", str(exe)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:]
    checked, ties = (int(w) for w in out.stdout.split()[1:4:2])
    assert checked > 300000 and ties > 100, out.stdout  # the exact ties were reached
