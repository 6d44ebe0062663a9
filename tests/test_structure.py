"""The code's shape, as the project asks it (README "The library"): short functions, a library below the
scripts, thin scripts, the authors' base settings written once."""
from __future__ import annotations

import ast
import os
import subprocess

import pytest

import online_accu_train
from utils.config import authors_config

SCRIPTS = ("train_cifar", "online_accu_train", "reproduce", "attack_generator")


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
