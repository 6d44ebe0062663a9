"""One command reproduces the tables: burn-ins (if missing), then ST / AT / DSC under attack, with controls,
on paired replicates (burn-in seed x online seed); the papers' claims with 95 % intervals; a check against the
published runs.

  python reproduce.py                          # cpu: the claims' rows, 5 burn-ins x 2 seeds, 2 CPU cores, < 20 min
  python reproduce.py --preset cpu_full        # every row of the table on the same replicates
  python reproduce.py --preset paper --smoke   # every stage of the paper preset, tiny: prove a new GPU machine
  python reproduce.py --preset paper           # CIFAR-10, ResNet-18, the papers' constants (a GPU)
  python reproduce.py --preset capacity        # the first cpu protocol for the CNN and ResNet-18 at widths 16, 32
  python reproduce.py --preset federated       # the federated attack per aggregator, 3 burn-ins, 2 CPU cores
  python reproduce.py --ablation bridge        # the cpu preset towards the authors' setting, step by step
  python reproduce.py --ablation my.toml       # your own ablation (utils/sweep/ablation.py: the file's format)
  python reproduce.py --tune ST                # the strongest attacker against ST: a search, then held-out runs

Writes results/<preset>/: claims.md/.csv, table.md/.csv, detectors.md/.csv, md_curve.md/.csv, the figures,
preset.json, fingerprint.json, check.md (and check.json), and one folder per run under
runs/<row>[_b<burn-in>]_s<seed>/ (config.json, steps.jsonl, md.jsonl, detectors.jsonl, summary.json); the capacity
preset writes one such folder per model and results/capacity/ladder.md/.csv; an ablation writes one such folder per
step and results/<ablation>/ablation.md/.csv/.json/.png (every claim at every step); --tune DEFENCE writes
results/tuned/<DEFENCE>/: study.db (the Optuna study), front.md/.csv, table.md/.csv/.json, fronts.png, and
results/tuned/table.md, fronts.png over the defences tuned so far (docs/TUNING.md). Finished runs and burn-ins of the
same configuration are reused, so an interrupted reproduction continues where it stopped; those of another
configuration are refused (--fresh replaces them). The check's verdict never changes the exit status.
"""
from __future__ import annotations

from utils.errors import quiet_start

if __name__ == "__main__":
    quiet_start()  # before torch is imported: Ctrl-C or SIGTERM while starting prints one line

import argparse
import os
import time
from typing import Sequence

from utils.core.checkpoint import load_checkpoint, model_from_checkpoint
from utils.core.data import get_data
from utils.core.train import get_device, use_cpu_kernels
from utils.errors import UserError, run_cli
from utils.io.results import FolderLock, ensure_dir, read_json, read_jsonl, write_json
from utils.report.reproduction import run_folders, write_reports
from utils.report.ablation import STEALTH_POINTS, write_ablation_reports
from utils.report.federated import write_federated_reports
from utils.report.tables import LADDER as LADDER_COLUMNS
from utils.report.tables import ladder_rows, write_table
from utils.report.timing import online_step_costs
from utils.report.tuned import chosen_points, trial_values, write_defence_reports, write_overview
from utils.sweep.on_ray import RayOptions, add_ray_flags, ray_options
from utils.sweep.overrides import add_override_flags, overrides_from_args, with_overrides
from utils.sweep.presets import LADDER, PRESETS, Preset, capacity_rung, smoke
from utils.sweep.ablation import load_ablation, run_ablation
from utils.sweep.federated import federated_preset, federated_smoke, run_federated_preset
from utils.sweep.runs import run_presets
from utils.sweep import tune

PUBLISHED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "docs", "results")  # the published runs


def build_parser() -> argparse.ArgumentParser:
    """Every flag of reproduce.py (the overrides generated from the fields they set)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", choices=[*PRESETS, "capacity", "federated"])
    p.add_argument("--smoke", action="store_true", help="every stage with tiny sizes (a burn-in of two epochs on "
                   "256 samples, two online steps, one seed), on the preset's dataset, model and device")
    p.add_argument("--ablation", default=None, metavar="NAME|FILE", help="run an ablation: a shipped one by name "
                   "(bridge) or a TOML file of steps (each a set of --set changes, cumulative or one at a time) on "
                   "the base preset's paired replicates; replaces --preset")
    p.add_argument("--rungs", nargs="+", default=list(LADDER), choices=list(LADDER), help="capacity: the models")
    p.add_argument("--out", default=None, metavar="DIR", help="results folder (default results/<preset>[_smoke])")
    p.add_argument("--fresh", action="store_true", help="replace finished runs and burn-ins of another configuration")
    p.add_argument("--published", default=None, metavar="DIR", help="the published runs to check this machine's "
                   "against (their fingerprint.json; default docs/results/<preset>)")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks")
    add_override_flags(p)
    add_ray_flags(p)
    add_tune_flags(p)
    return p


def add_tune_flags(p: argparse.ArgumentParser) -> None:
    """--tune and its flags (docs/TUNING.md)."""
    g = p.add_argument_group("the tuned attacker (pip install -e \".[tune]\"; docs/TUNING.md)")
    g.add_argument("--tune", default=None, metavar="DEFENCE", help=f"search the attacker's knobs against a defence "
                   f"({', '.join(tune.DEFENCES)}; MD is judged on ST's runs) with Optuna on the search replicates, "
                   f"then confirm the front's chosen points on held-out replicates; replaces --preset")
    g.add_argument("--trials", type=int, default=None, metavar="N", help=f"--tune: the study's trials in all (a "
                   f"resumed study runs the missing ones; default, 11-22 minutes on 2 cores: "
                   f"{', '.join(f'{d} {n}' for d, n in tune.DEFAULT_TRIALS.items())}; --smoke {tune.SMOKE_TRIALS})")
    g.add_argument("--storage", default=None, metavar="URL", help="--tune: the Optuna storage (default: "
                   "sqlite:///<--out>/<DEFENCE>/study.db); an RDB URL or journal:FILE to share one study between "
                   "machines")


TUNE_TAKES = {"burn_in.dataroot", "run.dataroot"}  # the overrides --tune accepts: where the data lie, no setting


def check_tune_args(args: argparse.Namespace) -> None:
    """--tune takes --trials, --storage, --smoke, --out, --fresh, --dataroot; --trials and --storage need it."""
    if args.tune is None:
        for flag, value in (("--trials", args.trials), ("--storage", args.storage)):
            if value is not None:
                raise UserError(f"{flag} belongs to --tune DEFENCE (the tuned attacker); add --tune or drop {flag}")
        return
    tune.defended_row(PRESETS["cpu"](), args.tune)
    if args.trials is not None and args.trials < 1:
        raise UserError(f"--trials must be at least 1, got {args.trials}")
    wrong = [flag for flag, given in (("--ablation", args.ablation is not None), ("--preset", args.preset != "cpu"),
                                      ("--published", args.published is not None), ("--ray", args.ray is not None),
                                      ("--rungs", args.rungs != list(LADDER))) if given]
    wrong += [f"the override of {path}" for path in sorted(set(overrides_from_args(args)) - TUNE_TAKES)]
    if wrong:
        raise UserError(f"--tune searches the attacker of the cpu preset and takes --trials, --storage, --smoke, "
                        f"--out, --fresh and --dataroot only; drop {', '.join(wrong)}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    check_tune_args(args)
    if args.ablation is not None and args.preset != "cpu":
        raise UserError("--ablation names its own base preset (its file's base = ...); drop --preset")
    if args.published is not None and args.preset in ("capacity", "federated"):
        raise UserError(f"--published checks the online presets' runs; --preset {args.preset} has no check")
    if args.published is not None and args.ablation is not None and not os.path.isdir(args.published):
        raise UserError(f"--published {args.published}: no such folder (give the folder of an ablation's results, "
                        f"e.g. docs/results/bridge)")
    if args.published is not None and args.ablation is None and not os.path.isfile(
            os.path.join(args.published, "fingerprint.json")):
        raise UserError(f"--published {args.published}: no fingerprint.json there (give the folder of a "
                        f"reproduction, e.g. docs/results/{args.preset} or results/{args.preset})")
    return args


def rung_costs(preset: Preset, out: str) -> dict:
    """The capacity rung's parameters, peak memory and crafting-to-floor ratio (kept in costs.json)."""
    path = os.path.join(out, "costs.json")
    if os.path.isfile(path):
        return read_json(path)
    device = get_device(preset.base.run.device)
    model, _ = model_from_checkpoint(load_checkpoint(preset.checkpoint(preset.online_epoch, preset.burn_in_seeds[0])))
    data = get_data(preset.burn_in.dataset, preset.base.run.dataroot, device, download=preset.base.run.download)
    b = preset.base
    costs = online_step_costs(model.to(device), data.train, data.test, batch_size=b.stream.batch_size,
                              val_size=b.attack.val_size, eval_subset=b.eval.eval_subset, epsilon=b.attack.epsilon,
                              num_steps=b.attack.num_steps)
    write_json(path, costs)
    return costs


def run_capacity(args: argparse.Namespace, overrides: dict, ray: RayOptions | None) -> str:
    """Every rung of the capacity ladder (on Ray: all at once), then the ladder's table."""
    root = args.out or os.path.join("results", "capacity" + ("_smoke" if args.smoke else ""))
    presets = []
    for name in args.rungs:
        preset = with_overrides(capacity_rung(name), overrides)
        presets.append((smoke(preset) if args.smoke else preset, os.path.join(root, name)))
    rows = []
    for (preset, out), groups, name in zip(presets, run_presets(presets, args.fresh, ray), args.rungs):
        write_reports(preset, out, groups, os.path.join(PUBLISHED, preset.name))
        steps = {label: [s for run in run_folders(preset, out, label) if os.path.exists(f"{run}/steps.jsonl")
                         for s in read_jsonl(f"{run}/steps.jsonl")] for label in groups}
        lists = {label: list(reps.values()) for label, reps in groups.items()}
        rows += ladder_rows(name, rung_costs(preset, out), lists, steps)
    return write_table(rows, LADDER_COLUMNS, root, "ladder", f"Capacity ladder: the cpu protocol along model "
                                                               f"capacity ({time.strftime('%Y-%m-%d')})")


def run_federated_reproduction(args: argparse.Namespace, overrides: dict, ray: RayOptions | None) -> str:
    """The federated preset (SPEC "Federated learning") in this process; its tables, claims and figure."""
    if overrides or ray is not None:
        raise UserError("--preset federated takes --out, --fresh and --smoke only (no overrides, no --ray)")
    preset = federated_smoke(federated_preset()) if args.smoke else federated_preset()
    use_cpu_kernels(preset.base.run.kernels)  # before this process's first computation
    out = args.out or os.path.join("results", preset.name)
    return write_federated_reports(preset, out, run_federated_preset(preset, out, args.fresh))


def run_ablation_reproduction(args: argparse.Namespace, overrides: dict, ray: RayOptions | None) -> str:
    """An ablation: every step as a preset on the same replicates, its reports, the ablation table and figure."""
    ab = load_ablation(args.ablation)
    name = ab.name + ("_smoke" if args.smoke else "")
    use_cpu_kernels(PRESETS[ab.base]().base.run.kernels)  # before this process's first computation
    out = args.out or os.path.join("results", name)
    steps, groups = run_ablation(ab, out, overrides, args.smoke, args.fresh, ray)
    return write_ablation_reports(ab, steps, groups, args.published or os.path.join(PUBLISHED, name), out)


def run_tuning(args: argparse.Namespace, overrides: dict) -> str:
    """--tune DEFENCE: the study (created or resumed), the front's chosen points run on the held-out replicates next
    to the authors' attacker, the defence's reports, then the overview of every defence tuned so far."""
    tune.import_optuna()  # before anything is written
    search, confirm = tune.presets(args.tune, args.smoke, overrides)
    use_cpu_kernels(search.base.run.kernels)  # before this process's first computation
    root = args.out or os.path.join("results", "tuned" + ("_smoke" if args.smoke else ""))
    folder = os.path.join(root, args.tune)
    trials = args.trials or (tune.SMOKE_TRIALS if args.smoke else tune.DEFAULT_TRIALS[args.tune])
    if args.storage is not None:
        tune.open_storage(args.storage, folder)  # a URL Optuna cannot open: one line, before anything is written
    with FolderLock(ensure_dir(folder)):
        found = tune.run_search(args.tune, search, folder, trials, args.storage, args.fresh, trial_values,
                                STEALTH_POINTS)
        chosen = chosen_points(found)
        confirmed = tune.run_confirmation(confirm, folder, [(name, t["changes"]) for name, t in chosen], args.fresh,
                                          (os.path.join("results", confirm.name),))
        row, control = tune.label_of(confirm, args.tune), tune.label_of(confirm, tune.CONTROL)
        split = {"search": search.replicates(), "confirm": confirm.replicates()}
        text = write_defence_reports(args.tune, folder, found, chosen, confirmed, row, control, split)
    write_overview(root)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = overrides_from_args(args)
    started = time.time()
    ray = ray_options(args)
    if args.tune is not None:
        text = run_tuning(args, overrides)
    elif args.ablation is not None:
        text = run_ablation_reproduction(args, overrides, ray)
    elif args.preset == "federated":
        text = run_federated_reproduction(args, overrides, ray)
    elif args.preset == "capacity":
        text = run_capacity(args, overrides, ray)
    else:
        preset = with_overrides(PRESETS[args.preset](), overrides)
        preset = smoke(preset) if args.smoke else preset
        use_cpu_kernels(preset.base.run.kernels)  # before this process's first computation
        out = args.out or os.path.join("results", preset.name)
        groups = run_presets([(preset, out)], args.fresh, ray)[0]
        text = write_reports(preset, out, groups, args.published or os.path.join(PUBLISHED, preset.name))
    print("\n" + text)
    print(f"reproduction took {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    run_cli(main)
