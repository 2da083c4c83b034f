"""VAE latent shards: a small random AutoencoderKL read from the loopback S3 server, moments of image and flip,
both normalisations, per-visit posterior sampling."""

from __future__ import annotations

import io
import json

import fsspec
import numpy as np
import pytest
import torch

from meanflow.data_pipeline import write
from meanflow.data_pipeline.manifest import IMF_CHANNEL_MEAN, IMF_CHANNEL_STD, read_manifest
from meanflow.data_pipeline.records import RecordDecoder, encode_record
from meanflow.data_pipeline.shard_reader import ShardReader
from meanflow.data_pipeline.vae import encode_moments, load_vae
from meanflow.data_pipeline.webdataset_stream import ShardStream

pytestmark = pytest.mark.timeout(120)
N_IMAGES, SIZE = 24, 16


@pytest.fixture(scope="module")
def latent_set(s3_server, tmp_path_factory):
    """A random 4-channel VAE (downsample 2) and 24 labelled 16×16 RGB images in a bucket, written as latents."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=SIZE)
    local = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(local, safe_serialization=True)
    fs = fsspec.filesystem("s3")
    fs.mkdir("latents")
    fs.put(str(local), "latents/tiny-vae", recursive=True)
    images = np.random.default_rng(0).integers(0, 256, size=(N_IMAGES, SIZE, SIZE, 3), dtype=np.uint8)
    labels = np.arange(N_IMAGES) % 3
    buf = io.BytesIO()
    np.savez(buf, x=images, y=labels)
    fs.pipe("latents/images.npz", buf.getvalue())
    code = write.main(["--source", "npz:s3://latents/images.npz", "--vae", "s3://latents/tiny-vae",
                       "--out", "s3://latents/set", "--samples-per-shard", "8", "--batch-size", "5", "--quiet"])
    assert code == 0
    return {"url": "s3://latents/set", "images": images, "vae": load_vae("s3://latents/tiny-vae")}


def raw_record(url: str, index: int):
    shard, offset = divmod(index, 8)
    return list(ShardReader([f"{url}/train-{shard:06d}.tar"]).shard_records(0, offset, offset + 1))[-1]


def moments_of(url: str, index: int) -> np.ndarray:
    return np.load(io.BytesIO(raw_record(url, index)["latent.npy"]), allow_pickle=False)


def test_manifest_records_vae_and_both_normalisations(latent_set):
    m = read_manifest(latent_set["url"])
    assert m["kind"] == "latent" and m["sample_shape"] == [4, SIZE // 2, SIZE // 2] and m["total"] == N_IMAGES
    assert m["vae"]["id"] == "tiny-vae" and m["vae"]["weights_sha256"] == latent_set["vae"].weights_sha256
    assert m["normalization"]["mf"]["scale_factor"] == pytest.approx(0.18215)
    assert m["normalization"]["imf"] == {"channel_mean": list(IMF_CHANNEL_MEAN),
                                         "channel_std": list(IMF_CHANNEL_STD)}
    assert len(m["normalization"]["measured"]["channel_std"]) == 4


def test_latent_shards_hold_moments_of_the_image_and_of_its_flip(latent_set):
    vae, images = latent_set["vae"], latent_set["images"]
    stored = moments_of(latent_set["url"], 13)                      # (2 flips, 2 moments, C, h, w)
    assert stored.shape == (2, 2, 4, SIZE // 2, SIZE // 2)
    src = int(raw_record(latent_set["url"], 13)["src"])            # the writer shuffled the source order
    direct = encode_moments(vae, images[src:src + 1], "cpu")[0]
    flipped = encode_moments(vae, images[src:src + 1, :, ::-1].copy(), "cpu")[0]
    np.testing.assert_allclose(stored, direct, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stored[1], flipped[0], rtol=1e-5, atol=1e-6)
    # The flip's latent is not the flipped latent: storing both is not redundant.
    assert np.abs(stored[1, 0] - stored[0, 0][..., ::-1]).max() > 1e-3


@pytest.mark.parametrize("norm", ["mf", "imf", "measured"])
def test_normalisations_map_a_latent_as_documented(latent_set, norm):
    manifest = read_manifest(latent_set["url"])
    mean = torch.randn(4, 3, 3)
    moments = torch.stack([mean, torch.zeros_like(mean)])             # std 0: the sample is the mean itself
    record = encode_record("latent", 5, torch.stack([moments, moments]).numpy(), label=1)
    manifest = {**manifest, "sample_shape": [4, 3, 3]}
    x = RecordDecoder(manifest, seed=0, latent_norm=norm)(record, epoch=0)["x"]
    if norm == "mf":
        expected = mean * 0.18215
    else:
        stats = manifest["normalization"][norm]
        expected = (mean - torch.tensor(stats["channel_mean"]).view(-1, 1, 1)) / \
            torch.tensor(stats["channel_std"]).view(-1, 1, 1)
    torch.testing.assert_close(x, expected)


def test_each_visit_draws_a_posterior_sample_of_a_random_flip(latent_set):
    manifest = read_manifest(latent_set["url"])
    record, moments = raw_record(latent_set["url"], 7), torch.from_numpy(moments_of(latent_set["url"], 7))
    decode = RecordDecoder(manifest, seed=0, latent_norm="mf")
    draws = torch.stack([decode(record, epoch)["x"] / 0.18215 for epoch in range(400)])
    # Each draw is mean + std·ε of one flip: its standardised residual is ~N(0, 1) for exactly that flip.
    z = [(draws - moments[f, 0]) / moments[f, 1] for f in (0, 1)]
    which = (z[0].pow(2).mean(dim=(1, 2, 3)) < z[1].pow(2).mean(dim=(1, 2, 3))).float()
    assert 0.4 < which.mean() < 0.6                                                  # flips chosen ~half the time
    chosen = torch.where(which.view(-1, 1, 1, 1).bool(), z[0], z[1])
    assert abs(chosen.mean()) < 0.05 and abs(chosen.std() - 1) < 0.05
    assert torch.equal(decode(record, 3)["x"], draws[3] * 0.18215)                  # same (seed, epoch): same draw


def test_latent_stream_batches_have_the_latent_shape(latent_set):
    stream = ShardStream(latent_set["url"], global_batch=6, seed=0, num_workers=0, latent_norm="imf")
    batch = stream.next_batch()
    assert batch["x"].shape == (6, 4, SIZE // 2, SIZE // 2) and batch["y"].shape == (6,)


def test_writer_names_a_missing_vae(tmp_path, capsys):
    code = write.main(["--source", "digits", "--vae", str(tmp_path / "no-vae"), "--out", str(tmp_path / "out")])
    assert code == 2 and "no-vae" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_latent_model_is_evaluated_through_the_vae_against_reference_stats(latent_set, random_inception, tmp_path):
    """Reference statistics from a WebDataset of the real images (the command), a latent MF-DiT trained a few
    steps on the latent shards, then the evaluation job: samples decoded by the VAE, FID/IS from inception (random
    weights, loaded offline by path)."""
    from meanflow.evaluation import reference_stats
    from meanflow.jobs.submit import main as submit
    from meanflow.jobs.train import Trainer
    from meanflow.platform.config import load_config

    weights = str(random_inception[0])
    assert write.main(["--source", "npz:s3://latents/images.npz", "--out", "s3://latents/images",
                       "--samples-per-shard", "8", "--quiet"]) == 0
    assert reference_stats.main(["--data", "s3://latents/images", "--out", "s3://latents/ref.npz",
                                 "--feature-weights", weights, "--batch-size", "10"]) == 0
    ref = reference_stats.load_reference("s3://latents/ref.npz")
    assert ref.num_images == N_IMAGES and ref.mu.shape == (2048,) and ref.feature_extractor == "inception-v3-compat"

    run_dir = str(tmp_path / "run")
    Trainer(load_config("tiny_mf", [f"run.run_dir={run_dir}", "run.steps=2", "run.log_every=1",
                                    "model.in_channels=4", "model.num_classes=3", "data.name=webdataset",
                                    f"data.url={latent_set['url']}", "data.global_batch=8", "data.num_workers=0",
                                    "eval.at_end=false"]), stdout=io.StringIO()).run()
    eval_args = ["eval", "--run-dir", run_dir, "eval.num_samples=6", f"eval.feature_weights={weights}",
                 "eval.reference_stats=s3://latents/ref.npz"]
    assert submit([*eval_args]) == 2                                       # no eval.vae: named
    assert submit([*eval_args, "eval.vae=s3://latents/tiny-vae"]) == 0
    result = json.loads((tmp_path / "run" / "eval" / "step-00000002" / "metrics.json").read_text())["results"][0]
    assert np.isfinite(result["fid"]) and result["feature_extractor"]["name"] == "inception-v3-compat"
    assert result["reference_stats"] == "s3://latents/ref.npz"
    assert (tmp_path / "run" / "eval" / "step-00000002" / "samples.png").exists()


def test_reference_stats_of_another_extractor_are_refused(latent_set, tmp_path):
    from meanflow.evaluation.feature_extractors import load_feature_extractor
    from meanflow.evaluation.reference_stats import load_reference

    ref = load_reference("s3://latents/ref.npz")
    with pytest.raises(ValueError, match="eval.reference_stats: s3://latents/ref.npz was computed with inception"):
        ref.check_matches(load_feature_extractor("digits-cnn"))
