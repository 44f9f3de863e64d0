"""QDyLoRA rank schedules (``engine.train.rank_schedule``)."""

from __future__ import annotations

import pytest
import torch

from engine.train.rank_schedule import step_ranks


def test_uniform_draws_one_rank_evenly():
    gen = torch.Generator().manual_seed(0)
    draws = [step_ranks("uniform", 4, gen) for _ in range(4000)]
    assert all(len(d) == 1 and d[0][1] == 1.0 for d in draws)
    counts = torch.bincount(torch.tensor([d[0][0] for d in draws]), minlength=5)[1:].double()
    assert torch.allclose(counts / 4000, torch.full((4,), 0.25, dtype=torch.float64), atol=0.03)


def test_pair_draws_small_ranks_as_one_over_b_and_always_trains_the_full_rank():
    gen = torch.Generator().manual_seed(0)
    draws = [step_ranks("pair", 4, gen) for _ in range(6000)]
    assert all(d[-1][0] == 4 and abs(sum(w for _, w in d) - 1.0) < 1e-12 for d in draws)
    counts = torch.bincount(torch.tensor([d[0][0] for d in draws]), minlength=5)[1:].double()
    expected = torch.tensor([1, 1 / 2, 1 / 3, 1 / 4], dtype=torch.float64)
    assert torch.allclose(counts / 6000, expected / expected.sum(), atol=0.03)
    assert all(d == [(4, 1.0)] for d in draws if d[0][0] == 4)  # drawing R itself: one pass, not two


@pytest.mark.parametrize("rank_max, ranks, weights", [
    (16, [1, 2, 4, 8, 16], [2 / 7, 1 / 7, 1 / 7, 1 / 7, 2 / 7]), (6, [1, 2, 4, 6], [2 / 6, 1 / 6, 1 / 6, 2 / 6]),
    (2, [1, 2], [0.5, 0.5]), (1, [1], [1.0]),
])
def test_nested_trains_every_power_of_two_and_the_full_rank_the_ends_twice(rank_max, ranks, weights):
    steps = step_ranks("nested", rank_max, torch.Generator().manual_seed(0))
    assert [r for r, _ in steps] == ranks
    assert [w for _, w in steps] == pytest.approx(weights)


def test_sampled_trains_both_ends_and_one_rank_between_and_averages_to_nested():
    gen = torch.Generator().manual_seed(0)
    draws = [step_ranks("sampled", 16, gen) for _ in range(6000)]
    assert all([r for r, _ in (d[0], d[2])] == [1, 16] and d[1][0] in (2, 4, 8) for d in draws)
    assert all([w for _, w in d] == pytest.approx([2 / 7, 3 / 7, 2 / 7]) for d in draws)
    mean = {rank: 0.0 for rank in (1, 2, 4, 8, 16)}  # each rank's weight averaged over steps: nested's weights
    for d in draws:
        for rank, weight in d:
            mean[rank] += weight / len(draws)
    assert list(mean.values()) == pytest.approx([2 / 7, 1 / 7, 1 / 7, 1 / 7, 2 / 7], abs=0.01)


@pytest.mark.parametrize("rank_max", [4, 2, 1])
def test_sampled_is_nested_where_nested_has_at_most_three_ranks(rank_max):
    gen = torch.Generator().manual_seed(0)
    assert step_ranks("sampled", rank_max, gen) == step_ranks("nested", rank_max, gen)


def test_an_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="allowed: uniform, pair, nested"):
        step_ranks("cyclic", 4, torch.Generator())


def test_a_schedule_without_a_dynamic_run_is_one_line_and_exit_2(tmp_path, capsys):
    from conftest import GGUF_MODEL, TRAIN_TXT, modulora

    code = modulora("finetune", GGUF_MODEL, "--data", TRAIN_TXT, "--rank-schedule", "pair", "--out", tmp_path / "run")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--rank-schedule" in err[0] and "--dynamic" in err[0], err
