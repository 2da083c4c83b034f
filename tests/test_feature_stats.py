"""FID/IS statistics: sums that reduce over ranks, checked against torch-fidelity's own formulas."""

import numpy as np
import pytest
import torch
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric

from meanflow.evaluation.feature_stats import FeatureMoments, InceptionScoreSums, frechet_distance

pytestmark = pytest.mark.timeout(60)


def features(n, d=16, shift=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d ** 0.5
    return torch.randn(n, d, generator=g) @ mix + shift


def test_moments_give_numpys_mean_and_covariance():
    f = features(500)
    moments = FeatureMoments(16)
    for chunk in f.split(64):   # any batching
        moments.add(chunk)
    mu, sigma = moments.mean_cov()
    reference = fid_features_to_statistics(f.double())
    np.testing.assert_allclose(mu, reference["mu"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, reference["sigma"], rtol=1e-10, atol=1e-12)


def test_frechet_distance_matches_torch_fidelity_and_is_zero_for_the_same_set():
    a, b = features(800, seed=1), features(800, shift=0.3, seed=2)
    stats = []
    for f in (a, b):
        m = FeatureMoments(16)
        m.add(f)
        stats.append(m.mean_cov())
    ours = frechet_distance(*stats[0], *stats[1])
    theirs = fid_statistics_to_metric(fid_features_to_statistics(a.double()), fid_features_to_statistics(b.double()),
                                      verbose=False)["frechet_inception_distance"]
    assert ours == pytest.approx(theirs, rel=1e-6) and ours > 1.0
    assert abs(frechet_distance(*stats[0], *stats[0])) < 1e-6


def test_split_sums_equal_one_pass_and_torch_fidelity_inception_score():
    logits = features(1003, d=10, seed=3) * 3           # N not divisible by the splits
    whole = InceptionScoreSums(10, 1003, splits=7)
    whole.add(logits, torch.arange(1003))
    parts = [InceptionScoreSums(10, 1003, splits=7) for _ in range(2)]
    order = torch.randperm(1003, generator=torch.Generator().manual_seed(0))   # any rank gets any indices
    for k, part in enumerate(parts):
        idx = order[k::2]
        part.add(logits[idx], idx)
    merged = parts[0]
    merged.count += parts[1].count
    merged.p_sum += parts[1].p_sum
    merged.plogp_sum += parts[1].plogp_sum
    theirs = isc_features_to_metric(logits, splits=7, shuffle=False)
    for sums in (whole, merged):
        mean, std = sums.score()
        assert mean == pytest.approx(theirs["inception_score_mean"], rel=1e-9)
        assert std == pytest.approx(theirs["inception_score_std"], rel=1e-7)


def test_statistics_reduced_over_two_ranks_equal_one_process(tmp_path):
    from distributed_run import feature_stats_over

    one, two = feature_stats_over(1, tmp_path / "one.json"), feature_stats_over(2, tmp_path / "two.json")
    np.testing.assert_allclose(two["mu"], one["mu"], rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(two["sigma"], one["sigma"], rtol=1e-12, atol=1e-14)
    assert two["is"] == pytest.approx(one["is"], rel=1e-12)


class Uint8Images(torch.utils.data.Dataset):
    def __init__(self, x):
        self.images = torch.clamp(127.5 * x + 128, 0, 255).to(torch.uint8)   # the evaluation's uint8 formula

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def digits_features(images: torch.Tensor) -> FeatureMoments:
    from meanflow.evaluation.digits_features import NAME, DigitsFeatureExtractor

    extractor = DigitsFeatureExtractor(NAME, ["64"])
    moments = FeatureMoments(64)
    with torch.no_grad():
        moments.add(extractor(Uint8Images(images).images)[0])
    return moments


def test_fid_on_the_digits_extractor_matches_torch_fidelity_calculate_metrics():
    import torch_fidelity

    from meanflow.data_pipeline.digits import load_digits_split

    real, _ = load_digits_split("train")
    test, _ = load_digits_split("test")
    noisy = (test + 0.3 * torch.randn(test.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    ours = frechet_distance(*digits_features(real).mean_cov(), *digits_features(noisy).mean_cov())
    theirs = torch_fidelity.calculate_metrics(input1=Uint8Images(real), input2=Uint8Images(noisy), fid=True,
                                              feature_extractor="digits-cnn", cuda=False, verbose=False,
                                              cache=False, batch_size=128)["frechet_inception_distance"]
    assert ours == pytest.approx(theirs, rel=1e-4) and ours > 1.0
    clean = frechet_distance(*digits_features(real).mean_cov(), *digits_features(test).mean_cov())
    assert clean < ours / 3                                  # held-out real digits are far closer than noisy ones
