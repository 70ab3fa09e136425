"""The import graph README's "Layout" promises, read statically from every .py file of clx
(so a new module is covered without touching this file), and the public names.

A method family imports only its own package and the shared pieces ``clx.core``,
``clx.tree``, ``clx.subspace`` and ``clx.functional``; never another family, the
trainer, the data, the metrics, checkpoints, sharding, ``clx.models``, the ``clx``
package itself (which imports all of them) or the experiments. The shared pieces import
only each other, so the rule holds transitively. No clx module imports experiments.
"""

import ast
import inspect
import pathlib
import pkgutil
import subprocess
import sys
import types

import pytest

import clx

ROOT = pathlib.Path(clx.__file__).resolve().parent.parent
CLX = ROOT / "clx"
FAMILIES = ("projection", "regularization", "replay", "plasticity", "merging", "hnet")
SHARED = ("clx.core", "clx.tree", "clx.subspace", "clx.functional")
OTHER_PACKAGES = ("data", "models")  # packages of clx that are not method families


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    p = ROOT.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _imports(path: pathlib.Path) -> set[str]:
    """Every module ``path`` imports (at top level or inside a function), relative imports resolved and
    ``from package import submodule`` counted as the submodule."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if _is_module(sub) else base)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            fn = node.func
            fn_name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if fn_name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                out.add(node.args[0].value)
    return out


def _files(package: str):
    files = sorted((CLX / package).rglob("*.py"))
    assert files, f"clx/{package} has no .py file"
    return files


def _is_within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_the_import_reader_resolves_absolute_relative_and_submodule_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "clx" / "fam"
    pkg.mkdir(parents=True)
    (tmp_path / "clx" / "tree.py").write_text("")
    (pkg / "__init__.py").write_text("from ._a import x\n")
    (pkg / "_a.py").write_text(
        "import jax.numpy\nfrom clx import tree\nfrom .. import core\nfrom . import _b\nfrom ..sub import y\n"
        "def f():\n    import experiments.main\n    importlib.import_module('clx.train')\n"
    )
    (pkg / "_b.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert _imports(pkg / "__init__.py") == {"clx.fam._a"}
    assert _imports(pkg / "_a.py") == {
        "jax.numpy",
        "clx.tree",
        "clx",  # clx/core.py does not exist here, so `from .. import core` is an import of the package
        "clx.fam._b",
        "clx.sub",
        "experiments.main",
        "clx.train",
    }


def test_every_package_of_clx_is_a_known_family_or_package():
    packages = {p.parent.name for p in CLX.glob("*/__init__.py")}
    assert packages == set(FAMILIES) | set(OTHER_PACKAGES), (
        "a new package in clx: add it to FAMILIES (then it may import only the shared pieces) or OTHER_PACKAGES"
    )


def _family_violations(family: str) -> dict[str, list[str]]:
    own = f"clx.{family}"
    bad = {}
    for path in _files(family):
        for target in sorted(_imports(path)):
            outside = _is_within(target, "experiments") or _is_within(target, "tests")
            if outside or (
                _is_within(target, "clx")
                and not (_is_within(target, own) or any(_is_within(target, s) for s in SHARED))
            ):
                bad.setdefault(str(path.relative_to(ROOT)), []).append(target)
    return bad


@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_imports_only_itself_and_the_shared_pieces(family):
    bad = _family_violations(family)
    assert not bad, f"clx.{family} may import only clx.{family} and {SHARED}; found {bad}"


def test_the_family_rule_catches_a_family_that_imports_the_trainer_another_family_or_clx(tmp_path, monkeypatch):
    (tmp_path / "clx" / "fam" / "sub").mkdir(parents=True)
    (tmp_path / "clx" / "other").mkdir()
    for f in ("core.py", "train.py", "other/__init__.py", "fam/__init__.py", "fam/_ok.py"):
        (tmp_path / "clx" / f).write_text("")
    (tmp_path / "clx" / "fam" / "_ok.py").write_text("from clx import core\nfrom . import _ok\nimport optax\n")
    (tmp_path / "clx" / "fam" / "sub" / "_bad.py").write_text(
        "def f():\n    from clx.train import fit\n    from ...other import x\n    import clx\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "CLX", tmp_path / "clx")
    assert _family_violations("fam") == {"clx/fam/sub/_bad.py": ["clx", "clx.other", "clx.train"]}


def test_the_shared_pieces_import_only_each_other():
    bad = {}
    for name in SHARED:
        path = ROOT.joinpath(*name.split(".")).with_suffix(".py")
        for target in _imports(path):
            if _is_within(target, "clx") and target not in SHARED:
                bad.setdefault(name, []).append(target)
    assert not bad, f"the shared pieces {SHARED} import other parts of clx: {bad}"


def test_no_clx_module_imports_the_experiments_or_the_tests():
    bad = {
        str(p.relative_to(ROOT)): sorted(
            t for t in _imports(p) if _is_within(t, "experiments") or _is_within(t, "tests")
        )
        for p in sorted(CLX.rglob("*.py"))
    }
    assert not {k: v for k, v in bad.items() if v}


def test_import_clx_loads_no_experiments_and_keeps_the_lazy_imports_lazy():
    code = (
        "import sys, clx\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('experiments', 'tests', 'orbax', 'tensorflow_datasets', 'sklearn')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --- public names ---------------------------------------------------------------------------------------------------


def _packages():
    yield clx
    for info in pkgutil.walk_packages(clx.__path__, "clx."):
        if info.ispkg:
            yield sys.modules.get(info.name) or __import__(info.name, fromlist=["_"])


def test_every_name_in_all_exists_once():
    for pkg in _packages():
        names = list(getattr(pkg, "__all__", []))
        assert len(names) == len(set(names)), f"{pkg.__name__}.__all__ has duplicates"
        missing = [n for n in names if not hasattr(pkg, n)]
        assert not missing, f"{pkg.__name__}.__all__ names missing attributes: {missing}"
    assert clx.__all__


def test_gpm_is_the_function_and_no_submodule_import_shadows_an_exported_name():
    import clx.projection

    assert inspect.isclass(clx.projection.GPMState)
    assert inspect.isfunction(clx.gpm) and clx.gpm is clx.projection.gpm
    exported = {pkg.__name__: {n: getattr(pkg, n) for n in getattr(pkg, "__all__", [])} for pkg in _packages()}
    for info in pkgutil.walk_packages(clx.__path__, "clx."):  # importing a submodule binds it on its package
        __import__(info.name)
    for pkg_name, names in exported.items():
        pkg = sys.modules[pkg_name]
        changed = [n for n, obj in names.items() if getattr(pkg, n) is not obj]
        assert not changed, f"importing the submodules of clx rebinds {pkg_name}.{changed}"
        for n, obj in names.items():  # a name that is also a submodule must be that submodule
            if _is_module(f"{pkg_name}.{n}"):
                assert isinstance(obj, types.ModuleType) and obj.__name__ == f"{pkg_name}.{n}", f"{pkg_name}.{n}"
    assert inspect.isfunction(clx.gpm) and inspect.isfunction(clx.projection.gpm)
