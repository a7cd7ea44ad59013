"""CPU step time of fusedopt.torch.Muon against torch.optim.Muon (torch 2.15), same process.

One optimizer step of one float32 matrix per case, GPT-2 small's hidden matrices: 768 x 768
(attention out), 768 x 3072 (MLP in), 3072 x 768 (MLP out: transposed inside the iteration),
768 x 2304 (fused QKV). Contenders, interleaved step by step so that a noisy shared machine
slows them alike (compare ratios within a run, docs/benchmarks.md):

- fusedopt.torch.Muon: float32 iteration (OpenBLAS), momentum and update fused passes;
- torch.optim.Muon: its own code, which iterates in bfloat16 (oneDNN; AMX-BF16 where the CPU
  has it);
- torch.optim.Muon, float32: the same with torch.optim._muon._zeropower_via_newtonschulz
  replaced by the same loop in float32 (fusedopt's precision).

    OPENBLAS_NUM_THREADS=2 python bench/python/muon_cpu_bench.py [--threads 2] [--steps 7]

Reports the median of --steps timed steps after 2 warm-up steps, per contender and shape.
Needs the fusedopt package (pip install .) and torch.
"""

import argparse
import statistics
import time

import torch
import torch.optim._muon as torch_muon

import fusedopt.torch as ft

SHAPES = [(768, 768), (768, 3072), (3072, 768), (768, 2304)]
_BF16 = torch_muon._zeropower_via_newtonschulz


def _zeropower_f32(grad, ns_coefficients, ns_steps, eps):
    a, b, c = ns_coefficients
    x = grad.to(dtype=torch.float32, copy=True)
    if grad.size(0) > grad.size(1):
        x = x.T
    x.div_(x.norm().clamp(min=eps))
    for _ in range(ns_steps):
        gram = x @ x.T
        update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, update, x, beta=a)
    if grad.size(0) > grad.size(1):
        x = x.T
    return x


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads; median of {args.steps} steps (ms)")
    print("| shape | fusedopt f32 | torch bf16 | torch f32 | torch bf16 / fusedopt |"
          " torch f32 / fusedopt |")
    print("|---|---:|---:|---:|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        w = torch.randn(shape, generator=gen) * 0.02
        contenders = {
            "fusedopt": (ft.Muon, _BF16),
            "torch bf16": (torch.optim.Muon, _BF16),
            "torch f32": (torch.optim.Muon, _zeropower_f32),
        }
        params, opts = {}, {}
        for name, (cls, _) in contenders.items():
            params[name] = w.clone().requires_grad_()
            opts[name] = cls([params[name]], lr=0.02)
        times = {name: [] for name in contenders}
        for step in range(args.steps + 2):
            g = torch.randn(shape, generator=gen)
            for name, (_, ns) in contenders.items():
                torch_muon._zeropower_via_newtonschulz = ns
                params[name].grad = g
                start = time.perf_counter()
                opts[name].step()
                elapsed = time.perf_counter() - start
                if step >= 2:
                    times[name].append(elapsed * 1e3)
        torch_muon._zeropower_via_newtonschulz = _BF16
        med = {name: statistics.median(t) for name, t in times.items()}
        print(f"| {shape[0]} x {shape[1]} | {med['fusedopt']:.1f} | {med['torch bf16']:.1f} | "
              f"{med['torch f32']:.1f} | {med['torch bf16'] / med['fusedopt']:.2f} | "
              f"{med['torch f32'] / med['fusedopt']:.2f} |")


if __name__ == "__main__":
    main()
