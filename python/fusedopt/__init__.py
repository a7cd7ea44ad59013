"""fusedopt: fused optimizer steps (torch.optim's math) on the CPU and CUDA, over DLPack arrays.

- ``fusedopt.torch``: drop-in ``torch.optim`` classes (``from fusedopt.torch import AdamW``).
- ``fusedopt.Optimizer``: the same optimizers for any array that speaks DLPack (numpy, CuPy,
  JAX, torch), with the state held here as arrays of the param's kind.
- ``fusedopt.algorithms()``: every registered optimizer with its options' defaults and states.

docs/python.md in the repository has the details.
"""

from ._fusedopt import algorithms, cuda_device_count, step, step_states

__all__ = ["Optimizer", "algorithms", "cuda_device_count", "step", "step_states"]
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
    float32 on the CPU (float32, bfloat16 or float16 on CUDA). ``state[i]`` holds param i's
    state arrays by name, created on its first step like the param (its array namespace's
    ``full_like``), and ``steps[i]`` its step count. Bad input raises ValueError or TypeError
    and changes nothing.
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

    def step(self, grads):
        grads = list(grads)
        if len(grads) != len(self.params):
            raise ValueError(f"step: {len(grads)} grads for {len(self.params)} params")
        specs = step_states(self.algorithm, self.options)
        idx = [i for i, g in enumerate(grads) if g is not None]
        fresh = []
        for i in idx:
            st = self.state[i]
            for name, _, init in specs:
                if name not in st:
                    st[name] = _namespace(self.params[i]).full_like(self.params[i], init)
                    fresh.append((i, name))
        try:
            step(self.algorithm, self.options, [self.params[i] for i in idx],
                 [grads[i] for i in idx],
                 [[self.state[i][name] for i in idx] for name, _, _ in specs],
                 [self.steps[i] + 1 for i in idx])
        except Exception:
            for i, name in fresh:  # nothing changed: not even new state
                del self.state[i][name]
            raise
        for i in idx:
            self.steps[i] += 1
