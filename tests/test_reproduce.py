"""experiments.reproduce: every entry's config builds (and, cut to digits, passes the script's checks), the row
machinery runs end to end on digits, a finished row is read and not rerun, the file lists every entry with its
published value, source and command, and bad input is refused before anything is written."""

import json
import math
import os

import pytest

from experiments import methods, reproduce
from experiments.run import prepare

RUN = ["pmnist_gpm/gpm", "split_mnist_vdv/ewc_class_il"]  # a fit_members-style row and a per-seed (random order) row


def test_every_entry_names_an_existing_config_that_builds_and_passes_the_checks_on_digits():
    configs = os.path.join(os.path.dirname(reproduce.__file__), "configs")
    assert len(reproduce.ENTRIES) >= 60
    for name, e in reproduce.ENTRIES.items():
        assert os.path.isfile(os.path.join(configs, f"{e.module}.py")), name
        c = reproduce.config(name, (0, 1, 2))
        assert c.method == e.method and tuple(c.seeds) == (0, 1, 2), name
        methods.check_config(methods.get(e.method), c)
        assert e.acc is None or 0 < e.acc <= 100, name
        assert e.bwt is None or -100 <= e.bwt <= 0, name
        assert e.source and (e.acc is not None or e.source.startswith("none")), name
        small = reproduce.config(name, (0, 1, 2), smoke=True)
        assert small.data.source == "digits" and small.stream.num_tasks == 2 and tuple(small.seeds) == (0,), name
        prepare(small)  # the data, the model and the rule's init on the params, as the run would build them
    for module in reproduce.NOT_ROWS:
        assert os.path.isfile(os.path.join(configs, f"{module}.py")), module
    # the setups tables.py does not cover are rows; GPM on Permuted MNIST is one row, not three
    for name in ("pmnist_gpm/gpm", "pmnist_hnet/hnet", "split_mnist_hnet/hnet_class_il", "pmnist_vdv/si_domain_il"):
        assert name in reproduce.ENTRIES
    assert sum(e.method == "gpm" and e.benchmark.startswith("Permuted") for e in reproduce.ENTRIES.values()) == 1
    assert reproduce.ENTRIES["pmnist_gpm/gpm"][4:6] == (93.91, -3.0)


def _results(workdir, name):
    return sorted(
        os.path.join(root, "results.json")
        for root, _, files in os.walk(os.path.join(workdir, name))
        if "results.json" in files
    )


def test_smoke_rows_run_end_to_end_and_a_finished_row_is_read_not_rerun(tmp_path, monkeypatch):
    work = str(tmp_path / "w")
    text = reproduce.build(work, (0, 1, 2), RUN, smoke=True)
    out = tmp_path / "w" / "REPRODUCTION.md"
    assert out.read_text() == text and "smoke" in text.splitlines()[0]
    files = {name: _results(work, name) for name in RUN}
    for name, paths in files.items():
        assert len(paths) == 1, (name, paths)  # one seed in smoke; the random-order row in its seed_0/
        r = json.load(open(paths[0]))
        assert math.isfinite(r["acc"]) and 0 <= r["acc"] <= 1 and math.isfinite(r["bwt"]) and -1 <= r["bwt"] <= 1
        assert json.load(open(os.path.join(work, name, reproduce.SIDECAR)))["hardware"] == reproduce.hardware()
        row = next(line for line in text.splitlines() if f"--rows {name}`" in line)
        assert f"{100 * r['acc']:.2f} ± 0.00" in row and "| 1 |" in row and reproduce.hardware() in row
    assert "split_mnist_vdv/ewc_class_il/seed_0/results.json" in files["split_mnist_vdv/ewc_class_il"][0]
    for name, e in reproduce.ENTRIES.items():  # every entry: published value, source, command
        row = next(line for line in text.splitlines() if f"`{reproduce.command(name, smoke=True)}`" in line)
        assert f"| {e.benchmark} | {e.method} | {'' if e.acc is None else f'{e.acc:g}'} |" in row, name
        assert e.source in row, name
        assert name in RUN or "| not run |" in row, name
    mtimes = {p: os.stat(p).st_mtime_ns for paths in files.values() for p in paths}
    monkeypatch.setattr("experiments.run.run", lambda *a, **k: pytest.fail("a finished row was run again"))
    again = reproduce.build(work, (0, 1, 2), RUN, smoke=True)
    assert {p: os.stat(p).st_mtime_ns for p in mtimes} == mtimes
    assert again.splitlines()[5:] == text.splitlines()[5:]  # the same rows (the header has the date)


def test_the_real_table_says_why_a_row_is_not_run_and_keeps_its_command(tmp_path):
    work, out = str(tmp_path / "w"), str(tmp_path / "R.md")
    text = reproduce.build(work, (0, 1, 2), out=out, run_rows=False)  # --report-only: reads, runs nothing
    assert open(out).read() == text and not os.path.exists(work)
    for name, e in reproduce.ENTRIES.items():
        row = next(line for line in text.splitlines() if f"`python -m experiments.reproduce --rows {name}`" in line)
        assert "not run" in row, name
        if e.module == "split_cifar100":
            assert "not run: CIFAR-100 needs TFDS download" in row, name
    assert "pmnist_plasticity" in text.split("Configs with no published ACC")[1]


def test_the_committed_reproduction_file_lists_every_entry():
    text = open(reproduce.DEFAULT_OUT).read()
    for name, e in reproduce.ENTRIES.items():
        row = next((line for line in text.splitlines() if f"--rows {name}`" in line), "")
        assert row and e.source in row, f"REPRODUCTION.md has no row for {name}: rerun python -m experiments.reproduce"


def test_bad_input_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "R.md"
    with pytest.raises(ValueError, match=r"unknown reproduction rows \['nosuch'\].*Groups: .*'pmnist_gpm'.*Rows: "):
        reproduce.build(str(tmp_path / "w"), (0,), ["pmnist_gpm/gpm", "nosuch"], out=str(out))
    with pytest.raises(ValueError, match="seeds is empty"):
        reproduce.build(str(tmp_path / "w"), (), out=str(out))
    afile = tmp_path / "file"
    afile.write_text("keep")
    with pytest.raises(NotADirectoryError, match="is a file, not a directory"):
        reproduce.build(str(afile), (0,), ["pmnist_gpm/gpm"], out=str(out), smoke=True)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        reproduce.build(str(tmp_path / "w"), (0,), ["pmnist_gpm/gpm"], out=str(tmp_path), smoke=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        reproduce.build(str(tmp_path / "w"), (0,), out=str(tmp_path / "no" / "R.md"), smoke=True)
    assert afile.read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    with pytest.raises(SystemExit):  # argparse: --report-only still refuses an unknown row
        reproduce.main(["--report-only", "--rows", "nosuch", "--out", str(out)])


def test_a_group_selects_its_rows():
    assert reproduce.select(["pmnist_vdv"]) == [
        f"pmnist_vdv/{m}_{s}"
        for m in ("finetune", "joint", "ewc", "online_ewc", "si")
        for s in ("task_il", "domain_il", "class_il")
    ]
    assert reproduce.select(["pmnist_gpm/gpm", "pmnist_gpm"]) == ["pmnist_gpm/gpm"]


def test_missing_data_names_what_is_missing_without_downloading(tmp_path):
    """The 'not run' reason of a row whose data are not here: MNIST's IDX files, notMNIST's pickles (files the
    user fetches: FileNotFoundError), a TFDS dataset not prepared (ValueError offline)."""
    import ml_collections

    def cfg(source, directory):
        return ml_collections.ConfigDict({"data": {"source": source, "dir": str(directory)}})

    assert reproduce.missing_data(cfg("digits", "")) is None
    assert "MNIST IDX files are not in" in reproduce.missing_data(cfg("mnist", tmp_path))
    why = reproduce.missing_data(cfg("notmnist", tmp_path))
    assert why.startswith("not run: notmnist needs files that are not here") and "notmnist_train.pkl" in why
    assert list(tmp_path.iterdir()) == []  # nothing fetched, nothing written
