#!/usr/bin/env python3
"""fusedopt against torch.optim on a CUDA GPU: step time, achieved bandwidth, agreement.

    python3 bench/torch_compare.py --lib build/gpu-shared/host/libfusedopt.so \
        --out torch_compare.json

Loads the fusedopt shared library (a BUILD_SHARED_LIBS=ON build with CUDA) through its C ABI
(fusedopt/fusedopt.h) with ctypes, and times one optimizer step of fusedopt and of
torch.optim's Adam, AdamW, SGD (momentum 0.9) and Adagrad, each with fused=True and with
foreach=True (a combination PyTorch rejects is skipped, with its reason), on:

  flat28  one float32 tensor of 2^28 elements
  flat24  one float32 tensor of 2^24 elements
  gpt2    GPT-2 small's parameter list (124M params in 148 tensors)

Timing: each library steps its own copy of the params (same initial values, the same
gradients, random normal); 3 warm-up steps (which also create the optimizer state), then 20
steps, each between two torch.cuda.Events on the current stream, recorded back to back
(the steady state of a training loop: host overhead shows when it exceeds the GPU time);
the median is reported. GB/s counts the minimal traffic of a step: 4 bytes for each stream
per element, 7 streams for adam/adamw (param, exp_avg, exp_avg_sq read and written, grad
read), 5 for sgd with momentum and for adagrad.

Agreement: after the 3 warm-up steps from identical params and grads, the largest
|fusedopt param - torch param| over all elements, divided by the largest |torch param -
initial param| (how far the params moved): about 1e-6 when the two compute the same step
up to float32 rounding.

Needs torch with CUDA; numpy is not used.
"""

import argparse
import ctypes
import json
import math
import os
import statistics
import sys
import time

try:
    import torch  # imported before the library: its CUDA runtime is then shared with fusedopt
except ImportError as exc:  # pragma: no cover - reported to the caller
    sys.exit(f"torch_compare: PyTorch is required ({exc})")

# ----------------------------------------------------------------------------- the C ABI

FO_OK = 0
FO_STATUS_NAMES = {
    0: "FO_OK",
    1: "FO_INVALID_ARGUMENT",
    2: "FO_UNSUPPORTED",
    3: "FO_OUT_OF_MEMORY",
    4: "FO_DEVICE_ERROR",
    5: "FO_IO_ERROR",
    6: "FO_CORRUPT_DATA",
}
FO_FLOAT32 = 0  # fo_dtype
FO_DEVICE_CUDA = 1  # fo_device


class _FoOptimizer(ctypes.Structure):
    """struct fo_optimizer: opaque."""


FoOptimizerPtr = ctypes.POINTER(_FoOptimizer)

# Enums (fo_status, fo_dtype, fo_device) are C ints. Signatures exactly as in fusedopt.h.
_c_int = ctypes.c_int
_c_double = ctypes.c_double
_c_float = ctypes.c_float
_c_int64 = ctypes.c_int64
_c_char_p = ctypes.c_char_p
_c_void_p = ctypes.c_void_p
_P = ctypes.POINTER

_SIGNATURES = {
    # name: (restype, argtypes, first ABI version that has it)
    "fo_abi_version": (_c_int, [], 1),
    "fo_last_error": (_c_char_p, [], 1),
    "fo_cuda_device_count": (_c_int, [], 1),
    "fo_optimizer_create": (_c_int, [_c_char_p, _c_int, _c_int, _P(FoOptimizerPtr)], 1),
    "fo_optimizer_destroy": (None, [FoOptimizerPtr], 1),
    "fo_optimizer_set_option": (_c_int, [FoOptimizerPtr, _c_char_p, _c_double], 1),
    "fo_optimizer_get_option": (_c_int, [FoOptimizerPtr, _c_char_p, _P(_c_double)], 1),
    "fo_optimizer_add_param": (
        _c_int,
        [FoOptimizerPtr, _c_char_p, _c_void_p, _c_int, _c_int, _P(_c_int64)],
        1,
    ),
    "fo_optimizer_set_param_option": (
        _c_int,
        [FoOptimizerPtr, _c_char_p, _c_char_p, _c_double],
        1,
    ),
    "fo_optimizer_step": (_c_int, [FoOptimizerPtr, _P(_c_void_p), _c_void_p], 1),
    "fo_optimizer_step_sparse": (
        _c_int,
        [FoOptimizerPtr, _c_char_p, _c_void_p, _c_int, _c_int64, _c_void_p, _c_void_p],
        1,
    ),
    "fo_optimizer_get_state": (
        _c_int,
        [FoOptimizerPtr, _c_char_p, _c_char_p, _P(_c_float), _c_int64],
        1,
    ),
    "fo_optimizer_step_count": (_c_int, [FoOptimizerPtr, _c_char_p, _P(_c_int64)], 1),
    "fo_optimizer_save": (_c_int, [FoOptimizerPtr, _c_char_p], 1),
    "fo_optimizer_load": (_c_int, [FoOptimizerPtr, _c_char_p], 1),
    "fo_optimizer_set_device_scalars": (
        _c_int,
        [FoOptimizerPtr, _P(_c_float), _P(_c_float), _P(_c_float)],
        2,
    ),
    "fo_optimizer_grad_norm": (_c_int, [FoOptimizerPtr, _P(_c_float)], 2),
}


def load_fusedopt(path):
    lib = ctypes.CDLL(os.path.abspath(path))
    for name, (restype, argtypes, since) in _SIGNATURES.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            if since > 1:
                continue  # an ABI 1 library; this script uses none of the later additions
            raise RuntimeError(f"{path} does not export {name}: not a fusedopt library?")
        fn.restype = restype
        fn.argtypes = argtypes
    return lib


class FusedoptError(RuntimeError):
    pass


def _check(lib, status, what):
    if status != FO_OK:
        msg = lib.fo_last_error()
        msg = msg.decode(errors="replace") if msg else ""
        raise FusedoptError(f"{what}: {FO_STATUS_NAMES.get(status, status)}: {msg}")


class FusedOptimizer:
    """A fusedopt CUDA optimizer over torch tensors (contiguous float32 on one GPU)."""

    def __init__(self, lib, algorithm, options, names, params, device_index):
        self.lib = lib
        self.opt = FoOptimizerPtr()
        _check(
            lib,
            lib.fo_optimizer_create(
                algorithm.encode(), FO_DEVICE_CUDA, device_index, ctypes.byref(self.opt)
            ),
            f"fo_optimizer_create({algorithm!r})",
        )
        if not self.opt:
            raise FusedoptError("fo_optimizer_create returned no optimizer")
        try:
            for key, value in options.items():
                _check(
                    lib,
                    lib.fo_optimizer_set_option(self.opt, key.encode(), float(value)),
                    f"fo_optimizer_set_option({key!r}, {value})",
                )
                got = ctypes.c_double()
                _check(
                    lib,
                    lib.fo_optimizer_get_option(self.opt, key.encode(), ctypes.byref(got)),
                    f"fo_optimizer_get_option({key!r})",
                )
                if got.value != float(value):
                    raise FusedoptError(f"option {key}: set {value}, reads {got.value}")
            for name, p in zip(names, params):
                if not (p.is_cuda and p.dtype == torch.float32 and p.is_contiguous()):
                    raise ValueError(f"{name}: need a contiguous float32 CUDA tensor")
                shape = (ctypes.c_int64 * p.dim())(*p.shape)
                _check(
                    lib,
                    lib.fo_optimizer_add_param(
                        self.opt,
                        name.encode(),
                        ctypes.c_void_p(p.data_ptr()),
                        FO_FLOAT32,
                        p.dim(),
                        shape,
                    ),
                    f"fo_optimizer_add_param({name!r})",
                )
        except BaseException:
            self.close()
            raise
        self._grads = None
        self._grad_refs = None

    def set_grads(self, grads):
        self._grad_refs = list(grads)  # keeps the tensors (and so the pointers) alive
        self._grads = (ctypes.c_void_p * len(grads))(*[g.data_ptr() for g in grads])

    def step(self):
        stream = torch.cuda.current_stream().cuda_stream
        _check(
            self.lib,
            self.lib.fo_optimizer_step(self.opt, self._grads, ctypes.c_void_p(stream)),
            "fo_optimizer_step",
        )

    def close(self):
        if self.opt:
            torch.cuda.synchronize()
            self.lib.fo_optimizer_destroy(self.opt)
            self.opt = FoOptimizerPtr()


# -------------------------------------------------------------------------- the cases

def gpt2_small():
    """GPT-2 small (124M): (name, shape) in the order of its state dict."""
    d, ctx, vocab, layers = 768, 1024, 50257, 12
    out = [("wte.weight", (vocab, d)), ("wpe.weight", (ctx, d))]
    for i in range(layers):
        h = f"h.{i}."
        out += [
            (h + "ln_1.weight", (d,)),
            (h + "ln_1.bias", (d,)),
            (h + "attn.c_attn.weight", (d, 3 * d)),
            (h + "attn.c_attn.bias", (3 * d,)),
            (h + "attn.c_proj.weight", (d, d)),
            (h + "attn.c_proj.bias", (d,)),
            (h + "ln_2.weight", (d,)),
            (h + "ln_2.bias", (d,)),
            (h + "mlp.c_fc.weight", (d, 4 * d)),
            (h + "mlp.c_fc.bias", (4 * d,)),
            (h + "mlp.c_proj.weight", (4 * d, d)),
            (h + "mlp.c_proj.bias", (d,)),
        ]
    out += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
    return out


CASES = {
    "flat28": ("one tensor, 2^28 elements", lambda: [("w", (1 << 28,))]),
    "flat24": ("one tensor, 2^24 elements", lambda: [("w", (1 << 24,))]),
    "gpt2": ("GPT-2 small, 148 tensors", gpt2_small),
}

# The same hyperparameters for both libraries (fusedopt option key -> value; torch kwargs).
OPTIMIZERS = {
    "adam": {
        "torch": ("Adam", dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                               amsgrad=False, maximize=False)),
        "fusedopt": dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                         amsgrad=0, maximize=0),
        "streams": 7,
    },
    "adamw": {
        "torch": ("AdamW", dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                                amsgrad=False, maximize=False)),
        "fusedopt": dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2,
                         amsgrad=0, maximize=0),
        "streams": 7,
    },
    "sgd": {
        "torch": ("SGD", dict(lr=1e-2, momentum=0.9, dampening=0.0, weight_decay=0.0,
                              nesterov=False, maximize=False)),
        "fusedopt": dict(lr=1e-2, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=0,
                         maximize=0),
        "streams": 5,
    },
    "adagrad": {
        "torch": ("Adagrad", dict(lr=1e-2, lr_decay=0.0, weight_decay=0.0,
                                  initial_accumulator_value=0.0, eps=1e-10, maximize=False)),
        "fusedopt": dict(lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0,
                         eps=1e-10, maximize=0),
        "streams": 5,
    },
}

TORCH_VARIANTS = [("torch_fused", {"fused": True}), ("torch_foreach", {"foreach": True})]


# ------------------------------------------------------------------------------ timing

def time_steps(step, warmup, iters, after_warmup=None):
    """Median ms of `iters` steps after `warmup` steps; every step between two events."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    if after_warmup is not None:
        after_warmup()
        torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    stream = torch.cuda.current_stream()
    for i in range(iters):
        starts[i].record(stream)
        step()
        ends[i].record(stream)
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    return statistics.median(times), times


def max_abs_diff(xs, ys):
    m = 0.0
    for x, y in zip(xs, ys):
        d = float((x - y).abs().max().item()) if x.numel() else 0.0
        if math.isnan(d):
            return float("nan")
        m = max(m, d)
    return m


def free_cuda():
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def gbps(nbytes, ms):
    return nbytes / (ms * 1e-3) / 1e9 if ms and ms > 0 else float("nan")


def run_case(lib, case, opt_name, args, device_index):
    spec = OPTIMIZERS[opt_name]
    layout = CASES[case][1]()
    names = [n for n, _ in layout]
    numel = sum(math.prod(s) for _, s in layout)
    nbytes = spec["streams"] * 4 * numel
    res = {
        "case": case,
        "description": CASES[case][0],
        "optimizer": opt_name,
        "tensors": len(layout),
        "numel": numel,
        "bytes_per_step": nbytes,
        "streams": spec["streams"],
        "variants": {},
        "check": None,
    }

    gen = torch.Generator(device="cuda")
    gen.manual_seed(args.seed)
    dev = torch.device("cuda", device_index)
    # Initial params like a GPT-2 init (N(0, 0.02)), gradients N(0, 1); read-only below.
    p0 = [torch.randn(s, device=dev, generator=gen).mul_(0.02) for _, s in layout]
    grads = [torch.randn(s, device=dev, generator=gen) for _, s in layout]

    # fusedopt first: its params after the warm-up are the reference of the check.
    fo_after = None
    params = [p.clone() for p in p0]
    fo = None
    try:
        fo = FusedOptimizer(lib, opt_name, spec["fusedopt"], names, params, device_index)
        fo.set_grads(grads)

        def snapshot():
            nonlocal fo_after
            fo_after = [p.clone() for p in params]

        ms, times = time_steps(fo.step, args.warmup, args.iters, snapshot)
        res["variants"]["fusedopt"] = {"ms": ms, "GBps": gbps(nbytes, ms), "times_ms": times}
    except Exception as exc:  # reported, and the torch variants still run
        res["variants"]["fusedopt"] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"  fusedopt {opt_name} on {case}: ERROR {exc}", flush=True)
    finally:
        if fo is not None:
            fo.close()
        del params, fo
        free_cuda()

    cls_name, kwargs = spec["torch"]
    cls = getattr(torch.optim, cls_name)
    checks = {}
    for variant, flag in TORCH_VARIANTS:
        params = [torch.nn.Parameter(p.clone()) for p in p0]
        for p, g in zip(params, grads):
            p.grad = g
        opt = None
        try:
            try:
                opt = cls(params, **kwargs, **flag)
                opt.step()  # the first step may reject the combination (e.g. fused on CUDA)
            except Exception as exc:
                lines = str(exc).strip().splitlines()
                reason = f"{type(exc).__name__}: {lines[0] if lines else ''}"
                res["variants"][variant] = {"skipped": reason}
                flag_text = ", ".join(f"{k}=True" for k in flag)
                print(f"  torch.optim.{cls_name}({flag_text}) skipped: {reason}", flush=True)
                continue

            def compare():
                if fo_after is None:
                    return
                with torch.no_grad():
                    diff = max_abs_diff(params, fo_after)
                    change = max_abs_diff(params, p0)
                checks[variant] = {
                    "max_abs_diff": diff,
                    "max_abs_change": change,
                    "rel": diff / change if change > 0 else float("nan"),
                }

            ms, times = time_steps(opt.step, args.warmup - 1, args.iters, compare)
            entry = {"ms": ms, "GBps": gbps(nbytes, ms), "times_ms": times}
            fo_v = res["variants"].get("fusedopt", {})
            if "ms" in fo_v:
                entry["speedup_of_fusedopt"] = ms / fo_v["ms"]
            res["variants"][variant] = entry
        except Exception as exc:
            res["variants"][variant] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"  torch {variant} {opt_name} on {case}: ERROR {exc}", flush=True)
        finally:
            del opt, params
            free_cuda()

    # The check against torch's fused step, or its foreach step where fused is not available.
    for variant, _ in TORCH_VARIANTS:
        if variant in checks:
            res["check"] = dict(vs=variant, **checks[variant])
            break
    res["checks"] = checks
    del p0, grads, fo_after
    free_cuda()
    return res


# ------------------------------------------------------------------------------ output

def fmt(x, spec):
    return format(x, spec) if isinstance(x, (int, float)) and not math.isnan(x) else "-"


def table(results):
    head = (f"{'case':<7} {'optimizer':<9} | {'fusedopt':>8} {'GB/s':>6} | "
            f"{'t.fused':>8} {'GB/s':>6} {'x':>5} | {'t.foreach':>9} {'GB/s':>6} {'x':>5} | "
            f"{'rel diff':>8} {'vs':<7}")
    lines = ["fusedopt vs torch.optim (median ms per step; x = torch ms / fusedopt ms)", head,
             "-" * len(head)]
    for r in results:
        v = r["variants"]

        def cell(name, width):
            e = v.get(name, {})
            if "ms" not in e:
                tag = "skip" if "skipped" in e else ("err" if "error" in e else "-")
                return f"{tag:>{width}} {'':>6}"
            return f"{fmt(e['ms'], '.3f'):>{width}} {fmt(e['GBps'], '.0f'):>6}"

        def sp(name):
            return f"{fmt(v.get(name, {}).get('speedup_of_fusedopt', float('nan')), '.2f'):>5}"

        chk = r.get("check") or {}
        vs = {"torch_fused": "fused", "torch_foreach": "foreach"}.get(chk.get("vs"), "-")
        lines.append(
            f"{r['case']:<7} {r['optimizer']:<9} | {cell('fusedopt', 8)} | "
            f"{cell('torch_fused', 8)} {sp('torch_fused')} | "
            f"{cell('torch_foreach', 9)} {sp('torch_foreach')} | "
            f"{fmt(chk.get('rel', float('nan')), '.1e'):>8} {vs:<7}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lib", default="build/gpu-shared/host/libfusedopt.so",
                    help="the fusedopt shared library (built with CUDA)")
    ap.add_argument("--out", default="torch_compare.json", help="JSON results")
    ap.add_argument("--cases", default="flat28,flat24,gpt2",
                    help=f"comma-separated, from {','.join(CASES)}")
    ap.add_argument("--optimizers", default="adam,adamw,sgd,adagrad",
                    help=f"comma-separated, from {','.join(OPTIMIZERS)}")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up steps (>= 1)")
    ap.add_argument("--iters", type=int, default=20, help="timed steps")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    cases = [c for c in args.cases.split(",") if c]
    opts = [o for o in args.optimizers.split(",") if o]
    for c in cases:
        if c not in CASES:
            ap.error(f"unknown case {c!r}")
    for o in opts:
        if o not in OPTIMIZERS:
            ap.error(f"unknown optimizer {o!r}")
    if args.warmup < 1 or args.iters < 1:
        ap.error("--warmup and --iters must be >= 1")

    if not torch.cuda.is_available():
        sys.exit("torch_compare: torch sees no CUDA device")
    lib = load_fusedopt(args.lib)
    abi = lib.fo_abi_version()
    ngpu = lib.fo_cuda_device_count()
    if ngpu < 1:
        sys.exit(f"torch_compare: {args.lib} sees no CUDA device (built without CUDA?)")
    device_index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(device_index)
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), fusedopt ABI {abi}, "
          f"{props.name}, {props.total_memory / 2**30:.0f} GiB", flush=True)

    results = []
    t0 = time.time()
    for c in cases:
        for o in opts:
            print(f"{c} / {o} ...", flush=True)
            results.append(run_case(lib, c, o, args, device_index))

    out = {
        "device": props.name,
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "fusedopt_abi": abi,
        "warmup_steps": args.warmup,
        "timed_steps": args.iters,
        "timing": "median of per-step torch.cuda.Event times, steps recorded back to back",
        "bytes": "minimal traffic: 4 bytes x streams x numel "
                 "(adam/adamw 7, sgd with momentum 5, adagrad 5)",
        "check": "after the warm-up from identical params and grads: max |fusedopt - torch| "
                 "/ max |torch - initial|",
        "seconds": time.time() - t0,
        "results": results,
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1, allow_nan=True)
    print(table(results))
    failed = [f"{r['case']}/{r['optimizer']}/{k}" for r in results
              for k, v in r["variants"].items() if "error" in v]
    if failed:
        print(f"errors: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
