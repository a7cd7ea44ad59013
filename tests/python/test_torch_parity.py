"""fusedopt against torch.optim on the CPU, through the C ABI: same defaults, same steps.

Every fusedopt optimizer that torch.optim also has is stepped beside the torch class of the
same name from the same float32 params and gradients (fresh random values each run; the seed
is printed), for 30 steps and several option sets, and must agree:

- defaults: each option's default is torch's constructor default (betas split in two);
- params and every state of the same name (exp_avg, exp_avg_sq, max_exp_avg_sq, sum,
  square_avg, acc_delta, momentum_buffer, grad_avg, exp_inf, prev, step_size) after each step.

Tolerance: both compute the same float32 formula per element, but not always with the same
operation order or fused multiply-adds (torch's vectorized CPU kernels use FMA where
fusedopt does not, and the reverse), so results differ by a few float32 roundings per step,
compounding over steps: |fo - torch| <= 1e-5 * (|torch| + scale), scale being the largest
magnitude of that kind of tensor (the params, or one state) across the param list. A wrong constant, a missing bias correction or a decay applied in
the wrong place is off by orders of magnitude more. Rprop multiplies step sizes by a factor
chosen by the sign of g * prev; elements where that product is within 1e-30 of zero are
excluded (a last-bit difference can flip it legitimately), but not exact zeros.

Needs: torch (CPU is enough) and the shared fusedopt library, FUSEDOPT_LIB (default
build/shared/host/libfusedopt.so, from `cmake --preset shared && cmake --build --preset
shared`).
"""

import ctypes
import inspect
import os
import random

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIB_PATH = os.environ.get(
    "FUSEDOPT_LIB", os.path.join(ROOT, "build", "shared", "host", "libfusedopt.so"))

SEED = int(os.environ.get("FUSEDOPT_TEST_SEED", random.SystemRandom().randrange(2**31)))
print(f"test_torch_parity seed: {SEED} (set FUSEDOPT_TEST_SEED to reproduce)")


def load_lib():
    lib = ctypes.CDLL(LIB_PATH)
    c_void_p, c_char_p, c_double = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_double
    lib.fo_optimizer_create.argtypes = [c_char_p, ctypes.c_int, ctypes.c_int,
                                        ctypes.POINTER(c_void_p)]
    lib.fo_optimizer_destroy.argtypes = [c_void_p]
    lib.fo_optimizer_set_option.argtypes = [c_void_p, c_char_p, c_double]
    lib.fo_optimizer_get_option.argtypes = [c_void_p, c_char_p, ctypes.POINTER(c_double)]
    lib.fo_optimizer_add_param.argtypes = [c_void_p, c_char_p, c_void_p, ctypes.c_int,
                                           ctypes.c_int, ctypes.POINTER(ctypes.c_int64)]
    lib.fo_optimizer_step.argtypes = [c_void_p, ctypes.POINTER(c_void_p), c_void_p]
    lib.fo_optimizer_get_state.argtypes = [c_void_p, c_char_p, c_char_p, c_void_p,
                                           ctypes.c_int64]
    lib.fo_last_error.restype = c_char_p
    return lib


LIB = load_lib() if os.path.exists(LIB_PATH) else None


class FoOptimizer:
    def __init__(self, algorithm, options):
        handle = ctypes.c_void_p()
        self.check(LIB.fo_optimizer_create(algorithm.encode(), 0, 0, ctypes.byref(handle)))
        self.h = handle
        for key, value in options.items():
            self.check(LIB.fo_optimizer_set_option(self.h, key.encode(), float(value)))

    @staticmethod
    def check(status):
        if status != 0:
            raise RuntimeError(LIB.fo_last_error().decode())

    def option(self, key):
        v = ctypes.c_double()
        self.check(LIB.fo_optimizer_get_option(self.h, key.encode(), ctypes.byref(v)))
        return v.value

    def add_param(self, name, tensor):
        shape = (ctypes.c_int64 * tensor.dim())(*tensor.shape)
        self.check(LIB.fo_optimizer_add_param(self.h, name.encode(), tensor.data_ptr(), 0,
                                               tensor.dim(), shape))

    def step(self, grads):
        arr = (ctypes.c_void_p * len(grads))(*[g.data_ptr() for g in grads])
        self.check(LIB.fo_optimizer_step(self.h, arr, None))

    def state(self, name, state, numel):
        out = torch.empty(numel, dtype=torch.float32)
        self.check(LIB.fo_optimizer_get_state(self.h, name.encode(), state.encode(),
                                              out.data_ptr(), numel))
        return out

    def __del__(self):
        if getattr(self, "h", None):
            LIB.fo_optimizer_destroy(self.h)


# fusedopt name -> (torch class, option sets to run: fusedopt keys; betas as beta1/beta2).
CASES = {
    "sgd": (torch.optim.SGD, [
        {"lr": 0.1},
        {"lr": 0.1, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.1},
        {"lr": 0.05, "momentum": 0.9, "nesterov": 1, "maximize": 1},
    ]),
    "adagrad": (torch.optim.Adagrad, [
        {},
        {"lr_decay": 0.05, "weight_decay": 0.1, "initial_accumulator_value": 0.5,
         "eps": 1e-3, "maximize": 1},
    ]),
    "adadelta": (torch.optim.Adadelta, [
        {},
        {"rho": 0.5, "eps": 1e-3, "weight_decay": 0.1, "maximize": 1, "lr": 0.5},
    ]),
    "rmsprop": (torch.optim.RMSprop, [
        {},
        {"centered": 1, "momentum": 0.9, "weight_decay": 0.1, "alpha": 0.9, "eps": 1e-3,
         "maximize": 1, "lr": 1e-3},
        {"momentum": 0.5},
    ]),
    "adam": (torch.optim.Adam, [
        {},
        {"amsgrad": 1, "weight_decay": 0.1, "beta1": 0.8, "beta2": 0.99, "maximize": 1,
         "lr": 1e-2},
    ]),
    "adamw": (torch.optim.AdamW, [
        {},
        {"amsgrad": 1, "weight_decay": 0.5, "beta1": 0.5, "beta2": 0.9, "eps": 1e-3,
         "maximize": 1, "lr": 1e-2},
    ]),
    "adamax": (torch.optim.Adamax, [
        {},
        {"weight_decay": 0.1, "beta1": 0.5, "beta2": 0.9, "eps": 1e-3, "maximize": 1,
         "lr": 1e-2},
    ]),
    "nadam": (torch.optim.NAdam, [
        {},
        {"weight_decay": 0.1, "momentum_decay": 0.02, "maximize": 1, "lr": 1e-2},
        {"weight_decay": 0.5, "decoupled_weight_decay": 1, "beta1": 0.5, "beta2": 0.9,
         "eps": 1e-3, "momentum_decay": 0},
    ]),
    "radam": (torch.optim.RAdam, [
        {},
        {"weight_decay": 0.1, "beta2": 0.9, "maximize": 1, "lr": 1e-2},
        {"weight_decay": 0.5, "decoupled_weight_decay": 1, "beta1": 0.5, "beta2": 0.99,
         "eps": 1e-3},
    ]),
    "rprop": (torch.optim.Rprop, [
        {},
        {"eta_minus": 0.3, "eta_plus": 1.5, "step_size_min": 1e-3, "step_size_max": 0.05,
         "maximize": 1, "lr": 0.1},
    ]),
}

# torch's keyword for each fusedopt option (betas and etas are pairs in torch).
PAIRS = {"beta1": ("betas", 0), "beta2": ("betas", 1), "eta_minus": ("etas", 0),
         "eta_plus": ("etas", 1), "step_size_min": ("step_sizes", 0),
         "step_size_max": ("step_sizes", 1)}
FLAGS = {"nesterov", "maximize", "amsgrad", "centered", "decoupled_weight_decay"}


def torch_kwargs(cls, options):
    sig = inspect.signature(cls.__init__).parameters
    kw = {}
    for key, value in options.items():
        if key in PAIRS:
            name, i = PAIRS[key]
            pair = list(kw.get(name, sig[name].default))
            pair[i] = value
            kw[name] = tuple(pair)
        else:
            kw[key] = bool(value) if key in FLAGS else value
    return kw


def torch_default(cls, key):
    sig = inspect.signature(cls.__init__).parameters
    if key in PAIRS:
        name, i = PAIRS[key]
        return float(sig[name].default[i])
    return float(sig[key].default)


needs_lib = pytest.mark.skipif(LIB is None, reason=f"no fusedopt shared library at {LIB_PATH}")


@needs_lib
@pytest.mark.parametrize("algorithm", sorted(CASES))
def test_defaults_are_torchs(algorithm):
    cls, _ = CASES[algorithm]
    opt = FoOptimizer(algorithm, {})
    sig = inspect.signature(cls.__init__).parameters
    for key in list(PAIRS) + [k for k in sig if k not in ("self", "params")]:
        if key in PAIRS and PAIRS[key][0] not in sig:
            continue
        if key in ("foreach", "capturable", "differentiable", "fused", "betas", "etas",
                   "step_sizes"):
            continue
        if key == "decoupled_weight_decay" and algorithm in ("adam", "adamax"):
            # torch.optim.Adam(decoupled_weight_decay=True) is AdamW: here a separate
            # optimizer, adamw; fusedopt's adam is torch's default, False.
            assert torch_default(cls, key) == 0.0
            continue
        assert opt.option(key) == pytest.approx(torch_default(cls, key), rel=0, abs=0), \
            f"{algorithm}.{key}: fusedopt {opt.option(key)}, torch {torch_default(cls, key)}"


def close(got, want, what, skip=None, scale=0.0):
    scale = max(scale, float(want.abs().max()) if want.numel() else 0.0)
    err = (got - want).abs()
    bound = 1e-5 * (want.abs() + scale) + 1e-30
    bad = err > bound
    if skip is not None:
        bad &= ~skip
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} of {want.numel()} elements differ; first at "
        f"{int(bad.nonzero()[0])}: fusedopt {float(got[bad][0])!r}, torch {float(want[bad][0])!r}")


@needs_lib
@pytest.mark.parametrize("algorithm,variant", [(a, v) for a in sorted(CASES)
                                               for v in range(len(CASES[a][1]))])
def test_steps_match_torch(algorithm, variant):
    cls, variants = CASES[algorithm]
    options = variants[variant]
    salt = sum(algorithm.encode()) % 1000  # stable across runs, unlike hash()
    gen = torch.Generator().manual_seed(SEED + 1000 * variant + salt)
    sizes = [1, 7, 8, 9, 33, 1000, 4099]
    p0 = [torch.randn(n, generator=gen) for n in sizes]
    fo_params = [p.clone() for p in p0]
    torch_params = [torch.nn.Parameter(p.clone()) for p in p0]
    fo = FoOptimizer(algorithm, options)
    for i, p in enumerate(fo_params):
        fo.add_param(f"p{i}", p)
    ref = cls(torch_params, **torch_kwargs(cls, options))
    for step in range(1, 31):
        grads = [torch.randn(n, generator=gen) * (0.1 + step) for n in sizes]
        prevs = {}
        if algorithm == "rprop" and step > 1:
            prevs = {i: ref.state[p]["prev"].clone() for i, p in enumerate(torch_params)}
        for p, g in zip(torch_params, grads):
            p.grad = g.clone()
        ref.step()
        fo.step(grads)
        # The scale of a tensor's error is that of the whole list: over 30 steps a 1-element
        # param or momentum can cancel to far below its own history (|fo - torch| is then
        # the rounding of the larger terms that cancelled).
        p_scale = max(float(p.detach().abs().max()) for p in torch_params)
        s_scale = {}
        for p in torch_params:
            for name, value in ref.state[p].items():
                if torch.is_tensor(value) and value.numel() > 1:
                    s_scale[name] = max(s_scale.get(name, 0.0), float(value.abs().max()))
        for i, (mine, theirs) in enumerate(zip(fo_params, torch_params)):
            skip = None
            if i in prevs:
                prod = grads[i] * prevs[i]
                skip = (prod != 0) & (prod.abs() < 1e-30)
            what = f"{algorithm} {options} step {step} param p{i}"
            close(mine, theirs.detach(), what, skip, p_scale)
            for name, value in ref.state[theirs].items():
                # step and nadam's mu_product are per-param scalars torch keeps and fusedopt
                # computes from the step count (docs/optimizers.md).
                if name in ("step", "mu_product") or not torch.is_tensor(value):
                    continue
                close(fo.state(f"p{i}", name, mine.numel()), value.reshape(-1),
                      f"{what}, state {name}", skip, s_scale.get(name, 0.0))
