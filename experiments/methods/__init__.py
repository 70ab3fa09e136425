"""The method registry: one :class:`Method` entry per method, the only place that knows methods.

An entry holds the method's config block and defaults, how to build its rule
from the config, the model and a swept value, which keys can be swept, what it
adds to results.json and its data mode. The built-in entries live in one module
per family and register themselves on import:

- ``baselines``: finetune, joint;
- ``projection``: gpm;
- ``hnet``: hnet;
- ``regularization``: ewc, online_ewc, si, mas, l2, lwf;
- ``replay``: er, agem, gem, der, derpp;
- ``plasticity``: l2_init, shrink_perturb, shrink_perturb_steps, cbp, redo, upgd, spectral.

Adding a method: write its entry in its family's module (``register(Method(...))``),
give it a config file in ``experiments/configs/`` that sets its paper's values, and
add it to the method list of ``tests/test_experiments.py``. ``configs/base.py`` adds
its ``config()`` block to every config; ``experiments/run.py`` needs no edit.
"""

# The built-in entries (one module per family) register themselves on import.
from experiments.methods import baselines, hnet, plasticity, projection, regularization, replay
from experiments.methods._registry import (
    DATA_MODES,
    METHODS,
    OPTIMIZERS,
    Method,
    build_mlp,
    check_config,
    check_sweep,
    get,
    optimizer,
    parse,
    register,
    swept,
)

__all__ = [
    "DATA_MODES",
    "METHODS",
    "OPTIMIZERS",
    "Method",
    "baselines",
    "build_mlp",
    "check_config",
    "check_sweep",
    "get",
    "hnet",
    "optimizer",
    "parse",
    "plasticity",
    "projection",
    "register",
    "regularization",
    "replay",
    "swept",
]
