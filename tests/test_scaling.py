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
