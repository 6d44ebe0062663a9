"""The tuned attacker (SPEC "The tuned attacker"): per defence, an Optuna study over the attacker's knobs that
maximises the paired effect (the trigger's drop after the accumulative phase minus the trigger alone) and minimises
the accumulative phase's own accuracy cost, on the *search* replicates; the front's chosen points are then run on
the *held-out* replicates, which the search never sees, next to the authors' attacker. Used by
``reproduce.py --tune DEFENCE`` (docs/TUNING.md).

A trial is the cpu preset's defended row and its trigger-alone control (the same attacker settings, no stream) on
the search replicates, in ``<out>/<DEFENCE>/trials/<key>/runs/``, ``key`` a hash of the settings: a trial of the
same settings (an interrupted one, taken up again) reuses its finished runs. The study lives in
``<out>/<DEFENCE>/study.db`` (SQLite) unless ``--storage`` names another Optuna storage; it resumes when it exists.
The values are measured by a function the caller passes (the report layer's, so the effect and the cost are the
claims' own).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from utils.errors import UserError, disk_full_message
from utils.io.results import FolderLock, ensure_dir
from utils.sweep.ablation import reuse_across_steps
from utils.sweep.overrides import with_overrides
from utils.sweep.presets import Preset, Replicate, Row, cpu_preset, smoke
from utils.sweep.runs import run_presets, run_sweep

DEFENCES = ("ST", "DSC", "DSC_calibrated", "AT_authors")  # the defended rows of the cpu preset a study attacks
CONTROL = "ST_trigger_alone"  # the trigger alone (no stream), on an undefended learner: every effect's control
# The split (SPEC "The tuned attacker"): the search runs on burn-ins and online seeds that the confirmation never
# uses; the confirmation runs on the cpu preset's own (burn-ins 0-4 x seeds 20, 21), where the authors' attacker's
# runs already are. A missing search burn-in is trained on demand (about a minute each on 2 cores).
SEARCH_BURN_INS, SEARCH_SEEDS = (5, 6), (30,)
SEED = 29  # the sampler's seed (plus the number of trials the study already has, so a resumed study draws anew)
SMOKE_TRIALS = 2
# The default budget per defence, the one the published fronts were made with: 11-22 minutes on 2 cores, measured
# (docs/TUNING.md, "Budget"); more trials on the 2 search replicates overfit them (measured there too).
DEFAULT_TRIALS = {"ST": 36, "DSC": 48, "DSC_calibrated": 44, "AT_authors": 32}
SPACE_VERSION = 1  # bump when SPACE changes: a study of another space is refused, not mixed


@dataclass(frozen=True)
class Knob:
    """One searched setting: its name in the study, its kind and range, the value the authors' attacker has, and
    the condition under which it is drawn (another knob's value), so that a knob is never set where it is unused."""

    name: str
    kind: str  # int, float, categorical, bool
    low: float = 0
    high: float | None = None  # None: the stream's length (stream.steps)
    choices: tuple[Any, ...] = ()
    log: bool = False
    step: float | None = None  # a grid (floats): fewer distinct points, readable values
    when: tuple[str, Any] | None = None
    authors: Any = None
    meaning: str = ""


SPACE = (
    Knob("num_steps", "int", 1, 5, authors=2, meaning="attack.num_steps: signed steps K per poisoned batch"),
    Knob("step_fraction", "float", 0.1, 1.0, step=0.05, authors=0.5,
         meaning="attack.step_size = this x 2ε (the authors': 1/K)"),
    Knob("objective", "categorical", choices=("reg", "normal", "second"), authors="reg",
         meaning="attack.objective: the poisons' target"),
    Knob("gamma", "float", 0.1, 10.0, log=True, when=("objective", "reg"), authors=1.0,
         meaning="attack.gamma: weight of the clean-gradient term (read by reg only)"),
    Knob("poison_scale", "float", 0.1, 1.0, step=0.05, authors=1.0,
         meaning="attack.poison_scale: fraction of a batch poisoned"),
    Knob("use_advtrigger", "bool", authors=True, meaning="attack.use_advtrigger: craft the poisoned trigger"),
    Knob("trigger_steps", "int", 1, 5, when=("use_advtrigger", True), authors=2,
         meaning="attack.trigger_steps: the trigger's signed steps (each of the poisons' step size)"),
    Knob("online_advtrigger", "bool", when=("use_advtrigger", True), authors=False,
         meaning="attack.online_advtrigger: re-craft the trigger after every batch"),
    Knob("fire", "categorical", choices=("threshold", "batches", "alignment_peak"), authors="threshold",
         meaning="attack.fire: when the trigger fires"),
    Knob("fire_after", "int", 1, None, when=("fire", "batches"), meaning="attack.fire_after: batches before it fires"),
    Knob("fire_patience", "int", 1, 5, when=("fire", "alignment_peak"),
         meaning="attack.fire_patience: batches without a new lowest alignment before it fires"),
)
FIXED = "attack.epsilon: the threat model's budget, never searched"


def defended_row(preset: Preset, defence: str) -> Row:
    """The row of ``defence`` in the preset (a UserError listing the known ones otherwise)."""
    if defence == "MD":
        raise UserError("--tune MD: MD is a detector, judged on the ST runs' MD AUROC: run --tune ST (its table has "
                        "MD's AUROC against the tuned attacker)")
    if defence not in DEFENCES:
        raise UserError(f"--tune {defence}: unknown defence; known: {', '.join(DEFENCES)} (MD: see --tune ST)")
    return next(r for r in preset.all_rows() if r.slug == defence)


def check_split(search: Preset, confirm: Preset) -> None:
    """The confirmation never reuses a search replicate: no burn-in and no online seed in common (SPEC "The tuned
    attacker", the split)."""
    burn_ins = set(search.burn_in_seeds) & set(confirm.burn_in_seeds)
    seeds = set(search.seeds) & set(confirm.seeds)
    if burn_ins or seeds:
        raise ValueError(f"the search and the confirmation share burn-ins {sorted(burn_ins)} or online seeds "
                         f"{sorted(seeds)}: the confirmation must run on held-out replicates")


def presets(defence: str, smoke_it: bool, overrides: dict[str, Any] | None = None) -> tuple[Preset, Preset]:
    """(search, confirmation): the cpu preset's defended row and its control, on the search replicates (detectors
    off: the search reads the effect and the cost only) and on the held-out ones (the cpu preset's own rows, so
    the authors' attacker's runs of results/cpu are reused); ``--smoke`` shrinks both."""
    base = with_overrides(cpu_preset(), overrides or {})
    defended_row(base, defence)
    confirm = dataclasses.replace(base, only=(CONTROL, defence))
    search = dataclasses.replace(confirm, burn_in_seeds=SEARCH_BURN_INS, seeds=SEARCH_SEEDS, detectors=False)
    if smoke_it:
        search, confirm = smoke(search), smoke(confirm)
    check_split(search, confirm)
    return search, confirm


def label_of(preset: Preset, slug: str) -> str:
    """The table label of a row, by its slug."""
    return next(r.label for r in preset.all_rows() if r.slug == slug)


def sample(trial: Any, stream_steps: int) -> dict[str, Any]:
    """The trial's knobs, drawn from SPACE (a conditional knob only where its condition holds; SPEC "The tuned
    attacker": ε is never drawn)."""
    params: dict[str, Any] = {}
    for k in SPACE:
        if k.when is not None and params.get(k.when[0]) != k.when[1]:
            continue
        high = stream_steps if k.high is None else k.high
        if k.kind == "int":
            params[k.name] = trial.suggest_int(k.name, int(k.low), int(high))
        elif k.kind == "float":
            value = trial.suggest_float(k.name, k.low, high, log=k.log, step=k.step)
            params[k.name] = round(value, 6) if k.step else value  # a grid value without float noise
        else:
            params[k.name] = trial.suggest_categorical(k.name, list(k.choices if k.kind == "categorical"
                                                                    else (False, True)))
    return params


def authors_params() -> dict[str, Any]:
    """The authors' attacker as a point of SPACE (the study's first trial, so the figure marks it)."""
    params: dict[str, Any] = {}
    for k in SPACE:
        if (k.when is None or params.get(k.when[0]) == k.when[1]) and k.authors is not None:
            params[k.name] = k.authors
    return params


def attack_changes(params: dict[str, Any], epsilon: float) -> dict[str, Any]:
    """The --set changes (PATH -> value) of a point of SPACE; ε stays the preset's."""
    changes = {f"attack.{k}": v for k, v in params.items() if k != "step_fraction"}
    changes["attack.step_size"] = round(params["step_fraction"] * 2.0 * epsilon, 6)
    return dict(sorted(changes.items()))


def changes_key(changes: dict[str, Any]) -> str:
    """A short, stable folder name for a set of changes."""
    return hashlib.sha256(json.dumps(changes, sort_keys=True).encode()).hexdigest()[:12]


def import_optuna() -> Any:
    """Optuna, or a UserError saying how to install it."""
    try:
        import optuna
    except ImportError:
        raise UserError('--tune needs Optuna, an optional extra: pip install -e ".[tune]"') from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the progress is this module's one line per trial
    return optuna


def open_storage(url: str | None, folder: str) -> tuple[Any, bool]:
    """(the Optuna storage, whether it is this folder's own SQLite file): ``url`` None: <folder>/study.db;
    ``journal:PATH``: a journal file (shared through a file system); else an RDB URL (sqlite:///PATH,
    postgresql://..., mysql://...)."""
    optuna = import_optuna()
    own = url is None
    if own:
        url = "sqlite:///" + os.path.abspath(os.path.join(folder, "study.db"))
    try:
        if url.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend

            path = url[len("journal:"):]
            if not path:
                raise UserError("--storage journal:PATH needs the journal file's path")
            return optuna.storages.JournalStorage(JournalFileBackend(path)), own
        return optuna.storages.RDBStorage(url), own
    except UserError:
        raise
    except Exception as e:  # a malformed URL, a missing database driver, an unreachable server
        raise UserError(f"--storage {url}: Optuna cannot open it ({type(e).__name__}: {str(e).splitlines()[0]}); "
                        f"give sqlite:///PATH, an RDB URL or journal:PATH") from None


def identity(defence: str, search: Preset) -> dict[str, Any]:
    """What a study is of: a study of another defence, setting, split or space is refused, not mixed."""
    return {"defence": defence, "setting": search.name, "epsilon": search.base.attack.epsilon,
            "search_replicates": [list(r) for r in search.replicates()], "space": SPACE_VERSION}


def open_study(defence: str, search: Preset, storage: Any) -> Any:
    """The study of this defence (created, or loaded when it exists), its sampler seeded by the number of its
    trials (reproducible, and a resumed study does not redraw its first points)."""
    optuna = import_optuna()
    name = f"tune_{defence}_{search.name}"
    try:
        existing = optuna.load_study(study_name=name, storage=storage).trials
    except KeyError:
        existing = []
    sampler = optuna.samplers.TPESampler(seed=SEED + len(existing))
    study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, load_if_exists=True,
                                directions=["maximize", "minimize"])
    want = identity(defence, search)
    have = study.user_attrs.get("identity")
    if have is None:
        study.set_user_attr("identity", want)
        study.enqueue_trial(authors_params())
    elif have != want:
        diff = ", ".join(f"{k}: {have.get(k)!r} -> {v!r}" for k, v in want.items() if have.get(k) != v)
        raise UserError(f"the study {name!r} in this storage is of another search ({diff}); choose another --out "
                        f"or --storage")
    return study


def counted(trial: Any) -> bool:
    """A trial that answered: complete, or failed with its reason (a diverged run); an interrupted one is not."""
    return trial.state.name == "COMPLETE" or (trial.state.name == "FAIL" and "fail_reason" in trial.user_attrs)


def take_up_interrupted(study: Any, storage: Any, own: bool) -> int:
    """Enqueue again the settings of interrupted trials (Ctrl-C, a crash; in this folder's own file also those a
    killed process left running, which are marked failed) that no later trial answered; returns how many."""
    trials = study.get_trials(deepcopy=False)
    if own:
        for t in trials:
            if t.state.name == "RUNNING":
                storage.set_trial_state_values(t._trial_id, state=import_optuna().trial.TrialState.FAIL)
        trials = study.get_trials(deepcopy=False)
    answered = [t.params for t in trials if counted(t) or t.state.name == "WAITING"]
    again = []
    for t in trials:
        if t.state.name == "FAIL" and not counted(t) and t.params not in answered and t.params not in again:
            again.append(t.params)
    for params in again:
        study.enqueue_trial(params)
    return len(again)


class TrialFailed(Exception):
    """A trial whose runs failed (a diverged model, say): that trial is marked failed with the reason, the study
    goes on."""


Groups = dict[str, dict[Replicate, dict]]  # row label -> replicate -> summary
Values = Callable[[Groups, str, str], tuple[float, float]]  # (groups, row, control) -> (effect, cost), points


def trial_runs(trial: Any, search: Preset, folder: str, fresh: bool) -> tuple[Groups, dict[str, Any]]:
    """A trial's knobs drawn, then its two rows run (or reused) on the search replicates; (groups, changes)."""
    changes = attack_changes(sample(trial, search.base.stream.steps), search.base.attack.epsilon)
    runs = os.path.join(folder, "trials", changes_key(changes))
    trial.set_user_attr("runs", runs)
    trial.set_user_attr("changes", changes)
    preset = dataclasses.replace(with_overrides(search, changes), name=f"{search.name}/tuned")
    try:
        return run_presets([(preset, runs)], fresh, None)[0], changes
    except (UserError, RuntimeError) as e:  # a diverged model, a run that cannot be made: this trial's answer
        reason = (str(e).splitlines() or [type(e).__name__])[0][:300]
        trial.set_user_attr("fail_reason", reason)
        raise TrialFailed(reason) from e


def progress(defence: str, total: int, stealth_points: float, started: float) -> Callable[[Any, Any], None]:
    """One line per finished trial: its number, its two values, the best effect so far at a cost under
    ``stealth_points``; the study stops once ``total`` trials have answered (also those of other machines)."""
    def show(study: Any, trial: Any) -> None:
        trials = study.get_trials(deepcopy=False)
        stealthy = [t for t in trials if t.state.name == "COMPLETE" and t.values[1] < stealth_points]
        best = max(stealthy, key=lambda t: t.values[0], default=None)
        best_text = "none yet" if best is None else f"{best.values[0]:+.2f} pts (trial {best.number})"
        done = sum(counted(t) for t in trials)
        what = (f"effect {trial.values[0]:+.2f} pts, cost {trial.values[1]:.2f} pts" if trial.values
                else f"failed: {trial.user_attrs.get('fail_reason', 'interrupted')}")
        print(f"tune {defence}: trial {trial.number} ({done}/{total}, {time.time() - started:.0f} s): {what}; best "
              f"effect at cost < {stealth_points:g} pts: {best_text}", flush=True)
        if done >= total:
            study.stop()
    return show


def search_burn_ins(search: Preset, fresh: bool) -> None:
    """The search replicates' burn-ins, trained when missing (before the first trial, so that a setup problem
    stops the search with one line instead of failing every trial)."""
    epochs = sorted({search.online_epoch, search.memorized_epoch})
    run_sweep([(cfg, epochs) for cfg in map(search.burn_in_for, search.burn_in_seeds)], [], fresh)


def run_search(defence: str, search: Preset, folder: str, trials: int, storage_url: str | None, fresh: bool,
               values: Values, stealth_points: float) -> list[dict]:
    """The study (created or resumed) run until ``trials`` trials have answered (SPEC "The tuned attacker"); every
    answered trial as a row."""
    ensure_dir(folder)
    storage, own = open_storage(storage_url, folder)
    search_burn_ins(search, fresh)
    where = storage_url or os.path.join(folder, "study.db")
    with storage_errors(where):
        study = open_study(defence, search, storage)
        taken = take_up_interrupted(study, storage, own)
        done = sum(counted(t) for t in study.get_trials(deepcopy=False))
        print(f"tune {defence}: {done} of {trials} trials done ({taken} interrupted one(s) taken up again), study "
              f"in {where}", flush=True)
        row, control = label_of(search, defence), label_of(search, CONTROL)

        def objective(trial: Any) -> tuple[float, float]:
            groups, _ = trial_runs(trial, search, folder, fresh)
            effect, cost = values(groups, row, control)
            if not (math.isfinite(effect) and math.isfinite(cost)):
                trial.set_user_attr("fail_reason", "no paired replicate measured")
                raise TrialFailed("no paired replicate measured")
            return effect, cost

        if trials > done:
            study.optimize(objective, n_trials=trials - done, catch=(TrialFailed,),
                           callbacks=[progress(defence, trials, stealth_points, time.time())])
        return trial_rows(study)


def storage_failure(e: BaseException | None) -> str | None:
    """Why the study's storage refused a write (an Optuna StorageInternalError in the exception's chain: a full
    disk, a lost database server), in its driver's words; None for any other failure."""
    while e is not None:
        if isinstance(e, import_optuna().exceptions.StorageInternalError):
            cause = e.__cause__
            return str(getattr(cause, "orig", None) or cause or e).splitlines()[0]
        e = e.__cause__ or e.__context__
    return None


@contextlib.contextmanager
def storage_errors(where: str) -> Iterator[None]:
    """A write the study's storage refuses is one UserError saying what to do; the trials that answered are in it,
    and the one that was running is taken up again by the same command."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        reason = storage_failure(e)
        if reason is None:
            raise
        if "full" in reason:
            raise UserError(disk_full_message(where, reason)) from None
        raise UserError(f"the study's storage {where!r} refused a write ({reason}); fix it and run the same command "
                        f"again (the trials that answered are kept, the one that was running is taken up "
                        f"again)") from None


def trial_rows(study: Any) -> list[dict]:
    """Every answered trial: number, knobs, changes, values, Pareto flag, authors' flag, runs folder, reason, wall
    seconds."""
    pareto = {t.number for t in study.best_trials}
    authors = authors_params()
    rows = []
    for t in study.get_trials(deepcopy=False):
        if not counted(t):
            continue
        effect, cost = t.values if t.values else (None, None)
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        rows.append({"number": t.number, "state": t.state.name, "params": dict(t.params), "seconds": seconds,
                     "changes": t.user_attrs.get("changes", {}), "effect": effect, "cost": cost,
                     "pareto": t.number in pareto, "authors": t.params == authors, "runs": t.user_attrs.get("runs", ""),
                     "fail_reason": t.user_attrs.get("fail_reason", "")})
    return rows


def run_confirmation(confirm: Preset, folder: str, chosen: list[tuple[str, dict[str, Any]]], fresh: bool,
                     elsewhere: tuple[str, ...] = ()) -> dict[str, Groups]:
    """The authors' attacker and each chosen (name, changes) on the held-out replicates, in
    <folder>/confirm/<authors|key>; finished runs of the same configuration in ``elsewhere`` (the cpu preset's
    results) are copied, not rerun. name -> groups."""
    out = {}
    for name, changes in [("authors", {}), *chosen]:
        preset = dataclasses.replace(with_overrides(confirm, changes), name=f"{confirm.name}/confirm")
        sub = os.path.join(folder, "confirm", changes_key(changes) if changes else "authors")
        with FolderLock(ensure_dir(sub)):
            reuse_across_steps([(preset, sub)], elsewhere)
        out[name] = run_presets([(preset, sub)], fresh, None)[0]
    return out
