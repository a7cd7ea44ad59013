"""fusedopt.torch.Muon (the installed package) against torch.optim.Muon (torch 2.15) on the CPU.

torch's Muon orthogonalizes in bfloat16 (its _zeropower_via_newtonschulz casts to bf16, on the
CPU too); fusedopt's CPU iteration is float32. So two comparisons:

1. Against torch's algorithm re-run in float32: torch.optim._muon._zeropower_via_newtonschulz
   monkeypatched to the same code without the bf16 cast. Then both compute the same thing in
   float32 and differ by summation orders (OpenBLAS's sgemm against torch's CPU matmul) and a
   norm taken in double here, float32 there, amplified by the iteration (slope up to 3.4 per
   step at small singular values). Measured (printed per variant) over these shapes, every
   variant and 30 steps: the params differ by at most 1.2e-5 to 3.6e-5 of lr (an update
   element is lr times an orthogonalized element of ~0.1-1). Bound: PARAM_TOL = 4e-4 of lr,
   ten times that (other BLAS builds, other seeds); a wrong coefficient, transpose, adjusted
   lr or lerp is off by > 1e-2 of lr at once. The momentum buffers, plain fp32 lerps, within
   1e-5 of their largest element.
2. Against stock torch (bf16 iteration), loosely: torch's bf16 iteration is within 2-3.3e-2 of
   the exact one (docs/newton-schulz.md), so one step's updates differ by a few percent of an
   update element, more at an ill-conditioned step; one step at a time from the same state
   (no compounding), measured 0.06 to 0.09 lr over 10 steps (5 seeds); bound 0.25 lr (the
   printed value is the run's largest). The adjusted lr alone is a factor sqrt(3) (24 x 8) or 0.2
   sqrt(max) away when wrong, far outside both bounds.

Also: the constructor's signature equals torch's, state_dict both ways (torch's checkpoint
goes on in fusedopt and the reverse), zero gradients (only the decay), 1-D params refused,
every adjust_lr_fn, nesterov off.
"""

import copy
import inspect
import os
import random

import pytest
import torch

if os.environ.get("FUSEDOPT_REQUIRE_PACKAGE"):  # CI: a missing package fails, never skips
    import fusedopt.torch as ft
else:
    ft = pytest.importorskip("fusedopt.torch", reason="the fusedopt package is not installed")

import torch.optim._muon as torch_muon  # noqa: E402

SEED = int(os.environ.get("FUSEDOPT_TEST_SEED", random.SystemRandom().randrange(2**31)))
print(f"test_muon seed: {SEED} (set FUSEDOPT_TEST_SEED to reproduce)")

SHAPES = [(16, 16), (8, 24), (24, 8), (33, 17), (1, 5)]
LR = 1e-2
PARAM_TOL = 4e-4  # of lr, per param element, after 30 steps against torch in float32
BUF_TOL = 1e-5

VARIANTS = [
    {},
    {"nesterov": False, "weight_decay": 0.0},
    {"adjust_lr_fn": "match_rms_adamw", "momentum": 0.5},
    {"adjust_lr_fn": "spectral_unclamped", "weight_decay": 0.3},
    {"ns_coefficients": (2.0, -1.5, 0.5), "ns_steps": 3, "eps": 1e-3, "momentum": 0.0},
]


def _zeropower_f32(grad, ns_coefficients, ns_steps, eps):
    """torch 2.15's _zeropower_via_newtonschulz with float32 in place of bfloat16."""
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


@pytest.fixture
def torch_f32(monkeypatch):
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", _zeropower_f32)


def _params(gen):
    return [torch.randn(s, generator=gen) for s in SHAPES]


def _grads(gen, t):
    gs = [torch.randn(s, generator=gen) for s in SHAPES]
    if t % 7 == 3:  # a few large gradients: an ill-conditioned input
        for g in gs:
            g.view(-1)[::5] *= 100
    return gs


def _pair(variant, p0):
    a = [p.clone().requires_grad_() for p in p0]
    b = [p.clone().requires_grad_() for p in p0]
    return a, torch.optim.Muon(a, lr=LR, **variant), b, ft.Muon(b, lr=LR, **variant)


def _set_grads(ps, gs):
    for p, g in zip(ps, gs):
        p.grad = g.clone()


@pytest.mark.parametrize("variant", range(len(VARIANTS)))
def test_thirty_steps_match_torch_in_float32(torch_f32, variant):
    gen = torch.Generator().manual_seed(SEED + variant)
    p0 = _params(gen)
    tp, topt, fp, fopt = _pair(VARIANTS[variant], p0)
    worst = 0.0
    for t in range(1, 31):
        gs = _grads(gen, t)
        _set_grads(tp, gs)
        _set_grads(fp, gs)
        topt.step()
        fopt.step()
        for i, (a, b) in enumerate(zip(tp, fp)):
            diff = (a.detach() - b.detach()).abs().max().item()
            worst = max(worst, diff / LR)
            assert diff <= PARAM_TOL * LR, f"step {t}, param {i} {SHAPES[i]}: {diff}"
            ba = topt.state[a]["momentum_buffer"]
            bb = fopt.state[b]["momentum_buffer"]
            scale = ba.abs().max().item() + 1e-30
            assert (ba - bb).abs().max().item() <= BUF_TOL * scale, f"step {t}, buffer {i}"
    print(f"variant {variant}: largest param difference / lr = {worst:.3g} (bound {PARAM_TOL})")


def test_one_step_at_a_time_is_near_stock_torch_bf16():
    gen = torch.Generator().manual_seed(SEED)
    p0 = _params(gen)
    tp, topt, fp, fopt = _pair({}, p0)
    worst = 0.0
    for t in range(1, 11):
        gs = _grads(gen, t)
        _set_grads(tp, gs)
        _set_grads(fp, gs)
        topt.step()
        fopt.step()
        for i, (a, b) in enumerate(zip(tp, fp)):
            diff = (a.detach() - b.detach()).abs().max().item()
            worst = max(worst, diff / LR)
            assert diff <= 0.25 * LR, f"step {t}, param {i} {SHAPES[i]}: {diff / LR} of lr"
        with torch.no_grad():  # the next step from the same state: differences do not compound
            for a, b in zip(tp, fp):
                b.copy_(a)
                fopt.state[b]["momentum_buffer"].copy_(topt.state[a]["momentum_buffer"])
    print(f"against torch's bf16 iteration: largest param difference / lr = {worst:.3g}")


def test_signature_and_defaults_equal_torchs():
    def plain(cls):  # names, kinds and defaults (torch's has annotations, ours none)
        return [(q.name, q.kind, q.default)
                for q in inspect.signature(cls.__init__).parameters.values()]
    assert plain(ft.Muon) == plain(torch.optim.Muon)
    p = torch.zeros(4, 4, requires_grad=True)
    assert ft.Muon([p]).defaults == torch.optim.Muon([p]).defaults


def test_state_dict_moves_both_ways(torch_f32):
    gen = torch.Generator().manual_seed(SEED)
    p0 = _params(gen)
    tp, topt, fp, fopt = _pair({"adjust_lr_fn": "match_rms_adamw"}, p0)
    for t in range(1, 4):
        gs = _grads(gen, t)
        _set_grads(tp, gs)
        _set_grads(fp, gs)
        topt.step()
        fopt.step()
    assert set(fopt.state[fp[0]].keys()) == set(topt.state[tp[0]].keys()) == {"momentum_buffer"}
    # torch's checkpoint into fusedopt, fusedopt's into torch: each goes on as the original.
    fp2 = [p.detach().clone().requires_grad_() for p in tp]
    fopt2 = ft.Muon(fp2, lr=LR)
    fopt2.load_state_dict(copy.deepcopy(topt.state_dict()))
    tp2 = [p.detach().clone().requires_grad_() for p in fp]
    topt2 = torch.optim.Muon(tp2, lr=LR)
    topt2.load_state_dict(copy.deepcopy(fopt.state_dict()))
    assert fopt2.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"
    gs = _grads(gen, 4)
    for ps, opt in ((tp, topt), (fp2, fopt2), (fp, fopt), (tp2, topt2)):
        _set_grads(ps, gs)
        opt.step()
    for a, b in zip(tp, fp2):
        assert (a - b).abs().max().item() <= PARAM_TOL * LR
    for a, b in zip(fp, tp2):
        assert (a - b).abs().max().item() <= PARAM_TOL * LR


def test_zero_gradients_only_decay_the_param():
    p = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.25, -1.0]], requires_grad=True)
    before = p.detach().clone()
    opt = ft.Muon([p], lr=0.1, weight_decay=0.5)
    p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(p.detach(), before * (1 - 0.1 * 0.5))
    assert torch.equal(opt.state[p]["momentum_buffer"], torch.zeros_like(p))


def test_vectors_and_bad_options_are_refused():
    with pytest.raises(ValueError, match="2D parameters"):
        ft.Muon([torch.zeros(5, requires_grad=True)])
    p = torch.zeros(3, 3, requires_grad=True)
    with pytest.raises(ValueError, match="not supported"):
        ft.Muon([p], adjust_lr_fn="cubic")
    with pytest.raises(ValueError):
        ft.Muon([p], lr=-1.0)
    with pytest.raises(ValueError):
        ft.Muon([p], ns_steps=100)
    opt = ft.Muon([p])
    with pytest.raises(ValueError, match="2D parameters"):
        opt.add_param_group({"params": [torch.zeros(4, requires_grad=True)]})
    assert len(opt.param_groups) == 1


def test_a_3d_param_steps_as_a_batch_of_matrices():
    gen = torch.Generator().manual_seed(SEED)
    w = torch.randn(3, 6, 4, generator=gen)
    g = torch.randn(3, 6, 4, generator=gen)
    batched = w.clone().requires_grad_()
    each = [w[i].clone().requires_grad_() for i in range(3)]
    ob, oe = ft.Muon([batched], lr=LR), ft.Muon(each, lr=LR)
    batched.grad = g.clone()
    for i, p in enumerate(each):
        p.grad = g[i].clone()
    ob.step()
    oe.step()
    for i in range(3):
        assert torch.equal(batched.detach()[i], each[i].detach())
