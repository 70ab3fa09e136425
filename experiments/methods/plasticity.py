"""The plasticity family (``clx.plasticity``): cures for the loss of plasticity on long streams.

Each entry chains its rule with the config's optimizer (``train.optimizer``, ``train.lr``),
so one config runs "backprop" (``finetune``) and every cure with SGD or with Adam, as the
plasticity papers compare them. Defaults are the papers' Permuted-MNIST values:

- ``l2_init``: lambda 1e-2 (Kumar, Marklund & Van Roy 2023, Table 3);
- ``shrink_perturb``: at task boundaries, shrink 0.4 (Ash & Adams 2020's code default) and
  standard normal noise of std 0.005 (their perturb 0.1 scales a fresh init, about 0.1 x 0.02-0.06
  on these layers; see ``clx.plasticity.shrink_perturb``);
- ``shrink_perturb_steps``: every step, weight decay 1e-4 and noise std 1e-5 (Dohare et al.
  2024's ``snp.json``: weight decay 1e-4, perturb_scale swept over 1e-4 / 1e-5 / 1e-6);
- ``cbp``: replacement rate 1e-4, decay 0.99, maturity 100, the paper's contribution utility;
- ``redo``: tau 0.1 (the paper's text and the loss-of-plasticity code's baseline; the official
  dopamine code's default is 0), every 1,000 steps;
- ``upgd``: the README's UPGD values (beta_u 0.999, sigma 1e-3, weight decay 1e-3) with the
  optimizer file's step (lr, not 2 lr); its step size is ``train.lr`` (UPGD is the optimizer);
- ``spectral``: strength 1e-4, k = 2 (not checked against the paper's text: see
  ``clx.plasticity.spectral_regularization``).
"""

from __future__ import annotations

import ml_collections

import clx
from experiments.methods._registry import Method, optimizer, register, swept


def l2_init_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.lam = 1e-2  # Kumar et al. 2023: lam ||theta - theta_0||^2, 1e-2 on Permuted MNIST (SGD and Adam)
    return c


def l2_init_rule(config, model, hp=None):
    """``clx.chain(clx.plasticity.l2_init(lam), optimizer)``; sweeps ``l2_init.lam`` or ``train.lr``."""
    del model
    lam = swept(config, hp, "l2_init.lam", float(config.l2_init.lam))
    return clx.chain(clx.plasticity.l2_init(lam), optimizer(config, hp))


L2_INIT = register(Method("l2_init", l2_init_rule, config=l2_init_config, sweepable=("l2_init.lam", "train.lr")))


def shrink_perturb_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.shrink = 0.4  # Ash & Adams 2020's code default (theta <- shrink theta + sigma eps at each task boundary)
    # Their perturb 0.1 multiplies a fresh initialisation (std about 0.02-0.06 for fan-ins 784-100 under PyTorch's
    # init); clx's eps is standard normal, so 0.005 is noise of that size (0.1 here would re-randomise the net).
    c.sigma = 0.005
    return c


def shrink_perturb_rule(config, model, hp=None):
    """``clx.chain(clx.plasticity.shrink_perturb(shrink, sigma, seed), optimizer)``; sweeps shrink, sigma, lr."""
    del model
    b = config.shrink_perturb
    shrink = swept(config, hp, "shrink_perturb.shrink", float(b.shrink))
    sigma = swept(config, hp, "shrink_perturb.sigma", float(b.sigma))
    rule = clx.plasticity.shrink_perturb(shrink, sigma, seed=int(config.seed))
    return clx.chain(rule, optimizer(config, hp))


SHRINK_PERTURB = register(
    Method(
        "shrink_perturb",
        shrink_perturb_rule,
        config=shrink_perturb_config,
        sweepable=("shrink_perturb.shrink", "shrink_perturb.sigma", "train.lr"),
    )
)


def shrink_perturb_steps_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.sigma = 1e-5  # Dohare et al. 2024 snp.json: perturb_scale in {1e-4, 1e-5, 1e-6}
    c.weight_decay = 1e-4  # the same config's weight decay
    c.shrink = 1.0  # 1: the loss-of-plasticity code (no shrink); < 1: Kumar et al. 2023's per-step S&P
    return c


def shrink_perturb_steps_rule(config, model, hp=None):
    """``clx.plasticity.shrink_perturb_steps(optimizer, sigma, ...)`` (the rule owns the optimizer)."""
    del model
    b = config.shrink_perturb_steps
    sigma = swept(config, hp, "shrink_perturb_steps.sigma", float(b.sigma))
    wd = swept(config, hp, "shrink_perturb_steps.weight_decay", float(b.weight_decay))
    return clx.plasticity.shrink_perturb_steps(
        optimizer(config, hp), sigma, weight_decay=wd, shrink=float(b.shrink), seed=int(config.seed)
    )


SHRINK_PERTURB_STEPS = register(
    Method(
        "shrink_perturb_steps",
        shrink_perturb_steps_rule,
        config=shrink_perturb_steps_config,
        sweepable=("shrink_perturb_steps.sigma", "shrink_perturb_steps.weight_decay", "train.lr"),
    )
)


def upgd_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.beta_utility = 0.999  # the README's UPGD (the optimizer file's default: 0)
    c.sigma = 1e-3  # the README's noise std (the file's default: 1.0)
    c.weight_decay = 1e-3  # the README's decoupled weight decay (the file's default: 0)
    c.step_scale = 1.0  # the optimizer file's step lr (the README steps 2 lr: 2.0)
    return c


def upgd_rule(config, model, hp=None):
    """``clx.plasticity.upgd(train.lr, ...)``: UPGD is the optimizer (``train.optimizer`` is not used)."""
    del model
    b = config.upgd
    lr = swept(config, hp, "train.lr", float(config.train.lr))
    sigma = swept(config, hp, "upgd.sigma", float(b.sigma))
    return clx.plasticity.upgd(
        lr,
        beta_utility=float(b.beta_utility),
        sigma=sigma,
        weight_decay=float(b.weight_decay),
        step_scale=float(b.step_scale),
        seed=int(config.seed),
    )


UPGD = register(Method("upgd", upgd_rule, config=upgd_config, sweepable=("upgd.sigma", "train.lr")))


def spectral_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.strength = 1e-4  # not from the paper (its text was not found): see clx.plasticity.spectral_regularization
    c.exponent = 2.0  # k in (sigma_max^k - 1)^2
    c.biases = True  # also pull the biases towards 0 (||b||^(2k))
    return c


def spectral_rule(config, model, hp=None):
    """``clx.chain(clx.plasticity.spectral_regularization(strength, ...), optimizer)``."""
    del model
    b = config.spectral
    strength = swept(config, hp, "spectral.strength", float(b.strength))
    rule = clx.plasticity.spectral_regularization(
        strength, exponent=float(b.exponent), biases=bool(b.biases), seed=int(config.seed)
    )
    return clx.chain(rule, optimizer(config, hp))


SPECTRAL = register(
    Method("spectral", spectral_rule, config=spectral_config, sweepable=("spectral.strength", "train.lr"))
)


def cbp_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.replacement_rate = 1e-4  # units replaced per hidden layer per step (Dohare et al. 2024: 1e-4..1e-6)
    c.decay = 0.99  # the utility's running-average decay (eta in Eq. 1)
    c.maturity = 100  # steps a fresh unit is protected from replacement
    c.utility = "contribution"  # the paper's Eq. 1 | adaptable_contribution (the code's Permuted-MNIST config)
    return c


def cbp_rule(config, model, hp=None):
    """``clx.plasticity.cbp(optimizer, ...)`` (the rule owns the optimizer, to reset replaced units' moments)."""
    del model
    b = config.cbp
    rate = swept(config, hp, "cbp.replacement_rate", float(b.replacement_rate))
    return clx.plasticity.cbp(
        optimizer(config, hp),
        rate,
        float(b.decay),
        int(b.maturity),
        seed=int(config.seed),
        utility=str(b.utility),
    )


CBP = register(Method("cbp", cbp_rule, config=cbp_config, sweepable=("cbp.replacement_rate", "train.lr")))


def redo_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.tau = 0.1  # a unit with mean|h_i| / mean_j mean|h_j| <= tau is dormant (the official code's default: 0)
    c.period = 1000  # steps between recycles
    return c


def redo_rule(config, model, hp=None):
    """``clx.plasticity.redo(optimizer, tau, period)`` (the rule owns the optimizer)."""
    del model
    tau = swept(config, hp, "redo.tau", float(config.redo.tau))
    return clx.plasticity.redo(optimizer(config, hp), tau, int(config.redo.period), seed=int(config.seed))


REDO = register(Method("redo", redo_rule, config=redo_config, sweepable=("redo.tau", "train.lr")))
