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

MuonWithAdamW (Muon's groups and AdamW's in one optimizer) against torch.optim.Muon and
torch.optim.AdamW stepped side by side, on a model-like set: two non-square matrices (Muon), an
embedding, a bias whose grad is None every third step and a norm weight (AdamW, in two groups),
30 steps, two option sets. Muon's params and buffers as in 1. (float32 torch, PARAM_TOL of lr,
BUF_TOL): measured at most 2.4e-5 to 4.8e-5 of lr over 25 seeds, about one float32 ulp of
params of magnitude 1 to 4. AdamW's params and states as test_fusedopt_torch.py's TOL: within
2e-5 of |torch| + the list's largest magnitude of that quantity (measured at most 2.6e-7 over 40
runs: roundings of the same formula), step counts exactly. Every step is one library call for
all three groups. Also: zero gradients, a checkpoint resumed bitwise, torch's two state_dicts
into it and its state_dict into torch's two, bad groups and options refused, adding nothing, a
bad step changing no group.
"""

import copy
import io
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


# -- MuonWithAdamW: Muon's groups and AdamW's in one optimizer ----------------------------------

MIXED_MUON = [(24, 8), (16, 33)]        # hidden matrices, non-square either way
MIXED_ADAMW = [(50, 16), (16,), (16,)]  # an embedding, a bias, a norm weight
ADAMW_TOL = 2e-5  # test_fusedopt_torch.py's TOL: of |torch| + the list's largest magnitude
SKIPPED = 3  # the bias: its grad is None every third step

MIXED_VARIANTS = [
    ({"lr": LR}, {"lr": 3e-3}),
    ({"lr": LR, "nesterov": False, "adjust_lr_fn": "match_rms_adamw", "weight_decay": 0.0},
     {"lr": 3e-3, "betas": (0.8, 0.95), "eps": 1e-6, "amsgrad": True, "maximize": True,
      "weight_decay": 0.1}),
]


def _mixed_params(gen):
    p0 = [torch.randn(s, generator=gen) for s in MIXED_MUON + MIXED_ADAMW]
    p0[-1] = 1 + 0.1 * p0[-1]  # a norm weight starts near one
    return p0


def _mixed_groups(ps, tag=True):
    """Muon's group and AdamW's two (the bias and the norm without decay and at their own lr,
    as usual), as MuonWithAdamW takes them (tag) or as torch's two optimizers do."""
    m = len(MIXED_MUON)
    muon = [{"params": ps[:m]}]
    adamw = [{"params": ps[m:m + 1]}, {"params": ps[m + 1:], "weight_decay": 0.0, "lr": 1e-3}]
    if tag:
        return [dict(g, use_muon=True) for g in muon] + [dict(g, use_muon=False) for g in adamw]
    return muon, adamw


def _mixed(variant, p0):
    """Ours over one copy of p0; torch.optim.Muon and torch.optim.AdamW over another."""
    muon_kw, adamw_kw = MIXED_VARIANTS[variant]
    fp = [p.clone().requires_grad_() for p in p0]
    tp = [p.clone().requires_grad_() for p in p0]
    fopt = ft.MuonWithAdamW(_mixed_groups(fp), muon=muon_kw, adamw=adamw_kw)
    muon_groups, adamw_groups = _mixed_groups(tp, tag=False)
    topts = (torch.optim.Muon(muon_groups, **muon_kw),
             torch.optim.AdamW(adamw_groups, **adamw_kw))
    return fp, fopt, tp, topts


def _mixed_grads(gen, t):
    m = len(MIXED_MUON)
    gs = [torch.randn(s, generator=gen) for s in MIXED_MUON + MIXED_ADAMW]
    for g in gs[:m]:
        if t % 7 == 3:  # an ill-conditioned input, as _grads
            g.view(-1)[::5] *= 100
    for g in gs[m:]:
        g *= 0.1 + t % 5
    if t % 3 == 0:
        gs[SKIPPED] = None
    return gs


def _set_mixed_grads(ps, gs):
    for p, g in zip(ps, gs):
        p.grad = None if g is None else g.clone()


def _state_of(topts, p):
    """p's state in whichever of torch's two optimizers holds it."""
    for opt in topts:
        if p in opt.state:
            return opt.state[p]
    return {}


def _step_mixed(runs, gs):
    """One step with gradients gs of each (params, optimizers) in runs."""
    for ps, opts in runs:
        _set_mixed_grads(ps, gs)
        for opt in opts:
            opt.step()


def _compare_mixed(fp, fopt, tp, topts, what):
    """Muon's params to PARAM_TOL of lr and its buffers to BUF_TOL (the bounds above); AdamW's
    params and states to ADAMW_TOL of |torch| + the list's largest magnitude, the step counts
    exactly; the state keys as torch's."""
    m = len(MIXED_MUON)
    worst = 0.0
    for i, (a, b) in enumerate(zip(fp[:m], tp[:m])):
        diff = (a.detach() - b.detach()).abs().max().item()
        worst = max(worst, diff / LR)
        assert diff <= PARAM_TOL * LR, f"{what}: Muon param {i}: {diff / LR} of lr"
        sa, sb = fopt.state[a], _state_of(topts, b)
        assert sorted(sa) == sorted(sb) == ["momentum_buffer"], f"{what}: param {i} keys"
        ba, bb = sa["momentum_buffer"], sb["momentum_buffer"]
        scale = bb.abs().max().item() + 1e-30
        assert (ba - bb).abs().max().item() <= BUF_TOL * scale, f"{what}: buffer {i}"
    scales = {"param": max(p.detach().abs().max().item() for p in tp[m:])}
    for b in tp[m:]:
        for key, v in _state_of(topts, b).items():
            if key != "step":
                scales[key] = max(scales.get(key, 0.0), v.abs().max().item())
    for i, (a, b) in enumerate(zip(fp[m:], tp[m:]), m):
        sa, sb = fopt.state.get(a, {}), _state_of(topts, b)
        assert sorted(sa) == sorted(sb), f"{what}: param {i} keys {sorted(sa)} vs {sorted(sb)}"
        for key, got, want in [("param", a, b)] + [(k, sa[k], v) for k, v in sb.items()]:
            if key == "step":
                assert got.dtype == want.dtype == torch.float32 and got.device == want.device
                assert float(got) == float(want), f"{what}: param {i} step {got} vs {want}"
                continue
            err = (got.detach() - want.detach()).abs()
            bound = ADAMW_TOL * (want.detach().abs() + scales[key])
            assert bool((err <= bound).all()), (
                f"{what}: AdamW param {i} {key}: {float((err / (bound / ADAMW_TOL)).max())} "
                f"of |torch| + scale (bound {ADAMW_TOL})")
    return worst


@pytest.mark.parametrize("variant", range(len(MIXED_VARIANTS)))
def test_muon_with_adamw_thirty_steps_match_torchs_two_optimizers(torch_f32, monkeypatch,
                                                                   variant):
    calls = []  # the library calls of one step: one, holding every group

    def step_groups(groups, *args, **kwargs):
        calls.append(sorted(g[0] for g in groups))
        return step_groups_lib(groups, *args, **kwargs)

    step_groups_lib = ft._fusedopt.step_groups
    monkeypatch.setattr(ft._fusedopt, "step_groups", step_groups)
    gen = torch.Generator().manual_seed(SEED + 100 + variant)
    fp, fopt, tp, topts = _mixed(variant, _mixed_params(gen))
    worst = 0.0
    for t in range(1, 31):
        calls.clear()
        _step_mixed([(fp, [fopt]), (tp, topts)], _mixed_grads(gen, t))
        assert calls == [["adamw", "adamw", "muon"]], f"step {t}: library calls {calls}"
        worst = max(worst, _compare_mixed(fp, fopt, tp, topts, f"step {t}"))
    assert float(fopt.state[fp[SKIPPED]]["step"]) == 20  # 30 steps, 10 without a grad
    print(f"MuonWithAdamW variant {variant}: largest Muon param difference / lr = {worst:.3g} "
          f"(bound {PARAM_TOL})")


def test_muon_with_adamw_defaults_are_torchs_per_kind():
    assert [q.name for q in inspect.signature(ft.MuonWithAdamW.__init__).parameters.values()] \
        == ["self", "params", "muon", "adamw"]
    w, b = torch.zeros(4, 3, requires_grad=True), torch.zeros(3, requires_grad=True)
    opt = ft.MuonWithAdamW([{"params": [w], "use_muon": True},
                            {"params": [b], "use_muon": False}])
    muon = torch.optim.Muon([torch.zeros(4, 3, requires_grad=True)])
    adamw = torch.optim.AdamW([torch.zeros(3, requires_grad=True)])
    assert opt.muon_defaults == muon.defaults and opt.adamw_defaults == adamw.defaults
    assert opt.defaults == {}
    # Each group's keys are its torch class's, plus use_muon.
    assert opt.param_groups[0].keys() == muon.param_groups[0].keys() | {"use_muon"}
    assert opt.param_groups[1].keys() == adamw.param_groups[0].keys() | {"use_muon"}
    # muon= and adamw= set the defaults of their kind's groups; a group's own key wins.
    opt = ft.MuonWithAdamW([{"params": [w], "use_muon": True, "lr": 0.5},
                            {"params": [b], "use_muon": False}],
                           muon={"lr": 0.02, "momentum": 0.9}, adamw={"betas": (0.9, 0.95)})
    assert (opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]) == (0.5, 0.9)
    assert opt.param_groups[1]["betas"] == (0.9, 0.95) and opt.param_groups[1]["lr"] == 1e-3


def test_muon_with_adamw_zero_gradients_only_decay_and_none_grads_skip():
    w = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.25, -1.0]], requires_grad=True)
    b = torch.tensor([0.5, -4.0, 2.0], requires_grad=True)
    skipped = torch.ones(3, 2, requires_grad=True)
    wb, bb = w.detach().clone(), b.detach().clone()
    opt = ft.MuonWithAdamW([{"params": [w, skipped], "use_muon": True},
                            {"params": [b], "use_muon": False}],
                           muon={"lr": 0.1, "weight_decay": 0.5},
                           adamw={"lr": 0.1, "weight_decay": 0.25})
    w.grad, b.grad = torch.zeros_like(w), torch.zeros_like(b)
    opt.step()
    assert torch.equal(w.detach(), wb * (1 - 0.1 * 0.5))
    assert torch.equal(opt.state[w]["momentum_buffer"], torch.zeros_like(w))
    # AdamW: m = v = 0, so the update m / (sqrt(v) + eps) is 0 and only the decay is left.
    assert torch.equal(b.detach(), bb * (1 - 0.1 * 0.25))
    assert float(opt.state[b]["step"]) == 1
    assert torch.equal(opt.state[b]["exp_avg"], torch.zeros(3))
    assert torch.equal(opt.state[b]["exp_avg_sq"], torch.zeros(3))
    assert torch.equal(skipped.detach(), torch.ones(3, 2)) and skipped not in opt.state


def _run_mixed(opt, ps, gen, steps, start=1):
    for t in range(start, start + steps):
        _set_mixed_grads(ps, _mixed_grads(gen, t))
        opt.step()


def test_muon_with_adamw_checkpoint_resumes_bitwise():
    gen = torch.Generator().manual_seed(SEED + 200)
    p0 = _mixed_params(gen)
    muon_kw, adamw_kw = MIXED_VARIANTS[1]
    ps = [p.clone().requires_grad_() for p in p0]
    opt = ft.MuonWithAdamW(_mixed_groups(ps), muon=muon_kw, adamw=adamw_kw)
    _run_mixed(opt, ps, gen, 4)
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in ps], "opt": opt.state_dict()}, buf)
    g_state = gen.get_state()
    _run_mixed(opt, ps, gen, 5, start=5)
    buf.seek(0)
    ckpt = torch.load(buf)
    resumed = [p.clone().requires_grad_() for p in ckpt["params"]]
    opt2 = ft.MuonWithAdamW(_mixed_groups(resumed))  # the options come from the checkpoint
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"
    assert opt2.param_groups[1]["amsgrad"] is True
    # A group added after a load has its kind's keys only (torch's load adds "differentiable"
    # to the defaults, which torch's add_param_group would copy into a Muon group).
    extra = torch.zeros(3, 3, requires_grad=True)
    opt2.add_param_group({"params": [extra], "use_muon": True})
    assert opt2.param_groups[-1].keys() == opt2.param_groups[0].keys()
    opt2.param_groups.pop()
    gen.set_state(g_state)
    _run_mixed(opt2, resumed, gen, 5, start=5)
    for i, (a, b) in enumerate(zip(resumed, ps)):
        assert torch.equal(a.detach(), b.detach()), f"param {i}"
        for key, v in opt.state[b].items():
            assert torch.equal(opt2.state[a][key], v), f"param {i} {key}"
    # A group of the other kind is refused (it would step a vector by Muon), changing nothing.
    sd = copy.deepcopy(ckpt["opt"])
    sd["param_groups"][0]["use_muon"] = False
    with pytest.raises(ValueError, match="use_muon"):
        opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["use_muon"] is True


def _concat_state_dicts(sds):
    """torch's state_dicts, one after another as one (param ids renumbered)."""
    out, offset = {"state": {}, "param_groups": []}, 0
    for sd in sds:
        out["state"].update({i + offset: st for i, st in sd["state"].items()})
        out["param_groups"] += [dict(g, params=[i + offset for i in g["params"]])
                                for g in sd["param_groups"]]
        offset += sum(len(g["params"]) for g in sd["param_groups"])
    return out


def _split_state_dict(sd, n_groups):
    """A state_dict's first n_groups groups (and their states) and the rest, each numbered
    from 0."""
    parts = []
    for groups in (sd["param_groups"][:n_groups], sd["param_groups"][n_groups:]):
        ids = [i for g in groups for i in g["params"]]
        renumber = {i: j for j, i in enumerate(ids)}
        parts.append({"state": {renumber[i]: st for i, st in sd["state"].items() if i in renumber},
                      "param_groups": [dict(g, params=[renumber[i] for i in g["params"]])
                                       for g in groups]})
    return parts


@pytest.mark.parametrize("direction", ["torch_to_fusedopt", "fusedopt_to_torch"])
def test_muon_with_adamw_state_dict_is_torchs_two(torch_f32, direction):
    gen = torch.Generator().manual_seed(SEED + 300)
    fp, fopt, tp, topts = _mixed(1, _mixed_params(gen))
    for t in range(1, 5):
        _step_mixed([(fp, [fopt]), (tp, topts)], _mixed_grads(gen, t))
    # The switch: one side's checkpoint into a fresh optimizer of the other (default options:
    # they come from the checkpoint), over copies of that side's params.
    if direction == "torch_to_fusedopt":
        sp = [p.detach().clone().requires_grad_() for p in tp]
        sopts = [ft.MuonWithAdamW(_mixed_groups(sp))]
        sopts[0].load_state_dict(copy.deepcopy(_concat_state_dicts(
            [opt.state_dict() for opt in topts])))
        adamw_groups = sopts[0].param_groups[1:]
    else:
        sp = [p.detach().clone().requires_grad_() for p in fp]
        muon_groups, adamw_groups = _mixed_groups(sp, tag=False)
        sopts = [torch.optim.Muon(muon_groups), torch.optim.AdamW(adamw_groups)]
        for opt, part in zip(sopts, _split_state_dict(fopt.state_dict(), 1)):
            opt.load_state_dict(copy.deepcopy(part))
        adamw_groups = sopts[1].param_groups
    assert [g["maximize"] for g in adamw_groups] == [True, True]
    assert [g["lr"] for g in adamw_groups] == [3e-3, 1e-3]
    for t in range(5, 10):
        _step_mixed([(fp, [fopt]), (tp, topts), (sp, sopts)], _mixed_grads(gen, t))
        if direction == "torch_to_fusedopt":  # fusedopt from torch's checkpoint against torch
            _compare_mixed(sp, sopts[0], tp, topts, f"{direction} step {t}")
        else:  # torch from fusedopt's checkpoint against fusedopt
            _compare_mixed(fp, fopt, sp, sopts, f"{direction} step {t}")


def test_muon_with_adamw_refuses_bad_groups_and_options():
    w, b = torch.zeros(4, 3, requires_grad=True), torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="2D parameters"):
        ft.MuonWithAdamW([{"params": [w, b], "use_muon": True}])
    with pytest.raises(ValueError, match="2D parameters"):  # named params too
        ft.MuonWithAdamW([{"params": [("w", w), ("b", b)], "use_muon": True}])
    with pytest.raises(ValueError, match="use_muon"):
        ft.MuonWithAdamW([w, b])
    with pytest.raises(ValueError, match="use_muon"):
        ft.MuonWithAdamW([{"params": [w]}])
    with pytest.raises(ValueError, match="True or False"):
        ft.MuonWithAdamW([{"params": [w], "use_muon": 1}])
    with pytest.raises(ValueError, match="betas"):  # AdamW's key in a Muon group
        ft.MuonWithAdamW([{"params": [w], "use_muon": True, "betas": (0.9, 0.95)}])
    with pytest.raises(ValueError, match="momentum"):
        ft.MuonWithAdamW([{"params": [b], "use_muon": False, "momentum": 0.9}])
    for groups, kw in [
            ([{"params": [w], "use_muon": True, "lr": -1.0}], {}),
            ([{"params": [b], "use_muon": False, "lr": -1.0}], {}),
            ([{"params": [w], "use_muon": True}], {"muon": {"lr": -1.0}}),
            ([{"params": [w], "use_muon": True}], {"adamw": {"lr": -1.0}})]:  # no AdamW group
        with pytest.raises(ValueError, match="lr must be >= 0"):
            ft.MuonWithAdamW(groups, **kw)
    with pytest.raises(ValueError, match="not supported"):
        ft.MuonWithAdamW([{"params": [w], "use_muon": True, "adjust_lr_fn": "cubic"}])
    with pytest.raises(ValueError, match="beta2"):
        ft.MuonWithAdamW([{"params": [b], "use_muon": False}], adamw={"betas": (0.9, 1.0)})
    with pytest.raises(TypeError, match="torch.optim.Muon's keywords"):
        ft.MuonWithAdamW([{"params": [w], "use_muon": True}], muon={"betas": (0.9, 0.95)})
    with pytest.raises(NotImplementedError, match="differentiable"):
        ft.MuonWithAdamW([{"params": [b], "use_muon": False}], adamw={"differentiable": True})
    # add_param_group: refused groups add nothing.
    opt = ft.MuonWithAdamW([{"params": [w], "use_muon": True}])
    for group in ({"params": [b], "use_muon": True}, {"params": [b]},
                  {"params": [b], "use_muon": False, "lr": -1.0},
                  {"params": [torch.zeros(2, 2, requires_grad=True)], "use_muon": True,
                   "ns_steps": 100}):
        with pytest.raises(ValueError):
            opt.add_param_group(group)
        assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [b], "use_muon": False})
    assert len(opt.param_groups) == 2


def test_muon_with_adamw_bad_step_changes_no_group():
    gen = torch.Generator().manual_seed(SEED + 400)
    ps = [p.requires_grad_() for p in _mixed_params(gen)]
    opt = ft.MuonWithAdamW(_mixed_groups(ps))
    _run_mixed(opt, ps, gen, 2)
    _set_mixed_grads(ps, _mixed_grads(gen, 4))
    opt.param_groups[-1]["lr"] = -1.0  # AdamW's last group, after Muon's: Muon's unstepped too
    before = [p.detach().clone() for p in ps]
    states = copy.deepcopy({i: dict(opt.state[p]) for i, p in enumerate(ps)})
    with pytest.raises(ValueError, match="lr must be >= 0"):
        opt.step()
    for i, p in enumerate(ps):
        assert torch.equal(p.detach(), before[i]), f"param {i}"
        assert opt.state[p].keys() == states[i].keys()
        for key, v in states[i].items():
            assert torch.equal(opt.state[p][key], v), f"param {i} {key}"
