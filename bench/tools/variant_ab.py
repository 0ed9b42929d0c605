"""One process of an A/B between two CPU kernel variants (or builds): for each case, our step and torch's best
correct step on the same sizes (16M elements, 4 tensors), interleaved step by step, median of --steps; prints our
median, torch's and their ratio per case. Run it alternately under each variant, e.g. (docs/csrc.md):

    for i in 1 2 3; do for v in avx512 avx512w; do
        MOMENTUM_FUSED_CPU_ISA=$v python bench/tools/variant_ab.py; done; done

A case is rule:dtype:layout (rules sgd, sgdm, nesterov, adamw, rmsprop, lion; dtypes bf16, fp16, fp32). torch's
step is the same rule in the param dtype (fused where torch has it and it is right here, else foreach:
bench/rules.py torch_update_error; Lion: torch's SGD momentum foreach, as a yardstick only), in fp32 for the
layouts whose params are fp32. Not a test: times move with the machine; compare the processes of one session."""
import argparse
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # the checkout: bench.rules
import momentum_fused as mf  # noqa: E402
from bench.rules import _torch_variant_ok, torch_update_error  # noqa: E402

CASES = ("sgd:bf16:native,sgdm:bf16:native,nesterov:bf16:native,adamw:bf16:native,rmsprop:bf16:native,"
         "lion:bf16:native,adamw:fp16:native,sgdm:fp16:native,adamw:fp32:bf16_state,adamw:bf16:master,"
         "adamw:bf16:master16,adamw:fp32:int8_state,adamw:bf16:master16_int8,adamw:bf16:bf16_sr")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OURS = {"sgd": (mf.SGD, dict(lr=1e-3)), "sgdm": (mf.SGD, dict(lr=1e-3, momentum=0.9)),
        "nesterov": (mf.SGD, dict(lr=1e-3, momentum=0.9, nesterov=True)), "adamw": (mf.AdamW, dict(lr=1e-3)),
        "rmsprop": (mf.RMSprop, dict(lr=1e-3)), "lion": (mf.Lion, dict(lr=1e-4))}
TORCH = {"sgd": (torch.optim.SGD, dict(lr=1e-3)), "sgdm": (torch.optim.SGD, dict(lr=1e-3, momentum=0.9)),
         "nesterov": (torch.optim.SGD, dict(lr=1e-3, momentum=0.9, nesterov=True)),
         "adamw": (torch.optim.AdamW, dict(lr=1e-3)), "rmsprop": (torch.optim.RMSprop, dict(lr=1e-3)),
         "lion": (torch.optim.SGD, dict(lr=1e-3, momentum=0.9))}


def params(dtype, n=16_000_000, k=4):
    ps = [torch.randn(n // k).to(dtype).requires_grad_() for _ in range(k)]
    for p in ps:
        p.grad = torch.randn(n // k).to(dtype)
    return ps


def torch_step(rule, dtype):
    cls, kw = TORCH[rule]
    if _torch_variant_ok(cls, "fused") and \
            torch_update_error(cls, dict(kw, fused=True), torch.device("cpu"), dtype) <= 0.1:
        return cls, dict(kw, fused=True), "fused"
    return cls, dict(kw, foreach=True), "foreach"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cases", nargs="?", default=CASES)
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    out = []
    for case in a.cases.split(","):
        rule, dn, lay = case.split(":")
        dt = DTYPES[dn]
        cls, kw = OURS[rule]
        ours = cls(params(dt), **kw, **({} if lay == "native" else dict(layout=lay)))
        tdt = torch.float32 if lay in ("int8_state", "bf16_state") else dt
        tcls, tkw, how = torch_step(rule, tdt)
        theirs = tcls(params(tdt), **tkw)
        for _ in range(3):
            ours.step()
            theirs.step()
        ta, tb = [], []
        for _ in range(a.steps):
            t = time.perf_counter()
            ours.step()
            ta.append(time.perf_counter() - t)
            t = time.perf_counter()
            theirs.step()
            tb.append(time.perf_counter() - t)
        ta.sort()
        tb.sort()
        m = len(ta) // 2
        out.append(f"{case} {ta[m] * 1e3:.2f}/{tb[m] * 1e3:.2f} ({how}) {tb[m] / ta[m]:.2f}")
        del ours, theirs
    print(torch.ops.momentum_fused.cpu_isa(), torch.get_num_threads(), "threads | " + " | ".join(out), flush=True)


if __name__ == "__main__":
    main()
