"""GPU path of evaluation (marked ``gpu``, skipped without CUDA): 1-NFE sampling in bf16 on the GPU and the feature
statistics there, against the fp32 CPU result of the same global indices. Run on a lent GPU machine with
``pytest -m gpu``."""

from __future__ import annotations

import pytest
import torch

from meanflow.evaluation.feature_extractors import load_feature_extractor
from meanflow.evaluation.feature_stats import FeatureMoments, frechet_distance
from meanflow.evaluation.images import to_uint8
from meanflow.evaluation.sampling import generate
from meanflow.models import build_model
from meanflow.platform.config import load_config

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def samples_and_moments(model, device, dtype):
    extractor = load_feature_extractor("digits-cnn", device=device)
    moments, images = FeatureMoments(extractor.feature_dim), []
    for _, x, _ in generate(model.to(device), range(512), (1, 8, 8), 10, seed=3, batch_size=128, device=device,
                            autocast_dtype=dtype):
        uint8 = to_uint8(x).cpu()
        images.append(uint8)
        moments.add(extractor(uint8)[0])
    return torch.cat(images), moments.mean_cov()


def test_bf16_gpu_sampling_and_features_match_fp32_cpu():
    torch.manual_seed(0)
    model = build_model(load_config("tiny_mf").model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cpu_images, (mu_c, sigma_c) = samples_and_moments(model, "cpu", None)
    gpu_images, (mu_g, sigma_g) = samples_and_moments(model, "cuda", torch.bfloat16)
    # bf16 moves some pixels by a few uint8 levels; the statistics stay close: FID(cpu, gpu) small vs FID scale
    assert (cpu_images.float() - gpu_images.float()).abs().mean() < 2.0
    assert frechet_distance(mu_c, sigma_c, mu_g, sigma_g) < 1.0
