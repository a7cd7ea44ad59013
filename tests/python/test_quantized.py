"""fusedopt.torch's 8-bit and 4-bit optimizers (AdamW8bit, AdamW4bit, Adam8bit, Adam4bit) and
the binding's block-quantized states, on the CPU.

Exactness: the quantized step itself is the library's contract (decode, the float32 step,
encode to nearest), tested bitwise against fo::Optimizer in C++
(tests/functional_quantized_test.cpp: the functional layer these classes call, with state
bytes). Here:

1. Against torch.optim.AdamW / Adam in float32, 50 steps over an MLP-like set of params (two
   large matrices, one above the size threshold only by a little, a small matrix and a bias
   that keep float32 states) with the same gradient sequence (iid Gaussian, a different scale
   per tensor). The difference is the quantization error of the states, which no bound on the
   float arithmetic covers: a state element is stored within half a code's spacing of its
   block's absmax (8-bit: about 0.7% of the absmax in the top decade, finer below; 4-bit: up to
   ~11% of it, and the second moment's map has no zero, so elements far below their block's
   largest read as absmax / 16). Each step's update moves by that error, and the errors add
   up, most for the few elements whose second moment is far below their block's largest
   (coarser codes there). Measured over 40 seeds, both classes, the large params after 50
   steps (a movement of up to ~32 lr per element): 8-bit, 2.1% of torch's movement in RMS,
   direction cosine >= 0.9997, and per element at most 0.92 lr (AdamW) / 3.8 lr (one element
   of one seed, Adam); 4-bit, 27.6% in RMS and cosine >= 0.961 (iid noise gradients are its
   worst case: every block holds second moments spread over a decade, and its unsigned map
   steps by absmax / 16). Bounds: 8-bit, 5% RMS, cosine >= 0.999, 8 lr per element; 4-bit,
   50% RMS, cosine >= 0.9. A wrong map (signed for exp_avg_sq), a dropped bias correction or
   a state that stops being kept is far outside these.
2. Small params (< min_quant_size) keep the states fusedopt.torch.AdamW keeps: bitwise the
   same params and states.
3. Memory: the uint8 buffers are quantized_state_bytes: about 1/4 (8-bit) and 1/8 (4-bit) of
   float32, plus one float32 per block.
4. state_dict round trip (torch.save / torch.load) and resume: bitwise. Float32 state dicts
   (torch's AdamW) load and are encoded; a quantized state dict loads into a full-precision
   class with a clear ValueError; a state of the wrong size is refused, nothing changed.
5. Arguments: torchao's signatures (plus min_quant_size), block_size mismatch ValueError,
   bf16_stochastic_round NotImplementedError.
6. The binding: uint8 states without state_dtype, the wrong size, misaligned, and a refused
   algorithm (lamb): errors, nothing changed.
"""

import copy
import inspect
import io
import os
import random

import pytest
import torch

if os.environ.get("FUSEDOPT_REQUIRE_PACKAGE"):  # CI: a missing package fails, never skips
    import fusedopt.torch as ft
    from fusedopt import _fusedopt
else:
    ft = pytest.importorskip("fusedopt.torch", reason="the fusedopt package is not installed")
    from fusedopt import _fusedopt

SEED = int(os.environ.get("FUSEDOPT_TEST_SEED", random.SystemRandom().randrange(2**31)))
print(f"test_quantized seed: {SEED} (set FUSEDOPT_TEST_SEED to reproduce)")

# An MLP-like set: two large matrices (quantized), one just above the threshold, a small
# matrix and a bias (float32 states).
SHAPES = [(64, 128), (128, 48), (4097,), (32, 64), (64,)]
LR = 1e-2
STEPS = 50
CLASSES = [("AdamW8bit", "int8"), ("AdamW4bit", "int4"), ("Adam8bit", "int8"),
           ("Adam4bit", "int4")]


def _torch_twin(name):
    return torch.optim.AdamW if name.startswith("AdamW") else torch.optim.Adam


def _fused_twin(name):
    return ft.AdamW if name.startswith("AdamW") else ft.Adam


def _params(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in SHAPES]


def _grads(seed, steps=STEPS):
    g = torch.Generator().manual_seed(seed + 1)
    return [[torch.randn(s, generator=g) * (0.1 + i) for i, s in enumerate(SHAPES)]
            for _ in range(steps)]


def _run(opt, params, grads):
    for step in grads:
        for p, gr in zip(params, step):
            p.grad = gr.clone()
        opt.step()


def _bits(t):
    return t.detach().reshape(-1).view(torch.uint8).clone()


@pytest.mark.parametrize("name,dtype", CLASSES)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_close_to_torch_in_float32(name, dtype, amsgrad):
    base = _params(SEED)
    grads = _grads(SEED)
    mine = [b.clone().requires_grad_() for b in base]
    ref = [b.clone().requires_grad_() for b in base]
    wd = 0.01 if name.startswith("AdamW") else 0.001
    opt = getattr(ft, name)(mine, lr=LR, weight_decay=wd, amsgrad=amsgrad)
    twin = _torch_twin(name)(ref, lr=LR, weight_decay=wd, amsgrad=amsgrad)
    _run(opt, mine, grads)
    _run(twin, ref, grads)
    for p, r, b, shape in zip(mine, ref, base, SHAPES):
        st = opt.state[p]
        large = p.numel() >= 4096
        assert (st["exp_avg"].dtype == torch.uint8) == large
        moved = (r - b).detach()
        diff = (p - r).detach()
        assert torch.isfinite(p).all()
        if not large:  # float32 states: roundings only (test_fusedopt_torch.py's tolerance)
            assert diff.abs().max() <= 2e-5 * (r.abs().max() + 1), shape
            continue
        rms = (diff.norm() / moved.norm()).item()
        cos = torch.nn.functional.cosine_similarity((p - b).reshape(1, -1).detach(),
                                                    moved.reshape(1, -1)).item()
        if dtype == "int8":
            assert diff.abs().max().item() <= 8 * LR, (shape, diff.abs().max().item() / LR)
            assert rms <= 0.05 and cos >= 0.999, (shape, rms, cos)
        else:
            assert rms <= 0.5 and cos >= 0.9, (shape, rms, cos)
        # The decoded states are torch's within the quantization errors of their blocks, which
        # add up over about 1 / (1 - beta) steps: measured over 40 seeds, at most 5.1% (8-bit)
        # and 51% (4-bit) of the state's largest magnitude; bounds 10% and 80%.
        decoded = ft.dequantized_state(opt, p)
        assert set(decoded) == ({"exp_avg", "exp_avg_sq", "max_exp_avg_sq"} if amsgrad
                                else {"exp_avg", "exp_avg_sq"})
        for k, v in decoded.items():
            assert v.shape == p.shape and v.dtype == torch.float32
            want = twin.state[r][k]
            scale = want.abs().max()
            assert (v - want).abs().max() <= (0.1 if dtype == "int8" else 0.8) * scale, k


@pytest.mark.parametrize("name,dtype", CLASSES)
def test_small_params_keep_the_full_precision_states_bitwise(name, dtype):
    base = _params(SEED)
    grads = _grads(SEED, 10)
    mine = [b.clone().requires_grad_() for b in base]
    full = [b.clone().requires_grad_() for b in base]
    opt = getattr(ft, name)(mine, lr=LR, weight_decay=0.02, amsgrad=True)
    twin = _fused_twin(name)(full, lr=LR, weight_decay=0.02, amsgrad=True)
    _run(opt, mine, grads)
    _run(twin, full, grads)
    for p, q in zip(mine, full):
        if p.numel() >= 4096:
            assert not torch.equal(p, q)  # the quantized ones did differ
            continue
        assert torch.equal(_bits(p), _bits(q))
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"):
            assert opt.state[p][k].dtype == twin.state[q][k].dtype
            assert torch.equal(_bits(opt.state[p][k]), _bits(twin.state[q][k])), k


@pytest.mark.parametrize("name,dtype", CLASSES)
def test_state_memory(name, dtype):
    p = torch.zeros(1 << 16, requires_grad=True)  # 65536 elements, float32 states: 256 KiB
    opt = getattr(ft, name)([p])
    p.grad = torch.randn_like(p)
    opt.step()
    nbytes = sum(v.nbytes for k, v in opt.state[p].items() if k != "step")
    fp32 = 2 * 4 * p.numel()
    ratio = nbytes / fp32
    want = _fusedopt.quantized_state_bytes(p.numel(), dtype)
    assert nbytes == 2 * want
    if dtype == "int8":
        assert 0.25 <= ratio <= 0.255, ratio  # 1/4 plus one float32 per 256
    else:
        assert 0.125 <= ratio <= 0.134, ratio  # 1/8 plus one float32 per 128
    # min_quant_size: below it, float32 states; above, quantized; 0 quantizes everything.
    small = torch.zeros(100, requires_grad=True)
    opt = getattr(ft, name)([small], min_quant_size=0)
    small.grad = torch.randn_like(small)
    opt.step()
    assert opt.state[small]["exp_avg"].dtype == torch.uint8
    assert opt.min_quant_size == 0


@pytest.mark.parametrize("name,dtype", CLASSES)
def test_state_dict_round_trip_and_resume_bitwise(name, dtype):
    base = _params(SEED)
    grads = _grads(SEED, 12)
    a = [b.clone().requires_grad_() for b in base]
    opt = getattr(ft, name)(a, lr=LR, amsgrad=True)
    _run(opt, a, grads[:6])
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    b = [p.detach().clone().requires_grad_() for p in a]
    other = getattr(ft, name)(b, lr=LR, amsgrad=True)
    other.load_state_dict(saved)
    for p, q in zip(a, b):
        for k, v in opt.state[p].items():
            w = other.state[q][k]
            assert w.dtype == v.dtype and w.shape == v.shape, k
            assert torch.equal(_bits(w), _bits(v)), k
    _run(opt, a, grads[6:])
    _run(other, b, grads[6:])
    for p, q in zip(a, b):
        assert torch.equal(_bits(p), _bits(q))
        for k, v in opt.state[p].items():
            assert torch.equal(_bits(other.state[q][k]), _bits(v)), k
    # A deep copy (pickling) keeps the storage too.
    c = copy.deepcopy(other)
    assert c.min_quant_size == other.min_quant_size


def test_float_state_dicts_load_encoded_and_quantized_ones_are_refused_elsewhere():
    base = _params(SEED)
    grads = _grads(SEED, 4)
    r = [b.clone().requires_grad_() for b in base]
    twin = torch.optim.AdamW(r, lr=LR)
    _run(twin, r, grads)
    q = [p.detach().clone().requires_grad_() for p in r]
    opt = ft.AdamW8bit(q, lr=LR)
    opt.load_state_dict(twin.state_dict())
    for p, pr in zip(q, r):
        st = opt.state[p]
        if p.numel() >= 4096:
            assert st["exp_avg"].dtype == torch.uint8
            decoded = ft.dequantized_state(opt, p)
            for k in ("exp_avg", "exp_avg_sq"):
                want = twin.state[pr][k]
                assert (decoded[k] - want).abs().max() <= 0.01 * want.abs().max(), k
        else:
            assert torch.equal(st["exp_avg"], twin.state[pr]["exp_avg"])
    _run(opt, q, grads)  # steps on from there
    # 8-bit into a full-precision class: refused (which bit width it is, only the class knows).
    full = [p.detach().clone().requires_grad_() for p in q]
    plain = ft.AdamW(full, lr=LR)
    with pytest.raises(ValueError, match="block-quantized"):
        plain.load_state_dict(opt.state_dict())
    assert not plain.state
    # 8-bit into 4-bit: the buffers' sizes differ, refused before anything is loaded.
    four = ft.AdamW4bit(full, lr=LR)
    with pytest.raises(ValueError, match="bytes"):
        four.load_state_dict(opt.state_dict())
    assert not four.state
    # A quantized optimizer with a larger threshold decodes what it no longer quantizes.
    loose = ft.AdamW8bit(full, lr=LR, min_quant_size=1 << 20)
    loose.load_state_dict(opt.state_dict())
    for p, pq in zip(full, q):
        assert loose.state[p]["exp_avg"].dtype == torch.float32
        assert torch.equal(loose.state[p]["exp_avg"], ft.dequantized_state(opt, pq)["exp_avg"])


def test_signatures_and_arguments():
    params = inspect.signature(ft.AdamW8bit.__init__).parameters
    assert list(params) == ["self", "params", "lr", "betas", "eps", "weight_decay", "amsgrad",
                            "block_size", "bf16_stochastic_round", "min_quant_size"]
    assert params["weight_decay"].default == 1e-2 and params["block_size"].default == 256
    assert params["min_quant_size"].default == 4096
    assert params["block_size"].kind is inspect.Parameter.KEYWORD_ONLY
    assert inspect.signature(ft.AdamW4bit.__init__).parameters["block_size"].default == 128
    assert inspect.signature(ft.Adam8bit.__init__).parameters["weight_decay"].default == 0
    p = torch.zeros(8, requires_grad=True)
    with pytest.raises(ValueError, match="block_size must be 256"):
        ft.AdamW8bit([p], block_size=128)
    with pytest.raises(ValueError, match="block_size must be 128"):
        ft.Adam4bit([p], block_size=256)
    with pytest.raises(NotImplementedError, match="bf16_stochastic_round"):
        ft.AdamW8bit([p], bf16_stochastic_round=True)
    with pytest.raises(ValueError, match="min_quant_size"):
        ft.AdamW8bit([p], min_quant_size=-1)
    opt = ft.AdamW4bit([p], lr=3e-4, betas=(0.8, 0.9))
    assert set(opt.param_groups[0]) == {"params", "lr", "betas", "eps", "weight_decay",
                                        "amsgrad"}


def test_bfloat16_params_with_8bit_states():
    p = torch.randn(64, 128).to(torch.bfloat16).requires_grad_()
    opt = ft.AdamW8bit([p], lr=LR)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.uint8 and torch.isfinite(p.float()).all()


def _adamw_call(n, state_dtype):
    p = torch.randn(n)
    g = torch.randn(n)
    nbytes = _fusedopt.quantized_state_bytes(n, state_dtype)
    states = []
    for non_negative in (False, True):
        s = torch.empty(nbytes, dtype=torch.uint8)
        _fusedopt.fill_quantized_state(s, n, state_dtype, non_negative, 0.0)
        states.append(s)
    return p, g, states


def test_the_binding_checks_quantized_states():
    n = 5000
    p, g, (m, v) = _adamw_call(n, "int8")
    p0, m0, v0 = p.clone(), m.clone(), v.clone()
    step = torch.tensor(0.0)

    def unchanged():
        return torch.equal(p, p0) and torch.equal(m, m0) and torch.equal(v, v0) and step == 0

    with pytest.raises(TypeError, match="state_dtype"):
        _fusedopt.step("adamw", {}, [p], [g], [[m], [v]], [step])
    assert unchanged()
    with pytest.raises(ValueError, match="bytes"):
        _fusedopt.step("adamw", {}, [p], [g], [[m], [v]], [step], state_dtype="int4")
    assert unchanged()
    with pytest.raises(ValueError, match="state_dtype"):
        _fusedopt.step("adamw", {}, [p], [g], [[m], [v]], [step], state_dtype="int2")
    big = torch.zeros(m.numel() + 4, dtype=torch.uint8)
    big[4:] = m
    with pytest.raises(ValueError, match="16-byte aligned"):
        _fusedopt.step("adamw", {}, [p], [g], [[big[4:]], [v]], [step], state_dtype="int8")
    assert unchanged()
    lamb_m, lamb_v = m.clone(), v.clone()
    with pytest.raises(TypeError, match="elementwise"):
        _fusedopt.step("lamb", {}, [p], [g], [[lamb_m], [lamb_v]], [step], state_dtype="int8")
    assert unchanged()
    _fusedopt.step("adamw", {}, [p], [g], [[m], [v]], [step], state_dtype="int8")
    assert step == 1 and not torch.equal(p, p0) and not torch.equal(m, m0)
    # The host conversions: encoding then decoding is within the 8-bit map's spacing.
    algorithms = {a["name"]: a for a in _fusedopt.algorithms()}
    assert algorithms["adamw"]["non_negative"] == [False, True, True]
    assert algorithms["adamw"]["quantizable"] and not algorithms["lamb"]["quantizable"]
    for non_negative in (False, True):
        x = torch.randn(n).abs() if non_negative else torch.randn(n)
        s = torch.empty(_fusedopt.quantized_state_bytes(n, "int8"), dtype=torch.uint8)
        _fusedopt.quantize_state(s, x, "int8", non_negative)
        y = torch.empty(n)
        _fusedopt.dequantize_state(y, s, "int8", non_negative)
        assert (y - x).abs().max() <= 0.01 * x.abs().max()
    with pytest.raises(ValueError, match="float32"):
        _fusedopt.dequantize_state(torch.empty(n, dtype=torch.float64), s, "int8", False)


def test_groups_and_the_weight_ema_step_as_without():
    """Two groups mixing quantized and float32 params, with the weight EMA: the params step
    bitwise as without the EMA (one library call, a list per group and storage)."""
    base = _params(SEED)
    grads = _grads(SEED, 4)
    a = [b.clone().requires_grad_() for b in base]
    b = [p.clone().requires_grad_() for p in base]
    opt = ft.AdamW8bit([{"params": a[:3]}, {"params": a[3:], "lr": 3e-3}], lr=LR)
    opt.ema_decay = 0.9
    ref = ft.AdamW8bit([{"params": b[:3]}, {"params": b[3:], "lr": 3e-3}], lr=LR)
    _run(opt, a, grads)
    _run(ref, b, grads)
    for p, q in zip(a, b):
        assert torch.equal(_bits(p), _bits(q))
        assert opt.state[p]["ema"].dtype == torch.float32
