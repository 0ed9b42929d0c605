import statistics, time, torch
torch.set_num_threads(1)

def count_plans(opt):
    """wrap opt._plan on the instance; returns a dict counter"""
    c = {"n": 0}
    orig = opt._plan
    def wrapped(*a, **k):
        c["n"] += 1
        return orig(*a, **k)
    opt._plan = wrapped
    return c

def compare(variants, rounds=9, iters=50, warm=5):
    """variants: dict name -> zero-arg step callable. Interleaved rounds; returns name -> median ms/step."""
    for f in variants.values():
        for _ in range(warm):
            f()
    res = {k: [] for k in variants}
    for r in range(rounds):
        for k, f in variants.items():
            t = time.perf_counter()
            for _ in range(iters):
                f()
            res[k].append((time.perf_counter() - t) / iters * 1e3)
    return {k: statistics.median(v) for k, v in res.items()}, res

def report(title, med, base):
    print(f"== {title}")
    for k, v in med.items():
        print(f"  {k:40s} {v:8.4f} ms   ratio vs {base}: {v/med[base]:.2f}")
