"""The split of the global batch (fmnist_dist.scaling): weak and strong scaling, simulated ranks."""
from __future__ import annotations

import pytest

from fmnist_dist.errors import ConfigError
from fmnist_dist.scaling import plan_batches


def train(batch=256, global_batch=None, simulate=None) -> dict:
    return {"batch_size": batch, "global_batch_size": global_batch, "simulate_world_size": simulate}


def test_weak_scaling_takes_the_batch_per_rank_and_scales_the_rate_with_the_ranks():
    plan = plan_batches(train(), 4)
    assert (plan.mode, plan.world, plan.global_batch, plan.per_rank, plan.per_process) == ("weak", 4, 1024, 256, 256)
    assert plan.lr_factor == 4 and plan.ranks_per_process == 1


def test_simulated_ranks_ride_in_each_process_and_the_rate_sees_them():
    plan = plan_batches(train(simulate=32), 2)
    assert (plan.world, plan.global_batch, plan.per_rank, plan.per_process) == (32, 8192, 256, 4096)
    assert plan.lr_factor == 32 and plan.ranks_per_process == 16
    assert plan.describe()["simulated"] is True


@pytest.mark.parametrize("processes", [1, 2, 4, 8, 32])
def test_strong_scaling_keeps_the_global_batch_and_the_rate_whatever_the_ranks(processes):
    plan = plan_batches(train(global_batch=8192), processes)
    assert plan.global_batch == 8192 and plan.per_rank * processes == 8192
    assert plan.lr_factor == 32                            # 8192 / train.batch_size: the same on any rank count


def test_a_global_batch_that_does_not_divide_is_an_error_naming_the_key_and_the_choices():
    with pytest.raises(ConfigError) as e:
        plan_batches(train(global_batch=8192), 3)
    assert "train.global_batch_size=8192" in str(e.value) and "8190 or 8193" in str(e.value)


def test_a_simulated_world_that_is_not_a_multiple_of_the_processes_is_an_error():
    with pytest.raises(ConfigError) as e:
        plan_batches(train(simulate=3), 2)
    assert "train.simulate_world_size=3" in str(e.value) and "2 or 4" in str(e.value)
    with pytest.raises(ConfigError):
        plan_batches(train(simulate=1), 2)                  # fewer than the processes


# ---------------------------------------------------------------------------------------------
# The accuracy basis and the time-to-accuracy arithmetic (reporting.basis, projection)

from fmnist_dist.reporting import basis as basis_mod  # noqa: E402
from fmnist_dist.reporting.projection import add_time_to_accuracy  # noqa: E402


def point(global_batch: int, accuracies: list[float], reached: list[int | None], epochs: int = 18) -> dict:
    """A scan point whose seeds' validation accuracy crosses 0.92 at the given epochs (None: never)."""
    curves = [[0.95 if r is not None and e >= r else 0.90 for e in range(1, epochs + 1)] for r in reached]
    return {"recipe": "lean", "recipe_key": "k", "lr_scaling": "linear", "warmup_epochs": 0.3,
            "global_batch": global_batch, "epochs": epochs,
            "seeds": list(range(1, len(accuracies) + 1)), "test_accuracy": accuracies, "val_curves": curves}


POINTS = [point(512, [0.93, 0.93, 0.93], [8, 10, 9]), point(2048, [0.91, 0.91, 0.91], [14, 16, 15]),
          point(8192, [0.85, 0.86, 0.84], [None, None, None])]


def test_the_basis_interpolates_in_log2_of_the_global_batch_and_takes_the_slowest_seed():
    e = basis_mod.expect(POINTS, 1024, 0.92)
    assert e["within"] and e["basis"] == [512, 2048]
    assert e["accuracy_mean"] == pytest.approx(0.92)        # halfway between 512 and 2048 in log2
    assert e["epochs_to_target"] == 13                        # ceil(10 + 0.5 x (16 - 10))
    assert basis_mod.expect(POINTS, 2048, 0.92)["epochs_to_target"] == 16
    assert basis_mod.expect(POINTS, 4096, 0.92)["epochs_to_target"] is None   # 8192 never reaches it


def test_outside_the_basis_nothing_is_claimed_and_a_launch_is_warned():
    e = basis_mod.expect(POINTS, 16384, 0.92)
    assert not e["within"] and e["accuracy_mean"] is None and e["epochs_to_target"] is None
    line = basis_mod.warning(POINTS, 16384, "lean")
    assert "global batch 16384 lies outside the measured accuracy basis (512–8192" in line and "85.00%" in line
    assert "below 92%" in basis_mod.warning(POINTS, 8192, "lean")
    assert basis_mod.warning(POINTS, 512, "lean") is None
    assert basis_mod.warning(POINTS, 256, "lean") is None     # below: the regime the recipes were tuned in
    assert "not measured" in basis_mod.launch_check(64)["note"]


def test_time_to_accuracy_is_epochs_times_seconds_per_epoch_and_names_where_more_nodes_stop_helping():
    rows = [{"nodes": n, "ranks": 2 * n, "epoch_s": 100.0 / n} for n in (1, 2, 4, 8, 16)]
    proj = {"base": {"batch": 256}, "rows": rows}
    add_time_to_accuracy(proj, {"points": POINTS, "recipe": "lean", "target": 0.92})
    by_nodes = {r["nodes"]: r for r in proj["rows"]}
    assert by_nodes[1]["global_batch"] == 512 and by_nodes[1]["time_to_target_s"] == pytest.approx(10 * 100.0)
    assert by_nodes[4]["global_batch"] == 2048 and by_nodes[4]["time_to_target_s"] == pytest.approx(16 * 25.0)
    assert by_nodes[8]["time_to_target_s"] is None                  # 4096: not reached in the basis
    assert by_nodes[16]["within_basis"] is True and by_nodes[16]["time_to_target_s"] is None
    assert proj["accuracy"]["fastest_nodes"] == 4
    assert "after 4 nodes" in proj["accuracy"]["lines"][-1]


def test_the_summary_says_the_split_and_the_warning():
    from fmnist_dist.reporting.render import summary_lines

    scaling = {**plan_batches(train(simulate=64), 1).describe(),
               "accuracy_basis": basis_mod.launch_check(16384)}
    report = {"run_id": "r", "status": "completed", "timing": {}, "results": {}, "epochs": [],
              "world": {"size": 1, "hosts": {"h": [0]}}, "environment": {},
              "data": {"batch_size_per_rank": 256, "global_batch_size": 16384, "scaling": scaling}}
    text = "\n".join(summary_lines(report))
    assert "global batch 16384 (256/rank, weak scaling, 64 ranks simulated on 1)" in text
    assert "warning: at global batch 16384 the lean recipe measured about 85.84% test accuracy" in text


def scan_report(global_batch: int, seed: int, scaling: dict) -> dict:
    return {"status": "completed", "environment": {"argv": ["train", "--config", "configs/lean.yaml"]},
            "config": {"train": {"seed": seed, "simulate_world_size": global_batch // 256, "lr": 0.001,
                                 "optimizer": "adam", "warmup_epochs": 0.3}},
            "data": {"global_batch_size": global_batch, "scaling": scaling},
            "epochs": [{"val_accuracy": 0.9}, {"val_accuracy": 0.91}], "results": {"test_accuracy": 0.9 + seed / 1000},
            "segments": [{"precision": "fp32"}]}


def test_a_scan_keeps_one_recipe_across_the_switch_to_the_large_batch_recipe():
    large = {"recipe": "large-batch", "optimizer": "lamb", "warmup_epochs": 5.0}
    loaded = [(f"r{g}-{s}", scan_report(g, s, large if g >= 4096 else {"recipe": "standard"}), None)
              for g in (2048, 8192) for s in (2, 1)]
    points = basis_mod.scan_points(loaded)
    assert [(p["global_batch"], p["scaling_recipe"], p["optimizer"], p["warmup_epochs"], p["seeds"]) for p in points] == [
        (2048, "standard", "adam", 0.3, [1, 2]), (8192, "large-batch", "lamb", 5.0, [1, 2])]
    assert len({p["recipe_key"] for p in points}) == 1          # what the user configured, whatever the job chose
    assert basis_mod.recipe_points({"points": points}) == points
    # the same batch scanned under both recipes is ambiguous: refused, with the batch
    loaded.append(("r8192-3", scan_report(8192, 3, {"recipe": "standard"}), None))
    with pytest.raises(basis_mod.ReportError, match=r"two points .* global batch \(\[8192\]\)"):
        basis_mod.recipe_points({"points": basis_mod.scan_points(loaded)})
