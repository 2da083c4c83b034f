"""The evaluation decodes latents through the VAE a bounded number at a time (an evaluation batch in one decoder
call would not fit a GPU at 256²), with the same images as one call."""

from __future__ import annotations

import pytest
import torch

from meanflow.data_pipeline.vae import DECODE_CHUNK, load_vae
from meanflow.evaluation.evaluator import LatentDecoder

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A random 4-channel AutoencoderKL (downsample 2), as save_pretrained writes it."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16)
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path, safe_serialization=True)
    return str(path)


def decoder_with_recorded_calls(vae_dir: str, chunk: int) -> tuple[LatentDecoder, list[int]]:
    sha = load_vae(vae_dir).weights_sha256
    manifest = {"vae": {"weights_sha256": sha}, "normalization": {"mf": {"scale_factor": 0.5}}}
    decoder = LatentDecoder(vae_dir, manifest, "mf", "cpu", chunk=chunk)
    calls, decode = [], decoder.vae.model.decode

    def recording(latents, *args, **kwargs):
        calls.append(len(latents))
        return decode(latents, *args, **kwargs)

    decoder.vae.model.decode = recording
    return decoder, calls


def test_a_large_batch_is_decoded_in_bounded_chunks_equal_to_one_call(vae_dir):
    latents = torch.randn(11, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    chunked, chunk_calls = decoder_with_recorded_calls(vae_dir, chunk=4)
    whole, whole_calls = decoder_with_recorded_calls(vae_dir, chunk=len(latents))
    images, reference = chunked(latents), whole(latents)
    assert chunk_calls == [4, 4, 3] and whole_calls == [11]
    assert images.shape == (11, 3, 16, 16) and images.dtype == torch.float32
    torch.testing.assert_close(images, reference)


def test_the_evaluation_bounds_its_decoder_calls_by_default(vae_dir):
    decoder, calls = decoder_with_recorded_calls(vae_dir, chunk=DECODE_CHUNK)
    decoder(torch.randn(2 * DECODE_CHUNK + 1, 4, 8, 8))
    assert calls == [DECODE_CHUNK, DECODE_CHUNK, 1]
