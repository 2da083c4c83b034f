"""What an evaluation measures with must be able to measure: reference statistics and feature extractors whose
features vary, an extractor that takes the data's images, an FID below the floor flagged, one FID series per
extractor and reference (a resume that changes them is refused unless meant); and pixel shards flipped only on
purpose."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from meanflow.data_pipeline import build_stream
from meanflow.data_pipeline.records import RecordDecoder, encode_record
from meanflow.data_pipeline.shard_writer import write_shards
from meanflow.data_pipeline.sources import open_source
from meanflow.evaluation import digits_features
from meanflow.evaluation.evaluator import EvalData, Evaluator, describe_data, feature_extractor_for, image_shape
from meanflow.evaluation.feature_extractors import DIGITS, INCEPTION, load_feature_extractor
from meanflow.evaluation.feature_stats import FeatureMoments
from meanflow.evaluation.images import to_uint8
from meanflow.evaluation.reference_stats import ReferenceStats, from_moments, load_reference, save_reference
from meanflow.evaluation.sampling import generate, rank_indices
from meanflow.jobs.plot import eval_series
from meanflow.jobs.preflight import check_same_run
from meanflow.jobs.status import print_evaluations
from meanflow.models import build_model
from meanflow.platform.config import ConfigError, load_config, save_config

pytestmark = pytest.mark.timeout(60)
D = 16


def stats(mu, sigma, url="memory://ref.npz") -> ReferenceStats:
    return ReferenceStats(mu, sigma, 100, DIGITS, "ab" * 32, url)


# ------------------------------------------------------------------------------------- degenerate statistics
@pytest.mark.parametrize("sigma, why", [
    (1e-13 * np.eye(D), "near-constant features"),                  # the numbers every FID ≈ 1e-13 came from
    (np.zeros((D, D)), "near-constant features"),
    (np.outer(np.arange(D), np.arange(D)) / D, "one direction only"),  # rank 1
    (np.full((D, D), np.nan), "non-finite"),
])
def test_reference_statistics_of_degenerate_features_are_refused_naming_the_file(tmp_path, sigma, why):
    url = f"file://{tmp_path}/ref.npz"
    save_reference(stats(np.ones(D), sigma, url), url)
    with pytest.raises(ValueError, match=rf"^eval\.reference_stats: {url}: .*{why}"):
        load_reference(url)


def test_reference_statistics_of_varying_features_load():
    url = "memory://healthy/ref.npz"
    sigma = np.cov(np.random.default_rng(0).normal(size=(64, D)), rowvar=False)
    save_reference(stats(np.ones(D), sigma, url), url)
    assert load_reference(url).mu.shape == (D,)


def test_reference_statistics_computed_from_constant_features_are_refused_naming_the_data():
    moments = FeatureMoments(D)
    moments.add(torch.ones(32, D))
    extractor = load_feature_extractor(DIGITS)
    with pytest.raises(ValueError, match="reference statistics of s3://b/shards: near-constant features"):
        from_moments(moments, extractor, "s3://b/shards")


@pytest.fixture(scope="module")
def dead_digits_weights(tmp_path_factory):
    """digits-cnn with its feature layer zeroed: every image gets the same (zero) features."""
    state = load_file(str(digits_features.WEIGHTS))
    state = {k: torch.zeros_like(v) if k.startswith("features.") else v for k, v in state.items()}
    path = tmp_path_factory.mktemp("weights") / "dead.safetensors"
    save_file(state, str(path))
    return str(path)


def test_a_feature_extractor_with_constant_features_is_refused_naming_its_weights(dead_digits_weights):
    with pytest.raises(ValueError, match=rf"^eval\.feature_weights: {dead_digits_weights}: digits-cnn gives "
                                         "near-constant features"):
        load_feature_extractor(DIGITS, dead_digits_weights).check_features_vary((1, 8, 8))
    load_feature_extractor(DIGITS).check_features_vary((1, 8, 8))   # the shipped weights tell images apart


def test_an_evaluation_with_a_dead_extractor_is_refused_before_sampling(dead_digits_weights):
    cfg = load_config("tiny_mf", [f"eval.feature_weights={dead_digits_weights}"])
    with pytest.raises(ValueError, match="eval.feature_weights"):
        Evaluator(cfg, describe_data(cfg.data, 0), "cpu")


# ------------------------------------------------------------------------------------------------ suspect FID
@pytest.mark.filterwarnings("ignore:Matrix is singular")   # sqrtm of Σ·Σ from 24 samples in 64 dimensions
def test_an_fid_below_the_floor_is_recorded_as_suspect():
    """Against the statistics of its own samples a model scores FID ≈ 0: the row says it is suspect."""
    cfg = load_config("tiny_mf", ["eval.num_samples=24", "eval.batch_size=24", "eval.grid=0"])
    evaluator = Evaluator(cfg, describe_data(cfg.data, 0), "cpu")
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    moments = FeatureMoments(evaluator.extractor.feature_dim)
    for _, x, _ in generate(model, rank_indices(24, 0, 1), (1, 8, 8), 10, cfg.eval.seed, **evaluator.setting,
                            batch_size=24):
        moments.add(evaluator.extractor(to_uint8(x))[0])
    evaluator.reference = from_moments(moments, evaluator.extractor, "the samples themselves")
    [result] = evaluator.run(model, step=1)
    assert abs(result.metrics["fid"]) < 1e-3 and result.metrics["suspect"] == "fid below 0.001"


# ------------------------------------------------------------------------------ extractor against the data
@pytest.mark.parametrize("name, data, fits", [
    ("digits-cnn", EvalData("cifar", "pixels", (3, 32, 32), 10), False),   # was a torch traceback
    ("digits-cnn", EvalData("digits", "pixels", (1, 8, 8), 10), True),
    ("inception-v3-compat", EvalData("planes", "pixels", (2, 32, 32), 0), False),
    ("digits-cnn", EvalData("in", "latent", (4, 1, 1), 0, manifest={"vae": {"downsample": 8}}), False),
])
def test_the_feature_extractor_is_checked_against_the_datas_images(name, data, fits):
    eval_cfg = load_config("tiny_mf", [f"eval.feature_extractor={name}"]).eval
    if fits:
        assert feature_extractor_for(eval_cfg, data) == name
    else:
        with pytest.raises(ConfigError, match=rf"^eval\.feature_extractor: {name} takes .*shape \("):
            feature_extractor_for(eval_cfg, data)


def test_auto_picks_digits_cnn_for_8x8_grey_and_inception_for_decoded_latents():
    eval_cfg = load_config("tiny_mf").eval
    latent = EvalData("in", "latent", (4, 32, 32), 0, manifest={"vae": {"downsample": 8}})
    assert image_shape(latent) == (3, 256, 256) and feature_extractor_for(eval_cfg, latent) == INCEPTION
    assert feature_extractor_for(eval_cfg, EvalData("digits", "pixels", (1, 8, 8), 10)) == DIGITS
    assert feature_extractor_for(eval_cfg, EvalData("checkerboard", "toy", (2,), 0)) is None


# ------------------------------------------------------------------------------------------ one FID series
def test_a_resume_with_another_extractor_or_reference_is_refused_unless_meant(tmp_path):
    run = [f"run.run_dir=file://{tmp_path}"]
    (tmp_path / "config.yaml").write_text(save_config(load_config("tiny_mf", run)))
    changed = [*run, "eval.feature_weights=s3://w/other.pth", "eval.reference_stats=s3://r/ref.npz"]
    with pytest.raises(ConfigError) as err:
        check_same_run(load_config("tiny_mf", changed))
    message = str(err.value)
    assert message.startswith("eval.feature_weights, eval.reference_stats: resuming")
    assert "eval.reference_stats '' -> 's3://r/ref.npz'" in message and "eval.new_series=true" in message
    check_same_run(load_config("tiny_mf", [*changed, "eval.new_series=true"]))
    check_same_run(load_config("tiny_mf", run))


def row(step, fid, sha, reference="s3://r/ref.npz"):
    return {"step": step, "fid": fid, "nfe": 1, "guidance": None, "reference_stats": reference,
            "feature_extractor": {"name": INCEPTION, "weights": "w.pth", "weights_sha256": sha * 64}}


def test_plot_and_status_keep_fids_of_two_extractors_apart(capsys):
    rows = [row(10, 30.0, "a"), row(20, 20.0, "a"), row(30, 1e-13, "b"), row(40, 2e-13, "b")]
    series = eval_series(rows)
    assert [[r["step"] for r in rs] for _, rs in series] == [[10, 20], [30, 40]]
    assert [label for label, _ in series] == ["no guidance; inception-v3-compat aaaaaaaa vs ref.npz",
                                              "no guidance; inception-v3-compat bbbbbbbb vs ref.npz"]
    assert [label for label, _ in eval_series(rows[:2])] == ["no guidance"]
    print_evaluations(rows)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "evaluations with inception-v3-compat (weights sha256 aaaaaaaaaaaa…) against s3://r/ref.npz:"
    assert out[3].startswith("evaluations with inception-v3-compat (weights sha256 bbbbbbbbbbbb…)")
    assert out[4].endswith("SUSPECT: fid below 0.001") and "SUSPECT" not in out[1]


# ------------------------------------------------------------------------------------------------ flips
def digit_record(index: int) -> dict:
    image = np.zeros((8, 8, 1), np.uint8)
    image[:, :3] = 255                            # left-heavy: its mirror image differs
    return encode_record("image", index, image, label=1)


def test_pixel_shards_are_mirrored_only_with_pixel_flip_per_seed_epoch_and_index():
    manifest = {"kind": "image", "sample_shape": [1, 8, 8], "num_classes": 10}
    plain, flipping = RecordDecoder(manifest, seed=0), RecordDecoder(manifest, seed=0, pixel_flip=True)
    xs = [plain(digit_record(i), epoch=0)["x"] for i in range(16)]
    assert all(torch.equal(x, xs[0]) for x in xs)                    # the default (latent_flip=true) flips no pixels
    flips = [not torch.equal(flipping(digit_record(i), epoch=0)["x"], xs[0]) for i in range(16)]
    assert 0 < sum(flips) < 16
    mirrored = next(i for i in range(16) if flips[i])
    assert torch.equal(flipping(digit_record(mirrored), epoch=0)["x"], xs[0].flip(-1))
    again = RecordDecoder(manifest, seed=0, pixel_flip=True)             # a resumed stream draws the same
    assert flips == [not torch.equal(again(digit_record(i), epoch=0)["x"], xs[0]) for i in range(16)]


def test_pixel_flip_is_refused_where_it_has_nothing_to_mirror(tmp_path):
    with pytest.raises(ValueError, match="^data.pixel_flip: .*latent samples .*data.latent_flip"):
        RecordDecoder({"kind": "latent", "sample_shape": [4, 4, 4], "num_classes": 0, "normalization": {}},
                      seed=0, pixel_flip=True)
    with pytest.raises(ConfigError, match="key 'data.pixel_flip'"):
        load_config("tiny_mf", ["data.pixel_flip=true"])


def test_the_stream_of_a_config_mirrors_pixel_shards_only_when_asked(tmp_path):
    url = f"file://{tmp_path}/digits"
    write_shards(open_source("digits:test"), url, samples_per_shard=360, show_progress=False)
    batches = []
    for flip in ("false", "true"):
        data = load_config("tiny_mf", ["data.name=webdataset", f"data.url={url}", "data.global_batch=32",
                                       "data.num_workers=0", f"data.pixel_flip={flip}"]).data
        stream = build_stream(data, seed=0)
        batches.append(stream.next_batch())
        stream.close()
    plain, flipped = batches
    assert torch.equal(plain["index"], flipped["index"])
    mirrored = [not torch.equal(a, b) for a, b in zip(plain["x"], flipped["x"])]
    assert 0 < sum(mirrored) < 32
    assert all(torch.equal(b, a.flip(-1)) for a, b, m in zip(plain["x"], flipped["x"], mirrored) if m)
