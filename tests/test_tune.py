"""The tuned attacker (utils/sweep/tune.py, utils/report/tuned.py, reproduce.py --tune; docs/TUNING.md): the new
flags leave today's commands alone and the search space holds the authors' attacker; every bad input is one
``error:`` line; the confirmation never reuses a search replicate; a study resumes from its file (an interrupted
trial taken up again, a failed run failing its trial only); the smoke study writes every report, and a second call
with more trials keeps the earlier ones and reruns no finished run."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import pytest

import reproduce
from conftest import REPO
from utils.errors import UserError
from utils.online.config import authors_config
from utils.report.tuned import chosen_points, trial_values
from utils.sweep import tune

optuna = pytest.importorskip("optuna")


def test_the_new_flags_default_to_todays_behaviour():
    args = reproduce.parse_args([])
    assert (args.tune, args.trials, args.storage, args.preset) == (None, None, None, "cpu")


def test_the_search_space_holds_the_authors_attacker_and_never_epsilon():
    """The study's first point is the authors' attacker: the same crafting, objective, trigger and fire rule."""
    eps = 0.05
    mine = authors_config(attack={"epsilon": eps})
    changes = tune.attack_changes(tune.authors_params(), eps)
    theirs = dataclasses.replace(mine.attack, **{k.split(".")[1]: v for k, v in changes.items()})
    assert theirs.trigger_crafting == (2, 0.05) and mine.attack.trigger_crafting[0] == 2
    assert theirs.step_size == 2 * eps / mine.attack.num_steps  # the authors' 0: 2ε/K
    for field in ("num_steps", "objective", "gamma", "poison_scale", "use_advtrigger", "online_advtrigger", "fire",
                  "fire_after", "fire_patience", "epsilon"):
        assert getattr(theirs, field) == getattr(mine.attack, field), field
    assert "epsilon" not in {k.name for k in tune.SPACE}


@pytest.mark.parametrize("smoke_it", [False, True])
@pytest.mark.parametrize("defence", tune.DEFENCES)
def test_the_confirmation_never_reuses_a_search_replicate(defence, smoke_it):
    search, confirm = tune.presets(defence, smoke_it)
    assert not set(search.burn_in_seeds) & set(confirm.burn_in_seeds)
    assert not set(search.seeds) & set(confirm.seeds)
    assert not set(search.replicates()) & set(confirm.replicates())
    assert len(confirm.replicates()) == (2 if smoke_it else 10)  # the cpu preset's own: the authors' runs exist
    assert [r.slug for r in search.rows()] == [r.slug for r in confirm.rows()] == [tune.CONTROL, defence]
    with pytest.raises(ValueError, match="held-out"):
        tune.check_split(search, dataclasses.replace(confirm, seeds=search.seeds))


@pytest.mark.parametrize("argv,message", [
    (["--tune", "NOPE"], "unknown defence; known: ST, DSC, DSC_calibrated, AT_authors"),
    (["--tune", "MD"], "judged on the ST runs"),
    (["--tune", "ST", "--trials", "0"], "--trials must be at least 1"),
    (["--trials", "3"], "--trials belongs to --tune"),
    (["--storage", "sqlite:///x.db"], "--storage belongs to --tune"),
    (["--tune", "ST", "--preset", "paper"], "drop --preset"),
    (["--tune", "ST", "--ablation", "bridge"], "drop --ablation"),
    (["--tune", "ST", "--set", "attack.gamma=2"], "drop the override of attack.gamma"),
    (["--tune", "ST", "--epsilon", "0.1"], "drop the override of attack.epsilon"),
    (["--tune", "ST", "--ray"], "drop --ray"),
])
def test_a_bad_tune_input_is_refused_with_what_to_do(argv, message):
    with pytest.raises(UserError, match=message):
        reproduce.parse_args(argv)


def test_optuna_missing_says_how_to_install_it_and_writes_nothing(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_optuna(name, *args, **kwargs):
        if name == "optuna" or name.startswith("optuna."):
            raise ImportError("No module named 'optuna'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_optuna)
    with pytest.raises(UserError, match=r'pip install -e "\.\[tune\]"'):
        reproduce.main(["--tune", "ST", "--smoke", "--out", str(tmp_path / "out")])
    assert not os.path.exists(tmp_path / "out")


def test_a_bad_storage_url_is_one_user_error(tmp_path):
    with pytest.raises(UserError, match="--storage nosuch://x: Optuna cannot open it"):
        tune.open_storage("nosuch://x", str(tmp_path))
    with pytest.raises(UserError, match="journal:PATH needs"):
        tune.open_storage("journal:", str(tmp_path))


@pytest.mark.slow
def test_a_bad_tune_flag_is_one_error_line_from_the_script(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(REPO, "reproduce.py"), "--tune", "NOPE"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: --tune NOPE"), done.stderr


def _summary(burn_in: float, before: float, after: float) -> dict:
    return {"err_burn_in": burn_in, "err_before_trigger": before, "err_after_trigger": after,
            "md_auroc_poison_vs_clean": 0.6}


def test_a_trials_values_are_the_claims_effect_and_the_phases_cost():
    groups = {"ST": {(5, 30): _summary(0.1, 0.13, 0.20), (6, 30): _summary(0.1, 0.11, 0.14)},
              "ST (trigger alone)": {(5, 30): _summary(0.1, 0.1, 0.12), (6, 30): _summary(0.1, 0.1, 0.13)}}
    effect, cost = trial_values(groups, "ST", "ST (trigger alone)")
    assert effect == pytest.approx(((7 - 2) + (3 - 3)) / 2) and cost == pytest.approx((3 + 1) / 2)


def test_the_rule_confirms_the_stealthy_and_the_strongest_point():
    def t(n, effect, cost):
        return {"number": n, "state": "COMPLETE", "effect": effect, "cost": cost}

    trials = [t(0, -1.0, 8.0), t(1, 0.5, 1.0), t(2, 3.0, 6.0), t(3, 0.2, 0.5), {"number": 4, "state": "FAIL"}]
    assert [(name, p["number"]) for name, p in chosen_points(trials)] == [("stealthy", 1), ("strongest", 2)]
    assert [(name, p["number"]) for name, p in chosen_points(trials[:2])] == [("stealthy", 1)]  # one point: once
    assert [(name, p["number"]) for name, p in chosen_points([trials[0]])] == [("strongest", 0)]


class FakeRuns:
    """run_presets for a study's bookkeeping: values from the knobs, no training; ``fail`` / ``interrupt``: the
    call numbers that raise a diverged model's UserError / a Ctrl-C."""

    def __init__(self, fail: tuple[int, ...] = (), interrupt: tuple[int, ...] = ()):
        self.calls, self.fail, self.interrupt = [], fail, interrupt

    def __call__(self, presets, fresh, ray):
        (preset, out), = presets
        self.calls.append(out)
        if len(self.calls) in self.interrupt:
            raise KeyboardInterrupt()
        if len(self.calls) in self.fail:
            raise UserError("the model's weights became NaN/inf at online step 3; lower --lr or use --clip_gradnorm")
        a, groups = preset.base.attack, {}
        for row in preset.rows():
            alone = row.slug == tune.CONTROL
            for rep in preset.replicates():
                cost, drop = (0, 0.01) if alone else (0.01 * a.poison_scale, 0.01 * a.num_steps)
                groups.setdefault(row.label, {})[rep] = _summary(0.1, 0.1 + cost, 0.1 + cost + drop)
        return [groups]


def _search(tmp_path, monkeypatch, runs: FakeRuns, trials: int, storage: str | None = None) -> list[dict]:
    monkeypatch.setattr(tune, "run_presets", runs)
    monkeypatch.setattr(tune, "search_burn_ins", lambda search, fresh: None)
    search, _ = tune.presets("ST", smoke_it=True)
    return tune.run_search("ST", search, str(tmp_path / "ST"), trials, storage, False, trial_values, 2.0)


def _answered(rows: list[dict]) -> list[tuple]:
    return [(r["number"], r["params"], r["effect"], r["cost"], r["state"]) for r in rows]


def test_a_study_resumes_from_its_file(tmp_path, monkeypatch, capsys):
    runs = FakeRuns()
    first = _search(tmp_path, monkeypatch, runs, 2)
    assert os.path.isfile(tmp_path / "ST" / "study.db") and len(first) == 2 and len(runs.calls) == 2
    assert first[0]["authors"] and first[0]["params"] == tune.authors_params()  # the first point: the authors'
    assert first[0]["effect"] == pytest.approx(2 - 1) and first[0]["runs"] == runs.calls[0]
    more = _search(tmp_path, monkeypatch, runs, 4)
    assert _answered(more)[:2] == _answered(first) and len(more) == 4
    assert len(runs.calls) == 4  # the two earlier trials were not run again
    assert _search(tmp_path, monkeypatch, runs, 4) == more and len(runs.calls) == 4  # nothing left to do
    out = capsys.readouterr().out
    assert "tune ST: trial 3 (4/4," in out and "best effect at cost < 2 pts:" in out


def test_a_failed_run_fails_its_trial_not_the_study(tmp_path, monkeypatch):
    rows = _search(tmp_path, monkeypatch, FakeRuns(fail=(2,)), 3)
    assert [r["state"] for r in rows] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert "weights became NaN" in rows[1]["fail_reason"] and rows[1]["effect"] is None


def test_an_interrupted_trial_is_taken_up_again_with_its_runs(tmp_path, monkeypatch):
    runs = FakeRuns(interrupt=(2,))
    with pytest.raises(KeyboardInterrupt):
        _search(tmp_path, monkeypatch, runs, 3)
    rows = _search(tmp_path, monkeypatch, runs, 3)
    assert [r["number"] for r in rows] == [0, 2, 3]  # trial 1 was interrupted: not an answer
    assert rows[1]["params"] == optuna.load_study(study_name="tune_ST_cpu_smoke", storage="sqlite:///" + str(
        tmp_path / "ST" / "study.db")).trials[1].params
    assert runs.calls[2] == runs.calls[1]  # the same settings, the same runs folder: its finished runs reused


def test_a_trial_a_killed_process_left_running_is_taken_up(tmp_path, monkeypatch):
    _search(tmp_path, monkeypatch, FakeRuns(), 1)
    storage = "sqlite:///" + str(tmp_path / "ST" / "study.db")
    study = optuna.load_study(study_name="tune_ST_cpu_smoke", storage=storage)
    left = study.ask()
    params = tune.sample(left, 2)  # then the process is killed: the trial stays RUNNING in the file
    rows = _search(tmp_path, monkeypatch, FakeRuns(), 2)
    states = [t.state.name for t in optuna.load_study(study_name="tune_ST_cpu_smoke", storage=storage).trials]
    assert states == ["COMPLETE", "FAIL", "COMPLETE"] and rows[1]["params"] == left.params and params


def test_a_study_whose_disk_fills_is_one_error_then_the_same_command_finishes(small_disk, monkeypatch):
    """A real full disk under the study's SQLite file: one UserError naming the file and what to do (not Optuna's
    traceback); freed, the same search goes on from the trials it kept, to the number asked for."""
    root, runs = pathlib.Path(small_disk.path), FakeRuns()
    assert len(_search(root, monkeypatch, runs, 1)) == 1
    small_disk.fill(leave=0)
    with pytest.raises(UserError, match=r"study\.db.*free some space .* run the same command again"):
        _search(root, monkeypatch, runs, 3)
    small_disk.free()
    rows = _search(root, monkeypatch, runs, 3)
    assert len(rows) == 3 and rows[0]["authors"] and all(r["state"] == "COMPLETE" for r in rows)


def test_only_a_storage_failure_is_reworded():
    error = optuna.exceptions.StorageInternalError("commit failed")
    error.__cause__ = OSError("database or disk is full")
    try:
        try:
            raise error
        except optuna.exceptions.StorageInternalError:
            raise AssertionError("Should not reach.")  # what Optuna's optimize raises on top of it
    except AssertionError as top:
        assert tune.storage_failure(top) == "database or disk is full"
    assert tune.storage_failure(ValueError("a bug")) is None
    with pytest.raises(ValueError, match="a bug"), tune.storage_errors("study.db"):
        raise ValueError("a bug")


def test_a_journal_storage_holds_a_shareable_study(tmp_path, monkeypatch):
    journal = tmp_path / "shared" / "study.log"
    journal.parent.mkdir()
    _search(tmp_path, monkeypatch, FakeRuns(), 1, f"journal:{journal}")
    rows = _search(tmp_path, monkeypatch, FakeRuns(), 2, f"journal:{journal}")
    assert journal.stat().st_size > 0 and len(rows) == 2 and not os.path.exists(tmp_path / "ST" / "study.db")


def test_a_study_of_another_search_is_refused(tmp_path, monkeypatch):
    _search(tmp_path, monkeypatch, FakeRuns(), 1)
    storage, _ = tune.open_storage(None, str(tmp_path / "ST"))
    study = optuna.load_study(study_name="tune_ST_cpu_smoke", storage=storage)
    study.set_user_attr("identity", {**study.user_attrs["identity"], "space": 0})
    with pytest.raises(UserError, match="another search.*space: 0 -> 1"):
        _search(tmp_path, monkeypatch, FakeRuns(), 2)


def _replicates_of(folder) -> set[tuple[int, int]]:
    """(burn-in seed, online seed) of every run under ``folder``, from the runs' own configuration."""
    reps = set()
    for config in folder.glob("**/runs/*/config.json"):
        run = json.load(open(config))["config"]["run"]
        reps.add((int(run["resume"].rsplit("_b", 1)[1]), run["seed"]))
    return reps


@pytest.mark.slow
def test_the_smoke_study_writes_every_report_and_resumes(small_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the smoke burn-ins (checkpoints/) land here
    out = tmp_path / "tuned"
    argv = ["--tune", "ST", "--smoke", "--dataroot", small_data, "--out", str(out)]
    assert reproduce.main(argv) == 0
    for name in ("study.db", "front.md", "front.csv", "front.json", "table.md", "table.csv", "table.json",
                 "fronts.png"):
        assert os.path.getsize(out / "ST" / name) > 0, name
    assert os.path.getsize(out / "table.md") > 0 and os.path.getsize(out / "fronts.png") > 0
    table = json.load(open(out / "ST" / "table.json"))
    assert table["rows"][0]["attacker"] == "the authors'" and len(table["rows"]) >= 2
    assert all(r["replicates"] == "2 (2)" for r in table["rows"])  # intervals over the held-out burn-ins
    search, confirm = _replicates_of(out / "ST" / "trials"), _replicates_of(out / "ST" / "confirm")
    assert search == {(5, 30), (6, 30)} and confirm == {(0, 20), (1, 20)}
    front = list(csv.DictReader(open(out / "ST" / "front.csv")))
    assert [r["number"] for r in front] == ["0", "1"] and front[0]["authors"] == "yes"
    done = {p: os.path.getmtime(p) for p in out.glob("ST/*/*/runs/*/summary.json")}
    assert reproduce.main([*argv, "--trials", "3"]) == 0
    again = list(csv.DictReader(open(out / "ST" / "front.csv")))
    kept = ("number", "effect", "cost", "runs", *(k.name for k in tune.SPACE))  # the front's flag may move
    assert len(again) == 3 and [[r[k] for k in kept] for r in again[:2]] == [[r[k] for k in kept] for r in front]
    assert {p: os.path.getmtime(p) for p in done} == done  # finished runs reused, none rerun


def test_the_tuning_page_states_the_code_s_space_and_budget(repo_root):
    """docs/TUNING.md's search space lists every knob with its range, and its budget table the default trials."""
    text = open(os.path.join(repo_root, "docs", "TUNING.md"), encoding="utf-8").read()
    for k in tune.SPACE:
        line = next(line for line in text.splitlines() if line.startswith(f"| `{k.name}` |"))
        if k.kind in ("int", "float"):
            assert f"{k.low:g}–" in line and (k.high is None or f"–{k.high:g}" in line), line
        for choice in k.choices:
            assert choice in line, line
    for defence, trials in tune.DEFAULT_TRIALS.items():
        assert any(line.startswith(f"| {defence} |") and f"| {trials} |" in line for line in text.splitlines())
