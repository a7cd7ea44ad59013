"""bfloat16 params on the CPU for every kind of step: LAMB, LARS and Adafactor (two passes over
a tensor; their bfloat16 states are rounded as stored between the passes, as on CUDA) and Muon
(its Newton-Schulz iteration between two elementwise passes) take bfloat16 params and states
through the CPU's storage layer, as the one-pass optimizers do (docs/optimizers.md). The CPU
stepped these kinds in float32 only before 2026-12-03.

Muon stores its momentum once, after the pass that reads it, so its first bfloat16 step is the
float32 step of the same values, rounded: equal bit for bit. The two-pass kinds round a state
between passes, so their bfloat16 steps are near the float32 ones, not equal. Each step adds
to the bound the param's rounding (half a bf16 ulp: at most 2^-8 of it; 2^-7 is allowed, as a
step shorter than half an ulp leaves a bf16 param where it was) and the effect of the rounded
states on the update (about 2^-8 of the step's movement; 2^-6 is allowed). Over 20 seeds the
largest difference was 0.49 of this bound (LAMB, LARS and Adafactor alike)."""

import os
import random

import pytest
import torch

if os.environ.get("FUSEDOPT_REQUIRE_PACKAGE"):  # CI: a missing package fails, never skips
    import fusedopt.torch as ft
else:
    ft = pytest.importorskip("fusedopt.torch", reason="the fusedopt package is not installed")

SEED = int(os.environ.get("FUSEDOPT_TEST_SEED", random.SystemRandom().randrange(2**31)))
SHAPES = [(37, 45), (3, 33, 70), (8193,), (1,)]


def _runs(cls, shapes, **kwargs):
    """A bfloat16 run and a float32 run of cls from the same values (the bf16 params widened)."""
    gen = torch.Generator().manual_seed(SEED)
    p16 = [torch.randn(s, generator=gen).to(torch.bfloat16) for s in shapes]
    p32 = [p.float() for p in p16]
    return p16, p32, cls(p16, **kwargs), cls(p32, **kwargs), gen


def _step(p16, p32, o16, o32, gen):
    for a, b in zip(p16, p32):
        a.grad = torch.randn(a.shape, generator=gen).to(torch.bfloat16)
        b.grad = a.grad.float()
    o16.step()
    o32.step()


@pytest.mark.parametrize("cls,kwargs", [
    (ft.LAMB, {"lr": 1e-2, "max_grad_norm": 0.0}),
    (ft.LARS, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}),
    # eps[0] set: None would take each run's dtype's epsilon (torch's rule), bf16's 2^-7
    (ft.Adafactor, {"lr": 1e-2, "eps": (1e-30, 1e-3)}),
], ids=["LAMB", "LARS", "Adafactor"])
def test_two_pass_kinds_step_bf16_params_on_the_cpu_near_float32(cls, kwargs):
    print(f"seed {SEED} (set FUSEDOPT_TEST_SEED to reproduce)")
    p16, p32, o16, o32, gen = _runs(cls, SHAPES, **kwargs)
    bounds = [torch.full_like(b, 1e-6) for b in p32]
    for _ in range(3):
        before = [b.clone() for b in p32]
        _step(p16, p32, o16, o32, gen)
        for a, b, b0, bound in zip(p16, p32, before, bounds):
            assert a.dtype == torch.bfloat16 and torch.isfinite(a).all()
            bound += 2.0**-7 * b.abs() + 2.0**-6 * (b - b0).abs()
            excess = (a.float() - b).abs() - bound
            assert (excess <= 0).all(), excess.max()
    for a in p16:  # the states are kept in the param's dtype, as torch keeps them
        assert all(v.dtype == torch.bfloat16 for v in o16.state[a].values()
                   if torch.is_tensor(v) and v.numel() > 1)


def test_muon_first_bf16_step_is_the_float32_step_rounded():
    print(f"seed {SEED} (set FUSEDOPT_TEST_SEED to reproduce)")
    p16, p32, o16, o32, gen = _runs(ft.Muon, SHAPES[:2], lr=0.02)
    _step(p16, p32, o16, o32, gen)
    for a, b in zip(p16, p32):
        assert torch.equal(a, b.to(torch.bfloat16))
        assert torch.equal(o16.state[a]["momentum_buffer"],
                           o32.state[b]["momentum_buffer"].to(torch.bfloat16))
