"""The house rules of esm_core, checked on the source: layers, no import cycles, imports at the top.

A module's imports are read with ``ast`` (no import runs), resolved to
``esm_core.*`` module names; a package's ``__init__`` counts as the package.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "esm_core"
# Imports allowed inside function bodies: optional dependencies that are heavy or not installed by default.
OPTIONAL = {"umap", "cairosvg", "sklearn.datasets", "yaml", "open_clip.model", "gradio", "spaces",
            "esm_core.app",      # the web app (the app extra), started by `esm-studio app`
            "transformers",      # a dependency, but seconds to import: only where a text model is built
            "threadpoolctl"}     # optional: limits BLAS threads where it is installed
# What each layer must never import (the data flow points one way).
FORBIDDEN = {
    "esm_core.adapters": ("esm_core.checkpoints", "esm_core.lazy", "esm_core.models", "esm_core.merging",
                          "esm_core.pools", "esm_core.probe", "esm_core.evaluation", "esm_core.esmpp",
                          "esm_core.studio", "esm_core.app", "esm_core.cli"),    # below checkpoints, which calls it
    "esm_core.merging": ("esm_core.probe", "esm_core.pools", "esm_core.evaluation", "esm_core.esmpp",
                         "esm_core.studio", "esm_core.app", "esm_core.cli", "esm_core.bench", "esm_core.analysis"),
    "esm_core.models": ("esm_core.merging", "esm_core.pools", "esm_core.probe", "esm_core.evaluation",
                        "esm_core.esmpp", "esm_core.studio", "esm_core.app", "esm_core.cli"),
    "esm_core.pools": ("esm_core.merging", "esm_core.evaluation", "esm_core.esmpp", "esm_core.studio",
                       "esm_core.app", "esm_core.cli"),
    "esm_core.evaluation": ("esm_core.studio", "esm_core.app", "esm_core.cli"),
    "esm_core.esmpp": ("esm_core.evaluation", "esm_core.studio", "esm_core.app", "esm_core.cli"),
    "esm_core.studio": ("esm_core.app", "esm_core.cli"),
}


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = list(p.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(mods: dict[str, Path]) -> dict[str, list[tuple[str, bool]]]:
    """{module: [(imported esm_core module or external name, at module top?)]}."""
    out = {}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        for n in tree.body:                     # `try:` / `if TYPE_CHECKING:` blocks at the top count as top
            if isinstance(n, (ast.Try, ast.If)):
                top |= {id(c) for c in ast.walk(n)}
        found = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(mod, path.name == "__init__.py", node)
                names = [target]
                for a in node.names:             # `from . import x` may name a submodule
                    if f"{target}.{a.name}" in mods:
                        names.append(f"{target}.{a.name}")
            else:
                continue
            found += [(n, id(node) in top) for n in names if n != "__future__"]
        out[mod] = found
    return out


MODS = _modules()
IMPORTS = _imports(MODS)


def _graph() -> dict[str, set[str]]:
    g = {}
    for mod, found in IMPORTS.items():
        deps = set()
        for name, _ in found:
            while name and name not in MODS:
                name = name.rpartition(".")[0]
            if name and name != mod and not mod.startswith(name + "."):   # a package importing its parents' names
                deps.add(name)
        g[mod] = deps
    return g


def _cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    for v in g:
        if v not in index:
            visit(v)
    return out


def test_the_reader_finds_a_planted_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    g = _graph()
    assert "esm_core.merging.stats" in g["esm_core.merging.esm"]          # the reader sees real imports
    # a package's __init__ re-exports its own submodules: that is not a cycle between layers
    g = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in g.items()}
    assert _cycles(g) == []


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_only_downwards(layer):
    bad = [(mod, name) for mod, found in IMPORTS.items() if mod == layer or mod.startswith(layer + ".")
           for name, _ in found if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[layer])]
    assert bad == []


def test_ui_libraries_stay_in_the_ui():
    for mod, found in IMPORTS.items():
        for name, _ in found:
            root = name.split(".")[0]
            if root == "gradio":
                assert mod.startswith("esm_core.app"), mod
            if root == "plotly":
                assert mod in ("esm_core.studio.viz",) or mod.startswith("esm_core.app"), mod


# The command line imports the library inside each command, so that `esm-studio --help` answers at once.
DEFERRING = ("esm_core.cli",)


def test_imports_at_module_top():
    inner = [(mod, name) for mod, found in IMPORTS.items() for name, top in found
             if not top and name not in OPTIONAL and not mod.startswith(DEFERRING)]
    assert inner == []


def test_the_command_line_answers_help_without_torch():
    """`esm-studio --help`, every command's --help and `esm-studio methods` load neither torch nor the library's
    heavy modules (the method schemas live in esm_core.schemas)."""
    import subprocess
    import sys
    code = ("import sys\nfrom esm_core import cli\n"
            "for argv in ([], *([c] for c in sys.argv[1:])):\n"
            "    try:\n        cli.main([*argv, '--help'])\n    except SystemExit:\n        pass\n"
            "cli.main(['methods'])\n"
            "heavy = sorted(m for m in ('torch', 'numpy', 'transformers', 'open_clip', 'gradio') if m in sys.modules)\n"
            "print('HEAVY', heavy)\n")
    cmds = ["methods", "merge", "eval", "bench", "build-demo", "build-pool", "app"]
    out = subprocess.run([sys.executable, "-c", code, *cmds], capture_output=True, text=True, timeout=300,
                         cwd=ROOT.parent)
    assert out.returncode == 0, out.stderr
    assert "usage: esm-studio eval" in out.stdout and "usage: esm-studio merge" in out.stdout
    assert "Essential Subspace Merging" in out.stdout and "also accepted as: task_arithmetic" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "HEAVY []"


def test_the_numerical_contract_is_cited_inside_the_repository():
    """Code, tests and docs cite docs/methods.md ("methods §6"), never a working note outside the repository."""
    repo = ROOT.parent
    files = [*repo.glob("esm_core/**/*.py"), *repo.glob("tests/*.py"), repo / "app.py", repo / "README.md",
             *repo.glob("docs/*.md"), *repo.glob("spaces_config/*")]
    bad = [f"{p.relative_to(repo)}:{i}" for p in files if p.name != "test_layers.py"
           for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
           if "SPEC §" in line or "SPEC.md" in line or "../shared" in line]
    assert bad == []
    cited = {line.split("methods §")[1][:1] for p in files if p.suffix == ".py" and p.name != "test_layers.py"
             for line in p.read_text().splitlines() if "methods §" in line}
    headings = {line[4] for line in (repo / "docs" / "methods.md").read_text().splitlines() if line.startswith("## §")}
    assert cited and cited <= headings            # every cited section exists in docs/methods.md


# ---------------------------------------------------------------- model families stay below esm_core.models
#
# Everything that depends on the kind of model lives in esm_core/models/ (one module per family, the protocol of
# esm_core/models/protocol.py); code above it reaches a model through that protocol only. So no string literal
# above models/ may hold a family's key names (docstrings and comments may mention them).
FAMILY_KEY_STRINGS = ("visual.", "resblocks", "encoder.layer", "transformer.layer", "in_proj", "c_fc", "c_proj",
                      "out_proj", "conv1", "attention.self", "vision_model", "q_lin", "q_proj", "intermediate.dense",
                      "layernorm_before", "pre_classifier", "embed_tokens", "self_attn", "gate_proj", "down_proj",
                      "model.layers", "input_layernorm")
# The layers below esm_core.models (they cannot call a family; checkpoints reads files of any family).
BELOW_MODELS = ("esm_core", "esm_core.settings", "esm_core.progress", "esm_core.errors", "esm_core.device",
                "esm_core.pickled", "esm_core.lazy", "esm_core.checkpoints", "esm_core.adapters", "esm_core.schemas")
# Places that still name a family's keys above models/, each with the reason it cannot go through the protocol yet.
KEY_STRING_EXCEPTIONS: dict[str, str] = {}


def _string_literals(tree: ast.AST) -> list[tuple[int, str]]:
    """``[(line, text)]`` of the string constants of ``tree`` (f-string parts included), docstrings left out."""
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docs.add(id(first.value))
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


def _family_key_strings(mods: dict[str, Path]) -> list[str]:
    out = []
    for mod, path in sorted(mods.items()):
        if mod == "esm_core.models" or mod.startswith("esm_core.models.") or mod in BELOW_MODELS \
                or mod.startswith("esm_core.adapters.") or mod in KEY_STRING_EXCEPTIONS:
            continue
        for line, text in _string_literals(ast.parse(path.read_text())):
            hits = [s for s in FAMILY_KEY_STRINGS if s in text]
            if hits:
                where = path.relative_to(ROOT.parent) if path.is_relative_to(ROOT.parent) else path.name
                out.append(f"{where}:{line} {hits[0]!r} in {text[:60]!r}")
    return out


def test_the_key_string_check_finds_a_planted_key(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text('"""Docstrings may say visual.transformer.resblocks."""\n'
                       'def f(sd):\n    """nor here: mlp.c_fc"""\n    return sd["visual.conv1.weight"], f"{sd}.c_fc"\n')
    found = _family_key_strings({"esm_core.studio.planted": planted})
    assert [f.split(" ", 1)[1][:10] for f in found] == ["'visual.' ", "'c_fc' in "]
    assert all(":4 " in f for f in found)


def test_no_family_key_names_above_the_models_package():
    """A new model family is one module in esm_core/models/ plus one line in models.FAMILIES: nothing above
    models/ may know a family's key names (it calls the family protocol instead)."""
    assert _family_key_strings(MODS) == []
    stale = [m for m in KEY_STRING_EXCEPTIONS if m not in MODS]
    assert stale == []                                   # an exception for a module that no longer exists


def test_every_registered_family_provides_the_protocol():
    from esm_core import models
    from esm_core.models.protocol import REQUIRED, check_family
    assert set(models.FAMILIES) >= {"openclip_vit", "bert"}
    for name, fam in models.FAMILIES.items():
        assert check_family(fam) is fam and fam.NAME == name
        assert isinstance(fam.DESCRIPTION, str) and fam.DESCRIPTION and "\n" not in fam.DESCRIPTION
        assert set(fam.ESD_TYPES) <= set(fam.LAYER_TYPES) and set(fam.ROUTED_TYPES) <= set(fam.LAYER_TYPES)
        assert set(fam.PROBED_TYPES) <= set(fam.LAYER_TYPES)
    import types
    lacking = types.ModuleType("lacking")
    lacking.NAME = "lacking"
    with pytest.raises(ValueError, match="lacks .*'matches'"):
        check_family(lacking)
    assert {"build_model", "record_points", "route", "sample_mask", "convert", "module_key"} <= set(REQUIRED)
