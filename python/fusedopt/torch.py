"""Drop-in ``torch.optim`` classes stepped by fusedopt: change one import.

    from fusedopt.torch import AdamW      # was: from torch.optim import AdamW

``SGD, Adagrad, Adadelta, RMSprop, Adam, AdamW, Rprop, Adamax, NAdam, RAdam, Adafactor, Muon``
take exactly the arguments and defaults of the ``torch.optim`` class of the same name (torch
2.15), and keep ``param_groups``, ``state`` and ``state_dict()`` in torch's own format, so LR
schedulers, ``zero_grad``, closures, checkpoints (both ways) and device moves work as with
torch. ``Lion``, ``LazyAdam`` and ``SignSGD`` are fusedopt's other optimizers in the same form;
``AdEMAMix`` takes the arguments and defaults of bitsandbytes' ``AdEMAMix`` (torch has none),
states in fusedopt's names. ``SGDScheduleFree`` and ``AdamWScheduleFree`` are the schedulefree
package's (1.4.1): its arguments, param-group keys and state, with its ``train()`` / ``eval()``.
``MuonWithAdamW`` is Muon and AdamW in one optimizer (Keller Jordan's MuonWithAuxAdam): groups
with ``use_muon=True`` step as ``Muon``, ``use_muon=False`` as ``AdamW``, in one step() and one
state_dict. ``AdamW8bit``, ``AdamW4bit``, ``Adam8bit`` and ``Adam4bit`` take torchao.optim's
arguments and keep the states of params of 4096 or more elements block-quantized (8 or 4 bits:
one uint8 tensor per state under torch's name, docs/quantized-states.md);
``dequantized_state(opt, p)`` decodes them.

Each ``step()`` makes one call into the library for all its param groups: every param with a
grad is validated (contiguous, float32, bfloat16 or float16 on the CPU and on CUDA; grad and
states of the param's shape and device) before any is written, then stepped by fused kernels
(on CUDA: multi-tensor launches on the current stream). Bad input raises ValueError or
TypeError and changes nothing.

Arguments that change the math and that fusedopt does not implement raise (``differentiable=
True``: NotImplementedError). ``foreach`` and ``fused`` are accepted and kept in the param
groups (checkpoints carry them) but do not change anything: every step is fused. ``capturable``
is accepted likewise; the step counts stay CPU tensors (torch's non-capturable format), so a
step is not CUDA-graph capturable. Sparse gradients (``nn.Embedding(sparse=True)``) go to the
library's sparse row step where it has one (SparseAdam, LazyAdam, Adagrad): only the named rows
and their states change, duplicates summed; elsewhere they raise NotImplementedError.

Weight EMA (docs/optimizers.md, "Weight EMA"): ``opt.ema_decay = 0.9999`` keeps a float32
``state[p]["ema"]`` per param, updated by the same fused pass as the step (timm's ModelEmaV3
without warm-up); ``opt.swap_ema()`` and ``opt.copy_ema_to_params()`` put it into the params.
"""

import inspect

import torch

from . import _fusedopt

__all__ = ["SGD", "Adagrad", "Adadelta", "RMSprop", "Adam", "AdamW", "Rprop", "Adamax", "NAdam",
           "RAdam", "SparseAdam", "Lion", "LazyAdam", "SignSGD", "AdEMAMix", "LAMB", "LARS",
           "SGDScheduleFree", "AdamWScheduleFree", "Adafactor", "Muon", "MuonWithAdamW",
           "AdamW8bit", "AdamW4bit", "Adam8bit", "Adam4bit", "dequantized_state"]

# torch's keyword for a library option that torch keeps in a pair (a triple: bitsandbytes'
# AdEMAMix betas); every other option has the same name in both.
_PAIRED = {"beta1": ("betas", 0), "beta2": ("betas", 1), "beta3": ("betas", 2),
           "eta_minus": ("etas", 0), "eta_plus": ("etas", 1),
           "step_size_min": ("step_sizes", 0), "step_size_max": ("step_sizes", 1),
           "eps1": ("eps", 0), "eps2": ("eps", 1)}
# Accepted and kept in the groups; they do not change the math of a fused step.
_IGNORED = ("foreach", "fused", "capturable")
_ALGORITHMS = {a["name"]: a for a in _fusedopt.algorithms()}
_HUGE_PAGE_MIN_BYTES = 4 << 20  # below, at most one whole 2 MiB page would gain
# Block-quantized state storages (docs/quantized-states.md): the library's fixed block sizes.
_QUANT_BLOCK = {"int8": 256, "int4": 128}


class _Spec:
    """What differs between the classes, as data.

    algorithm: the library's name. step: how torch keeps state["step"] ("tensor": a CPU float32
    scalar; "int": a Python int; None: no step key, and a state created by this step marks the
    first step). init_state: torch creates the state in the constructor, from the
    constructor's arguments even where a group sets its own (Adagrad's sum).
    variants: {group flag: algorithm used where the flag is true}. extra_defaults: defaults
    torch's class adds beyond its arguments.
    """

    def __init__(self, algorithm, step="tensor", init_state=False, variants=None,
                 extra_defaults=None, torch_scalars=None, sparse_only=False):
        self.algorithm = algorithm
        # Takes sparse gradients only, as torch.optim.SparseAdam (dense ones raise).
        self.sparse_only = sparse_only
        self.step = step
        self.init_state = init_state
        self.variants = variants or {}
        self.extra_defaults = extra_defaults or {}
        # {state name: (initial value, update(value, group, step) -> new value)}: per-param
        # scalars torch keeps and its checkpoints carry, which the library computes from the
        # step count instead (NAdam's mu_product). Kept here as torch keeps them, so that a
        # checkpoint goes on in torch as it would have; the library never reads them.
        self.torch_scalars = torch_scalars or {}


def _number(value):
    if torch.is_tensor(value):
        if value.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        return float(value.item())
    return float(value)


def _refuse_differentiable(opt, options):
    if options.get("differentiable"):
        raise NotImplementedError(
            f"fusedopt.torch.{type(opt).__name__}: differentiable=True is not supported "
            "(fusedopt steps params in place, outside autograd)")


class _FusedOptimizer(torch.optim.Optimizer):
    """The common body of fusedopt.torch's classes (torch.optim.Optimizer with a fused step)."""

    _spec = None  # set by each class
    # Block-quantized states (docs/python.md, "8-bit and 4-bit states"): None (the states are
    # tensors of the param's dtype), or "int8" / "int4" for params of min_quant_size or more
    # elements, whose states are then uint8 buffers of quantized_state_bytes bytes each.
    _state_dtype = None
    _min_quant_size = 4096

    def _setup(self, params, args):
        defaults = {k: v for k, v in args.items() if k not in ("self", "params", "__class__")}
        defaults.update(self._spec.extra_defaults)
        _refuse_differentiable(self, defaults)
        super().__init__(params, defaults)
        # The group keys of this class's own torch twin (torch's base __setstate__ adds
        # "differentiable" to the defaults even where the class has no such argument).
        self._group_keys = tuple(defaults)
        if self._spec.init_state:
            # As torch's: from the constructor's arguments, whatever a group overrides.
            for group in self.param_groups:
                for p in group["params"]:
                    self._create_state(p, self.state[p], self.defaults)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:  # the library's checks of the options (ValueError with its message)
            _fusedopt.step_states(self._algorithm(group), self._options(group))
        except Exception:
            self.param_groups.pop()
            raise

    def __setstate__(self, state):
        super().__setstate__(state)
        keys = getattr(self, "_group_keys", tuple(self.defaults))
        for group in self.param_groups:
            for key in keys:
                group.setdefault(key, self.defaults[key])

    def state_dict(self):
        state_dict = super().state_dict()
        if self.ema_decay > 0:
            state_dict["ema_decay"] = self.ema_decay
        return state_dict

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        decay = float(state_dict.pop("ema_decay", 0.0))
        # torch casts every state to its param's dtype: an EMA stays float32, and a
        # block-quantized state (uint8) stays its bytes.
        emas = {i: st["ema"] for i, st in state_dict["state"].items() if "ema" in st}
        quantized = {i: {k: v for k, v in st.items()
                         if torch.is_tensor(v) and v.dtype == torch.uint8}
                     for i, st in state_dict["state"].items()}
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        if any(quantized.values()):
            self._check_quantized_states(state_dict, ids, params, quantized)
        super().load_state_dict(state_dict)
        for i, p in zip(ids, params):
            if i in emas:
                self.state[p]["ema"] = emas[i].to(device=p.device, dtype=torch.float32,
                                                  copy=True)
            for k, v in quantized.get(i, {}).items():
                self.state[p][k] = v.to(device=p.device, copy=True)
        if self._state_dtype is not None:
            self._convert_loaded_states()
        self._ema_decay = decay
        # A checkpoint of torch's fused or capturable optimizer keeps step on the param's
        # device; fusedopt reads step counts on the CPU, as torch's default does.
        for st in self.state.values():
            step = st.get("step")
            if torch.is_tensor(step) and (step.device.type != "cpu" or step.dtype not in (
                    torch.float32, torch.float64)):
                st["step"] = step.to(device="cpu", dtype=torch.float32)

    # -- block-quantized states ---------------------------------------------------------------

    def _quantizes(self, p):
        """Whether a param's states are block-quantized (uint8 buffers) when created: this
        optimizer quantizes, and the param has min_quant_size elements or more."""
        return self._state_dtype is not None and p.numel() >= self._min_quant_size

    def _state_maps(self, group):
        """{state name: non_negative} of the group's algorithm (which map a quantized state of
        it takes)."""
        a = _ALGORITHMS[self._algorithm(group)]
        return dict(zip(a["states"], a["non_negative"]))

    def _check_quantized_states(self, state_dict, ids, params, quantized):
        """A state dict's uint8 states, checked before anything is loaded: this optimizer keeps
        block-quantized states, and each is one buffer of its param's bytes."""
        if self._state_dtype is None:
            raise ValueError(
                f"{type(self).__name__} keeps no block-quantized states, and the state dict "
                "has uint8 ones (an 8-bit or 4-bit optimizer's): load it into that class "
                "(AdamW8bit, AdamW4bit, ...)")
        by_id = dict(zip(ids, params))
        for i, states in quantized.items():
            p = by_id.get(i)
            if p is None:
                continue  # torch's own error for a state of an unknown param
            want = _fusedopt.quantized_state_bytes(p.numel(), self._state_dtype)
            for k, v in states.items():
                if v.dim() != 1 or v.numel() != want:
                    raise ValueError(
                        f"state {k!r} of param {i} is a uint8 tensor of shape {tuple(v.shape)}:"
                        f" a {self._state_dtype} state of a param of {p.numel()} elements is "
                        f"one buffer of {want} bytes (a state dict of another bit width?)")

    def _convert_loaded_states(self):
        """The loaded states in this optimizer's storage: a float state of a param it quantizes
        is encoded (to nearest), a quantized state of a param it does not is decoded (exact),
        into the param's dtype as torch keeps states."""
        for group in self.param_groups:
            maps = self._state_maps(group)
            for p in group["params"]:
                st = self.state.get(p)
                if not st:
                    continue
                quantize = self._quantizes(p)
                for name, non_negative in maps.items():
                    v = st.get(name)
                    if not torch.is_tensor(v) or (v.dtype == torch.uint8) == quantize:
                        continue
                    if quantize:
                        if v.shape != p.shape:
                            continue  # not a per-element state: left to the step's checks
                        st[name] = _quantize(v, self._state_dtype, non_negative).to(p.device)
                    else:
                        st[name] = _dequantize(v, p, self._state_dtype, non_negative).to(
                            device=p.device, dtype=p.dtype)

    def _by_state_storage(self, call):
        """A group's call as the library takes it: one call per state storage, since a list
        step takes one state dtype (block-quantized params apart from the others)."""
        states = call[4]
        quantized = [any(s[i] is not None and s[i].dtype == torch.uint8 for s in states)
                     for i in range(len(call[2]))]
        if not any(quantized):
            return [call]

        def pick(keep):
            idx = [i for i, q in enumerate(quantized) if q == keep]
            if not idx:
                return None
            out = list(call)
            for k in (2, 3, 5, 6, 8):
                if k < len(out) and out[k] is not None:
                    out[k] = [out[k][i] for i in idx]
            out[4] = [[s[i] for i in idx] for s in states]
            return out

        calls = []
        plain, quant = pick(False), pick(True)
        if plain is not None:
            calls.append(tuple(plain))
        quant += [None, 0.0, None][len(quant) - 6:]  # emas, ema_decay, scalars
        calls.append(tuple(quant) + (self._state_dtype,))
        return calls

    # -- the weight EMA ----------------------------------------------------------------------

    @property
    def ema_decay(self):
        """The weight EMA's decay, in [0, 1); 0 (the default): no EMA. A param's EMA starts at
        its next step as a float32 copy of its value before that step. The decay may change at
        any time; turning the EMA off once a param has one is refused."""
        return getattr(self, "_ema_decay", 0.0)

    @ema_decay.setter
    def ema_decay(self, value):
        value = _number(value)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0: no weight EMA), got {value}")
        if value == 0.0 and any("ema" in st for st in self.state.values()):
            raise ValueError("ema_decay cannot turn the weight EMA off: params have stepped "
                             "with one (a non-zero decay may change)")
        self._ema_decay = value

    def _ema_pairs(self, who):
        if self.ema_decay == 0.0:
            raise ValueError(f"{who}: there is no weight EMA (ema_decay is 0)")
        return [(p, self.state[p]["ema"]) for g in self.param_groups for p in g["params"]
                if "ema" in self.state.get(p, {})]

    @torch.no_grad()
    def swap_ema(self):
        """Exchanges every param with its EMA, bitwise: a second call restores both. Params
        that have not stepped are their own EMA and stay. A bfloat16/float16 param is refused
        (TypeError, nothing changes): its float32 EMA would not come back from it."""
        pairs = self._ema_pairs("swap_ema")
        for p, _ in pairs:
            if p.dtype != torch.float32:
                raise TypeError(f"swap_ema: a {p.dtype} param cannot hold its float32 EMA and "
                                "give it back exactly (use copy_ema_to_params)")
        for p, ema in pairs:
            value = p.clone()
            p.copy_(ema)
            ema.copy_(value)

    @torch.no_grad()
    def copy_ema_to_params(self):
        """Overwrites every param that has an EMA with it (rounded to nearest into a bfloat16 or
        float16 param); the EMA is kept."""
        for p, ema in self._ema_pairs("copy_ema_to_params"):
            p.copy_(ema)

    # -- from a torch param group to the library's call ---------------------------------------

    def _group_spec(self, group):
        """The _Spec a group steps by: the class's (MuonWithAdamW: the group's kind's)."""
        return self._spec

    def _algorithm(self, group):
        spec = self._group_spec(group)
        for flag, algorithm in spec.variants.items():
            if group.get(flag):
                return algorithm
        return spec.algorithm

    def _options(self, group):
        """The library's options (by its names) from a torch param group."""
        options = {}
        for name in _ALGORITHMS[self._algorithm(group)]["defaults"]:
            key, index = _PAIRED.get(name, (name, None))
            if key not in group:
                continue  # a library option torch's class does not have: its default
            value = group[key] if index is None else group[key][index]
            if value is None:
                continue  # an argument left unset (a warm-up of None): the library's default
            options[name] = _number(value)
        return options

    def _create_state(self, p, st, group, specs=None):
        algorithm, options = self._algorithm(group), self._options(group)
        if specs is None:
            specs = _fusedopt.step_states(algorithm, options)
        # Factored states (Adafactor's row_var, col_var, variance) have shapes of their own, and
        # a param keeps them by its dimensions; every other state is the param's shape.
        shapes = dict(_fusedopt.state_shapes(algorithm, options, tuple(p.shape)))
        spec = self._group_spec(group)
        if spec.step == "tensor" and "step" not in st:
            st["step"] = torch.tensor(0.0, dtype=torch.float32)
        elif spec.step == "int" and "step" not in st:
            st["step"] = 0
        created = False
        # Block-quantized where the param's states already are, or (none yet) by the policy.
        kept = [v for k, v in st.items() if k in shapes and torch.is_tensor(v)]
        quantized = (kept[0].dtype == torch.uint8) if kept else self._quantizes(p)
        maps = self._state_maps(group) if quantized else {}
        for name, _, init, from_param in specs:
            shape = shapes[name]
            if shape is None:
                continue  # a param of these dimensions does not keep it
            if name not in st and quantized:
                # One uint8 buffer (codes, then one float32 absmax per block), built on the CPU.
                t = torch.empty(_fusedopt.quantized_state_bytes(p.numel(), self._state_dtype),
                                dtype=torch.uint8)
                _fusedopt.fill_quantized_state(t, p.numel(), self._state_dtype, maps[name], init)
                st[name] = t.to(p.device)
                created = True
            elif name not in st:
                # Huge pages for large CPU states, advised before the memory is first touched
                # (a step streams them; the library's own states get the same).
                t = (torch.empty_like(p, memory_format=torch.preserve_format)
                     if list(shape) == list(p.shape) else
                     torch.empty(shape, dtype=p.dtype, device=p.device))
                if t.device.type == "cpu" and t.nbytes >= _HUGE_PAGE_MIN_BYTES:
                    _fusedopt.advise_huge_pages(t)
                # from_param: the state starts as a copy of the param (schedule-free's z).
                st[name] = t.copy_(p) if from_param else t.fill_(init)
                created = True
        for name, (init, _) in spec.torch_scalars.items():
            if name not in st:
                st[name] = torch.tensor(init, dtype=torch.float32)
        return created

    @torch.no_grad()
    def step(self, closure=None):
        """One fused step of every param group (params whose grad is None are skipped).

        closure: reevaluates the model and returns the loss, as torch's.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # One library call for all groups: every group is checked before any is stepped.
        calls, sparse, fresh, counted = [], [], [], []
        stepped = []  # (group, its torch scalars, the states of its stepped params)
        try:
            for group in self.param_groups:
                call = self._gather(group, fresh, counted, sparse)
                scalars = self._group_spec(group).torch_scalars
                if call is not None:
                    calls.extend(self._by_state_storage(call))
                    if scalars:
                        stepped.append((group, scalars, [self.state[p] for p in call[2]]))
            if calls or sparse:
                self._before_library_call(calls)
                _fusedopt.step_groups(calls, sparse,
                                      grad_multiplier=self._grad_multiplier(calls))
        except Exception:
            for st, keys in fresh:  # state created for this step goes again
                for k in keys:
                    del st[k]
            raise
        self._after_library_call()
        for st in counted:  # torch keeps an int step (SparseAdam's format)
            st["step"] += 1
        for group, scalars, states in stepped:
            for st in states:
                for name, (_, update) in scalars.items():
                    st[name] = update(st[name], group, float(st["step"]))
        return loss

    def _before_library_call(self, calls):
        """Completes the gathered calls just before the library steps them (schedule-free: the
        scalar states' buffers)."""

    def _after_library_call(self):
        """Book-keeping after a step the library has taken (schedule-free: the group scalars)."""

    def _grad_multiplier(self, calls):
        """What every dense gradient of this step is multiplied by: None (1) unless the class
        clips (LAMB: Apex's global max_grad_norm)."""
        return None

    def _gather(self, group, fresh, counted, sparse):
        """The library call's arguments for one group: the params with a dense grad, their
        grads, states and step counts; params with a sparse grad go to `sparse`, one sparse row
        step each. Creates the state of params stepping for the first time (recorded in
        `fresh`)."""
        algorithm = self._algorithm(group)
        options = self._options(group)
        specs = _fusedopt.step_states(algorithm, options)
        names = [spec[0] for spec in specs]
        spec = self._group_spec(group)
        kind = spec.step
        step_key = {"step"} if kind else set()
        kept_by_ndim = {}  # the states a param keeps, by its dimensions (factored states)
        params, grads, steps, emas = [], [], [], []
        ema_decay = self.ema_decay
        states = [[] for _ in names]
        sparse_names = None  # the states a sparse step uses, asked once per group
        state = self.state
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            if g.is_sparse != spec.sparse_only and not (
                    g.is_sparse and _ALGORITHMS[algorithm]["sparse"]):
                if g.is_sparse:
                    sparse_capable = ", ".join(a for a, d in _ALGORITHMS.items() if d["sparse"])
                    raise NotImplementedError(
                        f"fusedopt.torch.{type(self).__name__} has no sparse step (the library "
                        f"steps sparse gradients with: {sparse_capable})")
                raise RuntimeError(
                    f"{type(self).__name__} does not support dense gradients, please consider "
                    "Adam instead")
            st = state[p]
            created = False
            wanted = kept_by_ndim.get(p.dim())
            if wanted is None:
                wanted = kept_by_ndim[p.dim()] = step_key | {
                    n for n, shape in _fusedopt.state_shapes(algorithm, options, tuple(p.shape))
                    if shape is not None}
            if not st.keys() >= wanted:  # a first step, or options that add a state
                before = set(st)
                created = self._create_state(p, st, group, specs)
                fresh.append((st, set(st) - before))
            if kind == "tensor":
                count = st["step"]
            elif kind == "int":
                count = st["step"] + 1
                counted.append(st)
            else:
                count = 1 if created else 2
            if ema_decay > 0 and "ema" not in st:  # the param before its first EMA step
                st["ema"] = p.detach().clone(memory_format=torch.contiguous_format).float()
                fresh.append((st, {"ema"}))
            if g.is_sparse:
                if ema_decay > 0:
                    raise NotImplementedError(
                        "the weight EMA (ema_decay) is updated by dense steps only")
                if g.sparse_dim() != 1:
                    raise ValueError(
                        f"a sparse gradient of {g.sparse_dim()} sparse dims: fusedopt's sparse "
                        "step takes gradients sparse in rows (sparse_dim 1), as nn.Embedding's")
                if sparse_names is None:
                    sparse_names = [n for n, _, _, _ in
                                    _fusedopt.sparse_step_states(algorithm, options)]
                sparse.append((algorithm, options, p, g._indices()[0], g._values().contiguous(),
                               [st[n] for n in sparse_names], count))
                continue
            params.append(p)
            grads.append(g)
            for j, name in enumerate(names):
                states[j].append(st.get(name))  # None: a state this param does not keep
            steps.append(count)
            if ema_decay > 0:
                emas.append(st["ema"])
        if not params:
            return None
        if ema_decay > 0:
            return (algorithm, options, params, grads, states, steps, emas, ema_decay)
        return (algorithm, options, params, grads, states, steps)


def _fused_class(name, spec, init, doc):
    cls = type(name, (_FusedOptimizer,), {"__init__": init, "_spec": spec, "__doc__": doc,
                                           "__module__": __name__})
    init.__qualname__ = f"{name}.__init__"
    return cls


def _doc(torch_name, algorithm):
    return (f"fusedopt's fused {algorithm} (docs/optimizers.md) as torch.optim.{torch_name}: "
            f"the same arguments, defaults, param groups and state_dict format.\n\n"
            "foreach, fused and capturable are accepted and change nothing (every step is fused;"
            " step counts stay on the CPU); differentiable=True raises NotImplementedError.")


# The constructors: torch 2.15's signatures, argument for argument (tests/python compares them
# with inspect.signature). Each passes its arguments, as torch's do, as the group defaults.
def _sgd_init(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False,
              *, maximize=False, foreach=None, differentiable=False, fused=None):
    self._setup(params, locals())


def _adagrad_init(self, params, lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0,
                  eps=1e-10, foreach=None, *, maximize=False, differentiable=False, fused=None):
    self._setup(params, locals())


def _adadelta_init(self, params, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0, foreach=None, *,
                   capturable=False, maximize=False, differentiable=False):
    self._setup(params, locals())


def _rmsprop_init(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0,
                  centered=False, capturable=False, foreach=None, maximize=False,
                  differentiable=False):
    self._setup(params, locals())


def _adam_init(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
               amsgrad=False, *, foreach=None, maximize=False, capturable=False,
               differentiable=False, fused=None, decoupled_weight_decay=False):
    self._setup(params, locals())


def _adamw_init(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                differentiable=False, fused=None):
    self._setup(params, locals())


def _rprop_init(self, params, lr=1e-2, etas=(0.5, 1.2), step_sizes=(1e-6, 50), *,
                capturable=False, foreach=None, maximize=False, differentiable=False):
    self._setup(params, locals())


def _adamax_init(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 foreach=None, *, maximize=False, differentiable=False, capturable=False):
    self._setup(params, locals())


def _sparseadam_init(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, maximize=False):
    self._setup(params, locals())


def _nadam_init(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                momentum_decay=4e-3, decoupled_weight_decay=False, *, foreach=None,
                maximize=False, capturable=False, differentiable=False):
    self._setup(params, locals())


def _radam_init(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                decoupled_weight_decay=False, *, foreach=None, maximize=False, capturable=False,
                differentiable=False):
    self._setup(params, locals())


def _nadam_mu_product(value, group, step):
    """torch.optim.NAdam's running product of its momentum schedule, in float32 as torch's."""
    beta1, md = group["betas"][0], group["momentum_decay"]
    return value * (beta1 * (1.0 - 0.5 * (0.96 ** (step * md))))


# fusedopt's own optimizers, in the same form (their defaults are the library's).
def _lion_init(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, maximize=False):
    self._setup(params, locals())


def _lazyadam_init(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, maximize=False):
    self._setup(params, locals())


def _signsgd_init(self, params, lr=1e-3, weight_decay=0.0, *, maximize=False):
    self._setup(params, locals())


# bitsandbytes.optim.AdEMAMix's arguments and defaults (t_alpha, t_beta3: None is no warm-up,
# the library's 0), without its quantization and paging arguments; maximize as the others.
def _ademamix_init(self, params, lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=5.0, t_alpha=None,
                   t_beta3=None, eps=1e-8, weight_decay=1e-2, *, maximize=False):
    self._setup(params, locals())


SGD = _fused_class("SGD", _Spec("sgd", step=None), _sgd_init, _doc("SGD", "sgd"))
Adagrad = _fused_class("Adagrad", _Spec("adagrad", init_state=True), _adagrad_init,
                       _doc("Adagrad", "adagrad"))
Adadelta = _fused_class("Adadelta", _Spec("adadelta"), _adadelta_init,
                        _doc("Adadelta", "adadelta"))
RMSprop = _fused_class("RMSprop", _Spec("rmsprop"), _rmsprop_init, _doc("RMSprop", "rmsprop"))
Adam = _fused_class("Adam", _Spec("adam", variants={"decoupled_weight_decay": "adamw"}),
                    _adam_init, _doc("Adam", "adam"))
AdamW = _fused_class("AdamW", _Spec("adamw", extra_defaults={"decoupled_weight_decay": True}),
                     _adamw_init, _doc("AdamW", "adamw"))
Rprop = _fused_class("Rprop", _Spec("rprop"), _rprop_init, _doc("Rprop", "rprop"))
Adamax = _fused_class("Adamax", _Spec("adamax"), _adamax_init, _doc("Adamax", "adamax"))
NAdam = _fused_class("NAdam", _Spec("nadam", torch_scalars={
    "mu_product": (1.0, _nadam_mu_product)}), _nadam_init, _doc("NAdam", "nadam"))
RAdam = _fused_class("RAdam", _Spec("radam"), _radam_init, _doc("RAdam", "radam"))
SparseAdam = _fused_class(
    "SparseAdam", _Spec("lazyadam", step="int", sparse_only=True), _sparseadam_init,
    "fusedopt's lazyadam (docs/optimizers.md) as torch.optim.SparseAdam: sparse gradients "
    "(nn.Embedding(sparse=True)) step only the rows they name; dense gradients raise, as "
    "torch's.")
Lion = _fused_class("Lion", _Spec("lion"), _lion_init,
                    "fusedopt's Lion (docs/optimizers.md `lion`) as a torch.optim.Optimizer.")
LazyAdam = _fused_class(
    "LazyAdam", _Spec("lazyadam", step="int"), _lazyadam_init,
    "fusedopt's LazyAdam (docs/optimizers.md `lazyadam`; torch.optim.SparseAdam's math and "
    "state format) as a torch.optim.Optimizer, here for dense gradients.")
SignSGD = _fused_class("SignSGD", _Spec("signsgd"), _signsgd_init,
                       "fusedopt's SignSGD (docs/optimizers.md `signsgd`) as a "
                       "torch.optim.Optimizer.")
AdEMAMix = _fused_class(
    "AdEMAMix", _Spec("ademamix"), _ademamix_init,
    "fusedopt's AdEMAMix (docs/optimizers.md `ademamix`) as a torch.optim.Optimizer, with "
    "bitsandbytes.optim.AdEMAMix's arguments and defaults; states exp_avg, exp_avg_slow, "
    "exp_avg_sq and a float32 step tensor.")


def _adafactor_init(self, params, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0,
                    weight_decay=0.0, *, foreach=None, maximize=False):
    self._setup(params, locals())


class Adafactor(_FusedOptimizer):
    """fusedopt's fused adafactor (docs/optimizers.md) as torch.optim.Adafactor: the same
    arguments, defaults, param groups and state_dict format (row_var [..., rows, 1] and col_var
    [..., 1, cols] for params of two or more dimensions, variance for vectors; a float32 step
    tensor). eps = (None, ...) takes the params' dtype's machine epsilon as torch does (one
    dtype per group). foreach is accepted and changes nothing."""

    _spec = _Spec("adafactor")
    __init__ = _adafactor_init

    def _options(self, group):
        options = super()._options(group)
        if group["eps"][0] is None:  # torch: the param dtype's epsilon
            dtypes = {p.dtype for p in group["params"]}
            if len(dtypes) > 1:
                raise ValueError(
                    "Adafactor with eps[0] = None takes the params' dtype's epsilon: this group "
                    f"mixes {sorted(str(t) for t in dtypes)}; split it or set eps[0]")
            if dtypes:
                options["eps1"] = torch.finfo(dtypes.pop()).eps
        return options


_adafactor_init.__qualname__ = "Adafactor.__init__"


# NVIDIA Apex's FusedLAMB: its arguments and defaults. set_grad_none is accepted (zero_grad sets
# grads to None in torch 2.x anyway); amsgrad raises, as Apex's does.
def _lamb_init(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-6,
               weight_decay=0.01, amsgrad=False, adam_w_mode=True, grad_averaging=True,
               set_grad_none=True, max_grad_norm=1.0, use_nvlamb=False):
    if amsgrad:
        raise RuntimeError("FusedLAMB does not support the AMSGrad variant.")
    self._setup(params, locals())


def _lamb_grad_multiplier(self, calls):
    """Apex's clipping before the step: with the global norm of every dense gradient of the
    step above max_grad_norm, every gradient is scaled by max_grad_norm / norm (on CUDA the
    factor stays on the device: no sync)."""
    max_norm = self.defaults["max_grad_norm"]
    grads = [g for call in calls for g in call[3]]
    if not max_norm or max_norm <= 0 or not grads:
        return None
    norm = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]))
    factor = torch.where(norm > max_norm, max_norm / norm, torch.ones_like(norm))
    if factor.device.type == "cpu":
        return float(factor)
    return factor.reshape(1).to(torch.float32)


# optax.lars's arguments (learning_rate has no default there; 1 here), adapt per param group
# for the exempt tensors (Optax's masks), maximize absent as in Optax.
def _lars_init(self, params, lr=1.0, momentum=0.9, weight_decay=0.0, trust_coefficient=1e-3,
               eps=0.0, nesterov=False, adapt=True):
    self._setup(params, locals())


LAMB = _fused_class(
    "LAMB", _Spec("lamb", step="int"), _lamb_init,
    "fusedopt's lamb (docs/optimizers.md `lamb`) as a torch.optim.Optimizer with NVIDIA Apex "
    "FusedLAMB's arguments and defaults, including its global max_grad_norm clipping (1.0): "
    "per-tensor trust ratios in a fused two-pass step. States exp_avg, exp_avg_sq, step.")
LAMB._grad_multiplier = _lamb_grad_multiplier
LARS = _fused_class(
    "LARS", _Spec("lars", step="int"), _lars_init,
    "fusedopt's lars (docs/optimizers.md `lars`) as a torch.optim.Optimizer with optax.lars's "
    "arguments; adapt=False in a param group exempts its tensors (biases, norms) from the trust "
    "ratio and the decay. State momentum_buffer (lr inside, as Optax's trace), step.")


# -- Schedule-Free (facebookresearch/schedule_free 1.4.1) ----------------------------------------

def _same_bits(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


class _ScheduleFree(_FusedOptimizer):
    """The schedulefree package's SGDScheduleFree / AdamWScheduleFree, stepped by fusedopt.

    The package keeps k (steps taken), lr_max and weight_sum per param group; the library keeps
    lr_max and weight_sum per param (its scalar states) and computes them itself
    (kernels/include/fusedopt/kernels/ops/schedule_free.hpp: the formula lives there only). Per
    step each stepped param gets a float64 buffer holding its group's (lr_max, weight_sum), all
    take the group's k + 1 as their step count (a param that skipped steps steps as in the
    package), and the values the step advanced are stored back into the group.
    """

    _TRAIN_MODE_ERROR = ("Optimizer was not in train mode when step is called. "
                         "Please insert .train() and .eval() calls on the "
                         "optimizer. See documentation for details.")

    def __setstate__(self, state):
        # torch.optim.Optimizer's, as the package's: no keys added to the groups on a load
        # (the base class would add "differentiable", which the package's groups do not have).
        torch.optim.Optimizer.__setstate__(self, state)

    def _beta(self, group):
        """The interpolation's beta: momentum (SGD) or beta1 (AdamW)."""
        return group["momentum"] if "momentum" in group else group["betas"][0]

    def _state_names(self, group):
        return [spec[0] for spec in _fusedopt.step_states(self._algorithm(group),
                                                          self._options(group))]

    @torch.no_grad()
    def step(self, closure=None):
        """One fused step of every param group, in train mode only (as the package: its first
        group's train_mode decides, and the exception is the package's)."""
        if not self.param_groups[0]["train_mode"]:
            raise Exception(self._TRAIN_MODE_ERROR)
        self._pending = []  # (group, its scalar buffer list, the param count, device)
        return super().step(closure)

    def _gather(self, group, fresh, counted, sparse):
        call = super()._gather(group, fresh, counted, sparse)
        if call is None:
            # The package advances a group's k, lr_max and weight_sum on every step, with or
            # without grads. An empty tensor steps nothing and advances its scalar states, so
            # the library computes them here too.
            device = group["params"][0].device if group["params"] else torch.device("cpu")
            empty = torch.empty(0, device=device)
            call = (self._algorithm(group), self._options(group), [empty], [empty],
                    [[empty] for _ in self._state_names(group)], [1])
        n = len(call[2])
        rows = []  # filled by _before_library_call: one buffer per param
        self._pending.append((group, rows, n, call[2][0].device))
        steps = [group["k"] + 1] * n
        if len(call) == 6:
            return call[:5] + (steps, None, 0.0, rows)
        return call[:5] + (steps,) + call[6:] + (rows,)

    def _before_library_call(self, calls):
        # One float64 buffer per device, a row (lr_max, weight_sum) per stepped param, from its
        # group's values: on CUDA one small host-to-device copy per device and step.
        by_device = {}
        for group, _, n, device in self._pending:
            by_device.setdefault(device, []).extend([[group["lr_max"], group["weight_sum"]]] * n)
        self._buffers = {d: torch.tensor(v, dtype=torch.float64).to(d)
                         for d, v in by_device.items()}
        offsets = dict.fromkeys(by_device, 0)
        for group, rows, n, device in self._pending:
            rows.extend(self._buffers[device][offsets[device]:offsets[device] + n].unbind(0))
            offsets[device] += n

    def _after_library_call(self):
        # The advanced values, read from the first param of each group (every param of a group
        # started from the same values and took the same step count, so all hold the same).
        # On CUDA this is one small device-to-host copy per device and step (a wait for the
        # stream): the price of keeping the package's per-group values in param_groups.
        host = {d: b.cpu() for d, b in self._buffers.items()}
        offsets = dict.fromkeys(host, 0)
        for group, _, n, device in self._pending:
            lr_max, weight_sum = host[device][offsets[device]].tolist()
            offsets[device] += n
            k = group["k"]
            warmup = group["warmup_steps"]
            group["scheduled_lr"] = group["lr"] * ((k + 1) / warmup if k < warmup else 1.0)
            group["lr_max"], group["weight_sum"] = lr_max, weight_sum
            group["k"] = k + 1
        self._pending, self._buffers = [], {}

    @torch.no_grad()
    def eval(self):
        """Puts each stepped param at x, the point to evaluate (and to save as the model), for
        the groups in train mode: the library's eval_params writes lerp(y, z, 1 - 1/beta). The
        training value y is kept, bitwise, in state[p]["train_param"] until train() (so a
        state_dict taken in eval mode carries it)."""
        for group in self.param_groups:
            if not group["train_mode"]:
                continue
            params = [p for p in group["params"] if "z" in self.state.get(p, {})]
            if params:
                names = self._state_names(group)
                kept = [p.detach().clone(memory_format=torch.preserve_format) for p in params]
                _fusedopt.eval_params(self._algorithm(group), self._options(group), params,
                                      [[self.state[p][n] for p in params] for n in names])
                for p, y in zip(params, kept):
                    self.state[p]["train_param"] = y
            group["train_mode"] = False

    @torch.no_grad()
    def train(self):
        """Puts each stepped param back at y, the point where gradients are taken, for the
        groups in eval mode: the y eval() kept, bitwise, where the param still is the x that
        eval() made from it and z; else (a checkpoint of the package's, saved in eval mode, or a
        param or z changed since) y from x and z by the package's own formula."""
        for group in self.param_groups:
            if group["train_mode"]:
                continue
            beta = self._beta(group)
            names = None
            for p in group["params"]:
                st = self.state.get(p, {})
                kept = st.pop("train_param", None)
                if "z" not in st:
                    continue
                if kept is not None and kept.shape == p.shape and kept.device == p.device:
                    # Is p still the x of this y? Recomputed by the library, compared bitwise.
                    if names is None:
                        names = self._state_names(group)
                    x = kept.clone()
                    _fusedopt.eval_params(self._algorithm(group), self._options(group), [x],
                                          [[st[n]] for n in names])
                    if _same_bits(x, p.detach()):
                        p.copy_(kept)
                        continue
                # The package's train(): y = lerp(x, z, 1 - beta), a rounding away from the y
                # that was (its inverse of eval()'s lerp is not exact).
                p.lerp_(st["z"].to(p.device), 1 - beta)
            group["train_mode"] = True


def _sgd_schedule_free_init(self, params, lr=1.0, momentum=0.9, weight_decay=0, warmup_steps=0,
                            r=0.0, weight_lr_power=2, foreach=hasattr(torch, "_foreach_mul_")):
    self._setup(params, locals())


def _adamw_schedule_free_init(self, params, lr=0.0025, betas=(0.9, 0.999), eps=1e-8,
                              weight_decay=0, warmup_steps=0, r=0.0, weight_lr_power=2.0,
                              foreach=hasattr(torch, "_foreach_mul_")):
    self._setup(params, locals())


# The package's group keys beyond its arguments, with its initial values.
_SCHEDULE_FREE_GROUP = {"k": 0, "train_mode": False, "weight_sum": 0.0, "lr_max": -1.0,
                        "scheduled_lr": 0.0}


def _schedule_free_class(name, algorithm, init, doc):
    cls = type(name, (_ScheduleFree,), {
        "__init__": init, "__doc__": doc, "__module__": __name__,
        "_spec": _Spec(algorithm, step=None, extra_defaults=_SCHEDULE_FREE_GROUP)})
    init.__qualname__ = f"{name}.__init__"
    return cls


_SF_DOC = (" as schedulefree.{0} (facebookresearch/schedule_free 1.4.1): its arguments, "
           "defaults, param-group keys (k, train_mode, lr_max, weight_sum, scheduled_lr) and "
           "state ({1}), so state_dicts move either way. Call train() before training and eval() "
           "before evaluating or saving, as with the package; step() in eval mode raises. foreach "
           "is kept and changes nothing. Unlike the package's, step() leaves p.grad as it was.")
SGDScheduleFree = _schedule_free_class(
    "SGDScheduleFree", "sgd_schedule_free", _sgd_schedule_free_init,
    "fusedopt's sgd_schedule_free (docs/optimizers.md)" + _SF_DOC.format("SGDScheduleFree", "z"))
AdamWScheduleFree = _schedule_free_class(
    "AdamWScheduleFree", "adamw_schedule_free", _adamw_schedule_free_init,
    "fusedopt's adamw_schedule_free (docs/optimizers.md)"
    + _SF_DOC.format("AdamWScheduleFree", "z, exp_avg_sq"))


# -- Muon (torch.optim.Muon, torch 2.15): a step of the matrix kind -----------------------------

# torch keeps the Newton-Schulz coefficients as one tuple; the library takes ns_a, ns_b, ns_c.
_PAIRED.update({"ns_a": ("ns_coefficients", 0), "ns_b": ("ns_coefficients", 1),
                "ns_c": ("ns_coefficients", 2)})
# torch's adjust_lr_fn strings as the library's numbers (None: torch's default, "original").
_MUON_ADJUST_LR_FN = {None: 0, "original": 0, "match_rms_adamw": 1, "spectral_unclamped": 2}


def _muon_adjust_lr_fn(fn):
    """torch's adjust_lr_fn string as the library's number; ValueError as torch's."""
    if fn not in _MUON_ADJUST_LR_FN:
        raise ValueError(f"Adjust learning rate function {fn} is not supported")
    return _MUON_ADJUST_LR_FN[fn]


def _muon_group(group):
    """A Muon group with its adjust_lr_fn as the library's number, for _options."""
    return dict(group, adjust_lr_fn=_muon_adjust_lr_fn(group.get("adjust_lr_fn")))


def _muon_params(param_group):
    """A Muon group's params as a list (a generator is read once), each checked to have two or
    more dimensions, with torch's message: nothing is added where one has fewer."""
    params = param_group["params"]
    params = [params] if torch.is_tensor(params) else list(params)
    for p in params:
        p = p[1] if isinstance(p, tuple) else p  # a named param: (name, tensor)
        if torch.is_tensor(p) and p.ndim < 2:
            raise ValueError(
                "Muon only supports 2D parameters whereas we found a parameter with size: "
                f"{p.size()} (fusedopt also steps 3-D and larger params as batches of "
                "matrices; use AdamW for vectors and scalars)")
    return params


def _muon_init(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
               ns_coefficients=(3.4445, -4.7750, 2.0315), eps=1e-7, ns_steps=5,
               adjust_lr_fn=None):
    _muon_adjust_lr_fn(adjust_lr_fn)
    self._setup(params, locals())


class _MuonOptimizer(_FusedOptimizer):
    """torch.optim.Muon's group keys to the library's options, and its 2-D-param check."""

    def add_param_group(self, param_group):
        param_group["params"] = _muon_params(param_group)
        _muon_adjust_lr_fn(param_group.get("adjust_lr_fn", self.defaults.get("adjust_lr_fn")))
        super().add_param_group(param_group)

    def _options(self, group):
        return super()._options(_muon_group(group))


Muon = type("Muon", (_MuonOptimizer,), {
    "__init__": _muon_init, "_spec": _Spec("muon", step=None), "__module__": __name__,
    "__doc__": (
        "fusedopt's muon (docs/optimizers.md) as torch.optim.Muon (torch 2.15): the same "
        "arguments, defaults, param groups and state (momentum_buffer), so state_dicts move "
        "either way. The Newton-Schulz iteration runs in float32 (torch's is bfloat16); a "
        "group key ns_bf16=True asks for bfloat16 on CUDA. Params of 3 or more dimensions "
        "step as batches of matrices over their last two (torch refuses them).")})
_muon_init.__qualname__ = "Muon.__init__"


# -- Muon and AdamW in one optimizer (Keller Jordan's MuonWithAuxAdam) ---------------------------

def _class_defaults(cls, overrides, who):
    """The group defaults of fusedopt.torch's class cls (its constructor's, as _setup takes
    them, and its spec's extra ones), overridden by the keywords of overrides (a name cls's
    constructor does not take: TypeError, as a call would raise)."""
    try:
        bound = inspect.signature(cls.__init__).bind(None, None, **(overrides or {}))
    except TypeError as e:
        raise TypeError(f"{who} takes torch.optim.{cls.__name__}'s keywords: {e}") from None
    bound.apply_defaults()
    defaults = dict(list(bound.arguments.items())[2:])  # all but self and params
    defaults.update(cls._spec.extra_defaults)
    return defaults


class MuonWithAdamW(_FusedOptimizer):
    """Muon for the hidden matrices and AdamW for the rest in one optimizer: one step() (one
    library call for every group), one state_dict (Keller Jordan's MuonWithAuxAdam).

        opt = MuonWithAdamW([{"params": hidden_matrices, "use_muon": True},
                             {"params": embeddings_head_biases_norms, "use_muon": False}],
                            muon=dict(lr=0.02), adamw=dict(lr=3e-4, betas=(0.9, 0.95)))

    Every param group names its kind with use_muon, True or False: required (ValueError without
    it), since which params are Muon's is the model's choice, not a rule on shapes (an
    embedding or a head is 2-D and belongs to AdamW). use_muon=True groups step as
    fusedopt.torch.Muon (torch.optim.Muon's keys: lr, weight_decay, momentum, nesterov,
    ns_coefficients, eps, ns_steps, adjust_lr_fn; params of fewer than two dimensions raise
    ValueError and nothing is added), use_muon=False groups as fusedopt.torch.AdamW
    (torch.optim.AdamW's: lr, betas, eps, weight_decay, amsgrad, maximize; any param).

    muon and adamw: the defaults of the groups of that kind, as keywords of torch.optim.Muon and
    torch.optim.AdamW (TypeError for others); what they leave out is torch's default, and a
    group's own keys win, as in any torch optimizer. Why two dicts rather than one set of
    keywords: lr, eps and weight_decay belong to both kinds with different meanings and
    defaults (eps is 1e-7 inside Newton-Schulz, 1e-8 in AdamW's denominator), so one flat set
    would need invented prefixed names; as two dicts the names stay torch's, and two torch
    optimizers Muon(m, **a) and AdamW(w, **b) become groups m and w with muon=a, adamw=b.
    Without them each group takes its kind's torch defaults, as in Keller Jordan's class
    (whose own defaults differ: Muon lr 0.02, no decay; AdamW lr 3e-4, betas (0.9, 0.95), eps
    1e-10, no decay). A group key that only the other kind has (betas in a Muon group, momentum
    in an AdamW one) raises ValueError rather than being ignored. opt.muon_defaults and
    opt.adamw_defaults hold the two sets; opt.defaults is empty: no one set fits every group.

    Each group's keys and each param's state are those of its kind's torch class, plus the
    group's use_muon: momentum_buffer for Muon's params; step (a CPU float32 tensor), exp_avg,
    exp_avg_sq (and max_exp_avg_sq) for AdamW's. So a state_dict is torch.optim.Muon's and
    torch.optim.AdamW's side by side: theirs, concatenated in this optimizer's group order,
    load into it (a group without use_muon takes this optimizer's; one of the other kind raises
    ValueError), and its groups and states split by kind load into theirs. The Newton-Schulz
    iteration runs in float32, as fusedopt.torch.Muon's.
    """

    def __init__(self, params, muon=None, adamw=None):
        self.muon_defaults = _class_defaults(Muon, muon, "MuonWithAdamW's muon=")
        self.adamw_defaults = _class_defaults(AdamW, adamw, "MuonWithAdamW's adamw=")
        for use_muon in (True, False):  # both sets checked, whether a group takes them or not
            group = dict(self._kind_defaults(use_muon), use_muon=use_muon)
            _refuse_differentiable(self, group)
            _fusedopt.step_states(self._algorithm(group), self._options(group))
        super().__init__(params, {})

    def _kind_defaults(self, use_muon):
        return self.muon_defaults if use_muon else self.adamw_defaults

    def _group_spec(self, group):
        return (Muon if group["use_muon"] else AdamW)._spec

    def add_param_group(self, param_group):
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        if "use_muon" not in param_group:
            raise ValueError(
                "MuonWithAdamW: every param group needs use_muon: True (Muon: hidden matrices) "
                "or False (AdamW: embeddings, heads, biases, norms)")
        use_muon = param_group["use_muon"]
        if not isinstance(use_muon, bool):
            raise ValueError(f"MuonWithAdamW: use_muon must be True or False, got {use_muon!r}")
        own, other = self._kind_defaults(use_muon), self._kind_defaults(not use_muon)
        foreign = sorted((param_group.keys() & other.keys()) - own.keys())
        if foreign:
            kind, whose = ("a Muon", "AdamW's") if use_muon else ("an AdamW", "Muon's")
            raise ValueError(f"MuonWithAdamW: {kind} group (use_muon={use_muon}) does not "
                             f"take {', '.join(foreign)} ({whose})")
        if use_muon:
            param_group["params"] = _muon_params(param_group)
        for key, value in own.items():
            param_group.setdefault(key, value)
        _refuse_differentiable(self, param_group)
        super().add_param_group(param_group)  # the library's checks of the options

    def __getstate__(self):
        # torch's keeps defaults, state and param_groups only; a pickled (or deep-copied)
        # optimizer keeps its two sets too.
        return dict(super().__getstate__(), muon_defaults=self.muon_defaults,
                    adamw_defaults=self.adamw_defaults)

    def __setstate__(self, state):
        torch.optim.Optimizer.__setstate__(self, state)
        # torch's adds "differentiable" to the defaults, which add_param_group would then put
        # into every group (Muon groups too, which torch's Muon does not have).
        self.defaults.pop("differentiable", None)
        for group in self.param_groups:  # a checkpoint without some keys: the kind's defaults
            for key, value in self._kind_defaults(group["use_muon"]).items():
                group.setdefault(key, value)

    def load_state_dict(self, state_dict):
        # A group keeps its kind: a saved group of the other kind would step its params by the
        # other algorithm (vectors by Muon). A group without use_muon (torch's checkpoints) takes
        # this optimizer's.
        saved = state_dict["param_groups"]
        if len(saved) == len(self.param_groups):  # else torch's own error
            for i, (s, g) in enumerate(zip(saved, self.param_groups)):
                if s.get("use_muon", g["use_muon"]) != g["use_muon"]:
                    raise ValueError(
                        f"loaded state dict's param group {i} has use_muon={s['use_muon']}, "
                        f"this optimizer's has use_muon={g['use_muon']}")
            state_dict = dict(state_dict, param_groups=[
                dict(s, use_muon=g["use_muon"]) for s, g in zip(saved, self.param_groups)])
        super().load_state_dict(state_dict)

    def _options(self, group):
        return super()._options(_muon_group(group) if group["use_muon"] else group)


# -- 8-bit and 4-bit optimizer states (docs/python.md, docs/quantized-states.md) ----------------

def _quantize(values, state_dtype, non_negative):
    """A CPU uint8 buffer of `values` (any dtype, device) block-quantized to nearest."""
    src = values.detach().to(device="cpu", dtype=torch.float32).contiguous().reshape(-1)
    out = torch.empty(_fusedopt.quantized_state_bytes(src.numel(), state_dtype), dtype=torch.uint8)
    _fusedopt.quantize_state(out, src, state_dtype, non_negative)
    return out


def _dequantize(buffer, p, state_dtype, non_negative):
    """The float32 CPU values, of p's shape, of a block-quantized state `buffer` of param p."""
    out = torch.empty(p.shape, dtype=torch.float32)
    _fusedopt.dequantize_state(out.reshape(-1), buffer.detach().to("cpu").contiguous(),
                               state_dtype, non_negative)
    return out


def dequantized_state(optimizer, param):
    """The states of `param` in `optimizer` (a fusedopt.torch optimizer) as float32 tensors of
    the param's shape on its device, by name ({"exp_avg": ..., "exp_avg_sq": ...}): a
    block-quantized state (uint8) decoded exactly (each element its code's value times its
    block's absmax), any other state converted to float32. A param that has not stepped: {}."""
    group = next((g for g in optimizer.param_groups if any(q is param for q in g["params"])),
                 None)
    if group is None:
        raise ValueError("dequantized_state: the param is not one of the optimizer's")
    st = optimizer.state.get(param, {})
    maps = optimizer._state_maps(group)
    out = {}
    for name, non_negative in maps.items():
        v = st.get(name)
        if not torch.is_tensor(v):
            continue
        if v.dtype == torch.uint8:
            if optimizer._state_dtype is None:
                raise ValueError(f"dequantized_state: state {name!r} is uint8 in an optimizer "
                                 "without block-quantized states")
            out[name] = _dequantize(v, param, optimizer._state_dtype, non_negative).to(
                param.device)
        else:
            out[name] = v.detach().to(dtype=torch.float32, copy=True)
    return out


class _QuantizedOptimizer(_FusedOptimizer):
    """A fusedopt.torch class whose large params keep 8-bit or 4-bit states."""

    def _quantized_setup(self, params, args):
        state_dtype = self._state_dtype  # the class's
        args = dict(args)
        block_size = args.pop("block_size")
        stochastic = args.pop("bf16_stochastic_round")
        min_quant_size = args.pop("min_quant_size")
        name = type(self).__name__
        if block_size != _QUANT_BLOCK[state_dtype]:
            raise ValueError(
                f"{name}: block_size must be {_QUANT_BLOCK[state_dtype]} (fusedopt's fixed "
                f"block of {state_dtype} states: one float32 absmax per "
                f"{_QUANT_BLOCK[state_dtype]} elements), got {block_size}")
        if stochastic:
            raise NotImplementedError(
                f"{name}: bf16_stochastic_round=True is not supported (fusedopt's stochastic "
                "rounding also draws the states' codes, unlike torchao's)")
        if isinstance(min_quant_size, bool) or not isinstance(min_quant_size, int) or \
                min_quant_size < 0:
            raise ValueError(f"{name}: min_quant_size must be an int >= 0, got {min_quant_size!r}")
        self._min_quant_size = min_quant_size
        self._setup(params, args)

    def __getstate__(self):
        # torch's keeps defaults, state and param_groups only: a pickled (or deep-copied)
        # optimizer keeps its storage too.
        return dict(super().__getstate__(), _min_quant_size=self._min_quant_size)

    def __setstate__(self, state):
        # Also called by torch's load_state_dict (without the threshold, which stays).
        super().__setstate__(state)

    @property
    def min_quant_size(self):
        """Params of fewer elements keep the states fusedopt.torch's full-precision class keeps
        (the param's dtype); fixed at construction."""
        return self._min_quant_size


def _quantized_doc(name, torch_name, bits, block):
    return (
        f"{torch_name} with {bits}-bit optimizer states, as torchao.optim.{name}: the same "
        f"arguments and group keys (lr, betas, eps, weight_decay, amsgrad). Each state of a "
        f"param of min_quant_size (4096) or more elements is one uint8 tensor in "
        f"state[p] under torch's name: block-quantized codes and one float32 absmax per "
        f"{block} elements (docs/quantized-states.md), about {'1/4' if bits == 8 else '1/8'} "
        f"of float32; smaller params keep fusedopt.torch.{torch_name}'s states. The step "
        f"decodes, steps in float32 and re-encodes to nearest in the same fused pass. "
        f"block_size must be {block} (ValueError otherwise); bf16_stochastic_round=True "
        f"raises NotImplementedError. fusedopt.torch.dequantized_state(opt, p) decodes.")


def _adamw8bit_init(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                    amsgrad=False, *, block_size=256, bf16_stochastic_round=False,
                    min_quant_size=4096):
    self._quantized_setup(params, locals())


def _adamw4bit_init(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                    amsgrad=False, *, block_size=128, bf16_stochastic_round=False,
                    min_quant_size=4096):
    self._quantized_setup(params, locals())


def _adam8bit_init(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                   amsgrad=False, *, block_size=256, bf16_stochastic_round=False,
                   min_quant_size=4096):
    self._quantized_setup(params, locals())


def _adam4bit_init(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                   amsgrad=False, *, block_size=128, bf16_stochastic_round=False,
                   min_quant_size=4096):
    self._quantized_setup(params, locals())


def _quantized_class(name, algorithm, init, torch_name, bits):
    cls = type(name, (_QuantizedOptimizer,), {
        "__init__": init, "_spec": _Spec(algorithm), "__module__": __name__,
        "_state_dtype": "int8" if bits == 8 else "int4",
        "__doc__": _quantized_doc(name, torch_name, bits, 256 if bits == 8 else 128)})
    init.__qualname__ = f"{name}.__init__"
    return cls


AdamW8bit = _quantized_class("AdamW8bit", "adamw", _adamw8bit_init, "AdamW", 8)
AdamW4bit = _quantized_class("AdamW4bit", "adamw", _adamw4bit_init, "AdamW", 4)
Adam8bit = _quantized_class("Adam8bit", "adam", _adam8bit_init, "Adam", 8)
Adam4bit = _quantized_class("Adam4bit", "adam", _adam4bit_init, "Adam", 4)
