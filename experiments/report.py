"""Writing and reading an experiment's results: JSON, CSV, a heatmap, a summary table.

``write_results(workdir, results)`` writes three files into ``workdir``:

* ``results.json``: every key of ``results``, indent 2, NaN written as JSON ``NaN`` (what
  Python's ``json`` writes and reads back); numpy scalars and arrays become python
  numbers and (nested) lists.
* ``accuracy_matrix.csv``: header ``after_task,task_0,...,task_{T-1}``, one row per
  training task, fractions with 6 decimals, an empty cell where not evaluated (NaN).
* ``accuracy_matrix.png``: heatmap of R in percent, cells annotated, NaN cells blank.

``write_summary(workdir, rows)`` writes ``summary.json`` and ``summary.txt`` (a plain-text
table, one line per method) and returns the table.

Every file is written atomically: to a temporary file in the same directory, flushed and
fsynced, then moved over the target with ``os.replace``, so a crash leaves either the old
file or the new one, never half of one.

Metrics are stored as fractions (as ``clx.metrics`` computes them); only the heatmap and
the summary table show percent.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import pathlib
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from clx.checkpoint import to_jsonable

__all__ = ["write_results", "write_summary", "load_results", "format_summary_table"]

RESULTS_FILE = "results.json"
CSV_FILE = "accuracy_matrix.csv"
PNG_FILE = "accuracy_matrix.png"
SUMMARY_JSON = "summary.json"
SUMMARY_TXT = "summary.txt"

# (key in a results dict, column header, scale, format) for the summary table.
_SUMMARY_COLUMNS = (
    ("acc", "ACC %", 100.0, "{:.2f}"),
    ("bwt", "BWT %", 100.0, "{:+.2f}"),
    ("fwt", "FWT %", 100.0, "{:+.2f}"),
    ("forgetting", "forgetting %", 100.0, "{:.2f}"),
    ("learning_accuracy", "learning acc %", 100.0, "{:.2f}"),
    ("online_acc", "online acc %", 100.0, "{:.2f}"),
    ("wall_seconds", "wall s", 1.0, "{:.1f}"),
)
# Shown only where some row has them (runs with continual evaluation, ``eval.every_steps``).
_OPTIONAL_COLUMNS = (
    ("min_acc", "min-ACC %", 100.0, "{:.2f}"),
    ("wc_acc", "WC-ACC %", 100.0, "{:.2f}"),
    ("stability_gap_mean", "stability gap %", 100.0, "{:.2f}"),
)


def _finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _columns(rows) -> tuple:
    """The summary columns, plus each optional one that some row (a results dict) has a number for."""
    return _SUMMARY_COLUMNS + tuple(c for c in _OPTIONAL_COLUMNS if any(_finite(r.get(c[0])) for r in rows))


# ---------------------------------------------------------------------------------------
# helpers


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` via a temporary file in the same directory."""
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600 files; give results the usual permissions.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    # Make the rename durable where the platform allows it (POSIX).
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, allow_nan=True) + "\n").encode("utf-8")


def _matrix(results: Mapping[str, Any]) -> np.ndarray:
    if "accuracy_matrix" not in results:
        raise KeyError("results has no 'accuracy_matrix'")
    R = np.asarray(results["accuracy_matrix"], dtype=np.float64)
    if R.ndim != 2:
        raise ValueError(f"results['accuracy_matrix'] must be a 2-D (T, T) matrix; got shape {R.shape}")
    return R


def _fmt_pct(value: Any, fmt: str = "{:.2f}") -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "n/a"
    if math.isnan(v):
        return "n/a"
    return fmt.format(100.0 * v)


# ---------------------------------------------------------------------------------------
# per-run results


def _csv_bytes(R: np.ndarray) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["after_task"] + [f"task_{j}" for j in range(R.shape[1])])
    for i, row in enumerate(R):
        w.writerow([i] + ["" if np.isnan(v) else f"{v:.6f}" for v in row])
    return buf.getvalue().encode("utf-8")


def _png_bytes(R: np.ndarray, results: Mapping[str, Any]) -> bytes:
    # The object-oriented API with the Agg canvas: no pyplot, so no global backend
    # switch in the caller's process (a notebook keeps its inline backend).
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    T_rows, T_cols = R.shape
    side = min(max(4.0, 0.55 * max(T_rows, T_cols) + 2.0), 12.0)  # long streams: one pixel-ish cell per task
    fig = Figure(figsize=(side + 1.2, side))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    pct = np.ma.masked_invalid(100.0 * R)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    im = ax.imshow(pct, cmap=cmap, vmin=0.0, vmax=100.0, aspect="equal")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="accuracy %")

    if max(T_rows, T_cols) <= 30:
        fontsize = 9 if max(T_rows, T_cols) <= 10 else 6
        for i in range(T_rows):
            for j in range(T_cols):
                v = R[i, j]
                if np.isnan(v):
                    continue
                ax.text(
                    j,
                    i,
                    f"{100.0 * v:.1f}",
                    ha="center",
                    va="center",
                    fontsize=fontsize,
                    color="black" if v > 0.6 else "white",
                )

    if max(T_rows, T_cols) <= 30:
        ax.set_xticks(range(T_cols))
        ax.set_yticks(range(T_rows))
    ax.set_xlabel("evaluated on task j")
    ax.set_ylabel("after training task i")
    method = results.get("method") or "(unnamed method)"
    ax.set_title(f"{method}: ACC {_fmt_pct(results.get('acc'))}%, BWT {_fmt_pct(results.get('bwt'), '{:+.2f}')}%")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def write_results(workdir: str | os.PathLike, results: Mapping[str, Any]) -> None:
    """Writes ``results.json``, ``accuracy_matrix.csv`` and ``accuracy_matrix.png``.

    Args:
      workdir: directory to write into; created (with parents) if missing.
      results: at least ``accuracy_matrix`` ((T, T) nested list or array of fractions,
        NaN where not evaluated), ``acc``, ``bwt``, ``fwt``, ``forgetting``,
        ``learning_accuracy``, ``wall_seconds`` and ``config`` (a plain dict); any other
        keys are kept in ``results.json``. ``method`` (optional) names the heatmap.

    Raises:
      KeyError: if ``accuracy_matrix`` is missing.
      ValueError: if ``accuracy_matrix`` is not 2-D.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    R = _matrix(results)
    # Serialise everything before touching the disk, so a bad value fails early.
    json_bytes = _dumps(to_jsonable(dict(results), "results"))
    csv_bytes = _csv_bytes(R)
    png_bytes = _png_bytes(R, results)
    # results.json last: its presence means the run's outputs are all complete.
    _atomic_write(workdir / CSV_FILE, csv_bytes)
    _atomic_write(workdir / PNG_FILE, png_bytes)
    _atomic_write(workdir / RESULTS_FILE, json_bytes)


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a ``results.json`` back (``path`` is the file or the workdir holding it).

    Values come back as JSON types: the accuracy matrix as a nested list of floats with
    ``nan`` where not evaluated (``np.asarray(d["accuracy_matrix"])`` gives the array).
    """
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------
# summary over methods


def format_summary_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """The plain-text table of ``write_summary``: one line per method, metrics in %."""
    columns = _columns(rows.values())
    header = ["method"] + [title for _, title, _, _ in columns]
    body = []
    for name, row in rows.items():
        cells = [str(name)]
        for key, _, scale, fmt in columns:
            value = row.get(key)
            try:
                v = float(value)
            except (TypeError, ValueError):
                v = math.nan
            cells.append("n/a" if math.isnan(v) else fmt.format(scale * v))
        body.append(cells)
    widths = [max(len(r[k]) for r in [header] + body) for k in range(len(header))]

    def line(cells):
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "  ".join([first] + rest).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule] + [line(r) for r in body]) + "\n"


def write_summary(workdir: str | os.PathLike, rows: Mapping[str, Mapping[str, Any]]) -> str:
    """Writes ``summary.json`` and ``summary.txt`` for several methods; returns the table.

    Args:
      workdir: directory to write into; created if missing.
      rows: method name -> its results (fractions: ``acc``, ``bwt``, ``fwt``,
        ``forgetting``, ``learning_accuracy``, and ``wall_seconds``); a missing or NaN
        value shows as ``n/a``. ``summary.json`` keeps every key of every row.

    Returns:
      The plain-text table (method, ACC %, BWT %, FWT %, forgetting %, learning acc %,
      wall s), as written to ``summary.txt``.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    json_bytes = _dumps(to_jsonable(dict(rows), "results"))
    table = format_summary_table(rows)
    _atomic_write(workdir / SUMMARY_JSON, json_bytes)
    _atomic_write(workdir / SUMMARY_TXT, table.encode("utf-8"))
    return table


# ---------------------------------------------------------------------------------------
# a report over several runs: ``python -m experiments.report RUNS... [--out DIR]``

# Config keys that differ between runs of one setup without changing the setup: seeds,
# bookkeeping, which methods ran. Everything else must agree for runs to share a table.
_NOT_SETUP = ("seed", "seeds", "progress", "checkpoint", "method", "sweep", "workdir", "log")
REPORT_FILE = "REPORT.md"
_REPORT_COLUMNS = tuple((key, title, scale) for key, title, scale, _ in _SUMMARY_COLUMNS + _OPTIONAL_COLUMNS)


def find_results(runs) -> list[pathlib.Path]:
    """Every ``results.json`` under the given workdirs (or the files themselves), sorted.

    Raises:
      ValueError: a path that does not exist, or no ``results.json`` anywhere under the paths.
    """
    found = []
    for run in runs:
        p = pathlib.Path(run)
        if not p.exists():
            raise ValueError(f"report: {str(p)!r} does not exist; pass experiment workdirs (or results.json files).")
        found += [p] if p.is_file() else sorted(p.rglob(RESULTS_FILE))
    if not found:
        raise ValueError(
            f"report: no {RESULTS_FILE} under {[str(r) for r in runs]}; run an experiment first "
            "(python -m experiments.main --config ... --workdir DIR) and pass its DIR."
        )
    return sorted(set(found))


def _setup(results: Mapping[str, Any], method_names) -> dict:
    """The part of a run's config that defines its benchmark (seeds, bookkeeping and method blocks removed)."""
    config = dict(results.get("config") or {})
    for k in (*_NOT_SETUP, *method_names):
        config.pop(k, None)
    return config


def _row_label(results: Mapping[str, Any]) -> tuple:
    """(method, its config block, sweep value): runs that differ only in the seed share a row."""
    method = results.get("method") or "?"
    block = (results.get("config") or {}).get(method)
    member = results.get("member") or {}
    swept = {k: v for k, v in member.items() if k not in ("seed", "members")}
    return method, json.dumps(block, sort_keys=True, default=str), json.dumps(swept, sort_keys=True)


def collect(runs) -> list[dict]:
    """Groups the runs' results into tables: one per setup, one row per (method, method config, swept value).

    Returns:
      ``[{"setup": dict, "rows": [{"label", "method", "runs": [results...], "stats": {metric: (mean, std, n)}}]}]``,
      means and standard deviations (ddof=0) over the row's runs (its seeds), metrics as fractions.

    Raises:
      ValueError: as :func:`find_results`, or a results.json without an accuracy matrix.
    """
    paths = find_results(runs)
    loaded = []
    for p in paths:
        r = load_results(p)
        if "accuracy_matrix" not in r:
            raise ValueError(f"report: {p} has no accuracy_matrix; is it a clx results.json?")
        r["_path"] = str(p)
        loaded.append(r)
    method_names = {r.get("method") for r in loaded}
    tables: dict[str, dict] = {}
    for r in loaded:
        setup = _setup(r, method_names)
        table = tables.setdefault(json.dumps(setup, sort_keys=True, default=str), {"setup": setup, "rows": {}})
        table["rows"].setdefault(_row_label(r), []).append(r)
    out = []
    for table in tables.values():
        rows = []
        labels = list(table["rows"])
        for label in labels:
            group = table["rows"][label]
            method, block, swept = label
            name = method
            if sum(1 for m, _, _ in labels if m == method) > 1:  # same method, other settings: say which
                extra = json.loads(swept)
                if not extra:
                    extra = {k: v for k, v in (json.loads(block) or {}).items() if _differs(labels, method, k, v)}
                name += " (" + ", ".join(f"{k}={v}" for k, v in extra.items()) + ")"
            stats = {}
            for key, _, _ in _REPORT_COLUMNS:
                vals = [float(g[key]) for g in group if g.get(key) is not None]
                vals = [v for v in vals if not math.isnan(v)]
                stats[key] = (float(np.mean(vals)), float(np.std(vals)), len(vals)) if vals else (math.nan, math.nan, 0)
            rows.append({"label": name, "method": method, "runs": group, "stats": stats})
        out.append({"setup": table["setup"], "rows": rows})
    return out


def _differs(labels, method, key, value) -> bool:
    return any(m == method and (json.loads(b) or {}).get(key) != value for m, b, _ in labels)


def _setup_title(setup: Mapping[str, Any]) -> str:
    stream = setup.get("stream") or {}
    model = setup.get("model") or {}
    train = setup.get("train") or {}
    parts = [
        f"data {(setup.get('data') or {}).get('source', '?')}",
        f"stream {stream.get('kind', '?')} x {stream.get('num_tasks', '?')} tasks",
        f"model {model.get('kind', 'mlp')} {tuple(model.get('hidden', ()))}",
        f"{train.get('optimizer', '?')} lr {train.get('lr', '?')}, batch {train.get('batch_size', '?')}, "
        f"{train.get('epochs', '?')} epochs",
    ]
    return "; ".join(parts)


def _mean_matrix(group) -> np.ndarray:
    stacked = np.stack([_matrix(g) for g in group])
    with np.errstate(invalid="ignore"):  # all-NaN cells (never evaluated) stay NaN
        return np.where(np.isnan(stacked).all(0), np.nan, np.nansum(stacked, 0) / np.sum(~np.isnan(stacked), 0))


def _acc_by_tasks(R: np.ndarray) -> np.ndarray:
    """ACC after each task i: the mean of R[i, :i+1] (the seen tasks)."""
    return np.array([np.nanmean(R[i, : i + 1]) for i in range(R.shape[0])])


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.5))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: pathlib.Path, rect=None) -> None:
    """Lays the figure out (inside ``rect``, figure fractions, when a legend sits outside it) and writes the PNG."""
    fig.tight_layout(rect=rect)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _atomic_write(path, buf.getvalue())


#: The per-task diagnostics drawn for plasticity runs (``results.json`` ``task_metrics``), with their axis labels.
_PLASTICITY_PANELS = (
    ("dormant_fraction", "dormant units (fraction)"),
    ("effective_rank", "effective rank (mean over layers)"),
    ("stable_rank", "stable rank (mean over layers)"),
    ("weight_norm", "weight norm (L2)"),
    ("gradient_norm", "gradient norm (L2)"),
)


def _is_plasticity(table: dict) -> bool:
    """Runs scored on the current task only (``eval.tasks = "current"``) or carrying per-task diagnostics."""
    runs = [g for row in table["rows"] for g in row["runs"]]
    return any(
        ((g.get("config") or {}).get("eval") or {}).get("tasks") == "current" or "task_metrics" in g for g in runs
    )


def _plasticity_figure(table: dict, out: pathlib.Path, name: str) -> None:
    """Online accuracy, the just-learned task's test accuracy and each diagnostic against the task index,
    one line per row (mean over its runs, band: std)."""
    panels = [
        ("online_accuracy", "online accuracy (%)", 100.0),
        ("diagonal", "test accuracy, task just learned (%)", 100.0),
    ]
    panels += [(k, label, 1.0) for k, label in _PLASTICITY_PANELS if any(
        k in (g.get("task_metrics") or {}) for row in table["rows"] for g in row["runs"])]  # fmt: skip
    cols = 2 if len(panels) <= 4 else 3
    nrows = (len(panels) + cols - 1) // cols
    fig = _figure()
    fig.set_size_inches(4.6 * cols + 2.2, 3.2 * nrows)
    for k, (key, label, scale) in enumerate(panels):
        ax = fig.add_subplot(nrows, cols, k + 1)
        width = 1
        for row in table["rows"]:
            curves = []
            for g in row["runs"]:
                if key == "online_accuracy":
                    c = g.get("online_accuracy") or [e[0] for e in g.get("epoch_train_accuracy") or []]
                elif key == "diagonal":
                    c = np.diag(_matrix(g))
                else:
                    c = (g.get("task_metrics") or {}).get(key)
                if c is not None and len(c):
                    curves.append(np.asarray(c, np.float64))
            if not curves:
                continue
            curves = np.stack(curves)
            width = max(1, curves.shape[1] // 50)  # long streams: means over bins of tasks, as the papers plot
            bins = curves.shape[1] // width
            curves = curves[:, : bins * width].reshape(len(curves), bins, width).mean(-1)
            mean, std = scale * curves.mean(0), scale * curves.std(0)
            x = width * np.arange(bins) + (width + 1) / 2
            (line,) = ax.plot(x, mean, lw=1.2, label=row["label"])
            if len(curves) > 1:
                ax.fill_between(x, mean - std, mean + std, alpha=0.2, color=line.get_color())
        ax.set_xlabel("task index" + (f" (means over bins of {width} tasks)" if width > 1 else ""), fontsize=8)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    _save(fig, out / name, rect=(0, 0, 1 - 2.0 / fig.get_size_inches()[0], 1))


def _continual_figure(table: dict, out: pathlib.Path, name: str) -> bool:
    """Each task's accuracy on its test subsample against the optimizer step (continual evaluation), one panel
    per row (mean over its runs), task boundaries dotted; False (nothing drawn) when no run has the curves."""
    rows = [row for row in table["rows"] if all("continual_eval" in g for g in row["runs"])]
    if not rows:
        return False
    cols = min(len(rows), 2)
    nrows = (len(rows) + cols - 1) // cols
    fig = _figure()
    fig.set_size_inches(6.0 * cols + 1.8, 3.4 * nrows)
    for k, row in enumerate(rows):
        ax = fig.add_subplot(nrows, cols, k + 1)
        curves = [g["continual_eval"] for g in row["runs"]]
        steps = np.asarray(curves[0]["global_step"])
        acc = 100 * np.mean([np.asarray(c["accuracy"], np.float64) for c in curves], axis=0)
        for j in range(acc.shape[1]):
            ax.plot(steps, acc[:, j], lw=1.0, label=f"task {j}")
        for end in np.cumsum(curves[0]["task_steps"])[:-1]:
            ax.axvline(end, color="0.6", ls=":", lw=0.8)
        every = curves[0].get("every_steps")
        ax.set_title(f"{row['label']} ({len(curves)} run(s), every {every} steps)", fontsize=9)
        ax.set_xlabel("optimizer steps (dotted: task boundaries)", fontsize=8)
        ax.set_ylabel("accuracy on the task's test subsample (%)", fontsize=8)
        ax.grid(alpha=0.3)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    _save(fig, out / name, rect=(0, 0, 1 - 1.1 / fig.get_size_inches()[0], 1))
    return True


def _report_figures(table: dict, out: pathlib.Path, prefix: str) -> list[str]:
    """ACC against the number of tasks, and each task's accuracy over the stream, one line per row; for plasticity
    runs (old tasks not scored) the online accuracy and the diagnostics against the task index instead."""
    if _is_plasticity(table):
        _plasticity_figure(table, out, f"{prefix}plasticity.png")
        return [f"{prefix}plasticity.png"]
    names = []
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    for row in table["rows"]:
        curves = np.stack([_acc_by_tasks(_matrix(g)) for g in row["runs"]])
        mean, std = 100 * curves.mean(0), 100 * curves.std(0)
        x = np.arange(1, len(mean) + 1)
        ax.plot(x, mean, marker="o", ms=3, label=row["label"])
        if len(curves) > 1:
            ax.fill_between(x, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("number of tasks trained")
    ax.set_ylabel("ACC on the tasks seen so far (%)")
    ax.set_title("ACC against the number of tasks (mean over seeds, band: std)")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    names.append(f"{prefix}acc_vs_tasks.png")
    _save(fig, out / names[-1])

    rows = table["rows"]
    fig = _figure()
    fig.set_size_inches(4.0 * min(len(rows), 3) + 1.5, 3.4 * ((len(rows) + 2) // 3))
    for k, row in enumerate(rows):
        ax = fig.add_subplot((len(rows) + 2) // 3, min(len(rows), 3), k + 1)
        R = 100 * _mean_matrix(row["runs"])
        for j in range(R.shape[1]):
            ax.plot(np.arange(j, R.shape[0]) + 1, R[j:, j], marker=".", label=f"task {j}")
        ax.set_ylim(0, 100)
        ax.set_title(row["label"], fontsize=9)
        ax.set_xlabel("after training task")
        ax.set_ylabel("accuracy (%)")
    if rows:
        fig.axes[-1].legend(loc="lower left", fontsize=6, ncol=2)
    names.append(f"{prefix}task_accuracy.png")
    _save(fig, out / names[-1])
    if _continual_figure(table, out, f"{prefix}continual_eval.png"):
        names.append(f"{prefix}continual_eval.png")
    return names


def build_report(runs, out) -> str:
    """Writes ``REPORT.md`` and its figures into ``out``; returns the Markdown.

    One table per setup (runs whose configs differ beyond the seeds and the method
    blocks are never averaged together: each setup gets its own table, titled by its
    stream, model and optimizer), one row per method and method config, each metric's
    mean ± std over the row's seeds (ddof=0) and the number of seeds; below each table
    ACC against the number of tasks and every task's accuracy after each training task
    (PNG). Each run's own accuracy-matrix heatmap is linked.

    Raises:
      ValueError: no results under ``runs``, a missing path, a results.json without an
        accuracy matrix (nothing is written then).
    """
    tables = collect(runs)  # every error before anything is written
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Report over {len(runs)} workdir(s)", ""]
    if len(tables) > 1:
        lines += [f"The runs hold {len(tables)} different setups; each has its own table (never averaged).", ""]
    for k, table in enumerate(tables):
        lines += [f"## Setup {k + 1}: {_setup_title(table['setup'])}", ""]
        shown = [c[:3] for c in _columns([g for row in table["rows"] for g in row["runs"]])]
        header = ["method", "runs"] + [title for _, title, _ in shown]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in table["rows"]:
            n = len(row["runs"])
            cells = [row["label"], str(n)]
            for key, _, scale in shown:
                mean, std, count = row["stats"][key]
                if count == 0:
                    cells.append("n/a")
                elif count > 1:
                    cells.append(f"{scale * mean:.2f} ± {scale * std:.2f}")
                else:
                    cells.append(f"{scale * mean:.2f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        for name in _report_figures(table, out, prefix=f"setup{k + 1}_"):
            lines += [f"![{name}]({name})", ""]
        heatmaps = []
        for row in table["rows"]:
            for g in row["runs"]:
                png = pathlib.Path(g["_path"]).with_name(PNG_FILE)
                if png.exists():
                    heatmaps.append(f"[{row['label']}]({os.path.relpath(png, out)})")
        if heatmaps:
            lines += ["Accuracy matrices: " + ", ".join(heatmaps), ""]
    text = "\n".join(lines)
    _atomic_write(out / REPORT_FILE, text.encode("utf-8"))
    return text


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m experiments.report",
        description="A Markdown report (tables of ACC, BWT, FWT, forgetting, learning accuracy, wall time; "
        "mean ± std over seeds) and PNG figures over one or more experiment workdirs.",
    )
    parser.add_argument("runs", nargs="+", help="experiment workdirs (searched recursively for results.json)")
    parser.add_argument("--out", default=None, help="where REPORT.md and the figures go (default: RUNS[0]/report)")
    args = parser.parse_args(argv)
    out = args.out or os.path.join(args.runs[0], "report")
    try:
        text = build_report(args.runs, out)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(text)
    print(f"-> {os.path.join(out, REPORT_FILE)}")


if __name__ == "__main__":
    main()
