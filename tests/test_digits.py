"""The embedded digits task: data split, parameter layout, batched scoring, experts."""
import numpy as np
import torch

from evomerge.demos import digits
from evomerge.spaces.digits import DigitsMLPSpace, DigitsMLPSpaceConfig
from evomerge.fitness.digits import DigitsFitness, DigitsFitnessConfig


def test_split_and_layout_follow_the_paper():
    train, test = digits.load()
    assert train.x.shape == (1437, 64) and test.x.shape == (360, 64)
    assert digits.N_PARAMS == 19_210 == DigitsMLPSpace.dim
    x = np.arange(digits.N_PARAMS, dtype=np.float32)
    p = digits.unflatten(x)
    assert p["W1"].shape == (64, 256) and p["W1"][0, 1] == 1  # row-major W1 first
    assert p["b1"][0] == 64 * 256 and p["W2"][0, 0] == 64 * 256 + 256 and p["b2"][-1] == 19_209
    np.testing.assert_array_equal(digits.flatten(p), x)


def test_batched_scoring_equals_one_model_at_a_time():
    train, _ = digits.load()
    rng = np.random.default_rng(0)
    batch = (rng.standard_normal((5, digits.N_PARAMS)) * 0.05).astype(np.float32)
    got = digits.BatchScorer(train).correct(batch)
    x = torch.from_numpy(train.x)
    for i in range(5):
        pred = digits.logits(torch.from_numpy(batch[i]), x).argmax(1).numpy()
        np.testing.assert_array_equal(got[i], pred == train.y)


def test_fitness_returns_per_example_scores_and_metrics():
    f = DigitsFitness(DigitsFitnessConfig(name="digits"))
    batch = np.stack(DigitsMLPSpace(DigitsMLPSpaceConfig(name="digits_mlp"), 0).seeds())
    ev = f.evaluate(batch)
    assert ev.scores.shape == (2, 1437) and ev.scores.dtype == bool
    np.testing.assert_allclose(ev.fitness, ev.scores.mean(axis=1))
    np.testing.assert_allclose(ev.metrics["train_accuracy"], ev.fitness)
    assert 0 <= f.holdout(batch[0])["test_accuracy"] <= 1


def test_experts_know_their_own_digits():
    seeds = DigitsMLPSpace(DigitsMLPSpaceConfig(name="digits_mlp"), seed=0).seeds()
    again = DigitsMLPSpace(DigitsMLPSpaceConfig(name="digits_mlp"), seed=7).seeds()
    for a, b in zip(seeds, again):
        np.testing.assert_array_equal(a, b)  # experts do not depend on the run's seed
    train, _ = digits.load()
    correct = digits.BatchScorer(train).correct(np.stack(seeds))
    low = train.y < 5
    assert correct[0][low].mean() > 0.5 and correct[0][~low].mean() == 0
    assert correct[1][~low].mean() > 0.5 and correct[1][low].mean() == 0


def test_scratch_seeds_are_small_random_models_that_depend_on_the_seed():
    cfg = DigitsMLPSpaceConfig(name="digits_mlp", init="scratch")
    a, b = DigitsMLPSpace(cfg, 0).seeds(), DigitsMLPSpace(cfg, 1).seeds()
    assert abs(a[0].std() - 0.01) < 0.001
    assert not np.array_equal(a[0], b[0]) and not np.array_equal(a[0], a[1])
