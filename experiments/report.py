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
    ("wall_seconds", "wall s", 1.0, "{:.1f}"),
)


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
    side = max(4.0, 0.55 * max(T_rows, T_cols) + 2.0)
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
    header = ["method"] + [title for _, title, _, _ in _SUMMARY_COLUMNS]
    body = []
    for name, row in rows.items():
        cells = [str(name)]
        for key, _, scale, fmt in _SUMMARY_COLUMNS:
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
