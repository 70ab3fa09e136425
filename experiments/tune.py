r"""Chooses one or two hyperparameters honestly: tuned on one stream, reported on another.

    python -m experiments.tune --config experiments/configs/pmnist_gpm.py --method gpm \
        --key gpm.threshold --grid 0.9,0.95,0.97,0.99 --workdir runs/tune_gpm \
        [--key2 train.lr --grid2 0.005,0.01] \
        [--seeds 0,1,2] [--criterion acc] [--tune-tasks N] [--tune-stream-seed S] [--overwrite] \
        [--config.stream.num_tasks=3 --config.train.epochs=1 ...]

With ``--key2`` / ``--grid2`` the grid is every (value, value2) pair (``config.sweep.key2``:
grid x grid2 x seeds members in the one tuning run) and the winner is a pair.

Cha & Cho 2024, "Hyperparameters in Continual Learning: a Reality Check"
(arXiv:2403.09066): choosing the hyperparameters on the very stream one then reports
on overestimates a method. Their protocol (GTEP) has two phases with the same
scenario configuration (number of tasks, ...) built from different data: tune on
the first, report the second with the chosen values. Here the two phases differ in
the stream's seed, i.e. in what :func:`clx.data.make_stream` draws from it (the
pixel permutations of a permuted stream, the label permutations of a label-permuted
one, the class order of a split stream with ``stream.class_order='random'``, the
``train_subset`` shuffle); the data source is the same. A stream kind that draws
nothing from its seed (rotated, split with the natural class order) would give the
same tasks twice, which is refused (see below).

1. **Tuning** (``<workdir>/tuning/``): the grid x seeds as ONE run of the existing
   sweep machinery (``config.sweep``: one ``clx.fit_members`` program over
   values x seeds, ``experiments.run``) on the tuning stream, drawn from
   ``--tune-stream-seed`` (default ``config.seed + 1000``), optionally only its
   first ``--tune-tasks`` tasks (Lee et al. 2024, "Hyperparameter Selection in
   Continual Learning", tune on the first task; permuted-like kinds only: a split
   stream cuts its classes into ``stream.num_tasks`` groups, so fewer tasks would be
   other tasks). The winner is the grid value with the best mean over seeds of the
   criterion (``--criterion``, default ``acc``: the final average accuracy; ``forgetting``
   is minimised, the others maximised); on a tie the first value in grid order wins;
   a value whose mean is NaN never wins.
2. **Evaluation** (``<workdir>/evaluation/``): the winner alone (a one-value sweep,
   so the rule is built exactly as in the tuning run), the same seeds as members of
   one run, on the evaluation stream: ``config.seed``'s, the stream ``experiments.main``
   would report on.

``<workdir>/TUNING.md`` and ``<workdir>/tuning.json`` then hold the grid with each
value's tuning ACC and BWT (mean ± std over seeds, std with ddof=0), the winner and
the criterion, the winner's evaluation ACC and BWT, and the gap: the winner's tuning
ACC minus its evaluation ACC (positive: the tuning number flattered it; with
``--tune-tasks`` it also holds the effect of the shorter stream). What the best grid
value would score if tuned on the evaluation stream itself is not computed.

Everything is checked before anything is trained or written: the grid (at least 2
distinct numbers, each in the key's range), the key (one the method lists in
``sweepable``), the method (one; ``--method`` picks it from a config that names
several), the seeds, the criterion, ``--tune-tasks``, the tuning stream seed, both
phases' configs (``experiments.run.prepare``), that the tuning stream is not the
evaluation stream, and a workdir that already holds a finished tuning
(``tuning.json``: refused unless ``--overwrite``, which first removes the previous
``tuning/``, ``evaluation/``, ``TUNING.md`` and ``tuning.json``). An unfinished
tuning in the workdir resumes from its checkpoints (``experiments.run``).
Errors print as ``experiments.main`` prints them (``error: ...``, exit status 1).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time

import numpy as np
from absl import app, flags, logging

from experiments import main as main_lib  # its --config, --workdir and --traceback flags are this script's too
from experiments import methods
from experiments.run import check_workdir, prepare, run

#: The tuning stream's seed is ``config.seed + TUNE_SEED_OFFSET`` unless given.
TUNE_SEED_OFFSET = 1000
#: criterion -> +1 (higher is better) or -1 (lower is better); each is a key of results.json / members_summary.json.
CRITERIA = {"acc": 1, "bwt": 1, "forgetting": -1, "learning_accuracy": 1, "online_acc": 1}
#: Criteria that need the old tasks' scores (config.eval.tasks="seen").
_NEED_SEEN = ("acc", "bwt", "forgetting")
#: What a tuning writes into its workdir (``--overwrite`` removes these, and nothing else).
OUTPUTS = ("tuning", "evaluation", "TUNING.md", "tuning.json")

_METHOD = flags.DEFINE_string("method", "", "The method to tune (default: config.method, when it names one).")
_KEY = flags.DEFINE_string("key", "", "The hyperparameter to tune: a key the method lists in `sweepable`.")
_GRID = flags.DEFINE_string("grid", "", "Comma-separated values of --key (at least 2), e.g. 0.9,0.95,0.99.")
_KEY2 = flags.DEFINE_string("key2", "", "A second hyperparameter, crossed with --key (grid x grid2 points).")
_GRID2 = flags.DEFINE_string("grid2", "", "Comma-separated values of --key2 (at least 2).")
_SEEDS = flags.DEFINE_string("seeds", "0,1,2", "Comma-separated member seeds (init, batch order) of both phases.")
_CRITERION = flags.DEFINE_enum("criterion", "acc", list(CRITERIA), "What picks the winner (mean over seeds).")
_TUNE_TASKS = flags.DEFINE_integer("tune-tasks", 0, "Tune on the first N tasks of the tuning stream; 0 = all.")
_TUNE_SEED = flags.DEFINE_integer(
    "tune-stream-seed", -1, f"The tuning stream's seed; -1 = config.seed + {TUNE_SEED_OFFSET}."
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a finished tuning in --workdir.")


def parse_grid(text: str) -> list[float]:
    """``"0.9, 0.95"`` -> ``[0.9, 0.95]``.

    Raises:
      ValueError: an empty grid, or an entry that is not a finite number (the message names it).
    """
    entries = [e.strip() for e in str(text).split(",")]
    if not any(entries):
        raise ValueError("the tuning grid is empty; pass the values to try, e.g. --grid 0.9,0.95,0.99.")
    values = []
    for e in entries:
        try:
            v = float(e)
        except ValueError:
            v = math.nan
        if not e or not math.isfinite(v):
            raise ValueError(f"the tuning grid value {e!r} (in {text!r}) is not a finite number; fix --grid.")
        values.append(v)
    return values


def check_grid(grid, flag: str = "--grid") -> list[float]:
    """The grid as floats, checked: at least two distinct finite numbers (``flag`` names it in messages).

    Raises:
      ValueError: an empty grid, one value, a repeated or non-numeric value (the message names it).
    """
    if isinstance(grid, str):
        return check_grid(parse_grid(grid) if grid.strip() else [], flag)
    grid = list(grid)
    if not grid:
        raise ValueError(f"the tuning grid is empty; pass the values to try, e.g. {flag} 0.9,0.95,0.99.")
    for v in grid:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
            raise ValueError(f"the tuning grid value {v!r} (in {grid}) is not a finite number; fix {flag}.")
    grid = [float(v) for v in grid]
    if len(grid) < 2:
        raise ValueError(
            f"a tuning grid ({flag}) needs at least 2 values, got {grid}; to run one value set it in the config "
            "(or use `python -m experiments.main`: there is nothing to choose)."
        )
    if len(set(grid)) != len(grid):
        raise ValueError(f"the tuning grid ({flag}) repeats a value: {grid}; list each value once.")
    return grid


def pick(means, criterion: str = "acc") -> int:
    """The index of the winner: the best mean (``CRITERIA``: max, or min for forgetting); the first on a tie; NaN
    never wins.

    Raises:
      ValueError: an unknown criterion; every mean is NaN (the tuning runs diverged).
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {list(CRITERIA)}.")
    scores = CRITERIA[criterion] * np.asarray(means, np.float64)
    if np.all(np.isnan(scores)):
        raise ValueError(f"every grid value's tuning {criterion} is NaN; no value can be chosen (diverged runs?).")
    return int(np.argmax(np.where(np.isnan(scores), -np.inf, scores)))  # argmax: the first of equal maxima


def _seeds(seeds) -> tuple[int, ...]:
    if isinstance(seeds, str):
        try:
            seeds = [int(s) for s in seeds.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--seeds must be comma-separated integers, got {seeds!r}.") from None
    seeds = tuple(seeds)
    if not seeds:
        raise ValueError("no seeds given; pass at least one, e.g. --seeds 0,1,2.")
    if any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be integers >= 0, got {seeds}.")
    return tuple(int(s) for s in seeds)


def _phase_config(config, method: str, keys, grids, seeds, stream_seed: int, num_tasks: int):
    """A copy of ``config``: ``method``, ``keys`` swept over ``grids`` (crossed) x ``seeds``, the stream of
    ``stream_seed``."""
    c = config.copy_and_resolve_references()
    with c.unlocked():
        c.method = method
        c.seed = int(stream_seed)
        c.seeds = tuple(seeds)
        c.sweep.key, c.sweep.grid = keys[0], tuple(grids[0])
        c.sweep.key2, c.sweep.grid2 = (keys[1], tuple(grids[1])) if len(keys) == 2 else ("", ())
        c.stream.num_tasks = int(num_tasks)
    return c


def _test_set_digest(stream, t: int) -> str:
    x, y = stream.test_set(t)
    h = hashlib.sha256(np.ascontiguousarray(x).tobytes())
    h.update(np.ascontiguousarray(y).tobytes())
    return h.hexdigest()


def _shared_tasks(tune_stream, eval_stream) -> list[int]:
    """The tuning tasks whose test set (inputs and labels) is one of the evaluation stream's tasks'.

    Raises:
      ValueError: every tuning task is the evaluation task of the same index (the seed changed nothing).
    """
    tune = [_test_set_digest(tune_stream, t) for t in range(tune_stream.num_tasks)]
    ev = [_test_set_digest(eval_stream, t) for t in range(eval_stream.num_tasks)]
    if tune == ev[: len(tune)]:
        raise ValueError(
            f"the tuning stream (seed {tune_stream.seed}) has the same tasks as the evaluation stream (seed "
            f"{eval_stream.seed}): stream.kind={tune_stream.kind!r} draws nothing from its seed here; tuning on it "
            "would be tuning on the reported stream. Use a kind that does (permuted, label_permuted) or "
            "stream.class_order='random' for a split stream."
        )
    return [t for t, d in enumerate(tune) if d in ev]


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _phase_results(out: str) -> dict:
    """The members' summary of a phase run into ``out`` and each member's results (in member order)."""
    summary = _read_json(os.path.join(out, "members_summary.json"))
    members = [_read_json(os.path.join(out, d, "results.json")) for d in summary["member_dirs"]]
    return {"summary": summary, "members": members}


def tune(
    config,
    workdir: str,
    *,
    key: str,
    grid,
    key2: str = "",
    grid2=(),
    seeds=(0, 1, 2),
    criterion: str = "acc",
    method: str = "",
    tune_tasks: int = 0,
    tune_stream_seed: int | None = None,
    overwrite: bool = False,
    command: str = "",
) -> dict:
    """Tunes ``key`` over ``grid`` on the tuning stream, evaluates the winner on ``config.seed``'s stream, writes
    ``<workdir>/TUNING.md`` and ``<workdir>/tuning.json``; returns what tuning.json holds.

    Args:
      config: an experiment config (``experiments/configs``); its ``seed`` draws the evaluation stream, its
        ``seeds`` and ``sweep`` are replaced by ``seeds`` and the grid.
      key: a key the method lists in ``sweepable`` (e.g. ``gpm.threshold``, ``ewc.lam``, ``train.lr``).
      grid: >= 2 distinct numbers (or a comma-separated string of them).
      key2, grid2: an optional second hyperparameter and its >= 2 values: the grid is then every
        (value, value2) pair, all in the one tuning run; the winner is a pair.
      seeds: the member seeds of both phases (init and batch order; the streams are the phases' own).
      criterion: a key of :data:`CRITERIA`.
      method: the method to tune; "" = ``config.method`` when it names exactly one.
      tune_tasks: tune on the first N tasks only (0: as many as the evaluation stream).
      tune_stream_seed: the tuning stream's seed; None = ``config.seed + TUNE_SEED_OFFSET``.
      overwrite: replace a finished tuning in ``workdir``.
      command: the command line, recorded in the report.

    Raises:
      ValueError: a bad grid, key, method, seed list, criterion, tune_tasks or stream seed; a tuning stream with
        the evaluation stream's tasks; what ``experiments.run.prepare`` raises for either phase's config.
      FileExistsError: ``workdir`` holds a finished tuning and ``overwrite`` is False.
      OSError: the workdir cannot be written (``experiments.run.check_workdir``).
    """
    # ---- checks: nothing is written or trained before all of them pass ----
    grid = check_grid(grid)
    keys, grids = (key,), (grid,)
    if key2 or (grid2 if isinstance(grid2, str) else len(grid2)):
        if not key2:
            raise ValueError("--grid2 is set but --key2 is empty; name the second hyperparameter.")
        if key2 == key:
            raise ValueError(f"--key2 repeats --key {key!r}; tune two different hyperparameters.")
        grid2 = check_grid(grid2, "--grid2")
        keys, grids = (key, key2), (grid, grid2)
    points = [v for v in grid] if len(keys) == 1 else [[a, b] for a in grid for b in grid2]
    seeds = _seeds(seeds)
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {list(CRITERIA)}.")
    names = methods.parse(method or config.method)
    if len(names) != 1:
        raise ValueError(f"a tuning tunes one method and config.method names {names}; pick one with --method.")
    chosen = methods.get(names[0])
    if not key:
        raise ValueError(f"name the hyperparameter to tune with --key, one of {list(chosen.sweepable)}.")
    for k in keys:
        methods.check_sweep(chosen, k)
    if criterion in _NEED_SEEN and config.eval.tasks != "seen":
        raise ValueError(
            f"--criterion {criterion} needs the old tasks' accuracies, and config.eval.tasks={config.eval.tasks!r} "
            "scores only the current ones; set config.eval.tasks='seen' or use --criterion learning_accuracy."
        )
    num_tasks = int(config.stream.num_tasks)
    tune_tasks = int(tune_tasks) or num_tasks
    if not 1 <= tune_tasks <= num_tasks:
        raise ValueError(f"--tune-tasks must be in [1, {num_tasks}] (config.stream.num_tasks) or 0, got {tune_tasks}.")
    if tune_tasks != num_tasks and str(config.stream.kind).startswith("split"):
        raise ValueError(
            f"--tune-tasks {tune_tasks} with stream.kind={config.stream.kind!r}: a split stream cuts the classes "
            f"into stream.num_tasks groups, so {tune_tasks} tasks would be other tasks, not the first ones; "
            "leave --tune-tasks at 0."
        )
    if tune_tasks == 1 and criterion in ("bwt", "forgetting"):
        raise ValueError(
            f"--criterion {criterion} needs at least 2 tuning tasks (it is NaN after one); raise --tune-tasks or "
            "use --criterion acc."
        )
    stream_seed = int(config.seed) + TUNE_SEED_OFFSET if tune_stream_seed is None else int(tune_stream_seed)
    if stream_seed < 0 or stream_seed == int(config.seed):
        raise ValueError(
            f"the tuning stream's seed must be >= 0 and differ from config.seed={config.seed} (the evaluation "
            f"stream's), got {stream_seed}."
        )
    done = os.path.join(workdir, "tuning.json")
    if os.path.exists(done) and not overwrite:
        raise FileExistsError(
            f"{workdir} already holds a finished tuning ({done}); pass --overwrite to replace it, or another --workdir."
        )
    tune_config = _phase_config(config, chosen.name, keys, grids, seeds, stream_seed, tune_tasks)
    eval_config = _phase_config(config, chosen.name, keys, grids, seeds, config.seed, num_tasks)
    tune_plan = prepare(tune_config)  # every grid value's rule is built in both: whichever wins can run
    eval_plan = prepare(eval_config)
    shared = _shared_tasks(tune_plan.stream, eval_plan.stream)
    del tune_plan, eval_plan
    check_workdir(workdir)

    # ---- the two phases ----
    if overwrite:
        for name in OUTPUTS:
            path = os.path.join(workdir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    t0 = time.time()
    tune_out = os.path.join(workdir, "tuning")
    run(tune_config, tune_out)
    tuned = _phase_results(tune_out)
    groups = tuned["summary"]["groups"]
    assert [g["value"] for g in groups] == points, ([g["value"] for g in groups], points)
    winner_index = pick([g[f"{criterion}_mean"] for g in groups], criterion)
    winner = points[winner_index]
    t1 = time.time()

    eval_config.sweep.grid = (winner if len(keys) == 1 else winner[0],)
    if len(keys) == 2:
        eval_config.sweep.grid2 = (winner[1],)
    eval_out = os.path.join(workdir, "evaluation")
    run(eval_config, eval_out)
    evaluated = _phase_results(eval_out)
    g = evaluated["summary"]["groups"][0]
    t2 = time.time()

    report = {
        "method": chosen.name,
        "key": key,
        "grid": grid,
        **({"key2": key2, "grid2": grid2} if len(keys) == 2 else {}),
        "keys": list(keys),
        "points": points,
        "seeds": list(seeds),
        "criterion": criterion,
        "criterion_rule": (
            f"{'lowest' if CRITERIA[criterion] < 0 else 'highest'} mean {criterion} over the seeds on the tuning "
            "stream; on a tie the first value in grid order; a NaN mean never wins"
        ),
        "winner": winner,
        "winner_index": winner_index,
        "tuning": {
            "stream_seed": stream_seed,
            "num_tasks": tune_tasks,
            "tasks_shared_with_evaluation": shared,
            "members": tuned["summary"]["members"],
            "wall_seconds": t1 - t0,
            "values": [
                {
                    "value": grp["value"],
                    **{f"{m}_{s}": grp[f"{m}_{s}"] for m in CRITERIA for s in ("mean", "std")},
                    "acc_per_seed": [r["acc"] for r in tuned["members"] if _point(r["member"], keys) == grp["value"]],
                }
                for grp in groups
            ],
        },
        "evaluation": {
            "stream_seed": int(config.seed),
            "num_tasks": num_tasks,
            "members": evaluated["summary"]["members"],
            "wall_seconds": t2 - t1,
            **{f"{m}_{s}": g[f"{m}_{s}"] for m in CRITERIA for s in ("mean", "std")},
            "acc_per_seed": [r["acc"] for r in evaluated["members"]],
            "bwt_per_seed": [r["bwt"] for r in evaluated["members"]],
        },
        "gap": groups[winner_index]["acc_mean"] - g["acc_mean"],
        "gap_rule": "the winner's mean tuning ACC minus its mean evaluation ACC (positive: tuning flattered it)",
        "command": command,
        "config": config.to_dict(),
    }
    with open(os.path.join(workdir, "TUNING.md"), "w") as f:
        f.write(markdown(report))
    with open(done + ".tmp", "w") as f:  # tuning.json marks a finished tuning: written last, whole
        json.dump(report, f, indent=2)
    os.replace(done + ".tmp", done)
    return report


def _point(member: dict, keys) -> float | list[float]:
    """A member's grid point (results.json ``member``): its value of the key, or its [value, value2]."""
    return member[keys[0]] if len(keys) == 1 else [member[k] for k in keys]


def _point_text(point, keys, sep: str = ", ") -> str:
    values = [point] if len(keys) == 1 else point
    return sep.join(f"{k}={v:g}" for k, v in zip(keys, values))


def _pm(mean: float, std: float) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def markdown(report: dict) -> str:
    """TUNING.md: the protocol, the grid's tuning table, the winner, its evaluation and the gap."""
    keys = report.get("keys") or [report["key"]]
    crit, tun, ev = report["criterion"], report["tuning"], report["evaluation"]
    n = len(report["seeds"])
    extra = crit not in ("acc", "bwt")
    head = f"| {' | '.join(keys)} | tuning ACC % | tuning BWT % |" + (f" tuning {crit} % |" if extra else "")
    head += " chosen |"
    winner = _point_text(report["winner"], keys)
    lines = [
        f"# Tuning {report['method']}: {' x '.join(keys)}",
        "",
        f"Protocol (Cha & Cho 2024, arXiv:2403.09066): tuned on the stream of seed {tun['stream_seed']} "
        f"({tun['num_tasks']} tasks), evaluated on the stream of seed {ev['stream_seed']} ({ev['num_tasks']} tasks), "
        f"{n} seeds ({', '.join(map(str, report['seeds']))}) in each phase; mean ± std over seeds (ddof=0). "
        f"Tuning tasks identical to an evaluation task: {tun['tasks_shared_with_evaluation'] or 'none'}.",
        "",
        f"Winner: **{winner}**, by the {report['criterion_rule']}.",
        "",
        head,
        "|---" * len(keys) + "|---|---|" + ("---|" if extra else "") + "---|",
    ]
    for i, v in enumerate(tun["values"]):
        values = [v["value"]] if len(keys) == 1 else v["value"]
        row = f"| {' | '.join(f'{x:g}' for x in values)} | {_pm(v['acc_mean'], v['acc_std'])} | "
        row += f"{_pm(v['bwt_mean'], v['bwt_std'])} |"
        if extra:
            row += f" {_pm(v[f'{crit}_mean'], v[f'{crit}_std'])} |"
        lines.append(row + (" winner |" if i == report["winner_index"] else " |"))
    win = tun["values"][report["winner_index"]]
    lines += [
        "",
        f"| {winner} | ACC % | BWT % |",
        "|---|---|---|",
        f"| tuning stream (seed {tun['stream_seed']}) | {_pm(win['acc_mean'], win['acc_std'])} | "
        f"{_pm(win['bwt_mean'], win['bwt_std'])} |",
        f"| evaluation stream (seed {ev['stream_seed']}) | {_pm(ev['acc_mean'], ev['acc_std'])} | "
        f"{_pm(ev['bwt_mean'], ev['bwt_std'])} |",
        "",
        f"Tuning-vs-evaluation gap (the winner's tuning ACC minus its evaluation ACC): "
        f"**{100 * report['gap']:+.2f}** points. Report the evaluation row.",
        "",
        f"Wall time: tuning {tun['wall_seconds']:.1f} s ({tun['members']} members in one run), evaluation "
        f"{ev['wall_seconds']:.1f} s ({ev['members']} members).",
    ]
    if report["command"]:
        lines += ["", f"Command: `{report['command']}`"]
    return "\n".join(lines) + "\n"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config, workdir = main_lib._CONFIG.value, main_lib._WORKDIR.value
    if config is None or not workdir:
        raise app.UsageError("both --config and --workdir are required.")
    logging.set_verbosity(logging.INFO if not config.progress else logging.WARNING)
    logging.get_absl_handler().addFilter(main_lib._QuietOrbax())
    t0 = time.time()
    try:
        report = tune(
            config,
            workdir,
            key=_KEY.value,
            grid=_GRID.value,
            key2=_KEY2.value,
            grid2=_GRID2.value,
            seeds=_SEEDS.value,
            criterion=_CRITERION.value,
            method=_METHOD.value,
            tune_tasks=_TUNE_TASKS.value,
            tune_stream_seed=None if _TUNE_SEED.value < 0 else _TUNE_SEED.value,
            overwrite=_OVERWRITE.value,
            command=" ".join(["python -m experiments.tune", *sys.argv[1:]]),
        )
    except main_lib.USER_ERRORS as e:
        if main_lib._TRACEBACK.value:
            raise
        print(main_lib.user_error(e), file=sys.stderr)
        sys.exit(1)
    print(markdown(report))
    print(f"done in {time.time() - t0:.1f}s -> {os.path.join(workdir, 'TUNING.md')}", file=sys.stderr)


if __name__ == "__main__":
    app.run(main)
