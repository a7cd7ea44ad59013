"""A fusedopt.torch class against torch.optim's (fused=True where torch has a fused kernel, and
foreach=True), same process; AdamW unless --optimizer names another class both have. The
schedule-free classes (--optimizer AdamWScheduleFree, SGDScheduleFree) run against the
schedulefree package's (foreach, its default), both in train mode.

Two measurements, each a median of steps, the optimizers interleaved round by round so that a
noisy shared machine slows them alike (compare the ratios, docs/benchmarks.md):

- overhead: the GPT-2-small param list (148 tensors) with one element each: the step's fixed
  cost per call (Python, argument handling, dispatch), the arithmetic being negligible;
- gpt2: the same list at full size (124M elements), and
- 2^26: one tensor of 2^26 float32 elements (the C++ benchmark's size), and the same as one
  8192x8192 matrix (Adafactor factors matrices: its own path).

    python bench/python/torch_optim_bench.py [--device cpu|cuda] [--rounds 3] [--optimizer NAdam]

Needs the fusedopt package (pip install .) and torch.
"""

import argparse
import statistics
import time

import torch

import fusedopt.torch as ft


def gpt2_shapes():
    shapes = [(50257, 768), (1024, 768)]
    for _ in range(12):
        shapes += [(768,), (768,), (768, 2304), (2304,), (768, 768), (768,), (768,), (768,),
                   (768, 3072), (3072,), (3072, 768), (768,)]
    return shapes + [(768,), (768,)]


CASES = {
    "overhead": [(1,)] * 148,
    "gpt2": gpt2_shapes(),
    "2^26": [(1 << 26,)],
    "8192x8192": [(8192, 8192)],  # 2^26 as a matrix: Adafactor's factored path
}
TORCH_FUSED = ("Adam", "AdamW", "SGD", "Adagrad")  # torch 2.15's classes with fused=True


def optimizers(name):
    """The contenders for class `name`: fusedopt's first (the baseline of the ratios)."""
    if name.endswith("ScheduleFree"):  # the peer is facebookresearch/schedule_free's
        import schedulefree

        def training(cls, **kwargs):
            def make(ps):
                opt = cls(ps, **kwargs)
                opt.train()  # both start in eval mode, as the package's
                return opt
            return make
        return {f"fusedopt.torch.{name}": training(getattr(ft, name)),
                f"schedulefree {name}(foreach=True)": training(getattr(schedulefree, name),
                                                               foreach=True)}
    ours, theirs = getattr(ft, name), getattr(torch.optim, name)
    out = {f"fusedopt.torch.{name}": lambda ps: ours(ps)}
    if name in TORCH_FUSED:
        out[f"torch {name}(fused=True)"] = lambda ps: theirs(ps, fused=True)
    out[f"torch {name}(foreach=True)"] = lambda ps: theirs(ps, foreach=True)
    return out


def timed_steps(opt, steps, device):
    times = []
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--optimizer", default="AdamW")
    args = ap.parse_args()
    contenders = optimizers(args.optimizer)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    assert len(CASES["overhead"]) == 148 and len(CASES["gpt2"]) == 148
    for case, shapes in CASES.items():
        steps = 200 if case == "overhead" else 5
        runs = {}
        for name, make in contenders.items():  # state created once, outside the timing
            params = [torch.nn.Parameter(torch.randn(s, device=args.device)) for s in shapes]
            for p in params:
                p.grad = torch.randn_like(p)
            opt = make(params)
            opt.step()
            runs[name] = opt
        medians = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, opt in runs.items():
                medians[name].append(timed_steps(opt, steps, args.device))
        base = statistics.median(medians[f"fusedopt.torch.{args.optimizer}"])
        print(f"\n{case}: {len(shapes)} tensors, {sum(torch.Size(s).numel() for s in shapes)} "
              f"elements; median of {args.rounds} rounds x {steps} steps")
        for name, m in medians.items():
            t = statistics.median(m)
            unit, scale = ("us", 1e6) if case == "overhead" else ("ms", 1e3)
            print(f"  {name:28s} {t * scale:10.1f} {unit}/step  ({t / base:5.2f}x fusedopt)  "
                  f"rounds: {', '.join(f'{x * scale:.1f}' for x in m)}")
        del runs


if __name__ == "__main__":
    main()
