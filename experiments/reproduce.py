"""The reproduction table: every published setup clx has a config for, run and set beside the published number.

    python -m experiments.reproduce [--workdir runs/reproduce] [--rows ROW,GROUP,...] [--seeds 0,1,2] [--out FILE]
    python -m experiments.reproduce --report-only     # rewrite the file from the results present, run nothing
    python -m experiments.reproduce --smoke [--rows ...] [--workdir DIR]   # every entry shrunk to sklearn digits

One row per (method, benchmark): the published ACC / BWT and where it comes from, clx's mean ± std over the
seeds (3 by default, one ``fit_members`` run; one run per seed where the stream is drawn from the seed), the
wall time and hardware of the run, and the command that reruns the row. The rows are
``experiments.tables.TABLES`` (published values and sources from there; BWT, where the paper gives one,
from the configs' docstrings) plus the setups that are not a table there: GPM on Permuted MNIST
(``configs/pmnist_gpm.py``; the GPM rows of the ``pmnist_baselines`` / ``pmnist_projection`` tables are the same
run and are left out), the hypernetworks (``pmnist_hnet.py``, ``split_mnist_hnet.py``) and 10-split CIFAR-100
(``split_cifar100.py``, no published value: its MLP is not the paper's network). ``pmnist_plasticity.py``,
``split_mnist_cnn.py`` and ``digits_default.py`` have no published ACC and are listed below the table, not run.

The work is done by ``experiments.tables`` (configs, reading a finished row, running a missing one); this module
adds the list of entries, the check of the data, the hardware record and the file. It is run by hand (hours on
CPU); a row whose results are in ``<workdir>/<row>/`` is read, not run again (delete that directory to rerun it),
so the table is built up over several sessions; a row cut off mid-run resumes from its checkpoints. The file is
rewritten after every row, and rows not run yet are in it as "not run" with their command. A row whose data are
not on the machine (CIFAR-100 needs a TFDS download; MNIST needs its IDX files) is "not run" with the reason.

``--smoke`` (CI: tests/test_reproduce.py) runs each chosen entry's own config cut to sklearn digits (2 tasks,
100 training examples per task, 1 epoch, hidden layers of 16, replay memories and samples capped, 1 seed, no
checkpoints) through the same row machinery, into ``--workdir`` (default ``runs/reproduce_smoke``) and
``<workdir>/REPRODUCTION.md``, never the repository's file. Compilation dominates: 5-25 s a row on 2 shared CPU
cores, so the test builds and checks every row's digits config (``experiments.run.prepare``: data, model, the rule's
init) and runs two rows end to end (each method's run on digits is tests/test_experiments.py's).

Bad input (an unknown row, a workdir that is a file, an ``--out`` that is a directory or in a missing one)
raises before anything runs or is written.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import glob
import json
import os
import sys
from typing import NamedTuple

from experiments import tables

DEFAULT_WORKDIR = "runs/reproduce"
SMOKE_WORKDIR = "runs/reproduce_smoke"
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "REPRODUCTION.md")
SIDECAR = "reproduce.json"  # per row: the hardware it ran on (written by this module after a run)


class Entry(NamedTuple):
    module: str  # experiments/configs/<module>.py
    variant: str | None  # what follows the colon (None: get_config())
    method: str
    benchmark: str
    acc: float | None  # published ACC, %; None: no published value (``source`` says why)
    bwt: float | None  # published BWT, percentage points; None: not given
    source: str


# GPM's Table 1 prints the Permuted-MNIST BWT as a fraction (GPM -0.03); here in points (-3), as the README
# reads it (the authors' code prints -3.1 % on this machine). Values from the docstrings of
# configs/pmnist_baselines.py and configs/pmnist_projection.py.
_GPM_BWT = {"gpm": -3.0, "ewc": -4.0, "agem": -14.0, "gem": -14.0, "er": -11.0, "ogd": -14.0}
_NONE = {  # rows of the tables without a published value: why
    "pmnist_baselines/finetune": "none: GPM's Table 1 has no fine-tuning row",
    "pmnist_projection/sgp": "none: Saha & Roy 2023 report no Permuted-MNIST number",
    "pmnist_projection/adam_nscl": "none: Wang et al. 2021 report no Permuted-MNIST number",
    **{
        f"pmnist_vdv/{row}": "none: configs/pmnist_vdv.py quotes no value for this row"
        for row, spec in tables.TABLES["pmnist_vdv"].items()
        if spec[3] is None
    },
}
_BENCHMARK = {
    "split_mnist_derpp": "Split MNIST class-IL (Mammoth), buffer {}",
    "split_mnist_vdv": "Split MNIST {} (van de Ven)",
    "pmnist_vdv": "Permuted MNIST-10 {} (van de Ven)",
    "pmnist_baselines": "Permuted MNIST-10 (GPM setup)",
    "pmnist_projection": "Permuted MNIST-10 (GPM setup)",
}
_SCENARIO = {"task_il": "task-IL", "domain_il": "domain-IL", "class_il": "class-IL"}


def _table_entries() -> dict[str, Entry]:
    out = {}
    for table, rows in tables.TABLES.items():
        for row, (module, variant, method, acc, source) in rows.items():
            if table in ("pmnist_baselines", "pmnist_projection") and method == "gpm":
                continue  # the same run as pmnist_gpm/gpm
            arg = variant.rpartition("_")[2] if table == "split_mnist_derpp" else _SCENARIO.get(variant, variant)
            bwt = _GPM_BWT.get(method) if table in ("pmnist_baselines", "pmnist_projection") else None
            name = f"{table}/{row}"
            out[name] = Entry(module, variant, method, _BENCHMARK[table].format(arg), acc, bwt, _NONE.get(name, source))
    return out


def _new_entries() -> dict[str, Entry]:
    cifar = "none: the config's MLP on raw pixels is not the paper's network (configs/split_cifar100.py)"
    out = {
        "pmnist_gpm/gpm": Entry(
            "pmnist_gpm", None, "gpm", "Permuted MNIST-10 (GPM setup)", 93.91, -3.0, "Saha et al. 2021, Table 1"
        ),
        "pmnist_hnet/hnet": Entry(
            "pmnist_hnet",
            None,
            "hnet",
            "Permuted MNIST-10 task-IL (hypercl setup)",
            97.6,
            None,
            'von Oswald et al. 2020 ("about 97.6", configs/pmnist_hnet.py; recalled per DESIGN.md)',
        ),
        "split_mnist_hnet/hnet_task_il": Entry(
            "split_mnist_hnet",
            "task_il",
            "hnet",
            "Split MNIST task-IL (hypercl setup)",
            99.8,
            None,
            'von Oswald et al. 2020, Table 2 ("about 99.8", configs/split_mnist_hnet.py)',
        ),
        "split_mnist_hnet/hnet_class_il": Entry(
            "split_mnist_hnet",
            "class_il",
            "hnet",
            "Split MNIST class-IL, HNET+ENT (hypercl setup)",
            69.0,
            None,
            'von Oswald et al. 2020, HNET+ENT ("about 69", configs/split_mnist_hnet.py; DESIGN.md: 69.48 ± 0.80 '
            "as quoted in hypercl issue 4)",
        ),
    }
    from experiments.configs import split_cifar100

    methods = split_cifar100.get_config().method.split(",")
    for scenario in split_cifar100.SCENARIOS:
        for method in methods:
            out[f"split_cifar100/{method}_{scenario}"] = Entry(
                "split_cifar100", scenario, method, f"10-split CIFAR-100 {_SCENARIO[scenario]}, MLP", None, None, cifar
            )
    return out


# Every reproduction row, by name (``<config or table>/<row>``, also its directory under the workdir).
ENTRIES: dict[str, Entry] = {**_table_entries(), **_new_entries()}
# Configs with no published ACC: listed under the table, never run by this module.
NOT_ROWS = {
    "pmnist_plasticity": "loss of plasticity: the papers publish curves of online accuracy, not an ACC to match",
    "split_mnist_cnn": "GPM on a LeNet, Split MNIST task-IL: clx's own setup, no published number",
    "digits_default": "sklearn digits: the demo, no published number",
}


def select(rows: list[str] | None) -> list[str]:
    """The row names a ``--rows`` list means (a name, or a group: every row under ``<group>/``); all without one.

    Raises:
      ValueError: a name that is neither a row nor a group (the message lists the groups and rows).
    """
    if not rows:
        return list(ENTRIES)
    groups = sorted({n.split("/")[0] for n in ENTRIES})
    chosen, unknown = [], []
    for r in rows:
        hits = [n for n in ENTRIES if n == r or n.split("/")[0] == r]
        if not hits:
            unknown.append(r)
        chosen += [h for h in hits if h not in chosen]
    if unknown:
        raise ValueError(
            f"unknown reproduction rows {unknown}; pass row names or groups. Groups: {groups}. Rows: {sorted(ENTRIES)}."
        )
    return chosen


def config(name: str, seeds: tuple[int, ...], smoke: bool = False):
    """The row's config (``experiments.tables._config``: its config file, variant and method, the seeds, no
    progress bars); with ``smoke`` cut to sklearn digits (:func:`shrink`) and one seed."""
    e = ENTRIES[name]
    c = tables._config(e.module, e.variant, e.method, seeds[:1] if smoke else seeds)
    return shrink(c) if smoke else c


def shrink(c):
    """Cuts a config to seconds on sklearn digits: 2 tasks of 100 training examples, 1 epoch, hidden layers of 16
    (as many as the config has: GPM's thresholds are per layer), batches of at most 32, replay memories,
    representation samples and the hypernetwork's chunks capped, no checkpoints. Edits ``c`` and returns it."""
    c.data.source, c.data.dir, c.data.pad = "digits", "", 0
    c.stream.num_tasks, c.stream.train_subset = 2, 100
    if c.model.kind == "mlp":
        c.model.hidden = tuple(16 for _ in c.model.hidden)
    c.train.epochs, c.train.batch_size = 1, min(int(c.train.batch_size), 32)
    c.checkpoint.enabled = False
    for block in ("er", "der", "derpp"):
        c[block].buffer_size = 64
        if "replay_batch_size" in c[block]:
            c[block].replay_batch_size = min(int(c[block].replay_batch_size), 16)
    c.agem.memory_per_task, c.agem.reference_batch_size = 32, 16
    c.gem.memory_per_task = 16
    c.ogd.memory_per_task = 10
    c.gpm.num_samples = c.sgp.num_samples = 20
    c.hnet.chunk_dim, c.hnet.hidden = 300, (8,)
    return c


def command(name: str, smoke: bool = False) -> str:
    """The command that runs one row (into the default workdir; add ``--workdir`` to read or resume another)."""
    return f"python -m experiments.reproduce{' --smoke' if smoke else ''} --rows {name}"


def missing_data(c) -> str | None:
    """Why the config's data are not on this machine ("not run: ..."), or None. Never downloads anything."""
    from clx import data

    source = str(c.data.source).lower()
    if source == "digits":
        return None
    if source == "mnist":
        names = [n for pair in data.MNIST_FILES.values() for n in pair]
        if c.data.dir and all(os.path.isfile(os.path.join(c.data.dir, n)) for n in names):
            return None
        return (
            f"not run: the MNIST IDX files are not in data.dir={c.data.dir!r} "
            "(../shared/data/mnist is used when it exists)"
        )
    return _tfds_missing(str(c.data.source), str(c.data.dir))


@functools.cache
def _tfds_missing(source: str, data_dir: str) -> str | None:
    from clx import data

    try:
        data.load_source(source, data_dir or None, download=False)
    except FileNotFoundError as e:  # a part read from files the user fetches (notMNIST's pickles)
        return f"not run: {source} needs files that are not here ({e})"
    except (ValueError, ModuleNotFoundError) as e:
        label = {"cifar100": "CIFAR-100"}.get(source.lower(), source)
        return f"not run: {label} needs TFDS download ({type(e).__name__} offline; see the config's docstring)"
    return None


def hardware() -> str:
    """What this process runs on: the JAX device kind and count, the CPU count."""
    import jax

    kind = jax.devices()[0].device_kind
    return f"{kind} x{jax.device_count()}, {os.cpu_count()} CPUs"


def _hardware_of(out: str) -> str:
    """The hardware a finished row ran on: this module's record, else the backend in its results.json."""
    path = os.path.join(out, SIDECAR)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)["hardware"]
    for res in sorted(glob.glob(os.path.join(out, "results.json")) + glob.glob(os.path.join(out, "*", "results.json"))):
        with open(res) as f:
            env = json.load(f).get("environment") or {}
        if env:
            return f"{env.get('backend', '?')} backend, {env.get('cpu_count', '?')} CPUs (device kind not recorded)"
    return "not recorded"


def _read(c, out: str) -> dict | None:
    """A finished row's summary, or None; reads only (``tables.run_row`` with a run that refuses)."""

    class _Missing(Exception):
        pass

    def refuse(*_):
        raise _Missing

    try:
        return tables.run_row(c, out, refuse)
    except _Missing:
        return None


def _pm(mean: float, std: float) -> str:
    return "n/a" if mean != mean else f"{mean:.2f} ± {std:.2f}"


def render(status: dict[str, dict], workdir: str, seeds: tuple[int, ...], smoke: bool) -> str:
    """The Markdown file: one row per entry in ``ENTRIES`` order, then the configs that are not rows."""
    lines = [
        "# Reproduction" + (" (smoke: digits-sized, not a result)" if smoke else ""),
        "",
        "Written by `python -m experiments.reproduce` (`make reproduce`); regenerated after every row it runs, "
        f"last on {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, from the results in `{workdir}` "
        f"(the commands use the default workdir; add `--workdir {workdir}` to read or resume those). "
        f"clx: mean ± std (ddof 0) over the seeds ({','.join(map(str, seeds))} asked; n per row), in %. "
        "Published ACC in %. Published BWT: GPM's Table 1 prints it as a fraction (GPM -0.03), shown here in "
        "points (-3), as the README reads it (the authors' code prints -3.1 % on this setup). "
        "Wall: the training loop of the row's run(s), all seeds together (data loading excluded). "
        '"recalled" sources were not re-read against the paper (see each config\'s docstring). '
        "A finished row is read, not rerun: delete `<workdir>/<row>` to run it again.",
        "",
        "| benchmark | method | published ACC | published BWT | source | clx ACC | clx BWT | Δ ACC | seeds "
        "| wall s | hardware | command |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in ENTRIES.items():
        s = status[name]
        pub = "" if e.acc is None else f"{e.acc:g}"
        bwt = "" if e.bwt is None else f"{e.bwt:g}"
        got = s.get("got")
        if got is None:
            clx_acc, clx_bwt, diff, n, wall, hw = s.get("reason", "not run"), "", "", "", "", ""
        else:
            clx_acc, clx_bwt = _pm(got["acc"], got["std"]), _pm(got["bwt"], got["bwt_std"])
            diff = "" if e.acc is None else f"{got['acc'] - e.acc:+.2f}"
            n, wall, hw = str(got["n"]), f"{got['wall']:.0f}", s.get("hardware", "")
        lines.append(
            f"| {e.benchmark} | {e.method} | {pub} | {bwt} | {e.source} | {clx_acc} | {clx_bwt} | {diff} | {n} "
            f"| {wall} | {hw} | `{s['command']}` |"
        )
    lines += ["", "Configs with no published ACC (not rows, not run here):", ""]
    lines += [f"- `experiments/configs/{m}.py`: {why}." for m, why in NOT_ROWS.items()]
    return "\n".join(lines) + "\n"


def _check_paths(workdir: str, out: str) -> None:
    fix = "pass another"
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise NotADirectoryError(f"the workdir {os.path.abspath(workdir)} is a file, not a directory; {fix} --workdir.")
    if os.path.isdir(out):
        raise IsADirectoryError(f"--out {os.path.abspath(out)} is a directory; {fix} --out (a Markdown file path).")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent) and parent != os.path.abspath(workdir):  # the workdir is created
        raise FileNotFoundError(f"--out {os.path.abspath(out)}: its directory {parent} does not exist; {fix} --out.")


def _write(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)  # a reader never sees half a file


def build(
    workdir: str = DEFAULT_WORKDIR,
    seeds: tuple[int, ...] = (0, 1, 2),
    rows: list[str] | None = None,
    out: str | None = None,
    smoke: bool = False,
    run_rows: bool = True,
) -> str:
    """Runs the chosen rows that have no results yet (all rows without ``rows``; none with ``run_rows=False``),
    reads the others, writes the file to ``out`` after each row and returns its text.

    Every chosen row's config is built and checked (``experiments.run.prepare``) and the paths are checked before
    anything runs or is written.

    Raises:
      ValueError: an unknown row or group (the message lists them), an empty seed list, a bad config.
      NotADirectoryError / IsADirectoryError / FileNotFoundError: the workdir is a file; ``out`` is a directory
        or its directory is missing.
    """
    if not seeds:
        raise ValueError("seeds is empty; pass at least one, e.g. --seeds 0,1,2.")
    chosen = select(rows) if run_rows else []
    out = out or (os.path.join(workdir, "REPRODUCTION.md") if smoke else DEFAULT_OUT)
    _check_paths(workdir, out)
    from experiments.run import check_workdir, prepare, run

    configs = {name: config(name, seeds, smoke) for name in ENTRIES}
    status = {name: {"command": command(name, smoke)} for name in ENTRIES}
    for name in ENTRIES:
        reason = missing_data(configs[name])
        if reason:
            status[name]["reason"] = reason
    todo = [name for name in chosen if "reason" not in status[name]]
    for name in todo:  # every config checked before anything runs or is written
        prepare(configs[name])
    for name in ENTRIES:  # what is finished already (read only)
        if "reason" not in status[name] and os.path.isdir(os.path.join(workdir, name)):
            got = _read(configs[name], os.path.join(workdir, name))
            if got is not None:
                status[name].update(got=got, hardware=_hardware_of(os.path.join(workdir, name)))
    if todo or os.path.dirname(os.path.abspath(out)) == os.path.abspath(workdir):
        check_workdir(workdir)
    _write(out, render(status, workdir, seeds, smoke))
    for name in todo:
        if "got" in status[name]:
            continue
        row_out = os.path.join(workdir, name)
        ran = []

        def run_and_note(c, o):
            ran.append(o)
            run(c, o)

        got = tables.run_row(configs[name], row_out, run_and_note)
        if ran:
            with open(os.path.join(row_out, SIDECAR), "w") as f:
                json.dump({"hardware": hardware(), "runs": ran, "smoke": smoke}, f, indent=2)
        status[name].update(got=got, hardware=_hardware_of(row_out))
        _write(out, render(status, workdir, seeds, smoke))
    return render(status, workdir, seeds, smoke)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default=None, help=f"default {DEFAULT_WORKDIR} ({SMOKE_WORKDIR} with --smoke)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rows", default="", help="comma-separated row names or groups (default: all)")
    ap.add_argument("--out", default=None, help="default REPRODUCTION.md at the repo root (<workdir>/... with --smoke)")
    ap.add_argument("--smoke", action="store_true", help="every entry's config cut to sklearn digits, 1 seed")
    ap.add_argument("--report-only", action="store_true", help="write the file from the results present; run nothing")
    args = ap.parse_args(argv)
    workdir = args.workdir or (SMOKE_WORKDIR if args.smoke else DEFAULT_WORKDIR)
    out = args.out or (os.path.join(workdir, "REPRODUCTION.md") if args.smoke else DEFAULT_OUT)
    try:  # bad input: one line and exit status 2, before anything runs or is written
        seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
        if not seeds:
            raise ValueError("--seeds is empty; pass at least one, e.g. --seeds 0,1,2.")
        rows = [r.strip() for r in args.rows.split(",") if r.strip()] or None
        select(rows)
        _check_paths(workdir, out)
    except (ValueError, OSError) as e:
        ap.error(str(e))
    print(build(workdir, seeds, rows, out, smoke=args.smoke, run_rows=not args.report_only))


if __name__ == "__main__":
    sys.exit(main())
