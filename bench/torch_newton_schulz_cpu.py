#!/usr/bin/env python3
"""torch's Newton-Schulz iteration (torch.optim.Muon, torch 2.15) on the CPU, for comparison
with bench/newton_schulz_bench.cpp on the same machine.

    python3 bench/torch_newton_schulz_cpu.py [--threads 2] [--reps 7]

For GPT-2 small's hidden matrices (768x768, 768x3072, 3072x768, 768x2304) it times
  bf16: torch.optim._muon._zeropower_via_newtonschulz itself (it casts to bfloat16), and
  f32:  the same loop written here in float32 (X @ X.T, addmm), which torch's function does
        not offer,
5 steps with torch's default coefficients; median of --reps calls after 2 warm-up calls, and
GFLOP/s of the same useful work as the C++ benchmark counts (per step 4 m^2 n + 2 m^3).

It also prints the accuracy of each against float64 (the same loop in double) on the tests'
shapes: max |x - ref| / max |ref|, the figure tests/newton_schulz_test.cpp's bf16 tolerance
is set from.
"""

import argparse
import statistics
import time

import torch
from torch.optim._muon import (DEFAULT_A, DEFAULT_B, DEFAULT_C, DEFAULT_NS_STEPS, EPS,
                               _zeropower_via_newtonschulz)

COEFFS = (DEFAULT_A, DEFAULT_B, DEFAULT_C)


def ns_same_dtype(g, steps=DEFAULT_NS_STEPS, eps=EPS):
    """torch's loop, in g's own dtype (float32 or float64)."""
    a, b, c = COEFFS
    x = g.clone()
    if g.size(0) > g.size(1):
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        upd = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, upd, x, beta=a)
    if g.size(0) > g.size(1):
        x = x.T
    return x


def flops(rows, cols, steps=DEFAULT_NS_STEPS):
    m, n = min(rows, cols), max(rows, cols)
    return steps * (4.0 * m * m * n + 2.0 * m * m * m)


def timed(fn, reps):
    for _ in range(2):
        fn()
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return statistics.median(t)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")

    print("accuracy against float64 (max |x - ref| / max |ref|), tests' shapes:")
    gen = torch.Generator().manual_seed(0)
    for rows, cols in [(64, 64), (64, 160), (160, 64), (1, 37), (37, 1), (48, 80), (33, 17)]:
        worst = {"bf16": 0.0, "f32": 0.0}
        for _ in range(20):
            g = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
            g = g.to(torch.bfloat16).to(torch.float64)  # the bf16 input, exactly
            ref = ns_same_dtype(g)
            scale = ref.abs().max().item()
            bf = _zeropower_via_newtonschulz(g.float(), COEFFS, DEFAULT_NS_STEPS, EPS).double()
            f32 = ns_same_dtype(g.float()).double()
            worst["bf16"] = max(worst["bf16"], (bf - ref).abs().max().item() / scale)
            worst["f32"] = max(worst["f32"], (f32 - ref).abs().max().item() / scale)
        print(f"  {rows}x{cols}: bf16 {worst['bf16']:.3g}, f32 {worst['f32']:.3g}")

    print("time (median of reps), 5 steps:")
    print("| shape | torch bf16 ms | GFLOP/s | torch f32 ms | GFLOP/s |")
    print("|---|---|---|---|---|")
    for rows, cols in [(768, 768), (768, 3072), (3072, 768), (768, 2304)]:
        g = torch.randn(rows, cols, generator=gen)
        tb = timed(lambda: _zeropower_via_newtonschulz(g, COEFFS, DEFAULT_NS_STEPS, EPS), args.reps)
        tf = timed(lambda: ns_same_dtype(g), args.reps)
        f = flops(rows, cols)
        print(f"| {rows}x{cols} | {tb * 1e3:.1f} | {f / tb / 1e9:.1f} | {tf * 1e3:.1f} | "
              f"{f / tf / 1e9:.1f} |")


if __name__ == "__main__":
    main()
