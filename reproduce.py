"""One command reproduces the tables: burn-in (if missing), then ST / AT / DSC under attack, with controls.

  python reproduce.py                          # cpu preset: real Fashion-MNIST, small CNN, 3 seeds, 2 CPU cores
  python reproduce.py --preset paper --smoke   # every stage of the paper preset, tiny: prove a new GPU machine
  python reproduce.py --preset paper           # CIFAR-10, ResNet-18, the papers' constants (a GPU)
  python reproduce.py --preset capacity        # the cpu protocol for the CNN and ResNet-18 at widths 16, 32

Writes results/<preset>/: table.md/.csv, detectors.md/.csv, md_curve.md/.csv, accuracy.png, md_over_stream.png,
md_histogram.png, detectors_roc.png, md_curve.png, preset.json, and one folder per run under
runs/<row>_s<seed>/ (config.json, steps.jsonl, md.jsonl, detectors.jsonl, summary.json); the capacity preset
writes one such folder per model and results/capacity/ladder.md/.csv. Finished runs and burn-ins of the same
configuration are reused, so an interrupted reproduction continues where it stopped; those of another
configuration are refused (--fresh replaces them).
"""
from __future__ import annotations

from utils.errors import quiet_start

if __name__ == "__main__":
    quiet_start()  # before torch is imported: Ctrl-C or SIGTERM while starting prints one line

import argparse
import contextlib
import dataclasses
import os
import time
from typing import Sequence

from utils.core.checkpoint import load_checkpoint, model_from_checkpoint
from utils.core.data import get_data
from utils.core.train import get_device
from utils.errors import run_cli
from utils.io.results import FolderLock, ensure_dir, read_json, read_jsonl, write_json
from utils.report import plots
from utils.report.tables import LADDER as LADDER_COLUMNS
from utils.report.tables import MAIN, MD_CURVE, detector_rows, ladder_rows, md_curve_rows, table_rows, write_table
from utils.report.timing import online_step_costs
from utils.sweep.on_ray import RayOptions, add_ray_flags, ray_options
from utils.sweep.overrides import add_override_flags, overrides_from_args, with_overrides
from utils.sweep.presets import LADDER, PRESETS, Preset, capacity_rung, smoke
from utils.sweep.reuse import refuse_other_burn_in
from utils.sweep.runs import run_sweep


def build_parser() -> argparse.ArgumentParser:
    """Every flag of reproduce.py (the overrides generated from the fields they set)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", choices=[*PRESETS, "capacity"])
    p.add_argument("--smoke", action="store_true", help="every stage with tiny sizes (a burn-in of two epochs on "
                   "256 samples, two online steps, one seed), on the preset's dataset, model and device")
    p.add_argument("--rungs", nargs="+", default=list(LADDER), choices=list(LADDER), help="capacity: the models")
    p.add_argument("--out", default=None, help="results folder (default results/<preset>[_smoke])")
    p.add_argument("--fresh", action="store_true", help="replace finished runs and burn-ins of another configuration")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks")
    add_override_flags(p)
    add_ray_flags(p)
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def title(preset: Preset) -> str:
    b, s = preset.base, preset.burn_in
    stream = "the authors' (reused first batch)" if b.stream.reuse_first_batch else "distinct batches"
    stop = (f"stop at error > {b.eval.threshold}" if b.eval.threshold is not None
            else f"stop at burn-in error + {b.eval.threshold_delta}")
    return (f"{preset.name} preset: {s.dataset}, {s.arch}{f' width {s.width}' if s.width else ''}, stream "
            f"{stream}, ε {b.attack.epsilon}, online lr {b.learner.lr}, at most {b.stream.steps} batches, {stop}, "
            f"seeds {list(preset.seeds)} ({time.strftime('%Y-%m-%d')})")


def run_presets(presets: list[tuple[Preset, str]], fresh: bool, ray: RayOptions | None) -> list[dict[str, list]]:
    """Every preset's burn-in and runs, into its results folder; per preset {row label: [summaries]}."""
    for preset, _ in presets:
        refuse_other_burn_in(preset.burn_in, fresh)  # before anything is written
    runs = [(row.label, preset.run_config(row, seed, out), i) for i, (preset, out) in enumerate(presets)
            for seed in preset.seeds for row in preset.rows()]
    with contextlib.ExitStack() as stack:
        for _, out in presets:
            stack.enter_context(FolderLock(ensure_dir(out)))
        summaries = run_sweep([(p.burn_in, sorted({p.online_epoch, p.memorized_epoch})) for p, _ in presets],
                              [(cfg, i) for _, cfg, i in runs], fresh, ray)
        groups: list[dict[str, list]] = [{} for _ in presets]
        for (label, _, i), summary in zip(runs, summaries):
            groups[i].setdefault(label, []).append(summary)
        for preset, out in presets:
            write_json(os.path.join(out, "preset.json"), dataclasses.asdict(preset))
    return groups


def run_folders(preset: Preset, out: str, label: str) -> list[str]:
    """The run folders of one row, a seed each."""
    row = next(r for r in preset.rows() if r.label == label)
    return [os.path.join(out, "runs", f"{row.slug}_s{seed}") for seed in preset.seeds]


def write_reports(preset: Preset, out: str, groups: dict[str, list[dict]]) -> str:
    """The main table, the detectors' table, MD by the memorized epoch, and the figures; returns the text."""
    text = write_table(table_rows(groups), MAIN, out, "table", title(preset))
    adaptive = {k.split(", adaptive attacker ")[1]: v for k, v in groups.items() if k.startswith("ST, adaptive")}
    rows, headers = detector_rows(groups["ST"], adaptive)
    if rows:
        text += "\n" + write_table(rows, headers, out, "detectors", f"Detectors on the ST runs' samples ({preset.name})")
    curve = md_curve_rows(groups["ST"])
    if curve:
        text += "\n" + write_table(curve, MD_CURVE, out, "md_curve", f"MD by the memorized model's epoch ({preset.name})")
    plt = plots.pyplot()
    if plt is not None:
        first = {label: run_folders(preset, out, label)[0] for label in groups if not label.startswith("ST (")}
        firsts = {k: v for k, v in first.items() if "adaptive" not in k}
        summaries = {k: groups[k][0] for k in firsts}
        plots.plot_accuracy(plt, firsts, summaries, os.path.join(out, "accuracy.png"))
        with_md = {k: v for k, v in firsts.items() if os.path.exists(os.path.join(v, "md.jsonl"))}
        if with_md:
            plots.plot_md_over_stream(plt, with_md, os.path.join(out, "md_over_stream.png"))
            plots.plot_md_histogram(plt, "ST", first["ST"], os.path.join(out, "md_histogram.png"))
        plots.plot_roc(plt, run_folders(preset, out, "ST"), os.path.join(out, "detectors_roc.png"))
        plots.plot_md_curve(plt, curve, os.path.join(out, "md_curve.png"))
    return text


def rung_costs(preset: Preset, out: str) -> dict:
    """The capacity rung's parameters, peak memory and crafting-to-floor ratio (kept in costs.json)."""
    path = os.path.join(out, "costs.json")
    if os.path.isfile(path):
        return read_json(path)
    device = get_device(preset.base.run.device)
    model, _ = model_from_checkpoint(load_checkpoint(preset.checkpoint(preset.online_epoch)))
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
        write_reports(preset, out, groups)
        steps = {label: [s for run in run_folders(preset, out, label) if os.path.exists(f"{run}/steps.jsonl")
                         for s in read_jsonl(f"{run}/steps.jsonl")] for label in groups}
        rows += ladder_rows(name, rung_costs(preset, out), groups, steps)
    return write_table(rows, LADDER_COLUMNS, root, "ladder", f"Capacity ladder: the cpu protocol along model "
                                                               f"capacity ({time.strftime('%Y-%m-%d')})")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = overrides_from_args(args)
    started = time.time()
    ray = ray_options(args)
    if args.preset == "capacity":
        text = run_capacity(args, overrides, ray)
    else:
        preset = with_overrides(PRESETS[args.preset](), overrides)
        preset = smoke(preset) if args.smoke else preset
        out = args.out or os.path.join("results", preset.name)
        text = write_reports(preset, out, run_presets([(preset, out)], args.fresh, ray)[0])
    print("\n" + text)
    print(f"reproduction took {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    run_cli(main)
