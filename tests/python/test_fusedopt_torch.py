"""fusedopt.torch (the installed Python package) against torch.optim on the CPU.

Each class is stepped beside the torch class of the same name for 50 steps from the same
float32 params and gradients (fresh random values each run; the seed is printed): two param
groups with different options, a StepLR scheduler editing param_groups[i]["lr"], and a param
whose grad is None on every third step (skipped: no state change, no step count). Every option
that changes the math is on in some variant. Params and every state of the same name must agree
after every step, and the step counts exactly.

Tolerance: both compute the same float32 formula per element, but not always in the same
operation order or with the same fused multiply-adds (torch's vectorized CPU kernels fuse where
fusedopt does not, and the reverse), so results differ by a few float32 roundings per step,
compounding over 50 steps: |fo - torch| <= 2e-5 * (|torch| + scale), scale being the largest
magnitude of that quantity (param, or one state) over the param list (1e-5 of each tensor's own
largest magnitude held for 6 steps in test_torch_parity.py; over 50 steps, a one-element
momentum buffer whose terms cancel can carry roundings far larger than its own size, so the
scale is taken over the list: a few ulps per step of the terms, fed back through the states,
stay more than an order of magnitude under 2e-5 of it). A wrong
constant, a missing bias correction or a decay in the wrong place is off by orders of magnitude
more. Rprop's step size is multiplied by a factor chosen by the sign of g * prev, which a
last-bit difference could flip where the product is tiny. Rprop (and SGD without momentum)
compute op for op what torch computes, so they are checked bitwise (BITWISE below; Rprop only
while no product within 1e-30 of zero has occurred, after which a flip would be legitimate).

Also: constructor signatures and defaults equal torch's, state_dict round trips both ways,
bad input changes nothing, closures and zero_grad, and the DLPack path from numpy; and
SGDScheduleFree / AdamWScheduleFree against the schedulefree package (its section below states
its own tolerance).
Needs the package installed (`pip install .`) and torch; the schedule-free comparisons need
schedulefree (skipped, saying so, where it is not importable).
"""

import copy
import inspect
import io
import math
import os
import random

import numpy as np
import pytest
import torch

if os.environ.get("FUSEDOPT_REQUIRE_PACKAGE"):  # CI: a missing package fails, never skips
    import fusedopt.torch as ft
else:
    ft = pytest.importorskip("fusedopt.torch", reason="the fusedopt package is not installed "
                                                      "(pip install . at the repository root)")
import fusedopt  # noqa: E402

SEED = int(os.environ.get("FUSEDOPT_TEST_SEED", random.SystemRandom().randrange(2**31)))
print(f"test_fusedopt_torch seed: {SEED} (set FUSEDOPT_TEST_SEED to reproduce)")

TOL = 2e-5
STEPS = 50
SHAPES = [(1,), (7,), (33,), (1000,), (17, 65), (4, 3, 9)]

# Class name -> option variants (torch's keywords). Group 0 takes the variant, group 1 the
# class defaults with its own lr, so the two groups differ in options and in state layout.
CASES = {
    "SGD": [{"lr": 0.1},
            {"lr": 0.1, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.1},
            {"lr": 0.05, "momentum": 0.9, "nesterov": True, "maximize": True}],
    "Adagrad": [{},
                {"lr_decay": 0.05, "weight_decay": 0.1, "initial_accumulator_value": 0.5,
                 "eps": 1e-3, "maximize": True}],
    "Adadelta": [{},
                 {"rho": 0.5, "eps": 1e-3, "weight_decay": 0.1, "maximize": True, "lr": 0.5}],
    "RMSprop": [{},
                {"centered": True, "momentum": 0.9, "weight_decay": 0.1, "alpha": 0.9,
                 "eps": 1e-3, "maximize": True, "lr": 1e-3},
                {"momentum": 0.5}],
    "Adam": [{},
             {"amsgrad": True, "weight_decay": 0.1, "betas": (0.8, 0.99), "maximize": True,
              "lr": 1e-2},
             {"decoupled_weight_decay": True, "weight_decay": 0.1}],
    "AdamW": [{},
              {"amsgrad": True, "weight_decay": 0.5, "betas": (0.5, 0.9), "eps": 1e-3,
               "maximize": True, "lr": 1e-2}],
    "Adamax": [{},
               {"weight_decay": 0.1, "betas": (0.5, 0.9), "eps": 1e-3, "maximize": True,
                "lr": 1e-2}],
    "Rprop": [{},
              {"etas": (0.3, 1.5), "step_sizes": (1e-3, 0.05), "maximize": True, "lr": 0.1}],
    "NAdam": [{},
              {"weight_decay": 0.1, "momentum_decay": 0.02, "maximize": True, "lr": 1e-2},
              {"weight_decay": 0.5, "decoupled_weight_decay": True, "betas": (0.5, 0.9),
               "eps": 1e-3, "momentum_decay": 0.0}],
    "Adafactor": [{},  # lr 1e-2: rho = 1/sqrt(t) throughout (lr only from t = 10^4)
                  {"lr": 2e-3, "beta2_decay": -0.5, "eps": (1e-3, 1e-2), "d": 2.0,
                   "weight_decay": 0.1, "maximize": True}],
    "RAdam": [{},
              {"weight_decay": 0.1, "betas": (0.9, 0.9), "maximize": True, "lr": 1e-2},
              {"weight_decay": 0.5, "decoupled_weight_decay": True, "betas": (0.5, 0.99),
               "eps": 1e-3}],
}
TORCH_CLASSES = sorted(CASES)
# (class, variant) bitwise equal to torch's CPU path: the same float32 operations in the same
# order (measured; the others differ in the last bits from the first step: FMA or op order).
BITWISE = {("Rprop", 0), ("Rprop", 1), ("SGD", 0)}


def rng_for(*salt):
    return torch.Generator().manual_seed(SEED + sum(str(s).encode()[0] * (i + 1) * 7919
                                                    for i, s in enumerate(salt)) % 100003)


def close(got, want, what, scale=None, tol=TOL):
    got, want = got.detach().reshape(-1), want.detach().reshape(-1)
    if scale is None:
        scale = float(want.abs().max()) if want.numel() else 0.0
    err = (got - want).abs()
    bad = err > tol * (want.abs() + scale) + 1e-30
    bad |= got.isnan() != want.isnan()
    bad &= ~(got.isnan() & want.isnan())
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} of {want.numel()} elements differ; first at "
        f"{int(bad.nonzero()[0])}: fusedopt {float(got[bad][0])!r}, torch {float(want[bad][0])!r}")


def bitwise(got, want, what):
    assert torch.equal(got.detach().view(torch.int32), want.detach().view(torch.int32)), (
        f"{what}: not bitwise equal; max |diff| {float((got - want).detach().abs().max())}")


def make_pair(cls_name, variant, gen):
    """Two param lists with the same values, and the two optimizers over them."""
    p0 = [torch.randn(s, generator=gen) for s in SHAPES]
    mine = [torch.nn.Parameter(p.clone()) for p in p0]
    theirs = [torch.nn.Parameter(p.clone()) for p in p0]
    options = CASES[cls_name][variant]
    lr1 = options.get("lr", inspect.signature(getattr(torch.optim, cls_name)).parameters[
        "lr"].default) * 0.5

    def groups(ps):
        return [{"params": ps[:3], **options}, {"params": ps[3:], "lr": lr1}]

    return (mine, getattr(ft, cls_name)(groups(mine)),
            theirs, getattr(torch.optim, cls_name)(groups(theirs)))


def set_grads(mine, theirs, gen, step, skip):
    for i, (a, b) in enumerate(zip(mine, theirs)):
        if i == skip and step % 3 == 0:
            a.grad = b.grad = None
            continue
        g = torch.randn(a.shape, generator=gen) * (0.1 + step % 5)
        a.grad, b.grad = g.clone(), g.clone()


def list_scale(tensors):
    return max((float(t.detach().abs().max()) for t in tensors if t.numel()), default=0.0)


def compare(mine, fo, theirs, ref, what, exact, tol=TOL):
    # scale: the largest magnitude of that quantity over the whole param list, not of one
    # tensor: in a one-element tensor whose value cancels (a momentum buffer summing terms of
    # both signs) the value's own size says nothing of the roundings it went through.
    scales = {"param": list_scale(theirs)}
    for b in theirs:
        for key, v in ref.state.get(b, {}).items():
            if key != "step" and torch.is_tensor(v):
                scales[key] = max(scales.get(key, 0.0), list_scale([v]))

    def check(got, want, label, key):
        if exact:
            bitwise(got, want, label)
        else:
            close(got, want, label, scales[key], tol)

    for i, (a, b) in enumerate(zip(mine, theirs)):
        check(a, b, f"{what} param {i}", "param")
        sa, sb = fo.state.get(a, {}), ref.state.get(b, {})
        assert sorted(sa) == sorted(sb), f"{what} param {i}: state keys {sorted(sa)} vs {sorted(sb)}"
        for key, want in sb.items():
            got = sa[key]
            if key == "step":
                assert float(got) == float(want), f"{what} param {i}: step {got} vs {want}"
                assert torch.is_tensor(got) == torch.is_tensor(want)
                if torch.is_tensor(want):
                    assert got.dtype == want.dtype and got.device == want.device
            else:
                check(got, want, f"{what} param {i} state {key}", key)


@pytest.mark.parametrize("cls_name,variant", [(c, v) for c in TORCH_CLASSES
                                              for v in range(len(CASES[c]))])
def test_fifty_steps_match_torch(cls_name, variant):
    gen = rng_for(cls_name, variant)
    mine, fo, theirs, ref = make_pair(cls_name, variant, gen)
    sched_fo = torch.optim.lr_scheduler.StepLR(fo, step_size=10, gamma=0.5)
    sched_ref = torch.optim.lr_scheduler.StepLR(ref, step_size=10, gamma=0.5)
    exact = (cls_name, variant) in BITWISE
    for step in range(1, STEPS + 1):
        set_grads(mine, theirs, gen, step, skip=4)
        if cls_name == "Rprop" and exact:
            # A last-bit difference can flip sign(g * prev) only where the product is tiny.
            for p in theirs:
                prev = ref.state.get(p, {}).get("prev")
                if p.grad is not None and prev is not None:
                    prod = p.grad * prev
                    if bool(((prod != 0) & (prod.abs() < 1e-30)).any()):
                        exact = False
        fo.step()
        ref.step()
        sched_fo.step()
        sched_ref.step()
        compare(mine, fo, theirs, ref, f"{cls_name} {CASES[cls_name][variant]} step {step}",
                exact)
    assert fo.param_groups[0]["lr"] == ref.param_groups[0]["lr"]


SKIP_ARGS = {"self", "params"}


@pytest.mark.parametrize("cls_name", TORCH_CLASSES + ["SparseAdam"])
def test_signature_and_defaults_are_torchs(cls_name):
    theirs = inspect.signature(getattr(torch.optim, cls_name).__init__).parameters
    mine = inspect.signature(getattr(ft, cls_name).__init__).parameters
    assert list(mine) == list(theirs)
    for name, p in theirs.items():
        assert mine[name].kind == p.kind, name
        assert mine[name].default == p.default, name
    w = [torch.nn.Parameter(torch.zeros(3))]
    assert getattr(ft, cls_name)(w).defaults == getattr(torch.optim, cls_name)(
        [torch.nn.Parameter(torch.zeros(3))]).defaults
    assert issubclass(getattr(ft, cls_name), torch.optim.Optimizer)


@pytest.mark.parametrize("cls_name", TORCH_CLASSES + ["SparseAdam", "SGDScheduleFree",
                                                     "AdamWScheduleFree"])
def test_every_torch_argument_is_mapped_ignored_or_refused(cls_name):
    cls = getattr(ft, cls_name)
    opt = cls([torch.nn.Parameter(torch.zeros(3))])
    group = opt.param_groups[0]
    options = opt._options(group)
    mapped = set()
    for name in options:
        mapped.add(ft._PAIRED.get(name, (name, None))[0])
    handled = mapped | set(ft._IGNORED) | {"differentiable"} | set(cls._spec.variants)
    args = set(inspect.signature(cls.__init__).parameters) - SKIP_ARGS
    assert args <= handled, f"{cls_name}: unhandled torch arguments {args - handled}"


def test_differentiable_and_sparse_are_refused():
    with pytest.raises(NotImplementedError, match="differentiable"):
        ft.Adam([torch.nn.Parameter(torch.zeros(3))], differentiable=True)
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = ft.Adam(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(NotImplementedError, match="sparse"):
        opt.step()
    bitwise(emb.weight, before, "after the refused sparse step")
    assert len(opt.state) == 0


# -- state_dict -------------------------------------------------------------------------------

def run(opt, params, gen, steps):
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


@pytest.mark.parametrize("cls_name", TORCH_CLASSES)
@pytest.mark.parametrize("direction", ["torch_to_fusedopt", "fusedopt_to_torch"])
def test_state_dict_round_trips(cls_name, direction):
    gen = rng_for(cls_name, direction)
    options = CASES[cls_name][-1]
    src_cls, dst_cls = ((getattr(torch.optim, cls_name), getattr(ft, cls_name))
                        if direction == "torch_to_fusedopt"
                        else (getattr(ft, cls_name), getattr(torch.optim, cls_name)))
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    src = src_cls(params, **options)
    run(src, params, gen, 5)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    # The switch: the same params, a new optimizer of the other kind, the saved state.
    switched = [torch.nn.Parameter(p.detach().clone()) for p in params]
    dst = dst_cls(switched, **options)
    buf.seek(0)
    dst.load_state_dict(torch.load(buf))
    sd_src, sd_dst = src.state_dict(), dst.state_dict()
    assert sd_src["param_groups"] == sd_dst["param_groups"]
    assert sd_src["state"].keys() == sd_dst["state"].keys()
    for k in sd_src["state"]:
        assert sd_src["state"][k].keys() == sd_dst["state"][k].keys()
    # Both continue from the same point with the same grads.
    g_state = gen.get_state()
    run(src, params, gen, 5)
    gen.set_state(g_state)
    run(dst, switched, gen, 5)
    compare(switched, dst, params, src, f"{cls_name} {direction}",
            exact=(cls_name, len(CASES[cls_name]) - 1) in BITWISE)


@pytest.mark.parametrize("cls_name", TORCH_CLASSES)
def test_fusedopt_checkpoint_resumes_bitwise(cls_name):
    gen = rng_for(cls_name, "resume")
    options = CASES[cls_name][-1]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = getattr(ft, cls_name)(params, **options)
    run(opt, params, gen, 4)
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buf)
    g_state = gen.get_state()
    run(opt, params, gen, 4)
    buf.seek(0)
    ckpt = torch.load(buf)
    resumed = [torch.nn.Parameter(p.clone()) for p in ckpt["params"]]
    opt2 = getattr(ft, cls_name)(resumed, **options)
    opt2.load_state_dict(ckpt["opt"])
    gen.set_state(g_state)
    run(opt2, resumed, gen, 4)
    compare(resumed, opt2, params, opt, f"{cls_name} resumed", exact=True)


# -- bad input changes nothing ------------------------------------------------------------------

def snapshot(opt):
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            out.append(p.detach().clone())
            for k, v in sorted(opt.state.get(p, {}).items()):
                out.append(v.detach().clone() if torch.is_tensor(v) else v)
    return out, {id(p): sorted(opt.state.get(p, {})) for g in opt.param_groups
                 for p in g["params"]}


def assert_unchanged(opt, before, what):
    after = snapshot(opt)
    assert after[1] == before[1], f"{what}: state keys changed"
    assert len(after[0]) == len(before[0])
    for a, b in zip(after[0], before[0]):
        if torch.is_tensor(b):
            assert a.dtype == b.dtype and torch.equal(a, b), f"{what}: a tensor changed"
        else:
            assert a == b, what


def stepped_adamw(gen):
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = ft.AdamW(params, weight_decay=0.1)
    run(opt, params, gen, 2)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    return params, opt


BAD = {
    "non-contiguous param": (ValueError, "not contiguous"),
    # float16 states (torch's, like the param): the library keeps float32 or bfloat16 ones
    "float16 param and states": ((TypeError, ValueError), "float16"),
    "grad of another shape": (ValueError, "different shape"),
    "float64 state": (TypeError, "float64"),
    "state of another shape": (ValueError, "different shape"),
    "negative lr from a scheduler": (ValueError, "lr must be >= 0"),
    "non-contiguous grad": (ValueError, "not contiguous"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_changes_nothing(case):
    gen = rng_for("bad", case)
    params, opt = stepped_adamw(gen)
    last = params[-1]
    if case == "non-contiguous param":
        wide = torch.randn(12, 6, generator=gen)
        p = torch.nn.Parameter(wide[:, ::2])
        assert not p.is_contiguous()
        opt.add_param_group({"params": [p]})
        p.grad = torch.randn(p.shape, generator=gen)
    elif case == "float16 param and states":
        p = torch.nn.Parameter(torch.randn(8, generator=gen).half())
        opt.add_param_group({"params": [p]})
        p.grad = torch.randn(8, generator=gen).half()
    elif case == "grad of another shape":
        # torch refuses a grad of another shape on assignment, not a change of its .data
        last.grad.data = torch.randn(last.numel() + 1, generator=gen)
    elif case == "float64 state":
        opt.state[last]["exp_avg"] = opt.state[last]["exp_avg"].double()
    elif case == "state of another shape":
        opt.state[last]["exp_avg_sq"] = opt.state[last]["exp_avg_sq"].reshape(-1)[:-1].clone()
    elif case == "negative lr from a scheduler":
        opt.param_groups[0]["lr"] = -1.0
    elif case == "non-contiguous grad":
        last.grad = torch.randn(last.shape[:-1] + (2 * last.shape[-1],), generator=gen)[..., ::2]
        assert not last.grad.is_contiguous()
    before = snapshot(opt)
    error, needle = BAD[case]
    with pytest.raises(error, match=needle):
        opt.step()
    assert_unchanged(opt, before, case)


def test_invalid_options_are_rejected_at_construction():
    w = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="lr must be >= 0"):
        ft.Adam(w, lr=-1)
    with pytest.raises(ValueError, match="beta2"):
        ft.AdamW(w, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="nesterov"):
        ft.SGD(w, nesterov=True)
    opt = ft.SGD(w, lr=0.1)
    with pytest.raises(ValueError, match="momentum"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "momentum": -1})
    assert len(opt.param_groups) == 1


def test_closure_zero_grad_and_skipped_params():
    gen = rng_for("closure")
    w = torch.nn.Parameter(torch.randn(10, generator=gen))
    unused = torch.nn.Parameter(torch.randn(5, generator=gen))
    opt = ft.Adam([w, unused], lr=0.1)
    target = torch.randn(10, generator=gen)

    def closure():
        opt.zero_grad()
        loss = ((w - target) ** 2).sum()
        loss.backward()
        return loss

    first = float(opt.step(closure).detach())
    for _ in range(20):
        loss = float(opt.step(closure).detach())
    assert loss < first
    assert float(opt.state[w]["step"]) == 21
    assert unused not in opt.state  # never had a grad: no state, no step count
    opt.zero_grad()
    assert w.grad is None
    before = w.detach().clone()
    opt.step()  # no grads: nothing happens
    assert torch.equal(w, before) and float(opt.state[w]["step"]) == 21


@pytest.mark.parametrize("cls_name,torch_cls,kwargs", [
    ("LazyAdam", "SparseAdam", {"lr": 1e-2, "betas": (0.8, 0.95), "maximize": True}),
])
def test_lazyadam_is_sparseadam_on_dense_rows(cls_name, torch_cls, kwargs):
    # torch.optim.SparseAdam takes sparse gradients only; with every row present its update is
    # LazyAdam's dense step.
    gen = rng_for(cls_name)
    p0 = torch.randn(20, 8, generator=gen)
    a, b = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    fo, ref = getattr(ft, cls_name)([a], **kwargs), getattr(torch.optim, torch_cls)([b], **kwargs)
    for _ in range(20):
        g = torch.randn(20, 8, generator=gen)
        a.grad, b.grad = g.clone(), g.clone().to_sparse()
        fo.step()
        ref.step()
        close(a, b, cls_name)
    assert fo.state[a]["step"] == ref.state[b]["step"] == 20
    close(fo.state[a]["exp_avg"], ref.state[b]["exp_avg"], "exp_avg")


# Sparse gradients: nn.Embedding(sparse=True) tables stepped row by row, against torch's
# sparse paths. Index batches repeat rows (summed, as torch's coalesce does; the sum's order may
# differ, hence the tolerance, not bits) and leave most rows untouched (bitwise unchanged, with
# their states).
@pytest.mark.parametrize("cls_name,kwargs", [
    ("SparseAdam", {}),
    ("SparseAdam", {"lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-3, "maximize": True}),
    ("Adagrad", {}),
    ("Adagrad", {"lr": 0.1, "lr_decay": 0.05, "initial_accumulator_value": 0.5, "eps": 1e-3,
                 "maximize": True}),
])
def test_sparse_embedding_gradients_match_torch(cls_name, kwargs):
    gen = rng_for("sparse", cls_name, len(kwargs))
    rows, dim = 50, 12
    w0 = torch.randn(rows, dim, generator=gen)
    mine, theirs = torch.nn.Embedding(rows, dim, sparse=True), torch.nn.Embedding(
        rows, dim, sparse=True)
    with torch.no_grad():
        mine.weight.copy_(w0)
        theirs.weight.copy_(w0)
    fo = getattr(ft, cls_name)(mine.parameters(), **kwargs)
    ref = getattr(torch.optim, cls_name)(theirs.parameters(), **kwargs)
    touched = torch.zeros(rows, dtype=torch.bool)
    for step in range(1, 31):
        idx = torch.randint(0, rows // 2, (9,), generator=gen)  # rows >= 25 never touched
        touched[idx] = True
        target = torch.randn(9, dim, generator=gen)
        for emb in (mine, theirs):
            emb.zero_grad()
            ((emb(idx) - target) ** 2).sum().backward()
        assert mine.weight.grad.is_sparse
        fo.step()
        ref.step()
        what = f"{cls_name} {kwargs} step {step}"
        close(mine.weight, theirs.weight, what)
        for key, want in ref.state[theirs.weight].items():
            got = fo.state[mine.weight][key]
            if key == "step":
                assert float(got) == float(want) and type(got) is type(want), (what, got, want)
            else:
                close(got, want, f"{what} state {key}")
    untouched = ~touched
    assert bool(untouched.any())
    bitwise(mine.weight[untouched], w0[untouched], "rows no index named")


def test_sparse_steps_refuse_what_torch_refuses_and_change_nothing():
    w = torch.nn.Parameter(torch.randn(6, 3))
    opt = ft.SparseAdam([w])
    w.grad = torch.randn(6, 3)  # dense
    before = w.detach().clone()
    with pytest.raises(RuntimeError, match="does not support dense gradients"):
        opt.step()
    bitwise(w, before, "after a refused dense grad")
    assert len(opt.state[w]) == 0
    emb = torch.nn.Embedding(6, 3, sparse=True)
    opt = ft.Adagrad(emb.parameters(), weight_decay=0.1)  # torch refuses it for sparse grads
    emb(torch.tensor([1, 1, 4])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(ValueError, match="weight_decay"):
        opt.step()
    bitwise(emb.weight, before, "after a refused sparse step")
    assert float(opt.state[emb.weight]["step"]) == 0


def test_gradscaler_on_the_cpu_unscales_and_skips_like_torch():
    # torch.amp.GradScaler's ordinary path: it unscales the grads in place, and skips
    # optimizer.step() where they hold inf or NaN, then lowers its scale.
    gen = rng_for("gradscaler")
    w0 = torch.randn(40, generator=gen)
    mine, theirs = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    fo, ref = ft.AdamW([mine], lr=1e-2), torch.optim.AdamW([theirs], lr=1e-2)
    scalers = torch.amp.GradScaler("cpu", init_scale=2.0**12), torch.amp.GradScaler(
        "cpu", init_scale=2.0**12)
    for step in range(12):
        target = torch.randn(40, generator=gen)
        for w, opt, scaler in ((mine, fo, scalers[0]), (theirs, ref, scalers[1])):
            opt.zero_grad()
            scaler.scale(((w - target) ** 2).sum()).backward()
            if step in (3, 7):
                w.grad[5] = float("inf") if step == 3 else float("nan")
            scaler.step(opt)
            scaler.update()
        close(mine, theirs, f"GradScaler step {step}")
        assert scalers[0].get_scale() == scalers[1].get_scale()
    assert fo.state[mine]["step"] == ref.state[theirs]["step"] == 10  # two skipped


def lion_reference(p, g, m, lr, b1, b2, wd):
    c = b1 * m + (1 - b1) * g
    p = p * (1 - lr * wd) - lr * torch.sign(c)
    return p, b2 * m + (1 - b2) * g


def test_adafactor_zero_grads_and_misshapen_state():
    """Zero gradients step like torch's (the param only decays); a factored state of the wrong
    shape is refused and nothing changes."""
    gen = rng_for("adafactor-zero")
    p0 = [torch.randn(s, generator=gen) for s in [(6, 10), (2, 5, 7), (9,)]]
    mine = [torch.nn.Parameter(p.clone()) for p in p0]
    theirs = [torch.nn.Parameter(p.clone()) for p in p0]
    fo = ft.Adafactor(mine, lr=0.05, weight_decay=0.2)
    ref = torch.optim.Adafactor(theirs, lr=0.05, weight_decay=0.2)
    for _ in range(3):
        for a, b in zip(mine, theirs):
            a.grad, b.grad = torch.zeros_like(a), torch.zeros_like(b)
        fo.step()
        ref.step()
    compare(mine, fo, theirs, ref, "Adafactor zero grads", exact=False)
    for a in mine:
        a.grad = torch.randn(a.shape, generator=gen)
    fo.state[mine[1]]["row_var"] = torch.zeros(2, 5)  # torch's layout is (2, 5, 1)
    before = snapshot(fo)
    with pytest.raises(ValueError, match="row_var"):
        fo.step()
    assert_unchanged(fo, before, "Adafactor with a misshapen row_var")


def test_lion_and_signsgd_follow_their_formulas():
    # Reference in float64 from docs/optimizers.md; a sign of a value within float32 rounding
    # of zero may legitimately differ, so elements with |c| < 1e-6 are left out.
    gen = rng_for("lion")
    p0 = torch.randn(1000, generator=gen)
    w = torch.nn.Parameter(p0.clone())
    opt = ft.Lion([w], lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    p, m = p0.double(), torch.zeros(1000, dtype=torch.float64)
    for _ in range(3):
        g = torch.randn(1000, generator=gen)
        w.grad = g.clone()
        c = 0.8 * m + 0.2 * g.double()
        opt.step()
        p, m = lion_reference(p, g.double(), m, 1e-2, 0.8, 0.95, 0.1)
        keep = c.abs() > 1e-6
        assert torch.allclose(w.detach().double()[keep], p[keep], rtol=1e-5, atol=1e-6)
        p[~keep] = w.detach().double()[~keep]
    s = torch.nn.Parameter(p0.clone())
    opt = ft.SignSGD([s], lr=0.1, weight_decay=0.0, maximize=True)
    g = torch.randn(1000, generator=gen)
    s.grad = g.clone()
    opt.step()
    assert torch.equal(s.detach(), p0 + 0.1 * torch.sign(g))


def ademamix_reference(p, g, st, step, lr, betas, alpha, t_alpha, t_beta3, eps, weight_decay):
    """One AdEMAMix step in float64, from the paper as bitsandbytes writes it (its
    _ReferenceAdEMAMix with the schedulers of its AdEMAMix.update_step; step counts from 1)."""
    b1, b2, b3 = betas
    if t_alpha:
        alpha = min(step * alpha / t_alpha, alpha)
    if t_beta3:
        s = step / t_beta3
        l1, l3 = math.log(b1), math.log(b3)
        b3 = min(math.exp(l1 * l3 / ((1 - s) * l3 + s * l1)), b3)
    st["m1"] = b1 * st["m1"] + (1 - b1) * g
    st["m2"] = b3 * st["m2"] + (1 - b3) * g
    st["nu"] = b2 * st["nu"] + (1 - b2) * g * g
    denom = st["nu"].sqrt() / math.sqrt(1 - b2 ** step) + eps
    update = (st["m1"] / (1 - b1 ** step) + alpha * st["m2"]) / denom
    return p - lr * (update + weight_decay * p)


@pytest.mark.parametrize("kwargs", [
    {"lr": 1e-2},  # bitsandbytes' defaults otherwise: no warm-up, weight_decay 1e-2
    {"lr": 1e-2, "betas": (0.8, 0.99, 0.999), "alpha": 3.0, "t_alpha": 20, "t_beta3": 35,
     "eps": 1e-6, "weight_decay": 0.1},
    {"lr": 5e-3, "t_alpha": 60, "t_beta3": 10, "weight_decay": 0.0, "maximize": True},
])
def test_ademamix_follows_its_formula(kwargs):
    # fusedopt computes in float32, the reference in float64 from the same float32 grads: over
    # 50 steps the two part by float32 roundings of the param (about 1) and of each moment,
    # under 1e-5 of the value plus the quantity's largest magnitude over the param list (as
    # TOL above). A moment bias-corrected or not, a warm-up off by a step, or decay after the
    # update instead of before is off by more.
    gen = rng_for("ademamix", str(kwargs))
    opt_args = dict(betas=(0.9, 0.999, 0.9999), alpha=5.0, t_alpha=None, t_beta3=None,
                    eps=1e-8, weight_decay=1e-2)
    opt_args.update({k: v for k, v in kwargs.items() if k != "maximize"})
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = ft.AdEMAMix(params, **kwargs)
    ref = [p.detach().double().clone() for p in params]
    states = [{k: torch.zeros_like(r) for k in ("m1", "m2", "nu")} for r in ref]
    sign = -1.0 if kwargs.get("maximize") else 1.0
    for step in range(1, STEPS + 1):
        grads = [torch.randn(s, generator=gen) for s in SHAPES]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            ref[i] = ademamix_reference(ref[i], sign * g.double(), states[i], step, **opt_args)
        pairs = {"param": [(p.detach(), ref[i]) for i, p in enumerate(params)]}
        for name, key in (("exp_avg", "m1"), ("exp_avg_slow", "m2"), ("exp_avg_sq", "nu")):
            pairs[name] = [(opt.state[p][name], states[i][key]) for i, p in enumerate(params)]
        for what, values in pairs.items():
            # Over the list: a one-element moment whose terms cancel keeps roundings of the
            # size of its terms, not of its own.
            scale = max(float(want.abs().max()) for _, want in values)
            for i, (got, want) in enumerate(values):
                err = (got.double() - want).abs()
                bound = 1e-5 * (want.abs() + scale)
                assert bool((err <= bound).all()), (
                    f"{kwargs} step {step} param {i} {what}: max error {float(err.max()):.3g}")
        assert all(float(opt.state[p]["step"]) == step for p in params)


def test_ademamix_signature_is_bitsandbytes():
    sig = inspect.signature(ft.AdEMAMix.__init__).parameters
    assert list(sig)[:10] == ["self", "params", "lr", "betas", "alpha", "t_alpha", "t_beta3",
                              "eps", "weight_decay", "maximize"]
    opt = ft.AdEMAMix([torch.nn.Parameter(torch.zeros(3))])
    assert opt.defaults == {"lr": 1e-3, "betas": (0.9, 0.999, 0.9999), "alpha": 5.0,
                            "t_alpha": None, "t_beta3": None, "eps": 1e-8,
                            "weight_decay": 1e-2, "maximize": False}
    assert opt._options(opt.param_groups[0]) == {
        "lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "beta3": 0.9999, "alpha": 5.0, "eps": 1e-8,
        "weight_decay": 1e-2, "maximize": 0.0}
    with pytest.raises(ValueError, match="beta3"):
        ft.AdEMAMix([torch.nn.Parameter(torch.zeros(3))], betas=(0.9, 0.999, 1.0))


# -- numpy through DLPack -----------------------------------------------------------------------

def test_numpy_arrays_step_like_torch_tensors():
    gen = np.random.default_rng(SEED)
    p0 = [gen.standard_normal(s).astype(np.float32) for s in SHAPES]
    arrays = [p.copy() for p in p0]
    tensors = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in p0]
    opt_np = fusedopt.Optimizer("adamw", arrays, lr=1e-2, weight_decay=0.1, amsgrad=1)
    opt_t = ft.AdamW(tensors, lr=1e-2, weight_decay=0.1, amsgrad=True)
    for step in range(5):
        grads = [gen.standard_normal(s).astype(np.float32) for s in SHAPES]
        grads_np = [None if (i == 2 and step == 1) else g for i, g in enumerate(grads)]
        for t, g in zip(tensors, grads_np):
            t.grad = None if g is None else torch.from_numpy(g.copy())
        opt_np.step(grads_np)
        opt_t.step()
    for i, (a, t) in enumerate(zip(arrays, tensors)):
        assert np.array_equal(a, t.detach().numpy()), f"param {i}"
        assert opt_np.steps[i] == int(opt_t.state[t]["step"])
        for name, v in opt_np.state[i].items():
            assert np.array_equal(v, opt_t.state[t][name].numpy()), f"param {i} {name}"


def test_numpy_weight_ema_matches_the_torch_class():
    # The same library pass under both: bitwise the same EMAs; swap twice restores both; a bad
    # step creates no EMA.
    gen = np.random.default_rng(SEED)
    p0 = [gen.standard_normal(s).astype(np.float32) for s in SHAPES]
    arrays = [p.copy() for p in p0]
    tensors = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in p0]
    opt_np = fusedopt.Optimizer("adam", arrays, lr=1e-2)
    opt_t = ft.Adam(tensors, lr=1e-2)
    opt_np.ema_decay = opt_t.ema_decay = 0.75
    with pytest.raises(TypeError, match="float64"):
        opt_np.step([np.ones(s) for s in SHAPES])  # float64 grads: refused, no EMA made
    assert opt_np.ema == [None] * len(SHAPES)
    for step in range(4):
        grads = [gen.standard_normal(s).astype(np.float32) for s in SHAPES]
        for t, g in zip(tensors, grads):
            t.grad = torch.from_numpy(g.copy())
        opt_np.step(grads)
        opt_t.step()
    for i, (a, t) in enumerate(zip(arrays, tensors)):
        assert np.array_equal(a, t.detach().numpy()), f"param {i}"
        assert np.array_equal(opt_np.ema[i], opt_t.state[t]["ema"].numpy()), f"ema {i}"
        assert not np.array_equal(opt_np.ema[i], a) or a.size == 0
    before = [a.copy() for a in arrays], [e.copy() for e in opt_np.ema]
    opt_np.swap_ema()
    assert all(np.array_equal(a, e) for a, e in zip(arrays, before[1]))
    opt_np.swap_ema()
    assert all(np.array_equal(a, b) for a, b in zip(arrays, before[0]))
    opt_np.copy_ema_to_params()
    assert all(np.array_equal(a, e) for a, e in zip(arrays, opt_np.ema))
    with pytest.raises(ValueError, match="cannot turn"):
        opt_np.ema_decay = 0
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        opt_np.ema_decay = 1.0


def test_numpy_bad_input_changes_nothing():
    w = np.ones(8, np.float32)
    b = np.ones(8, np.float32)
    opt = fusedopt.Optimizer("adam", [w, b])
    with pytest.raises(TypeError, match="float64"):
        opt.step([np.ones(8, np.float32), np.ones(8)])  # a float64 grad
    assert np.array_equal(w, np.ones(8, np.float32)) and opt.steps == [0, 0]
    assert opt.state == [{}, {}]
    with pytest.raises(ValueError, match="unknown algorithm"):
        fusedopt.Optimizer("adamm", [w])
    with pytest.raises(ValueError, match="beta1"):
        fusedopt.Optimizer("adam", [w], beta1=1.5)


# -- CUDA ---------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or fusedopt.cuda_device_count() == 0,
    reason="needs a CUDA GPU and a fusedopt built with CUDA")


@needs_cuda
@pytest.mark.parametrize("cls_name", TORCH_CLASSES)
def test_cuda_equals_cpu_bitwise_and_torch(cls_name):
    gen = rng_for(cls_name, "cuda")
    options = CASES[cls_name][-1]
    p0 = [torch.randn(s, generator=gen) for s in SHAPES + [(3, 1 << 16)]]
    cpu = [torch.nn.Parameter(p.clone()) for p in p0]
    gpu = [torch.nn.Parameter(p.clone().cuda()) for p in p0]
    ref = [torch.nn.Parameter(p.clone().cuda()) for p in p0]
    o_cpu = getattr(ft, cls_name)(cpu, **options)
    o_gpu = getattr(ft, cls_name)(gpu, **options)
    o_ref = getattr(torch.optim, cls_name)(ref, **options)
    for _ in range(10):
        for a, b, c in zip(cpu, gpu, ref):
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad, c.grad = g.clone(), g.cuda(), g.cuda()
        o_cpu.step()
        o_gpu.step()
        o_ref.step()
    torch.cuda.synchronize()
    for a, b, c in zip(cpu, gpu, ref):
        bitwise(b.cpu(), a, f"{cls_name} cuda vs cpu")
        assert o_gpu.state[b].get("step", torch.tensor(0.)).device.type == "cpu"
        close(b.cpu(), c.cpu(), f"{cls_name} cuda vs torch")


@needs_cuda
def test_cuda_param_with_state_on_another_device_changes_nothing():
    w = torch.nn.Parameter(torch.randn(64, device="cuda"))
    opt = ft.Adam([w])
    w.grad = torch.randn(64, device="cuda")
    opt.step()
    opt.state[w]["exp_avg"] = opt.state[w]["exp_avg"].cpu()
    before = w.detach().clone()
    with pytest.raises(ValueError, match="is on cpu, the param on cuda:0"):
        opt.step()
    assert torch.equal(w, before) and float(opt.state[w]["step"]) == 1


@needs_cuda
def test_gradscaler_unscales_and_skips_nonfinite_steps():
    w = torch.nn.Parameter(torch.randn(64, device="cuda"))
    opt = ft.AdamW([w])
    scaler = torch.amp.GradScaler("cuda")
    loss = (w * w).sum()
    scaler.scale(loss).backward()
    w.grad[0] = float("inf")
    before = w.detach().clone()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(w, before) and w not in opt.state


# -- the weight EMA -------------------------------------------------------------------------------

EMA_CASES = [("AdamW", {"lr": 0.01, "weight_decay": 0.1}), ("SGD", {"lr": 0.05, "momentum": 0.9}),
             ("Adam", {"lr": 0.01, "amsgrad": True})]


@pytest.mark.parametrize("cls_name,kwargs", EMA_CASES)
@pytest.mark.parametrize("decay", [0.99, 0.3])  # 0.3: torch's other lerp branch
def test_weight_ema_matches_timm_style_ema_in_torch(cls_name, kwargs, decay):
    """fusedopt's EMA (updated in the step's pass) against timm's ModelEmaV3 without warm-up,
    written in torch: a copy of the params at the start, then after every step
    torch._foreach_lerp_(ema, params, 1 - decay), beside torch's optimizer of the same name:
    the EMA is checked through 50 steps of the same trajectory."""
    gen = rng_for(cls_name, "ema", decay)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fo = getattr(ft, cls_name)(params, **kwargs)
    fo.ema_decay = decay
    ref = getattr(torch.optim, cls_name)(theirs, **kwargs)
    ema = [p.detach().clone() for p in theirs]  # timm: the EMA model starts as a copy
    for step in range(1, STEPS + 1):
        for p, q in zip(params, theirs):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        fo.step()
        ref.step()
        torch._foreach_lerp_(ema, [q.detach() for q in theirs], 1.0 - decay)
        scale = max(float(e.abs().max()) for e in ema)
        for i, (p, e) in enumerate(zip(params, ema)):
            got = fo.state[p]["ema"]
            assert got.dtype == torch.float32 and got.shape == p.shape
            err = float((got - e).abs().max())
            assert err <= TOL * scale, f"{cls_name} decay {decay} step {step} param {i}: {err}"


def test_weight_ema_swap_copy_checkpoint_and_refusals():
    gen = rng_for("ema-swap")
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = ft.AdamW(params, lr=0.01)
    with pytest.raises(ValueError, match="ema_decay"):
        opt.swap_ema()  # no EMA
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="ema_decay"):
            opt.ema_decay = bad
    assert opt.ema_decay == 0.0
    opt.ema_decay = 0.9
    params[-1].requires_grad_(False)  # never stepped: no EMA, left alone by swap and copy
    run(opt, params[:-1], gen, 5)
    assert "ema" not in opt.state[params[-1]]
    with pytest.raises(ValueError, match="ema_decay"):
        opt.ema_decay = 0.0  # params have an EMA
    opt.ema_decay = 0.95  # the decay itself may change
    p_before = [p.detach().clone() for p in params]
    e_before = [opt.state[p]["ema"].clone() for p in params[:-1]]
    assert not torch.equal(p_before[0], e_before[0])
    opt.swap_ema()
    for p, e in zip(params, e_before):
        assert torch.equal(p.detach(), e)
    for p, q in zip(params[:-1], p_before):
        assert torch.equal(opt.state[p]["ema"], q)
    assert torch.equal(params[-1].detach(), p_before[-1])
    opt.swap_ema()
    for p, q in zip(params, p_before):
        assert torch.equal(p.detach(), q)
    # The checkpoint carries the decay and the float32 EMA; resuming equals never stopping.
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = ft.AdamW(resumed, lr=0.01)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf))
    assert opt2.ema_decay == 0.95
    g_state = gen.get_state()
    run(opt, params[:-1], gen, 3)
    gen.set_state(g_state)
    run(opt2, resumed[:-1], gen, 3)
    for p, q in zip(params[:-1], resumed[:-1]):
        assert torch.equal(p.detach(), q.detach())
        assert torch.equal(opt.state[p]["ema"], opt2.state[q]["ema"])
    e_now = [opt.state[p]["ema"].clone() for p in params[:-1]]
    opt.copy_ema_to_params()
    for p, e in zip(params, e_now):
        assert torch.equal(p.detach(), e)
        assert torch.equal(opt.state[p]["ema"], e)


def lamb_reference(ps, gs, states, step, lr, betas, eps, weight_decay, bias_correction,
                   adam_w_mode, grad_averaging, max_grad_norm, use_nvlamb):
    """One step of NVIDIA Apex's FusedLAMB over a list, in float64: its global gradient
    clipping, Adam's moments, the update with decay inside it, the per-tensor trust ratio."""
    b1, b2 = betas
    norm = math.sqrt(sum(float((g * g).sum()) for g in gs))
    clip = norm / max_grad_norm if max_grad_norm and norm > max_grad_norm else 1.0
    bc1 = 1 - b1 ** step if bias_correction else 1.0
    bc2 = 1 - b2 ** step if bias_correction else 1.0
    out = []
    for p, g, st in zip(ps, gs, states):
        g = g / clip
        if not adam_w_mode:
            g = g + weight_decay * p
        st["exp_avg"] = b1 * st["exp_avg"] + ((1 - b1) if grad_averaging else 1.0) * g
        st["exp_avg_sq"] = b2 * st["exp_avg_sq"] + (1 - b2) * g * g
        u = (st["exp_avg"] / bc1) / ((st["exp_avg_sq"] / bc2).sqrt() + eps)
        if adam_w_mode:
            u = u + weight_decay * p
        pn, un = float(p.norm()), float(u.norm())
        ratio = pn / un if (weight_decay != 0 or use_nvlamb) and pn > 0 and un > 0 else 1.0
        out.append(p - lr * ratio * u)
    return out


@pytest.mark.parametrize("kwargs", [
    {},  # Apex's defaults: clipping at 1.0 (these grads' norm is far above it)
    {"lr": 1e-2, "betas": (0.5, 0.9), "eps": 1e-4, "weight_decay": 0.1, "adam_w_mode": False,
     "bias_correction": False, "grad_averaging": False, "max_grad_norm": 0.0},
    {"weight_decay": 0.0, "use_nvlamb": True, "max_grad_norm": 1e6},
])
def test_lamb_follows_apex(kwargs):
    # Each step restarts the float64 reference from fusedopt's float32 params and states, so
    # the comparison is of one step's roundings (1e-5 of the value plus the list's largest
    # magnitude, as TOL above). A ratio off, clipping ignored, or decay in the wrong place is
    # off by far more.
    gen = rng_for("lamb", str(kwargs))
    args = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, bias_correction=True,
                adam_w_mode=True, grad_averaging=True, max_grad_norm=1.0, use_nvlamb=False)
    args.update(kwargs)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = ft.LAMB(params, **kwargs)
    for step in range(1, 11):
        ps = [p.detach().double().clone() for p in params]
        states = [{k: (opt.state[p][k].double().clone() if k in opt.state[p]
                       else torch.zeros_like(ps[i])) for k in ("exp_avg", "exp_avg_sq")}
                  for i, p in enumerate(params)]
        grads = [torch.randn(s, generator=gen) for s in SHAPES]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        want = lamb_reference(ps, [g.double() for g in grads], states, step, **args)
        scale = max(float(w.abs().max()) for w in want)
        for i, p in enumerate(params):
            err = (p.detach().double() - want[i]).abs()
            assert bool((err <= 1e-5 * (want[i].abs() + scale)).all()), (
                f"{kwargs} step {step} param {i}: max error {float(err.max()):.3g}")


def test_lamb_signature_is_apex():
    sig = inspect.signature(ft.LAMB.__init__).parameters
    assert list(sig) == ["self", "params", "lr", "bias_correction", "betas", "eps",
                         "weight_decay", "amsgrad", "adam_w_mode", "grad_averaging",
                         "set_grad_none", "max_grad_norm", "use_nvlamb"]
    with pytest.raises(RuntimeError):
        ft.LAMB([torch.nn.Parameter(torch.zeros(3))], amsgrad=True)


def test_lars_follows_optax_with_an_exempt_group():
    # optax.lars: decay, trust ratio tc * ||p|| / (||g + wd p|| + eps), lr, then a trace; the
    # group with adapt=False takes neither ratio nor decay. Restarted each step as above.
    gen = rng_for("lars")
    w = torch.nn.Parameter(torch.randn(300, 7, generator=gen))
    b = torch.nn.Parameter(torch.randn(7, generator=gen))
    lr, mom, wd, tc = 0.5, 0.9, 0.1, 0.02
    opt = ft.LARS([{"params": [w]}, {"params": [b], "adapt": False}], lr=lr, momentum=mom,
                  weight_decay=wd, trust_coefficient=tc, nesterov=True)
    for step in range(1, 8):
        for p, adapt in ((w, True), (b, False)):
            g = torch.randn(p.shape, generator=gen)
            p.grad = g
        before = {p: (p.detach().double().clone(),
                      opt.state[p]["momentum_buffer"].double().clone()
                      if "momentum_buffer" in opt.state[p] else torch.zeros(p.shape).double())
                  for p in (w, b)}
        opt.step()
        for p, adapt in ((w, True), (b, False)):
            p0, v0 = before[p]
            u = p.grad.double() + (wd * p0 if adapt else 0.0)
            ratio = tc * float(p0.norm()) / float(u.norm()) if adapt else 1.0
            v = mom * v0 + lr * ratio * u
            want = p0 - (lr * ratio * u + mom * v)
            err = (p.detach().double() - want).abs()
            assert bool((err <= 1e-5 * (want.abs() + float(want.abs().max()))).all()), (
                f"step {step}, adapt {adapt}: max error {float(err.max()):.3g}")


# -- Schedule-Free, against facebookresearch/schedule_free ----------------------------------------
#
# fusedopt.torch.SGDScheduleFree / AdamWScheduleFree against the schedulefree package itself
# (PyPI schedulefree==1.4.1, which CI installs), step for step on the CPU in float32, with its
# foreach path (its default). Tolerance: the package's step is a chain of torch foreach ops, each
# rounded to float32 (with torch's vectorized CPU kernels free to fuse multiply-adds), ours one
# fused pass in the same float32 formula but its own operation order: a few float32 roundings per
# step apart, which the averaging (y pulled towards z, z an SGD/Adam iterate) does not amplify.
# Measured over 40 seeds, every variant below: at most 1.6e-7 (about one float32 ulp) of |ref|
# plus the list's largest magnitude of that quantity, through 35 steps and eval(). SF_TOL, 2e-6
# of the same (about 16 ulps), keeps a margin of more than 10x, where a wrong c_t, a missing
# warm-up or bias correction, or the decay taken at x instead of y is off by far more.
# The group scalars: k, lr_max and scheduled_lr are the same double operations in both (exact);
# weight_sum adds t^r * lr_max^p, which the library computes with its own pow (bit-identical on
# CPU and GPU) where the package uses Python's: a few ulps of each term apart, so 1e-12 relative.

try:
    import schedulefree
except ImportError:
    schedulefree = None
needs_schedulefree = pytest.mark.skipif(
    schedulefree is None, reason="the schedulefree package (facebookresearch/schedule_free; "
    "pip install schedulefree==1.4.1, as CI does) is not importable")

SF_CASES = {
    "SGDScheduleFree": [
        {},  # the package's defaults: lr 1, momentum 0.9, no warm-up, r 0, weight_lr_power 2
        {"lr": 0.3, "momentum": 0.7, "weight_decay": 0.05, "warmup_steps": 8, "r": 0.5,
         "weight_lr_power": 1.5},
        # a warm-up longer than the run; momentum < 0.5: train()'s lerp in torch's other branch
        {"lr": 2.0, "momentum": 0.3, "weight_decay": 0.01, "warmup_steps": 50, "r": 1.0,
         "weight_lr_power": 0.0},
    ],
    "AdamWScheduleFree": [
        {},  # lr 0.0025, betas (0.9, 0.999), eps 1e-8, no decay, warm-up or polynomial weight
        {"lr": 0.02, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1, "warmup_steps": 8,
         "r": 0.5, "weight_lr_power": 1.0},
        {"lr": 0.01, "betas": (0.95, 0.9), "eps": 1e-3, "weight_decay": 0.01,
         "warmup_steps": 50, "r": 2.0, "weight_lr_power": 3.0},
    ],
}
SF_STEPS = 35
SF_TOL = 2e-6
SF_GROUP_KEYS = ("k", "lr_max", "scheduled_lr", "train_mode", "lr")


def sf_pair(cls_name, options, gen, shapes=SHAPES):
    """The same params under fusedopt's class and the package's: two groups, the second with its
    own lr, decay and warm-up."""
    p0 = [torch.randn(s, generator=gen) for s in shapes]
    mine = [torch.nn.Parameter(p.clone()) for p in p0]
    theirs = [torch.nn.Parameter(p.clone()) for p in p0]
    lr1 = options.get("lr", inspect.signature(getattr(schedulefree, cls_name)).parameters[
        "lr"].default) * 0.5

    def groups(ps):
        return [{"params": ps[:3], **options},
                {"params": ps[3:], "lr": lr1, "weight_decay": 0.02, "warmup_steps": 3}]

    return (mine, getattr(ft, cls_name)(groups(mine)),
            theirs, getattr(schedulefree, cls_name)(groups(theirs)))


def sf_grads(mine, theirs, gen, scale=1.0, none=()):
    # Each gets its own copy: the package's step overwrites p.grad (with the normalized update).
    for i, (a, b) in enumerate(zip(mine, theirs)):
        if i in none:
            a.grad = b.grad = None
            continue
        g = torch.randn(a.shape, generator=gen) * scale
        a.grad, b.grad = g.clone(), g.clone()


def sf_compare(mine, fo, theirs, ref, what):
    compare(mine, fo, theirs, ref, what, exact=False, tol=SF_TOL)
    for i, (ga, gb) in enumerate(zip(fo.param_groups, ref.param_groups)):
        for key in SF_GROUP_KEYS:
            assert ga[key] == gb[key], f"{what} group {i} {key}: {ga[key]!r} vs {gb[key]!r}"
        assert ga["weight_sum"] == pytest.approx(gb["weight_sum"], rel=1e-12, abs=0), (
            f"{what} group {i} weight_sum")


@needs_schedulefree
@pytest.mark.parametrize("cls_name,variant", [(c, v) for c in sorted(SF_CASES)
                                              for v in range(len(SF_CASES[c]))])
def test_schedule_free_matches_the_package(cls_name, variant):
    """35 steps beside the package, with a StepLR schedule editing the groups' lr (lr_max
    follows it in both), param 4 without a grad every third step, and steps 7 and 8 without any
    grad in group 1 (the package still advances its k, lr_max and weight_sum); then eval() (x),
    train() (y) and 5 more steps."""
    options = SF_CASES[cls_name][variant]
    gen = rng_for("schedule-free", cls_name, variant)
    mine, fo, theirs, ref = sf_pair(cls_name, options, gen)
    assert fo.param_groups[0]["train_mode"] is False  # the package's starting mode
    fo.train()
    ref.train()
    sched_fo = torch.optim.lr_scheduler.StepLR(fo, step_size=10, gamma=0.5)
    sched_ref = torch.optim.lr_scheduler.StepLR(ref, step_size=10, gamma=0.5)
    for step in range(1, SF_STEPS + 1):
        none = (3, 4, 5) if step in (7, 8) else (4,) if step % 3 == 0 else ()
        sf_grads(mine, theirs, gen, 0.1 + step % 5, none)
        fo.step()
        ref.step()
        sched_fo.step()
        sched_ref.step()
        sf_compare(mine, fo, theirs, ref, f"{cls_name} {options} step {step}")
    assert fo.param_groups[1]["k"] == SF_STEPS
    fo.eval()
    ref.eval()
    scale = list_scale(theirs)
    for i, (a, b) in enumerate(zip(mine, theirs)):
        close(a, b, f"{cls_name} {options} eval() param {i}", scale, SF_TOL)
    fo.train()
    ref.train()
    for step in range(SF_STEPS + 1, SF_STEPS + 6):
        sf_grads(mine, theirs, gen)
        fo.step()
        ref.step()
        sf_compare(mine, fo, theirs, ref, f"{cls_name} {options} after train(), step {step}")


@needs_schedulefree
@pytest.mark.parametrize("cls_name", sorted(SF_CASES))
def test_schedule_free_signature_and_defaults_are_the_packages(cls_name):
    theirs = inspect.signature(getattr(schedulefree, cls_name).__init__).parameters
    mine = inspect.signature(getattr(ft, cls_name).__init__).parameters
    assert list(mine) == list(theirs)
    for name, p in theirs.items():
        assert mine[name].kind == p.kind, name
        assert mine[name].default == p.default, name  # foreach's too: the same expression
    assert getattr(ft, cls_name)([torch.nn.Parameter(torch.zeros(3))]).defaults == getattr(
        schedulefree, cls_name)([torch.nn.Parameter(torch.zeros(3))]).defaults
    assert issubclass(getattr(ft, cls_name), torch.optim.Optimizer)


@pytest.mark.parametrize("cls_name", sorted(SF_CASES))
def test_schedule_free_train_eval_twice_is_bitwise(cls_name):
    gen = rng_for("schedule-free-modes", cls_name)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = getattr(ft, cls_name)(params, **SF_CASES[cls_name][1])
    fresh = [p.detach().clone() for p in params]
    opt.eval()  # on fresh params (no z yet): nothing changes, as the package's
    opt.train()
    for p, q in zip(params, fresh):
        bitwise(p, q, "eval()/train() before any step")
    params[-1].requires_grad_(False)  # never steps: no z, left alone
    run(opt, params[:-1], gen, 6)
    y = [p.detach().clone() for p in params]
    for _ in range(2):
        opt.eval()
        assert all(not g["train_mode"] for g in opt.param_groups)
        for p, q in zip(params[:-1], y):
            assert torch.equal(opt.state[p]["train_param"], q)
            assert not torch.equal(p.detach(), q)  # x, not y
        bitwise(params[-1], y[-1], "the param that never stepped, in eval()")
        x = [p.detach().clone() for p in params]
        opt.eval()  # already in eval mode: nothing changes
        for p, q in zip(params, x):
            bitwise(p, q, "a second eval()")
        opt.train()
        for p, q in zip(params, y):
            bitwise(p, q, "train() after eval()")
            assert "train_param" not in opt.state.get(p, {})
        opt.train()  # already in train mode
        for p, q in zip(params, y):
            bitwise(p, q, "a second train()")


def sf_group_snapshot(opt):
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


@needs_schedulefree
@pytest.mark.parametrize("cls_name", sorted(SF_CASES))
def test_schedule_free_step_in_eval_mode_raises_as_the_package_and_changes_nothing(cls_name):
    gen = rng_for("schedule-free-eval-step", cls_name)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = getattr(ft, cls_name)(params)
    pkg = getattr(schedulefree, cls_name)([torch.nn.Parameter(torch.zeros(3))])
    pkg.param_groups[0]["params"][0].grad = torch.zeros(3)
    with pytest.raises(Exception) as theirs:
        pkg.step()  # the package starts in eval mode
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    for phase in ("fresh", "after eval()"):
        if phase == "after eval()":
            opt.train()
            run(opt, params, gen, 3)
            opt.eval()
        before, groups = snapshot(opt), sf_group_snapshot(opt)
        calls = []
        with pytest.raises(Exception) as mine:
            opt.step(lambda: calls.append(1))
        assert type(mine.value) is type(theirs.value) and str(mine.value) == str(theirs.value)
        assert not calls  # raised before the closure, as the package's
        assert_unchanged(opt, before, f"{cls_name} step in eval mode, {phase}")
        assert sf_group_snapshot(opt) == groups


@needs_schedulefree
@pytest.mark.parametrize("cls_name", sorted(SF_CASES))
@pytest.mark.parametrize("saved_in", ["eval", "train"])
@pytest.mark.parametrize("direction", ["package_to_fusedopt", "fusedopt_to_package"])
def test_schedule_free_state_dict_round_trips(cls_name, saved_in, direction):
    """Saved (in eval mode, as the package asks, or in train mode) by one, loaded by the other
    over the same params; both go on for 10 steps (after train() where saved in eval mode) and
    stay within the tolerance above."""
    gen = rng_for("schedule-free-sd", cls_name, saved_in, direction)
    options = SF_CASES[cls_name][1]
    mine_cls, pkg_cls = getattr(ft, cls_name), getattr(schedulefree, cls_name)
    src_cls, dst_cls = (pkg_cls, mine_cls) if direction == "package_to_fusedopt" else (
        mine_cls, pkg_cls)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    src = src_cls([{"params": params[:3]}, {"params": params[3:], "lr": 0.01}], **options)
    src.train()
    run(src, params, gen, 5)
    if saved_in == "eval":
        src.eval()
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    switched = [torch.nn.Parameter(p.detach().clone()) for p in params]
    dst = dst_cls([{"params": switched[:3]}, {"params": switched[3:], "lr": 0.01}], **options)
    buf.seek(0)
    dst.load_state_dict(torch.load(buf))
    sd_src, sd_dst = src.state_dict(), dst.state_dict()
    assert sd_src["param_groups"] == sd_dst["param_groups"]
    assert sd_src["state"].keys() == sd_dst["state"].keys()
    for k in sd_src["state"]:
        # fusedopt's eval mode keeps y as train_param, which the package carries and ignores
        assert sd_src["state"][k].keys() == sd_dst["state"][k].keys()
        assert ("train_param" in sd_src["state"][k]) == (
            saved_in == "eval" and direction == "fusedopt_to_package")
    if saved_in == "eval":
        src.train()
        dst.train()
    if direction == "fusedopt_to_package":
        for st in dst.state.values():
            st.pop("train_param", None)  # stale in the package after its train(), never read
    g_state = gen.get_state()
    run(src, params, gen, 10)
    gen.set_state(g_state)
    run(dst, switched, gen, 10)
    fo, ref, mine, theirs = (dst, src, switched, params) if direction == "package_to_fusedopt" \
        else (src, dst, params, switched)
    sf_compare(mine, fo, theirs, ref, f"{cls_name} {direction} saved in {saved_in} mode")


@pytest.mark.parametrize("cls_name", sorted(SF_CASES))
def test_schedule_free_checkpoint_in_eval_mode_resumes_bitwise(cls_name):
    """Saved in eval mode (params at x, y in the state): loaded and train()ed, the copy goes on
    bitwise as the optimizer that never stopped."""
    gen = rng_for("schedule-free-resume", cls_name)
    options = SF_CASES[cls_name][1]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = getattr(ft, cls_name)(params, **options)
    opt.train()
    run(opt, params, gen, 4)
    opt.eval()
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buf)
    opt.train()
    g_state = gen.get_state()
    run(opt, params, gen, 4)
    buf.seek(0)
    ckpt = torch.load(buf)
    resumed = [torch.nn.Parameter(p.clone()) for p in ckpt["params"]]
    opt2 = getattr(ft, cls_name)(resumed, **options)
    opt2.load_state_dict(ckpt["opt"])
    assert not opt2.param_groups[0]["train_mode"]
    opt2.train()
    gen.set_state(g_state)
    run(opt2, resumed, gen, 4)
    compare(resumed, opt2, params, opt, f"{cls_name} resumed from eval mode", exact=True)
    assert sf_group_snapshot(opt2) == sf_group_snapshot(opt)


@needs_schedulefree
def test_schedule_free_stale_train_param_is_not_restored():
    """fusedopt (eval mode) -> the package, which steps on (carrying train_param, stale now) ->
    fusedopt in eval mode: train() sees that the param is not the x of the kept y and takes the
    package's formula, as the package would."""
    gen = rng_for("schedule-free-stale")
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = ft.AdamWScheduleFree(params, lr=0.01)
    opt.train()
    run(opt, params, gen, 3)
    opt.eval()
    pkg = schedulefree.AdamWScheduleFree(params, lr=0.01)
    pkg.load_state_dict(opt.state_dict())
    pkg.train()
    run(pkg, params, gen, 3)
    pkg.eval()
    assert all("train_param" in st for st in pkg.state.values())  # carried along, stale
    back = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = ft.AdamWScheduleFree(back, lr=0.01)
    opt2.load_state_dict(pkg.state_dict())
    opt2.train()
    pkg.train()
    for i, (a, b) in enumerate(zip(back, params)):
        bitwise(a, b, f"train() with a stale train_param, param {i}")  # the same torch lerp


def test_schedule_free_numpy_optimizer_and_binding_checks():
    """fusedopt.Optimizer steps sgd_schedule_free as fusedopt.torch does (bitwise: the same
    library call); bad scalar-state buffers raise and change nothing."""
    gen = np.random.default_rng(SEED)
    p0 = [gen.standard_normal(s).astype(np.float32) for s in SHAPES]
    arrays = [p.copy() for p in p0]
    tensors = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in p0]
    opt_np = fusedopt.Optimizer("sgd_schedule_free", arrays, lr=0.5, warmup_steps=2)
    opt_t = ft.SGDScheduleFree(tensors, lr=0.5, warmup_steps=2)
    opt_t.train()
    for _ in range(4):
        grads = [gen.standard_normal(s).astype(np.float32) for s in SHAPES]
        for t, g in zip(tensors, grads):
            t.grad = torch.from_numpy(g.copy())
        opt_np.step(grads)
        opt_t.step()
    for i, (a, t) in enumerate(zip(arrays, tensors)):
        assert np.array_equal(a, t.detach().numpy()), f"param {i}"
        assert np.array_equal(opt_np.state[i]["z"], opt_t.state[t]["z"].numpy())
        assert opt_np.scalars[i].tolist() == [opt_t.param_groups[0]["lr_max"],
                                              opt_t.param_groups[0]["weight_sum"]]
    assert fusedopt.step_scalars("sgd_schedule_free") == [("lr_max", -1.0), ("weight_sum", 0.0)]
    assert fusedopt.step_scalars("adam") == []
    # The binding: each param its own 2 float64 values on its device.
    w = [torch.randn(5), torch.randn(3)]
    g = [torch.randn(5), torch.randn(3)]
    z = [x.clone() for x in w]
    good = [torch.tensor([-1.0, 0.0], dtype=torch.float64) for _ in w]
    shared = torch.tensor([-1.0, 0.0], dtype=torch.float64)
    bad = {"missing": (None, ValueError, "scalars must be a list"),
           "shared": ([shared, shared], ValueError, "share"),
           "float32": ([s.float() for s in good], TypeError, "float64"),
           "3 values": ([torch.zeros(3, dtype=torch.float64)] * 2, ValueError, "must be 2"),
           "strided": ([torch.zeros(4, dtype=torch.float64)[::2], good[1]], ValueError,
                       "contiguous")}
    before = [x.clone() for x in w + z + good]
    for case, (scalars, error, needle) in bad.items():
        with pytest.raises(error, match=needle):
            fusedopt.step("sgd_schedule_free", {}, w, g, [z], [1, 1], scalars=scalars)
        for a, b in zip(w + z + good, before):
            assert torch.equal(a, b), case
    with pytest.raises(ValueError, match="no scalar states"):
        fusedopt.step("sgd", {}, w, g, [], [1, 1], scalars=good)
    with pytest.raises(TypeError, match="no evaluation form"):
        fusedopt.eval_params("adam", {}, w, [z, z])


@needs_cuda
@pytest.mark.parametrize("cls_name", sorted(SF_CASES))
def test_schedule_free_cuda_equals_cpu_bitwise(cls_name):
    gen = rng_for(cls_name, "schedule-free-cuda")
    options = SF_CASES[cls_name][1]
    p0 = [torch.randn(s, generator=gen) for s in SHAPES + [(3, 1 << 16)]]
    cpu = [torch.nn.Parameter(p.clone()) for p in p0]
    gpu = [torch.nn.Parameter(p.clone().cuda()) for p in p0]
    o_cpu = getattr(ft, cls_name)([{"params": cpu[:3]}, {"params": cpu[3:], "lr": 0.01}],
                                  **options)
    o_gpu = getattr(ft, cls_name)([{"params": gpu[:3]}, {"params": gpu[3:], "lr": 0.01}],
                                  **options)
    o_cpu.train()
    o_gpu.train()
    for step in range(10):
        for i, (a, b) in enumerate(zip(cpu, gpu)):
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = (None, None) if i == 4 and step % 3 == 0 else (g.clone(), g.cuda())
        o_cpu.step()
        o_gpu.step()
        if step == 6:
            for o in (o_cpu, o_gpu):
                o.eval()
            for a, b in zip(cpu, gpu):
                bitwise(b.cpu(), a, f"{cls_name} cuda vs cpu, eval()")
            for o in (o_cpu, o_gpu):
                o.train()
    torch.cuda.synchronize()
    for a, b in zip(cpu, gpu):
        bitwise(b.cpu(), a, f"{cls_name} cuda vs cpu")
        bitwise(o_gpu.state[b]["z"].cpu(), o_cpu.state[a]["z"], f"{cls_name} z cuda vs cpu")
    assert sf_group_snapshot(o_gpu) == sf_group_snapshot(o_cpu)
