"""Ablations (utils/sweep/ablation.py, utils/report/ablation.py): a file's steps applied as written, cumulative and
one at a time; malformed files refused with one line; a step's runs are the runs of the preset with those changes,
reused across steps and calls; the ablation table's effects are the per-step claims."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

import reproduce
from conftest import DATA_ROOT, REPO
from utils.errors import UserError
from utils.online.config import replace
from utils.sweep.ablation import load_ablation, step_presets

TWO_STEPS = """
name = "{name}"
base = "cpu"
mode = "{mode}"
[base_set]
"preset.only" = ["ST_trigger_alone", "ST_clean_stream", "ST", "DSC"]
[[steps]]
label = "ε 0.1"
set = {{ "attack.epsilon" = 0.1 }}
[[steps]]
label = "lr 0.05"
note = "closer"
set = {{ "learner.lr" = 0.05, "preset.seeds" = [1, 2] }}
"""


def write(tmp_path, text: str, name: str = "ab.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("mode", ["cumulative", "one_at_a_time"])
def test_steps_are_applied_as_written(tmp_path, mode):
    ab = load_ablation(write(tmp_path, TWO_STEPS.format(name="t", mode=mode)))
    assert [s.label for s in ab.steps] == ["base", "ε 0.1", "lr 0.05"]
    assert [s.slug for s in ab.steps] == ["base", "1_eps_0.1", "2_lr_0.05"]
    base, eps, lr = step_presets(ab, {}, smoke_it=False)
    for p in (base, eps, lr):  # base_set reaches every step
        assert [r.slug for r in p.rows()] == ["ST_trigger_alone", "ST_clean_stream", "ST", "DSC"]
    assert (base.base.attack.epsilon, base.base.learner.lr, base.seeds) == (0.05, 0.1, (20, 21))
    assert (eps.base.attack.epsilon, eps.base.learner.lr) == (0.1, 0.1)
    assert (lr.base.learner.lr, lr.seeds) == (0.05, (1, 2))
    assert lr.base.attack.epsilon == (0.1 if mode == "cumulative" else 0.05)
    assert lr.name == "t/2_lr_0.05" and ab.steps[2].note == "closer"


def test_the_shipped_bridge_moves_towards_the_authors_setting():
    ab = load_ablation("bridge")
    assert ab.mode == "cumulative" and ab.base == "cpu"
    last = step_presets(ab, {}, smoke_it=False)[-1]
    b = last.base
    assert (b.attack.epsilon, b.stream.steps, b.eval.eval_subset, b.eval.threshold) == (0.2, 100, 0, 1.0)
    assert (b.attack.num_steps, last.burn_in.epochs, last.online_epoch, last.memorized_epoch) == (10, 10, 10, 5)
    assert not last.burn_in.normalize and last.burn_in.outf.endswith("_raw")
    assert all(s.note for s in ab.steps[1:])


@pytest.mark.parametrize("text,message", [
    ('name = "x"\n[[steps]]\nlabel = "a"\nset = { "attack.epsilonn" = 0.1 }', "step 1 \\(a\\).*no field 'epsilonn'"),
    ('name = "x"\n[[steps]]\nlabel = "a"\nset = { "attack.epsilon" = 2.0 }', "step 1 \\(a\\).*--set attack.epsilon"),
    ('name = "x"\n[[steps]]\nlabel = "a"\nset = { "attack.epsilon" = "big" }', "is not a float"),
    ('name = "x"\nsteps = []', "no steps"),
    ('name = "x"', "no steps"),
    ('name = "x"\n[[steps]]\nlabel = "a"\nset = {}', "the set table is empty"),
    ('name = "x"\n[[steps]]\nset = { "attack.epsilon" = 0.1 }', "needs a label and a set table"),
    ('name = "x"\nmode = "sideways"\n[[steps]]\nlabel = "a"\nset = { "attack.epsilon" = 0.1 }', "mode 'sideways'"),
    ('name = "x"\nbase = "nope"\n[[steps]]\nlabel = "a"\nset = { "attack.epsilon" = 0.1 }', "not a preset"),
    ('name = "x y"\n[[steps]]\nlabel = "a"\nset = { "attack.epsilon" = 0.1 }', "folder-name word"),
    ('name = "x"\nstep = 1', "unknown key"),
    ('name = "x"\n[[steps]]\nlabel = "a"\nset = { "attack.epsilon" = 0.1 }\nwhen = 1', "unknown key.*when"),
    ('name = "x"\n[[steps]\n', "not valid TOML"),
])
def test_a_malformed_ablation_is_refused_with_what_to_fix(tmp_path, text, message):
    with pytest.raises(UserError, match=message):
        load_ablation(write(tmp_path, text))


def test_an_unknown_ablation_names_the_shipped_ones():
    with pytest.raises(UserError, match="shipped: bridge"):
        load_ablation("no_such_ablation")


@pytest.mark.slow
def test_a_malformed_ablation_file_gets_one_error_line(tmp_path):
    path = write(tmp_path, 'name = "x"\n[[steps]]\nlabel = "a"\nset = { "attack.epsilon" = -1 }')
    done = subprocess.run([sys.executable, os.path.join(REPO, "reproduce.py"), "--ablation", path],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "attack.epsilon" in lines[0], done.stderr


def _shrink(tiny_run, out) -> list[str]:
    """The tiny burn-in (reused) and small sizes, as tests/test_reproduce.py shrinks a preset."""
    return ["--ckpt", tiny_run, "--dataroot", DATA_ROOT, "--width", "4", "--burnin_epochs", "2", "--save_freq", "1",
            "--online_epoch", "2", "--memorized_epoch", "1", "--epochs", "2", "--seeds", "1", "2",
            "--set", "preset.burn_in_seeds=0", "--eval_subset", "100", "--threshold", "1.0", "--out", str(out)]


def _without_timing(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if not k.endswith("_s") and k not in ("total_seconds", "trigger_info")}


@pytest.mark.slow
def test_an_ablation_runs_its_steps_as_presets_and_tables_their_claims(tiny_run, small_data, tmp_path):
    path = write(tmp_path, TWO_STEPS.format(name="two", mode="one_at_a_time").replace(
        '"learner.lr" = 0.05, "preset.seeds" = [1, 2]', '"learner.lr" = 0.05'))
    out = tmp_path / "ab"
    assert reproduce.main(["--ablation", path, *_shrink(tiny_run, out)]) == 0
    for name in ("ablation.md", "ablation.csv", "ablation.json", "ablation.png"):
        assert os.path.getsize(out / name) > 0, name
    rows = {r["step"]: r for r in csv.DictReader(open(out / "ablation.csv"))}
    assert list(rows) == ["base", "ε 0.1", "lr 0.05"]
    for slug, label in (("base", "base"), ("1_eps_0.1", "ε 0.1"), ("2_lr_0.05", "lr 0.05")):
        claims = {r["key"]: r for r in csv.DictReader(open(out / slug / "claims.csv"))}
        for key in ("attack_vs_trigger_alone", "dsc_paper_vs_st"):  # the table's effects are the step's claims
            c = claims[key]
            assert rows[label][key] == f"{c['effect'].split(' ')[0]} {c['ci']} {c['verdict']}"
            assert c["verdict"] in ("holds", "does not hold", "inconclusive")  # two seeds: an interval
        config = json.load(open(out / slug / "runs" / "ST_s1" / "config.json"))["config"]
        assert (config["attack"]["epsilon"], config["learner"]["lr"]) == {
            "base": (0.05, 0.1), "1_eps_0.1": (0.1, 0.1), "2_lr_0.05": (0.05, 0.05)}[slug]
    # a step's runs are the runs of the preset with those changes
    preset_out = tmp_path / "preset"
    assert reproduce.main(["--preset", "cpu", *_shrink(tiny_run, preset_out), "--set", "attack.epsilon=0.1", "--set",
                           "preset.only=ST_trigger_alone,ST_clean_stream,ST,DSC"]) == 0
    for run in os.listdir(out / "1_eps_0.1" / "runs"):
        a = json.load(open(out / "1_eps_0.1" / "runs" / run / "summary.json"))
        b = json.load(open(preset_out / "runs" / run / "summary.json"))
        assert _without_timing(a) == _without_timing(b), run
    # a second call recomputes nothing
    mtimes = {p: os.path.getmtime(p) for p in (out / "2_lr_0.05" / "runs").glob("*/summary.json")}
    assert reproduce.main(["--ablation", path, *_shrink(tiny_run, out)]) == 0
    assert {p: os.path.getmtime(p) for p in mtimes} == mtimes


@pytest.mark.slow
def test_identical_runs_are_copied_across_steps_not_recomputed(tiny_run, small_data, tmp_path, capsys):
    """One at a time, a step that changes only what the trigger-alone row overrides (the stream's length) gets the
    base's trigger-alone runs copied; the copies are then reused like any finished run."""
    text = TWO_STEPS.format(name="copy", mode="one_at_a_time").split("[[steps]]")[0] + (
        '[[steps]]\nlabel = "stream 3"\nset = { "stream.steps" = 3 }\n')
    out = tmp_path / "ab"
    assert reproduce.main(["--ablation", write(tmp_path, text), *_shrink(tiny_run, out)]) == 0
    base = json.load(open(out / "base" / "runs" / "ST_trigger_alone_s1" / "summary.json"))
    copied = json.load(open(out / "1_stream_3" / "runs" / "ST_trigger_alone_s1" / "config.json"))
    assert copied["copied_from"].endswith(os.path.join("base", "runs", "ST_trigger_alone_s1"))
    assert copied["config"]["run"]["out"].endswith(os.path.join("1_stream_3", "runs", "ST_trigger_alone_s1"))
    assert json.load(open(out / "1_stream_3" / "runs" / "ST_trigger_alone_s1" / "summary.json")) == base
    assert "copied across steps" in capsys.readouterr().out


@pytest.mark.slow
def test_the_gpu_bridge_script_runs_in_its_cpu_smoke_form(tmp_path, monkeypatch):
    """scripts/gpu_bridge.sh's reproduce.py flags, with --smoke on CIFAR-10-format files, on the CPU: the authors'
    model without input normalisation, the claims' rows, two seeds cut to one by the smoke."""
    import shlex

    import fake_data

    text = open(os.path.join(REPO, "scripts", "gpu_bridge.sh")).read()
    command = text[text.index("reproduce.py") + len("reproduce.py"):text.index('"$@"')].replace("\\\n", " ")
    root = str(tmp_path / "data")
    fake_data.install_cifar10(root, monkeypatch, per_batch=60, n_test=100)
    monkeypatch.chdir(tmp_path)
    assert reproduce.main([*shlex.split(command), "--smoke", "--dataroot", root, "--device", "cpu"]) == 0
    out = tmp_path / "results" / "gpu_bridge"
    assert sorted(os.listdir(out / "runs")) == ["DSC_s20", "ST_clean_stream_s20", "ST_s20", "ST_trigger_alone_s20"]
    config = json.load(open(out / "runs" / "ST_s20" / "config.json"))
    assert config["model"]["arch"] == "resnet18" and config["model"]["mean"] == [0.0, 0.0, 0.0]
    assert config["config"]["attack"]["epsilon"] == 0.2 and os.path.getsize(out / "claims.md") > 0


def test_a_step_reuses_the_base_presets_own_finished_runs(tmp_path):
    """reuse_across_steps copies a finished run of the same configuration from a folder elsewhere (the base
    preset's results/<preset>, e.g. make demo's) and leaves a run of another configuration alone."""
    from utils.sweep.ablation import reuse_across_steps

    ab = load_ablation(write(tmp_path, TWO_STEPS.format(name="t", mode="one_at_a_time")))
    base = step_presets(ab, {"preset.burn_in_seeds": (0,), "preset.seeds": (20,)}, smoke_it=False)[0]
    demo, out = str(tmp_path / "demo"), str(tmp_path / "ab" / "base")
    rows = base.rows()
    for row, summary in ((rows[0], {"delta": 0.5}), (rows[1], {"delta": 0.25})):
        cfg = base.run_config(row, (0, 20), demo)
        if row is rows[1]:  # another configuration: not copied
            cfg = replace(cfg, learner={"lr": 0.5})
        os.makedirs(cfg.run.out)
        json.dump({"config": cfg.to_dict()}, open(os.path.join(cfg.run.out, "config.json"), "w"))
        json.dump(summary, open(os.path.join(cfg.run.out, "summary.json"), "w"))
    assert reuse_across_steps([(base, out)], (demo,)) == 1
    run = os.path.join(out, "runs", base.run_name(rows[0], (0, 20)))
    assert json.load(open(os.path.join(run, "summary.json"))) == {"delta": 0.5}
    saved = json.load(open(os.path.join(run, "config.json")))
    assert saved["config"]["run"]["out"] == run and saved["copied_from"].startswith(demo)
    assert not os.path.exists(os.path.join(out, "runs", base.run_name(rows[1], (0, 20))))
    assert reuse_across_steps([(base, out)], (demo,)) == 0  # already there
