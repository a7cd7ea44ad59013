#!/usr/bin/env python3
"""fusedopt's CPU Adam against torch.optim.Adam(fused=True) on the CPU, in one process.

    python3 bench/torch_cpu_compare.py [--lib build/shared/host/libfusedopt.so] [--reps 15]

Both step their own float32 param of n elements (2^20 and 2^26) with the same gradient, Adam
with torch's defaults, on the same number of threads (torch.set_num_threads and OpenMP's
OMP_NUM_THREADS, both from --threads, default: the cores). After 3 warm-up steps the two are
timed alternately, one step each, the order swapped every repetition so that neither always
runs on a cache the other warmed or dirtied; the medians are reported, with GB/s of the
minimal traffic (param, exp_avg, exp_avg_sq read and written, grad read: 28 bytes per
element) and x = torch ms / fusedopt ms (above 1: fusedopt is faster).

This machine is shared and noisy: compare the ratio, not the absolute times, and take
several runs. fusedopt is loaded through its C ABI (ctypes), so a step also pays a ctypes
call (microseconds; visible at small n only).
"""

import argparse
import ctypes
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lib", default=os.path.join(ROOT, "build", "shared", "host",
                                                  "libfusedopt.so"))
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--sizes", default="20,26", help="log2 of the element counts")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before the library's OpenMP starts
    import torch  # noqa: E402  (after OMP_NUM_THREADS)
    torch.set_num_threads(args.threads)

    lib = ctypes.CDLL(args.lib)
    vp = ctypes.c_void_p
    lib.fo_optimizer_create.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int,
                                        ctypes.POINTER(vp)]
    lib.fo_optimizer_add_param.argtypes = [vp, ctypes.c_char_p, vp, ctypes.c_int, ctypes.c_int,
                                           ctypes.POINTER(ctypes.c_int64)]
    lib.fo_optimizer_step.argtypes = [vp, ctypes.POINTER(vp), vp]
    lib.fo_optimizer_destroy.argtypes = [vp]
    lib.fo_last_error.restype = ctypes.c_char_p

    def ok(status):
        if status != 0:
            sys.exit("fusedopt: " + lib.fo_last_error().decode())

    print(f"torch {torch.__version__}, {args.threads} threads, {args.reps} timed steps each")
    print(f"{'n':>10} {'torch ms':>9} {'fo ms':>8} {'torch GB/s':>10} {'fo GB/s':>8} {'x':>6}")
    for lg in (int(s) for s in args.sizes.split(",")):
        n = 1 << lg
        gen = torch.Generator().manual_seed(lg)
        p0 = torch.randn(n, generator=gen)
        grad = torch.randn(n, generator=gen)
        tp = torch.nn.Parameter(p0.clone())
        tp.grad = grad
        topt = torch.optim.Adam([tp], fused=True)
        fp = p0.clone()
        handle = vp()
        ok(lib.fo_optimizer_create(b"adam", 0, 0, ctypes.byref(handle)))
        shape = (ctypes.c_int64 * 1)(n)
        ok(lib.fo_optimizer_add_param(handle, b"p", fp.data_ptr(), 0, 1, shape))
        grads = (vp * 1)(grad.data_ptr())

        def torch_step():
            topt.step()

        def fo_step():
            ok(lib.fo_optimizer_step(handle, grads, None))

        for _ in range(3):
            torch_step()
            fo_step()
        t_ms, f_ms = [], []
        for r in range(args.reps):
            order = (torch_step, fo_step) if r % 2 == 0 else (fo_step, torch_step)
            for fn in order:
                t0 = time.perf_counter()
                fn()
                dt = (time.perf_counter() - t0) * 1e3
                (t_ms if fn is torch_step else f_ms).append(dt)
        lib.fo_optimizer_destroy(handle)
        tm, fm = statistics.median(t_ms), statistics.median(f_ms)
        gb = 28.0 * n / 1e9
        print(f"{n:>10} {tm:>9.2f} {fm:>8.2f} {gb / tm * 1e3:>10.1f} {gb / fm * 1e3:>8.1f} "
              f"{tm / fm:>6.2f}")


if __name__ == "__main__":
    main()
