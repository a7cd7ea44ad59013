"""fusedopt: fused optimizer steps (torch.optim's math) on the CPU and CUDA, over DLPack arrays.

- ``fusedopt.torch``: drop-in ``torch.optim`` classes (``from fusedopt.torch import AdamW``).
- ``fusedopt.Optimizer``: the same optimizers for any array that speaks DLPack (numpy, CuPy,
  JAX, torch), with the state held here as arrays of the param's kind.
- ``fusedopt.algorithms()``: every registered optimizer with its options' defaults and states.

docs/python.md in the repository has the details.
"""

from ._fusedopt import (algorithms, cuda_device_count, dequantize_state, eval_params,
                        fill_quantized_state, quantize_state, quantized_state_bytes,
                        state_shapes, step, step_groups, step_scalars, step_states)

__all__ = ["Optimizer", "algorithms", "cuda_device_count", "eval_params", "step", "step_groups",
           "step_scalars", "step_states", "state_shapes", "quantized_state_bytes",
           "quantize_state", "dequantize_state", "fill_quantized_state"]
__version__ = "0.1.0"

_ALGORITHMS = {a["name"]: a for a in algorithms()}


def _namespace(array):
    """The array API namespace of `array` (numpy, CuPy, JAX...), or numpy."""
    get = getattr(array, "__array_namespace__", None)
    if get is not None:
        return get()
    import numpy

    return numpy


class Optimizer:
    """One optimizer over a list of arrays, for code outside PyTorch.

    ``Optimizer("adamw", [w, b], lr=1e-3, weight_decay=0.1)`` takes the library's option names
    (docs/optimizers.md: ``beta1``, ``beta2``, not ``betas``). Each ``step(grads)`` updates the
    params in place from one grad per param (``None`` skips that param: its step count stays).
    The arrays are viewed through DLPack, never copied; params must be contiguous and writable,
    float32, bfloat16 or float16 (on the CPU and on CUDA). ``state[i]`` holds param i's
    state arrays by name, created on its first step like the param (its array namespace's
    ``full_like``; a copy of it for the states that start as the param, schedule-free's ``z``),
    and ``steps[i]`` its step count. ``scalars[i]``: param i's scalar states (``step_scalars``:
    schedule-free's lr_max and weight_sum), a float64 array of 2 made by its namespace's
    ``asarray`` at its first step, or None. Bad input raises ValueError or TypeError and
    changes nothing.

    Weight EMA (docs/optimizers.md, "Weight EMA"): ``ema_decay`` in [0, 1) (0, the default:
    off) keeps ``ema[i]``, a float32 average of param i updated in the step's own pass, created
    at its first step as a float32 copy of the param; ``swap_ema()`` exchanges params and EMAs
    (twice restores both), ``copy_ema_to_params()`` copies the EMAs into the params.
    """

    def __init__(self, algorithm, params, **options):
        if algorithm not in _ALGORITHMS:
            raise ValueError(
                f"unknown algorithm {algorithm!r} (known: {', '.join(_ALGORITHMS)})")
        self.algorithm = algorithm
        self.params = list(params)
        self.options = dict(options)
        step_states(algorithm, self.options)  # validates the options now
        self.state = [dict() for _ in self.params]
        self.steps = [0] * len(self.params)
        self.scalars = [None] * len(self.params)
        self.ema = [None] * len(self.params)
        self._ema_decay = 0.0

    @property
    def ema_decay(self):
        """The weight EMA's decay in [0, 1); 0: no EMA. Turning it off once a param has an EMA
        is refused."""
        return self._ema_decay

    @ema_decay.setter
    def ema_decay(self, value):
        value = float(value)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0: no weight EMA), got {value}")
        if value == 0.0 and any(e is not None for e in self.ema):
            raise ValueError("ema_decay cannot turn the weight EMA off: params have stepped "
                             "with one")
        self._ema_decay = value

    def swap_ema(self):
        """Exchanges each param that has an EMA with it, bitwise (float32 params only)."""
        for p, e in self._ema_pairs("swap_ema"):
            xp = _namespace(p)
            kept = xp.asarray(p, copy=True)
            p[...] = e
            e[...] = kept

    def copy_ema_to_params(self):
        """Overwrites each param that has an EMA with it; the EMA is kept."""
        for p, e in self._ema_pairs("copy_ema_to_params"):
            p[...] = e

    def _ema_pairs(self, who):
        if self._ema_decay == 0.0:
            raise ValueError(f"{who}: there is no weight EMA (ema_decay is 0)")
        pairs = [(p, e) for p, e in zip(self.params, self.ema) if e is not None]
        for p, _ in pairs:
            if str(p.dtype) != "float32":
                raise TypeError(f"{who}: a {p.dtype} param cannot hold its float32 EMA exactly")
        return pairs

    def step(self, grads):
        grads = list(grads)
        if len(grads) != len(self.params):
            raise ValueError(f"step: {len(grads)} grads for {len(self.params)} params")
        specs = step_states(self.algorithm, self.options)
        idx = [i for i, g in enumerate(grads) if g is not None]
        scalar_inits = [init for _, init in step_scalars(self.algorithm)]
        fresh, fresh_scalars, fresh_emas = [], [], []
        for i in idx:
            st = self.state[i]
            p = self.params[i]
            xp = _namespace(p)
            shapes = dict(state_shapes(self.algorithm, self.options, tuple(p.shape)))
            for name, _, init, from_param in specs:
                if name not in st and shapes[name] is not None:  # factored: kept by shape
                    st[name] = (xp.asarray(p, copy=True) if from_param else
                                xp.full_like(p, init) if tuple(shapes[name]) == tuple(p.shape)
                                else xp.full(tuple(shapes[name]), init, dtype=p.dtype))
                    fresh.append((i, name))
            if self._ema_decay > 0 and self.ema[i] is None:  # the param before its first step
                self.ema[i] = xp.asarray(p, dtype=xp.float32, copy=True)
                fresh_emas.append(i)
            if scalar_inits and self.scalars[i] is None:
                self.scalars[i] = xp.asarray(scalar_inits + [0.0] * (2 - len(scalar_inits)),
                                             dtype=xp.float64)
                fresh_scalars.append(i)
        try:
            step(self.algorithm, self.options, [self.params[i] for i in idx],
                 [grads[i] for i in idx],
                 [[self.state[i].get(spec[0]) for i in idx] for spec in specs],
                 [self.steps[i] + 1 for i in idx],
                 scalars=[self.scalars[i] for i in idx] if scalar_inits else None,
                 emas=[self.ema[i] for i in idx] if self._ema_decay > 0 else None,
                 ema_decay=self._ema_decay)
        except Exception:
            for i, name in fresh:  # nothing changed: not even new state
                del self.state[i][name]
            for i in fresh_scalars:
                self.scalars[i] = None
            for i in fresh_emas:
                self.ema[i] = None
            raise
        for i in idx:
            self.steps[i] += 1
