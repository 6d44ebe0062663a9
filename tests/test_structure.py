"""The code's shape, as the project asks it (README "The library"): short functions, a library below the
scripts, thin scripts, the authors' base settings written once."""
from __future__ import annotations

import ast
import dataclasses
import importlib
import os
import re
import subprocess

import pytest

import online_accu_train
import train_cifar
from utils.burnin.config import BurnInConfig
from utils.fields import options
from utils.online.config import PARTS, OnlineConfig, authors_config
from utils.online.flags import ODD

SCRIPTS = ("train_cifar", "online_accu_train", "feder_accu_train", "reproduce", "attack_generator")


def _python_files(repo_root: str, *folders: str) -> list[str]:
    out = []
    for folder in folders:
        base = os.path.join(repo_root, folder)
        if os.path.isfile(base):
            out.append(base)
            continue
        out += [os.path.join(d, f) for d, _, files in os.walk(base) for f in files if f.endswith(".py")]
    return out


def test_no_function_is_longer_than_60_lines(repo_root):
    long = []
    for path in _python_files(repo_root, "utils", "bench", "experiments", *(f"{s}.py" for s in SCRIPTS)):
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{os.path.relpath(path, repo_root)}:{node.lineno} {node.name}")
    assert long == []


def test_the_library_never_imports_a_script(repo_root):
    wrong = []
    for path in _python_files(repo_root, "utils"):
        for node in ast.walk(ast.parse(open(path).read())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            wrong += [f"{os.path.basename(path)}: {n}" for n in names
                      if n.split(".")[0] in (*SCRIPTS, "bench", "tests", "experiments", "examples")]
    assert wrong == []


def test_online_accu_train_main_is_flag_parsing_and_one_call():
    tree = ast.parse(open(online_accu_train.__file__).read())
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    calls = [ast.unparse(n) for n in main.body]
    assert calls == ["run_online(parse_config(argv))", "return 0"]


@pytest.mark.parametrize("script,med", [("run_st.sh", "ST"), ("run_at.sh", "AT"), ("run_dsc.sh", "DSC")])
def test_the_run_scripts_hold_the_authors_base_configuration(repo_root, tmp_path, script, med):
    """run_*.sh keep the authors' literal command lines; they give exactly authors_config()'s settings."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nprintf '%s\\n' \"$@\"\n")
    fake.chmod(0o755)
    done = subprocess.run(["bash", os.path.join(repo_root, script)], env={**os.environ, "PY": str(fake)},
                          cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    argv = done.stdout.splitlines()
    assert argv[0] == "online_accu_train.py"
    cfg, base = online_accu_train.parse_config(argv[1:]), authors_config(defence=med)
    for part in ("stream", "learner", "attack", "eval", "at", "dsc", "measure"):
        assert getattr(cfg, part) == getattr(base, part), part
    assert cfg.defence == med and cfg.run.norm == "bn" and cfg.run.model_name == "epoch40.pth"


# the library's layers, bottom up: a module imports only from lower layers or from its own package
LAYERS = {"errors": 0, "fields": 1, "io": 1, "core": 2, "attack": 3, "defense": 4, "detect": 4, "online": 5,
          "burnin": 5, "fed": 5, "sweep": 6, "report": 7}


def _module_name(repo_root: str, path: str) -> str:
    rel = os.path.relpath(path, repo_root)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def library_imports(repo_root: str) -> dict[str, set[str]]:
    """Every utils module -> the utils modules it imports anywhere in its text: at the top, inside functions
    (lazy), under ``if TYPE_CHECKING`` (type-only) alike."""
    modules = {_module_name(repo_root, p): p for p in _python_files(repo_root, "utils")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                # ``from utils.defense import defenders`` imports the module utils.defense.defenders
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def find_loops(graph: dict[str, set[str]]) -> list[str]:
    """The import loops of a graph, each as 'a -> b -> a' (depth-first search)."""
    state: dict[str, str] = {}
    loops: list[str] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                loops.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return loops


def test_the_loop_finder_finds_a_loop_hidden_behind_a_lazy_import(tmp_path):
    lib = tmp_path / "utils" / "core"
    lib.mkdir(parents=True)
    (tmp_path / "utils" / "__init__.py").write_text("")
    (lib / "__init__.py").write_text("")
    (lib / "a.py").write_text("from utils.core.b import f\n")
    (lib / "b.py").write_text("def f():\n    from utils.core import a\n")
    assert find_loops(library_imports(str(tmp_path))) == ["utils.core.a -> utils.core.b -> utils.core.a"]


def test_no_import_loop_in_the_library_not_even_a_lazy_or_type_only_one(repo_root):
    assert find_loops(library_imports(repo_root)) == []


def test_every_import_points_down_the_layers(repo_root):
    def package(module: str) -> str:
        return module.split(".")[1] if module.count(".") else "utils"

    graph = library_imports(repo_root)
    assert {package(m) for m in graph} - {"utils"} == set(LAYERS)  # a new subpackage needs its layer here
    wrong = [f"{a} -> {b}" for a, targets in graph.items() for b in targets
             if package(a) != package(b) and package(a) != "utils" and LAYERS[package(a)] <= LAYERS[package(b)]]
    assert wrong == []


def _flagged(cls: type, part: str = "") -> set[str]:
    return {f"{part}.{f.name}" if part else f.name for f, o in options(cls, generated=True)}


def test_every_field_has_a_flag_and_no_flags_give_the_dataclass_defaults():
    covered = _flagged(OnlineConfig) | set(ODD)
    for part, cls in PARTS.items():
        covered |= _flagged(cls, part)
    every = {f"{part}.{f.name}" for part, cls in PARTS.items() for f in dataclasses.fields(cls)}
    assert every | {"defence"} == covered
    assert online_accu_train.parse_config([]) == OnlineConfig()
    assert {f.name for f in dataclasses.fields(BurnInConfig)} == _flagged(BurnInConfig)
    assert train_cifar.parse_config([]) == BurnInConfig()


def test_a_flag_is_its_field(tmp_path):
    """The generated flags carry the field's range: a value out of it is refused, naming the flag."""
    from utils.errors import UserError

    cfg = online_accu_train.parse_config(["--epsilon", "0.05", "--num_steps", "3", "--no_md", "--detectors", "all"])
    assert (cfg.attack.epsilon, cfg.attack.num_steps, cfg.measure.md) == (0.05, 3, False)
    assert len(cfg.measure.detectors) > 5
    with pytest.raises(UserError, match="--dsc_calibrate must lie in"):
        online_accu_train.parse_config(["--dsc_calibrate", "1.5"])


def test_the_flag_page_is_generated_from_the_parsers(repo_root):
    """docs/FLAGS.md is what scripts/flag_tables.py renders from the parsers now (regenerate it after a change)."""
    import sys

    done = subprocess.run([sys.executable, os.path.join(repo_root, "scripts", "flag_tables.py"), "--check"],
                          capture_output=True, text=True, timeout=120, cwd=repo_root)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("script", ["run_st.sh", "run_at.sh", "run_dsc.sh"])
def test_the_run_scripts_cpu_hint_names_the_cpu_presets_checkpoints(repo_root, script):
    """The CPU-scale lines of each run_*.sh point at checkpoints the cpu preset writes (folder, online and memorized
    epochs, both saved), so a user who copies it finds them."""
    from utils.sweep.presets import cpu_preset

    text = open(os.path.join(repo_root, script)).read()
    hint = dict(re.findall(r"\b(CKPT|MODEL|MEMORIZED|DATASET|ARCH)=(\S+)", text.split("CPU scale", 1)[1]))
    preset = cpu_preset()
    burn_in = preset.burn_in_for(preset.burn_in_seeds[0])
    assert hint["CKPT"] == burn_in.outf and hint["MODEL"] == f"epoch{preset.online_epoch}.pth", hint
    assert hint.get("MEMORIZED", f"{burn_in.outf}/epoch{preset.memorized_epoch}.pth") == \
        f"{burn_in.outf}/epoch{preset.memorized_epoch}.pth"
    assert hint.get("DATASET", burn_in.dataset) == burn_in.dataset and hint.get("ARCH", burn_in.arch) == burn_in.arch
    assert preset.online_epoch % burn_in.save_freq == 0 and preset.memorized_epoch % burn_in.save_freq == 0


@pytest.mark.parametrize("module", [online_accu_train, train_cifar, "feder_accu_train", "reproduce"])
def test_help_names_each_value_as_a_user_reads_it(module):
    """--help shows DIR, FILE, N or the field's own name for a value, never the namespace path (RUN.RESUME)."""
    module = importlib.import_module(module) if isinstance(module, str) else module
    text = module.build_parser().format_help()
    assert re.findall(r"[A-Z_]+\.[A-Z_]+", text) == [], text
    for flag, meta in (("--dataroot", "DIR"), ("--resume", "DIR"), ("--out", "DIR"), ("--outf", "DIR"),
                       ("--model_name", "FILE"), ("--memorized_model", "FILE")):
        if re.search(rf"{flag} [A-Z\[]", text):
            assert re.search(rf"{flag} \[?{meta}\]?\b", text), (flag, text)
