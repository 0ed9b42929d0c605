"""python -m bench.kernel_report: what the compiler made of every elementwise kernel, without a GPU.

    python -m bench.kernel_report --arch sm_90                 # a table
    python -m bench.kernel_report --arch sm_90 --json          # a JSON list of objects
    python -m bench.kernel_report --backend cuda --rules adam --layouts native-fp32,native-bf16

For kernel developers. The CUDA kernels (csrc/cuda/fused_step.cu, every rule x flags x dtype layout) are
compiled with nvcc to a cubin (``--resource-usage``), the Triton kernels (triton_kernels/kernels.py, every
specialization the launcher can ask for) with Triton's own pipeline for the target (``triton.compile`` with a
``GPUTarget``: no device needed). Both cubins are disassembled with cuobjdump (the CUDA toolkit's, or the copy
Triton ships). Per kernel:

- ``registers``, ``stack_bytes`` (the stack frame), ``spill_bytes`` / ``spill_load_bytes`` (ptxas' spill
  stores and loads);
- ``v4_loads`` / ``v4_stores``: 128-bit global accesses (``LDG.E.128`` / ``STG.E.128``) in the SASS;
  ``loads`` / ``stores``: all global loads / stores, whatever their width;
- ``instructions``: SASS instructions of the kernel; ``loop_instructions``: those of the hot loop (the
  backward branch whose body holds the widest data loads: the CUDA kernels' vector loop) or of the whole
  kernel when it has no loop (a Triton program handles one block); ``elements_per_iteration``: elements one
  thread handles in that loop body / program (the bytes its data loads fetch, divided by the bytes per element
  the layout reads); ``instructions_per_element`` = loop_instructions / elements_per_iteration. Static counts:
  rarely taken paths inside the loop body (the IEEE division's slow path when inlined) count as well. The CUDA int8
  kernels' loop body holds both the aligned (128-bit) and the scalar path for the same 8 elements, and the block
  scales' loads: their elements_per_iteration is ~2x the elements a lane handles (16.8 for 8) and their
  instructions_per_element compares with the int8 kernels' own (before / after a change), not with the others'.

The numbers are the evidence for docs/csrc.md and docs/triton.md until a GPU measures them
(bench/device_check.sh, phase ``kernel-report`` writes this report next to the timings).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"

# (rule id, name, instantiated flag values) -- mirrors csrc/update_rules.h (enum Rule, MF_FOR_EACH_RULE_FLAGS);
# tests/test_kernel_report.py checks the mirror against the header.
RULES = {0: "sgd", 1: "qhm", 2: "adam", 3: "nadam", 4: "rmsprop", 5: "signum", 6: "lion", 7: "fsgdm", 8: "sgd_sf",
         9: "adamw_sf", 10: "muon_momentum", 11: "muon_apply"}
RULE_FLAGS = {"sgd": (0, 1, 3), "qhm": (0, 1), "adam": (0, 1, 2, 3), "nadam": (0, 1), "rmsprop": (0, 1, 2, 3),
              "signum": (0, 1), "lion": (0,), "fsgdm": (0,), "sgd_sf": (0,), "adamw_sf": (0, 1),
              "muon_momentum": (0, 1), "muon_apply": (0,)}

def traffic_lists(rule: str, nstate: int) -> tuple[int, int]:
    """(lists read, lists written) of one element of ``rule`` with ``nstate`` states: its spec.traffic (the C++
    loops read it from generated/tables.h's RuleTraffic; nvcc drops the loads of what a rule never reads)."""
    from momentum_fused.specs import get_spec
    t = get_spec(rule).traffic
    mask = (1 << nstate) - 1
    return (int(t.reads_param) + int(t.reads_grad) + bin(t.states_read & mask).count("1"),
            int(t.writes_param) + bin(t.states_written & mask).count("1"))


def num_states(rule: str, flags: int) -> int:
    """csrc/update_rules.h rule_num_states."""
    return {"sgd": flags & 1, "qhm": 1, "adam": 3 if flags & 2 else 2, "nadam": 2,
            "rmsprop": 1 + (flags & 1) + ((flags >> 1) & 1), "signum": flags & 1, "lion": 1, "fsgdm": 1,
            "sgd_sf": 1, "adamw_sf": 3 if flags & 1 else 2, "muon_momentum": 1, "muon_apply": 1}[rule]


# dtype layouts: name -> (param/grad storage, state storage, master, stochastic rounding); master: True an fp32
# master copy (master), 2 the int16 remainder (master16: the master is the bf16 param and its low half); state
# "int8": int8_state (1-byte codes and an fp32 scale per 256 elements; schedule-free rules refuse it), master16_int8
# both (bf16 params, the int16 remainder and the codes)
LAYOUTS = {"native-fp32": ("fp32", "fp32", False, False), "native-fp64": ("fp64", "fp64", False, False),
           "native-bf16": ("bf16", "bf16", False, False), "native-fp16": ("fp16", "fp16", False, False),
           "bf16_state": ("fp32", "bf16", False, False), "master-bf16": ("bf16", "fp32", True, False),
           "master-fp16": ("fp16", "fp32", True, False), "bf16_sr": ("bf16", "bf16", False, True),
           "master16": ("bf16", "fp32", 2, False), "int8_state": ("fp32", "int8", False, False),
           "master16_int8": ("bf16", "int8", 2, False), "int8_sr": ("fp32", "int8", False, True),
           "master16_int8_sr": ("bf16", "int8", 2, True)}
SIZE = {"fp32": 4, "fp64": 8, "bf16": 2, "fp16": 2, "int8": 1}
SCHEDULE_FREE = ("sgd_sf", "adamw_sf")
# their own kernels (triton int8_state_kernel, CUDA Int8Functor); the _sr forms: the codes rounded stochastically
INT8_LAYOUTS = ("int8_state", "master16_int8", "int8_sr", "master16_int8_sr")


def layout_applies(rule: str, layout: str, flags: int | None = None, backend: str = "triton") -> bool:
    """Whether ``rule`` has kernels in ``layout`` (int8_state, master16_int8: not the schedule-free rules; in CUDA not
    the specializations without state either, which run the native fp32 or master16 kernel)."""
    if layout not in INT8_LAYOUTS:
        return True
    return rule not in SCHEDULE_FREE and not (backend == "cuda" and flags is not None and num_states(rule, flags) == 0)


def cuda_kernel_count() -> int:
    """The CUDA kernels fused_step.cu instantiates: every (rule, flags) in every layout where it applies."""
    return sum(layout_applies(r, lay, f, "cuda") for r, fl in RULE_FLAGS.items() for f in fl for lay in LAYOUTS)


def bytes_read_per_element(layout: str, nstate: int) -> int:
    """Bytes one element's update reads: param (or the fp32 master; master16: the param and its remainder), grad,
    states (int8_state: the codes; the scales are 4 bytes per 256 elements)."""
    p, s, master, _ = LAYOUTS[layout]
    return (4 if master else SIZE[p]) + SIZE[p] + nstate * SIZE[s]


# ------------------------------------------------------------------------------------------------ tools
def find_cuobjdump() -> str | None:
    """The toolkit's cuobjdump, else the one Triton ships (triton/backends/nvidia/bin)."""
    exe = shutil.which("cuobjdump")
    if exe:
        return exe
    nvcc = shutil.which("nvcc")
    if nvcc:
        for cand in (Path(os.path.realpath(nvcc)).parent / "cuobjdump",
                     Path(subprocess.run(["sh", "-c", f"grep -o '/[^ ]*/nvcc' {nvcc} || true"], capture_output=True,
                                         text=True).stdout.strip() or "/nonexistent").parent / "cuobjdump"):
            if cand.exists():
                return str(cand)
    try:
        import triton  # noqa: F401
        cand = Path(sys.modules["triton"].__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if cand.exists():
            return str(cand)
    except Exception:
        pass
    return None


_SASS_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)")
_SASS_INSN = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def parse_sass(text: str) -> dict[str, list[tuple[int, str]]]:
    """cuobjdump -sass text -> {function name: [(address, instruction text)]}."""
    funcs: dict[str, list[tuple[int, str]]] = {}
    cur = None
    for line in text.splitlines():
        m = _SASS_FUNC.match(line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        m = _SASS_INSN.match(line)
        if m and cur is not None:
            cur.append((int(m.group(1), 16), m.group(2)))
    return funcs


def _opcode(insn: str) -> str:
    parts = insn.split()
    if parts and parts[0].startswith("@"):
        parts = parts[1:]
    return parts[0] if parts else ""


_WIDTH = {"64": 8, "128": 16, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def _access_bytes(op: str) -> int:
    for suffix in op.split(".")[1:]:
        if suffix in _WIDTH:
            return _WIDTH[suffix]
    return 4


def analyze_sass(insns: list[tuple[int, str]], read_bytes_per_element: int, elements_hint: int | None = None,
                 table_loads: tuple = ()) -> dict:
    """Counts over one function's SASS: global loads/stores by width, and instructions per element: those of the
    hot loop over the elements its loads fetch (CUDA), or, with ``elements_hint`` (a Triton program: one pass
    over BLOCK elements, elements_hint per thread), the whole function's over elements_hint. Loads whose opcode is
    in ``table_loads`` read constant tables, not elements: they count as loads, not as fetched elements (CUDA:
    LDG.E.CONSTANT)."""
    ops = [(a, _opcode(i), i) for a, i in insns if _opcode(i) not in ("NOP",)]
    # the trailing "BRA self" after EXIT pads the function: drop it
    while ops and ops[-1][1] == "BRA" and ops[-1][2].split()[-1] == hex(ops[-1][0]):
        ops.pop()
    ldg = [(a, op) for a, op, _ in ops if op.startswith("LDG")]
    stg = [(a, op) for a, op, _ in ops if op.startswith("STG")]
    out = {"instructions": len(ops),
           "loads": len(ldg), "stores": len(stg),
           "v4_loads": sum(op.endswith(".128") or ".128." in op for _, op in ldg),
           "v4_stores": sum(op.endswith(".128") or ".128." in op for _, op in stg),
           "local_ops": sum(op.startswith(("LDL", "STL")) for _, op, _ in ops)}
    # loops: backward branches; the hot loop is the one holding the most data-load bytes
    best = None
    for a, op, text in ops:
        if op != "BRA" or elements_hint:
            continue
        m = re.search(r"(0x[0-9a-f]+)\s*$", text)
        if not m:
            continue
        target = int(m.group(1), 16)
        if target >= a:
            continue
        body = [(x, o) for x, o, _ in ops if target <= x <= a]
        widths = [_access_bytes(o) for x, o in body if o.startswith("LDG") and o not in table_loads]
        # the vector loop: the widest loads first (the scalar-tail loop may fetch as many bytes per iteration)
        score = (max(widths, default=0), sum(widths))
        if score[1] and (best is None or score > best[0]):
            best = (score, len(body))
    if best is not None:
        (_, load_bytes), n = best
    else:  # no loop: one pass over the program's elements
        load_bytes = sum(_access_bytes(op) for _, op in ldg if op not in table_loads)
        n = len(ops)
    elems = load_bytes / read_bytes_per_element if read_bytes_per_element else 0
    if best is None and elements_hint:
        elems = elements_hint
    out["loop_instructions"] = n
    out["elements_per_iteration"] = round(elems, 2)
    out["instructions_per_element"] = round(n / elems, 1) if elems else None
    return out


# -------------------------------------------------------------------------------------------------- CUDA
_DEMANGLED = re.compile(r"StepFunctor<mf::RuleOp<(\d+), (\d+)>, ([\w:]+), ([\w:]+), (true|false), (true|false)"
                        r"(?:, (true|false))?")
# REM (master16_int8), then SRQ (the stochastic codes of int8_sr / master16_int8_sr)
_DEMANGLED_INT8 = re.compile(r"Int8Functor<mf::RuleOp<(\d+), (\d+)>, (true|false), (true|false)\s*>")
_CTYPE = {"float": "fp32", "double": "fp64", "mf::bf16": "bf16", "mf::fp16": "fp16"}
NVCC_FLAGS = ["-O3", "-std=c++17", "--fmad=false"]


def _cuda_inputs_digest(arch: str) -> str:
    h = hashlib.sha256()
    for f in sorted(x for x in CSRC.rglob("*") if x.suffix in (".h", ".cuh", ".cu") and "cpu" not in x.parts
                    and "tools" not in x.parts):
        h.update(str(f.relative_to(CSRC)).encode() + b"\0" + f.read_bytes())
    h.update(" ".join(NVCC_FLAGS + [arch]).encode())
    return h.hexdigest()[:16]


def cuda_cache_dir(arch: str = "sm_90", build_dir: Path | None = None) -> Path:
    """Where the cubin and ptxas log of the current sources are kept (csrc/check_cuda_compile.sh fills it too, so
    CI compiles fused_step.cu once for both)."""
    build_dir = Path(build_dir or os.environ.get("MF_KERNEL_REPORT_DIR") or ROOT / "build" / "kernel_report")
    return build_dir / f"cuda-{arch}-{_cuda_inputs_digest(arch)}"


def compile_cuda(arch: str = "sm_90", build_dir: Path | None = None, nvcc: str | None = None) -> tuple[Path, str]:
    """nvcc -cubin --resource-usage on csrc/cuda/fused_step.cu; returns (cubin path, ptxas log). Cached in
    cuda_cache_dir (a digest of the sources and flags), so a second run (or the test after the CLI, or after
    csrc/check_cuda_compile.sh) reuses the cubin."""
    out = cuda_cache_dir(arch, build_dir)
    cubin, log = out / "fused_step.cubin", out / "ptxas.log"
    if cubin.exists() and log.exists():
        return cubin, log.read_text()
    nvcc = nvcc or os.environ.get("NVCC") or shutil.which("nvcc")
    if not nvcc:
        raise FileNotFoundError("nvcc not found")
    out.mkdir(parents=True, exist_ok=True)
    cmd = [nvcc, *NVCC_FLAGS, f"-arch={arch}", f"-I{CSRC}", "-cubin", "--resource-usage",
           str(CSRC / "cuda" / "fused_step.cu"), "-o", str(cubin) + ".tmp"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"nvcc failed ({' '.join(cmd)}):\n{r.stdout}\n{r.stderr}")
    log.write_text(r.stdout + r.stderr)
    os.replace(str(cubin) + ".tmp", cubin)
    return cubin, log.read_text()


def parse_ptxas_log(log: str) -> dict[str, dict]:
    """ptxas -v output -> {function: {registers, stack_bytes, spill_bytes, spill_load_bytes}}."""
    res: dict[str, dict] = {}
    cur = None
    for line in log.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            cur = res.setdefault(m.group(1), {})
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur.update(stack_bytes=int(m.group(1)), spill_bytes=int(m.group(2)), spill_load_bytes=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
    return res


def _demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt:
        raise FileNotFoundError("c++filt not found (binutils)")
    r = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=True)
    return dict(zip(names, r.stdout.splitlines()))


def cuda_report(arch: str = "sm_90", rules=None, layouts=None, build_dir=None) -> list[dict]:
    cubin, log = compile_cuda(arch, build_dir)
    cuobjdump = find_cuobjdump()
    if not cuobjdump:
        raise FileNotFoundError("cuobjdump not found (CUDA toolkit or the triton package)")
    sass = parse_sass(subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True,
                                     check=True).stdout)
    res = parse_ptxas_log(log)
    names = sorted(set(res) | set(sass))
    rows = []
    for mangled, text in _demangle(names).items():
        m = _DEMANGLED.search(text)
        mi = _DEMANGLED_INT8.search(text)
        if mi:  # the int8 layouts' quantized-tensor kernel (their fp32-state tensors run the native-fp32 or master16
            # kernel)
            rule, flags = RULES[int(mi.group(1))], int(mi.group(2))
            layout = ("master16_int8" if mi.group(3) == "true" else "int8_state") + \
                ("_sr" if mi.group(4) == "true" else "")
            layout = {"int8_state_sr": "int8_sr"}.get(layout, layout)
            key = LAYOUTS[layout]
        elif m:
            rule = RULES[int(m.group(1))]
            flags = int(m.group(2))
            master = 2 if m.group(7) == "true" else m.group(5) == "true"  # the 6th argument: master16's remainder
            key = (_CTYPE[m.group(3)], _CTYPE[m.group(4)], master, m.group(6) == "true")
            layout = next(k for k, v in LAYOUTS.items() if v == key)
        else:
            continue
        if rules and rule not in rules or layouts and layout not in layouts:
            continue
        kernel = text.split("<", 1)[0].split("::")[-1]
        nstate = num_states(rule, flags)
        row = {"backend": "cuda", "kernel": kernel, "path": "all", "rule": rule, "flags": flags, "layout": layout,
               "dtype": key[0], "state_dtype": key[1], "nstate": nstate, **res.get(mangled, {})}
        row.update(analyze_sass(sass.get(mangled, []), bytes_read_per_element(layout, nstate),
                                table_loads=("LDG.E.CONSTANT",)))
        row["symbol"] = mangled
        rows.append(row)
    rows.sort(key=lambda r: (r["rule"], r["flags"], list(LAYOUTS).index(r["layout"]), r["kernel"]))
    return rows


# ------------------------------------------------------------------------------------------------ Triton
TRITON_LAYOUTS = [k for k in LAYOUTS if k != "native-fp64"]


def triton_specs(rules=None, layouts=None, flags_mode: str = "all"):
    """(rule, flags, nstate, layout) to compile. flags_mode "all": every instantiated flag value in every layout;
    "fp32": every flag value in native-fp32, the first flag value of each rule in the other layouts."""
    out = []
    for rule, flag_values in RULE_FLAGS.items():
        if rules and rule not in rules:
            continue
        for layout in TRITON_LAYOUTS:
            if layouts and layout not in layouts:
                continue
            for f in flag_values:
                if flags_mode == "fp32" and layout != "native-fp32" and f != flag_values[-1] \
                        or not layout_applies(rule, layout):
                    continue
                out.append((rule, f, num_states(rule, f), layout))
    return out


def _triton_jobs(rule, flags, nstate, layout):
    """[(kernel name, path, jit function, signature, constexprs, options, elements per thread)] for one
    specialization, from triton_kernels.launcher.compile_variants (the launcher's own choice of kernels, BLOCK and
    num_warps)."""
    from momentum_fused.triton_kernels import launcher
    p, s, master, sr = LAYOUTS[layout]
    tdt = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int8": "int8"}
    return launcher.compile_variants(rule, (bool(flags & 1), bool(flags & 2)), nstate, tdt[p], tdt[s], master, sr)


_WORK: list = []  # the jobs of the current report, read by the forked workers


def _compile_triton_one(i: int, arch_num: int, cache_dir: str):
    """Compiles job i in this (forked) process: returns (cubin bytes, kernel symbol, ptxas log). ptxas' log is
    printed by Triton when knobs.nvidia.dump_ptxas_log is set, so stdout is captured: a process per compile
    keeps the logs apart."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, path, fn, signature, constexprs, options, elems = _WORK[i][1]
    sig = {n: ("constexpr" if n in constexprs else signature[n]) for n in fn.arg_names}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(n),): v for n, v in constexprs.items()})
    knobs.cache.dir = cache_dir
    knobs.nvidia.dump_ptxas_log = True
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        ck = triton.compile(src, target=GPUTarget("cuda", arch_num, 32), options=options)
    return ck.asm["cubin"], ck.metadata.name, buf.getvalue()


def triton_report(arch: str = "sm_90", rules=None, layouts=None, flags_mode: str = "all", jobs: int = 2,
                  cache_dir: str | None = None, specs=None, paths=None) -> list[dict]:
    """Compiles every Triton specialization for ``arch`` (or ``specs``: (rule, flags, nstate, layout) tuples), each
    kernel path the launcher can run (or only ``paths``: "full", "packed", "mixed"). Triton's cache is pointed at
    a fresh folder (unless ``cache_dir``) so that ptxas runs and its log (registers, spills) is seen."""
    import multiprocessing

    import triton  # noqa: F401  (fails early with ImportError)

    arch_num = int(re.sub(r"\D", "", arch))
    cuobjdump = find_cuobjdump()
    specs = specs if specs is not None else triton_specs(rules, layouts, flags_mode)
    work = _WORK
    work.clear()
    for rule, f, nstate, layout in specs:
        for job in _triton_jobs(rule, f, nstate, layout):
            if paths is None or job[1] in paths:
                work.append(((rule, f, nstate, layout), job))
    tmp = tempfile.mkdtemp(prefix="mf-kernel-report-")
    rows = []
    try:
        cache = cache_dir or os.path.join(tmp, "cache")
        with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=multiprocessing.get_context("fork")) as ex:
            compiled = list(ex.map(_compile_triton_one, range(len(work)), [arch_num] * len(work),
                                   [cache] * len(work)))
        for i, (((rule, f, nstate, layout), job), (cubin_bytes, sym, log)) in enumerate(zip(work, compiled)):
            name, path, fn, signature, constexprs, options, elems = job
            cubin = os.path.join(tmp, f"k{i}.cubin")
            with open(cubin, "wb") as fh:
                fh.write(cubin_bytes)
            sass = parse_sass(subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True,
                                             check=True).stdout) if cuobjdump else {}
            res = parse_ptxas_log(log)
            p, s, master, sr = LAYOUTS[layout]
            row = {"backend": "triton", "kernel": name, "path": path, "rule": rule, "flags": f, "layout": layout,
                   "dtype": p, "state_dtype": s, "nstate": nstate, "block": constexprs.get("BLOCK"),
                   "num_warps": options.get("num_warps", 4), **res.get(sym, {})}
            if sass:
                row.update(analyze_sass(next(iter(sass.values())), bytes_read_per_element(layout, nstate), elems))
            row["symbol"] = sym
            rows.append(row)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


# ------------------------------------------------------------------------------------ timing (on a device)
STEP_RULES = {"adamw": ("AdamW", dict(lr=1e-3, weight_decay=0.01)),
              "sgd_momentum": ("SGD", dict(lr=1e-3, momentum=0.9))}


def _torch_opt(rule, params):
    """torch's fused optimizer where its update is right on the params' device and dtype (bench/rules.py's probe:
    torch's CPU fused SGD never writes bf16/fp16 params), else its foreach one."""
    import torch

    from bench.rules import TORCH_UPDATE_TOL, torch_update_error
    cls, kw = (torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.01)) if rule == "adamw" else \
        (torch.optim.SGD, dict(lr=1e-3, momentum=0.9))
    fused_ok = torch_update_error(cls, dict(kw, fused=True), params[0].device, params[0].dtype) <= TORCH_UPDATE_TOL
    return cls(params, **kw, **(dict(fused=True) if fused_ok else dict(foreach=True)))


def time_steps(device: str = "cuda", rules=("adamw",), dtypes=("fp32",), profiles=("llm",), params: float | None = None,
               backends=("cuda", "triton", "torch"), iters: int = 20, layouts=("native",), emit=None) -> list[dict]:
    """Per (profile, dtype, rule, backend): one optimizer step timed three ways, side by side in this process:
    ``step_ms`` (events around step(): the GPU time of a step, front end and launch gaps included), ``host_ms``
    (perf_counter around step() without a sync: what the Python front end and the launches cost the host),
    ``kernel_ms`` and ``launches`` (torch.profiler: the device time of the kernels a step runs, and their number).
    ``params``: the llm profile's elements (default 1e9 on CUDA, 2e5 on the CPU; the tiny profile takes 5.4e6 on
    CUDA, 2e5 on the CPU). ``device="cpu"``: the same code as a dry run (host timers, no kernel time). ``layouts``: the
    dtype layouts of the momentum_fused backends (each where it takes the params' dtype: master / master16 bf16,
    int8_state fp32); torch runs the native layout. ``emit(row)`` is called with each row as soon as it is measured
    (the CLI prints it and rewrites ``--out``: a run killed by its timeout keeps what it measured); a run that raises
    (construction, warmup, timing or profiling) gives a row with ``error`` and the next run goes on."""
    import statistics
    import time

    import torch

    import momentum_fused as mf
    from bench.core import make_params, profile_shapes
    dev = torch.device(device)
    rows = []
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}
    for prof in profiles:
        cuda = dev.type == "cuda"
        total = int((params or (1e9 if cuda else 2e5)) if prof == "llm" else (5.4e6 if cuda else 2e5))
        shapes = profile_shapes(prof, total)
        for dname in dtypes:
            ps = make_params(shapes, dev, dt[dname])
            for rule in rules:
                cls_name, kw = STEP_RULES[rule]
                runs = [(b, "native") for b in backends if b == "torch"] + \
                    [(b, lay) for lay in layouts for b in backends if b != "torch"
                     and dt[dname] in mf.layouts.get_layout(lay).param_dtypes]
                for backend, layout in runs:  # each run a fresh optimizer (its own state) on the same params
                    try:
                        row = _time_one(dev, ps, rule, cls_name, kw, backend, layout, iters)
                    except Exception as e:  # a backend not available here, or a run that failed: the next goes on
                        row = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                        if dev.type == "cuda":
                            torch.cuda.synchronize()
                    row = {"profile": prof, "dtype": dname, "rule": rule, "backend": backend, "layout": layout,
                           **row}
                    rows.append(row)
                    if emit is not None:
                        emit(row)
            del ps
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _time_one(dev, ps, rule, cls_name, kw, backend, layout, iters) -> dict:
    """One run of ``time_steps``: a fresh optimizer on ``ps``, 3 warmup steps, ``iters`` timed ones, 5 profiled."""
    import statistics
    import time

    import torch

    import momentum_fused as mf
    opt = _torch_opt(rule, ps) if backend == "torch" else getattr(mf, cls_name)(ps, backend=backend, layout=layout,
                                                                             **kw)
    try:
        for _ in range(3):
            opt.step()
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        sync()
        step, host = [], []
        for _ in range(iters):
            if dev.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
            t0 = time.perf_counter()
            opt.step()
            host.append((time.perf_counter() - t0) * 1e3)
            if dev.type == "cuda":
                b.record()
                b.synchronize()
                step.append(a.elapsed_time(b))
            else:
                step.append(host[-1])
            sync()
        row = {"tensors": len(ps), "elements": sum(p.numel() for p in ps),
               "step_ms": statistics.median(step), "host_ms": statistics.median(host)}
        if mf.layouts.get_layout(layout).int8 and backend != "torch":  # (the rest keeps fp32 state)
            row["quantized_elements"] = sum(p.numel() for p in ps if mf.layouts.int8_quantized(p))
        if dev.type == "cuda":
            from torch.profiler import ProfilerActivity, profile
            n = 5
            with profile(activities=[ProfilerActivity.CUDA]) as pr:
                for _ in range(n):
                    opt.step()
                sync()
            kernels = [e for e in pr.events() if e.device_type == torch.autograd.DeviceType.CUDA
                       and not e.name.startswith(("Memcpy", "Memset"))]
            row["kernel_ms"] = sum(e.device_time for e in kernels) / 1e3 / n
            row["launches"] = len(kernels) / n
            row["kernels"] = sorted({e.name[:60] for e in kernels})
        return row
    finally:
        del opt


# --------------------------------------------------------------------------------------------------- CLI
COLUMNS = ["backend", "kernel", "path", "rule", "flags", "layout", "registers", "stack_bytes", "spill_bytes",
           "v4_loads", "v4_stores", "loads", "stores", "instructions_per_element"]


def table(rows: list[dict]) -> str:
    head = ["backend", "kernel", "path", "rule", "f", "layout", "regs", "stack", "spill", "ld128", "st128", "ld",
            "st", "insn/elem"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in COLUMNS) + " |")
    return "\n".join(lines)


def _key(r):
    return (r["backend"], r["kernel"], r.get("path"), r["rule"], r["flags"], r["layout"])


def summary(rows: list[dict]) -> str:
    """Per backend, kernel path and layout: the worst registers / stack / spills, the fewest 128-bit loads, and
    AdamW's (adam, flags 1) and SGD momentum's (sgd, flags 1) instructions per element."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["backend"], r.get("path"), r["layout"]), []).append(r)
    lines = ["| backend | path | layout | kernels | max regs | max stack B | max spill B | min ld128 | min st128 | "
             "AdamW insn/elem | SGD-mom insn/elem |", "|" + "---|" * 11]
    for (b, path, lay), rs in groups.items():
        ipe = {name: next((x.get("instructions_per_element") for x in rs if (x["rule"], x["flags"]) == rf), None)
               for name, rf in (("adamw", ("adam", 1)), ("sgdm", ("sgd", 1)))}
        lines.append(f"| {b} | {path} | {lay} | {len(rs)} | {max(x['registers'] for x in rs)} | "
                     f"{max(x['stack_bytes'] for x in rs)} | {max(x['spill_bytes'] for x in rs)} | "
                     f"{min(x['v4_loads'] for x in rs)} | {min(x['v4_stores'] for x in rs)} | {ipe['adamw']} | "
                     f"{ipe['sgdm']} |")
    return "\n".join(lines)


def compare(before: list[dict], after: list[dict]) -> str:
    """Side by side, per (backend, rule, flags, layout): before -> after of registers, stack, spills, 128-bit
    loads/stores and instructions per element (the kernels that run: CUDA's, Triton's mixed kernel before and
    its full-block path after)."""
    def pick(rows):
        out = {}
        for r in rows:
            if r["backend"] == "triton" and r.get("path") not in ("mixed", "full"):
                continue
            out.setdefault((r["backend"], r["rule"], r["flags"], r["layout"]), r)
        return out
    b, a = pick(before), pick(after)
    lines = ["| backend | rule | flags | layout | regs | stack B | spill B | ld128 | st128 | insn/elem |",
             "|" + "---|" * 10]
    for k in sorted(set(b) | set(a), key=lambda k: (k[0], k[1], k[2], list(LAYOUTS).index(k[3]))):
        x, y = b.get(k, {}), a.get(k, {})
        cell = lambda f: f"{x.get(f, '-')} → {y.get(f, '-')}"  # noqa: E731
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {cell('registers')} | {cell('stack_bytes')} | "
                     f"{cell('spill_bytes')} | {cell('v4_loads')} | {cell('v4_stores')} | "
                     f"{cell('instructions_per_element')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.kernel_report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="sm_90", help="target (sm_90: H100/H200)")
    ap.add_argument("--json", action="store_true", help="print a JSON list instead of the table")
    ap.add_argument("--backend", default="cuda,triton", help="cuda, triton or both (default)")
    ap.add_argument("--rules", default="", help="comma-separated rule names (default: all)")
    ap.add_argument("--layouts", default="", help=f"comma-separated layouts (default: all): {','.join(LAYOUTS)}")
    ap.add_argument("--flags", default="all", choices=["all", "fp32"],
                    help="Triton: every flag value in every layout (all), or only in native-fp32 (fp32)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="parallel Triton compiles")
    ap.add_argument("--out", default="", help="also write the JSON list to this file")
    ap.add_argument("--summary", metavar="JSON", help="print the per-layout summary of a saved report and exit")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="two saved reports side by side")
    ap.add_argument("--time", action="store_true",
                    help="time optimizer steps on --device instead (step, host and kernel time; needs a GPU, or "
                         "--device cpu for a dry run)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--profiles", default="llm,tiny")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--step-rules", default="adamw,sgd_momentum")
    ap.add_argument("--step-backends", default=None,
                    help="default cuda,triton,torch (--device cpu: cpu,torch)")
    ap.add_argument("--step-layouts", default="native",
                    help="dtype layouts of the momentum_fused backends (e.g. native,master16,int8_state)")
    ap.add_argument("--params", type=float, default=None,
                    help="--time: the llm profile's elements (default 1e9 on CUDA, 2e5 on --device cpu)")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args(argv)
    if args.time and args.device.startswith("cuda") and not __import__("torch").cuda.is_available():
        ap.error("--time on --device cuda needs a CUDA device (none visible here); --device cpu times the "
                 "kernels on the CPU")  # (a CUDA-generator traceback before)
    if args.time:
        done = []

        def emit(r):  # each row when measured: a run cut by a timeout keeps the rows before it
            done.append(r)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(done, indent=1) + "\n")

        rows = time_steps(args.device, args.step_rules.split(","), args.dtypes.split(","), args.profiles.split(","),
                          args.params, (args.step_backends or ("cuda,triton,torch" if args.device.startswith("cuda")
                                                               else "cpu,torch")).split(","),
                          args.iters, args.step_layouts.split(","), emit)
        return 1 if any("error" in r for r in rows) else 0
    if args.summary:
        print(summary(json.loads(Path(args.summary).read_text())))
        return 0
    if args.compare:
        print(compare(*(json.loads(Path(f).read_text()) for f in args.compare)))
        return 0
    rules = [r for r in args.rules.split(",") if r] or None
    layouts = [x for x in args.layouts.split(",") if x] or None
    # kernel rule ids (AdamW is rule "adam" with its decoupled flag): an unknown name would give an empty report
    alias = {"adamw": "adam", "sgd_momentum": "sgd", "amsgrad": "adam", "muon": "muon_momentum,muon_apply"}
    bad = [r for r in rules or () if r not in RULE_FLAGS and r not in alias]
    if bad:
        ap.error(f"--rules: unknown {bad}; kernel rules: {','.join(RULE_FLAGS)} (aliases: "
                 + ", ".join(f"{k} -> {v}" for k, v in alias.items()) + ")")
    if rules:
        rules = list(dict.fromkeys(x for r in rules for x in alias.get(r, r).split(",")))
    bad = [x for x in layouts or () if x not in LAYOUTS and x not in INT8_LAYOUTS]
    if bad:
        ap.error(f"--layouts: unknown {bad}; layouts: {','.join([*LAYOUTS, *INT8_LAYOUTS])}")
    rows, notes = [], []
    backends = args.backend.split(",")
    if "cuda" in backends:
        try:
            rows += cuda_report(args.arch, rules, layouts)
        except FileNotFoundError as e:
            notes.append(f"cuda: skipped ({e})")
    if "triton" in backends:
        try:
            rows += triton_report(args.arch, rules, layouts, args.flags, args.jobs)
        except ImportError as e:
            notes.append(f"triton: skipped ({e})")
    for r in rows:
        r.pop("symbol", None) if args.json else None
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(table(rows))
    for n in notes:
        print(n, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
