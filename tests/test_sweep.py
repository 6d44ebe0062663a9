"""What decides whether a finished run is reused (utils/sweep.py), and the thread count that CPU results depend on
(the cpu preset pins it, so a machine with more cores reproduces docs/results/cpu)."""
from __future__ import annotations

import os

import pytest
import torch

from utils.sweep.overrides import with_overrides
from utils.sweep.presets import CPU_THREADS, LADDER, capacity_rung, cpu_full_preset, cpu_preset, paper_preset
from utils.sweep.reuse import config_diff
from utils.core.train import set_threads


def test_config_diff_resolves_paths_and_sees_the_thread_count(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    saved = {"run": {"out": "results/cpu/runs/ST_s20", "threads": 2}, "measure": {"md_curve": ["ck/epoch1.pth"]}}
    same = {"run": {"out": str(tmp_path / "results/cpu/runs/ST_s20"), "threads": 2},
            "measure": {"md_curve": (str(tmp_path / "ck/epoch1.pth"),)}}
    assert config_diff(saved, same) == []  # a sequential run's relative paths are a Ray task's absolute ones
    assert config_diff(saved, {**same, "run": {**same["run"], "threads": 1}}) == ["run.threads: 2 -> 1"]
    other = {**same, "measure": {"md_curve": (str(tmp_path / "ck/epoch2.pth"),)}}
    assert [d.split(":")[0] for d in config_diff(saved, other)] == ["measure.md_curve"]
    assert config_diff({"run": {"out": "a"}}, {"run": {"out": None}}) == [f"run.out: {os.path.abspath('a')!r} -> None"]


def test_the_cpu_presets_pin_the_thread_count_of_their_burn_in_and_every_run():
    presets = [cpu_preset(), *(capacity_rung(name) for name in LADDER)]
    for preset in presets:
        assert preset.burn_in.threads == CPU_THREADS
        assert {preset.run_config(row, rep, "out").run.threads for row in preset.rows()
                for rep in preset.replicates()} == {CPU_THREADS}
    paper = paper_preset()  # a GPU run: torch's default
    assert paper.burn_in.threads == 0 and paper.base.run.threads == 0
    four = with_overrides(cpu_preset(), {"threads": 4})
    assert four.burn_in.threads == 4 and four.base.run.threads == 4


def test_set_threads_sets_torchs_count_and_zero_leaves_it():
    before = torch.get_num_threads()
    try:
        set_threads(0)
        assert torch.get_num_threads() == before
        set_threads(before + 1)
        assert torch.get_num_threads() == before + 1
    finally:
        torch.set_num_threads(before)


def test_the_cpu_preset_runs_the_claims_rows_on_ten_paired_replicates_with_pinned_kernels():
    """Every row on every (burn-in, seed) replicate, each burn-in its own folder and seed; the full preset adds
    the other rows on the same replicates and burn-ins."""
    preset, full = cpu_preset(), cpu_full_preset()
    reps = preset.replicates()
    assert len(reps) >= 10 and len({b for b, _ in reps}) >= 5
    assert {b: preset.burn_in_for(b).seed for b, _ in reps} == {b: b for b, _ in reps}
    assert len({preset.burn_in_for(b).outf for b, _ in reps}) == len(preset.burn_in_seeds)
    assert {r.slug for r in preset.rows()} < {r.slug for r in full.rows()}
    assert [preset.burn_in_for(b) for b in preset.burn_in_seeds] == [full.burn_in_for(b) for b in full.burn_in_seeds]
    for row in preset.rows():
        cfgs = [preset.run_config(row, rep, "out") for rep in reps]
        assert {(c.run.resume, c.run.seed) for c in cfgs} == {(preset.burn_in_for(b).outf, s) for b, s in reps}
        assert {c.run.kernels for c in cfgs} == {preset.burn_in.kernels} == {"portable"}


def test_a_burn_in_written_before_the_memory_format_setting_counts_as_contiguous(tiny_run, small_data, tmp_path):
    """A checkpoint whose flags predate --memory_format was trained contiguous: reused for a contiguous burn-in,
    refused (as another configuration) for the default channels_last one."""
    import dataclasses

    from conftest import tiny_burn_in_config
    from utils.core.checkpoint import load_checkpoint, save_checkpoint, model_from_checkpoint
    from utils.errors import UserError
    from utils.sweep.reuse import burn_in_matches, refuse_other_burn_in

    ckpt = load_checkpoint(os.path.join(tiny_run, "epoch1.pth"))
    args = {k: v for k, v in ckpt["args"].items() if k != "memory_format"}
    model, spec = model_from_checkpoint(ckpt)
    old = str(tmp_path / "old")
    os.makedirs(old)
    save_checkpoint(os.path.join(old, "epoch1.pth"), model, spec, epoch=1, err_cls=ckpt["err_cls"], args=args,
                    run_id=ckpt["run_id"])
    cfg = dataclasses.replace(tiny_burn_in_config(small_data, old), seed=args["seed"])
    assert cfg.memory_format == "channels_last"
    assert burn_in_matches(cfg, os.path.join(old, "epoch1.pth")) == ["--memory_format 'contiguous' -> 'channels_last'"]
    assert burn_in_matches(dataclasses.replace(cfg, memory_format="contiguous"), os.path.join(old, "epoch1.pth")) == []
    with pytest.raises(UserError, match="another configuration.*memory_format"):
        refuse_other_burn_in(cfg, fresh=False)
