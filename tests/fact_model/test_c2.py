"""C²-score arithmetic on constructed inputs with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from fact_model.analysis.c2 import (
    attribution_weighted_encodings,
    random_concept_consistency,
    select_top_images,
    weighted_consistency,
)


def test_identical_encodings_score_one():
    encodings = torch.tensor([[1.0, 2.0, 3.0]]).repeat(6, 1)
    assert weighted_consistency(encodings, torch.rand(6) + 0.1) == pytest.approx(1.0)


def test_two_orthogonal_groups_give_the_weighted_within_group_share():
    # group A: 2 images along x with weights 1, 2; group B: 1 image along y with weight 3
    encodings = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 5.0]])
    weights = torch.tensor([1.0, 2.0, 3.0])
    # ordered pairs i≠j: within A: (1·2)·2 = 4 with cos 1; across: 2·(1·3 + 2·3) = 18 with cos 0
    assert weighted_consistency(encodings, weights) == pytest.approx(4 / 22)


def test_opposite_directions_score_minus_one():
    encodings = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    assert weighted_consistency(encodings, torch.ones(2)) == pytest.approx(-1.0)


def test_uniform_attribution_is_the_plain_mean():
    features = torch.randn(4, 3, 5, 6)
    uniform = torch.full((4, 5, 6), 0.7)
    torch.testing.assert_close(attribution_weighted_encodings(uniform, features), features.mean(dim=(2, 3)))


def test_point_attribution_picks_the_pixel():
    features = torch.randn(1, 3, 4, 4)
    attribution = torch.zeros(1, 4, 4)
    attribution[0, 2, 1] = 5.0
    torch.testing.assert_close(attribution_weighted_encodings(attribution, features)[0], features[0, :, 2, 1])


def test_selection_rules_on_a_crafted_table():
    n = 400
    table = torch.zeros(n, 5)
    table[:, 0] = torch.arange(n, dtype=torch.float) + 1  # active everywhere: top 5 % of 400 = 20
    table[:100, 1] = torch.arange(100, dtype=torch.float) + 1  # active in 100: 5 % = 5 → at least 10
    table[:7, 2] = 1.0  # active in 7 (≤ 10): all 7 kept
    table[:3, 3] = 1.0  # active in 3: fewer than 5 → dropped
    # concept 4 never active: dead
    selection = select_top_images(table)
    assert len(selection.selected[0]) == 20 and selection.selected[0][0] == n - 1
    assert torch.equal(selection.weights[0], torch.arange(n, n - 20, -1, dtype=torch.float))
    assert len(selection.selected[1]) == 10 and set(selection.selected[1].tolist()) == set(range(90, 100))
    assert len(selection.selected[2]) == 7
    assert selection.dropped == (3,) and selection.dead == (4,)


def test_random_baseline_is_reproducible_and_near_zero_for_unstructured_features():
    features = torch.randn(200, 16, 8, 8)
    features = features - features.mean(dim=(0, 2, 3), keepdim=True)
    a = random_concept_consistency(features, 20, repeats=5, seed=3)
    b = random_concept_consistency(features, 20, repeats=5, seed=3)
    c = random_concept_consistency(features, 20, repeats=5, seed=4)
    assert a == b and a != c
    assert abs(a) < 0.05


def test_random_baseline_within_a_pool():
    features = torch.zeros(10, 2, 4, 4)
    features[:5, 0] = 1.0  # the pool's images all point the same way
    features[5:, 1] = 1.0
    pool = torch.arange(5)
    assert random_concept_consistency(features, 5, repeats=3, pool=pool) == pytest.approx(1.0)
    assert not math.isclose(random_concept_consistency(features, 10, repeats=3), 1.0)
