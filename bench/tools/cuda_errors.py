"""Diagnostic for the crash of the CUDA op's argument errors (device_check.sh, phase cuda-errors): runs each bad
argument of tests/test_cuda_backend.py's ``_bad_arguments_body`` in its own process, through both entries (the
eager ``_C_cuda.cuda_step`` and ``torch.ops.momentum_fused.cuda_step``), with bench/tools/segv_backtrace.c
preloaded (argv[1]: the built .so), and prints one line per case (exit status, the error or the first lines of
the native stack, symbolized with addr2line where the frame has no symbol).

    python3 bench/tools/cuda_errors.py /tmp/segv_backtrace.so [CASES]"""
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N_CASES = 13


def child(entry, i, preload):
    code = (f"import sys; sys.path.insert(0, {os.path.join(ROOT, 'tests')!r}); import test_cuda_backend as t; "
            f"t.{entry}(only={i}); print('OK')")
    env = dict(os.environ, LD_PRELOAD=preload) if preload else dict(os.environ)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    return entry, i, res


def symbolize(text):
    out = []
    a2l = shutil.which("addr2line")
    for line in text.splitlines():
        m = re.match(r"(\S+\.so[^\s(]*)\(\+(0x[0-9a-f]+)\)", line)
        if m and a2l and "momentum_fused" in m.group(1):
            r = subprocess.run([a2l, "-Cfpe", m.group(1), m.group(2)], capture_output=True, text=True)
            line += "  => " + r.stdout.strip()
        out.append(line)
    text = "\n".join(out)
    cf = shutil.which("c++filt")
    return subprocess.run([cf], input=text, capture_output=True, text=True).stdout if cf else text


def main():
    preload = sys.argv[1] if len(sys.argv) > 1 else ""
    cases = [int(x) for x in sys.argv[2].split(",")] if len(sys.argv) > 2 else range(N_CASES)
    jobs = [(e, i) for e in ("_bad_arguments_eager_entry", "_bad_arguments_registered_op") for i in cases]
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        results = list(ex.map(lambda a: child(*a, preload), jobs))
    first_crash = None
    for entry, i, res in results:
        ok = res.returncode == 0 and "OK" in res.stdout
        tail = (res.stderr.strip().splitlines() or [""])[-1][:160]
        print(f"{entry} case {i}: rc={res.returncode} {'ok' if ok else 'FAILED'} {'' if ok else tail}")
        if res.returncode < 0 and first_crash is None:
            first_crash = (entry, i, res)
    if first_crash:
        entry, i, res = first_crash
        print(f"\n== native stack of {entry} case {i} ==")
        print(symbolize(res.stderr)[-6000:])


if __name__ == "__main__":
    main()
