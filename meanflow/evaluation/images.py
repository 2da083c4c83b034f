"""Writing samples as pictures: image grids (PNG) and 2-D scatter plots, to any fsspec URL (file://, s3://, memory://)."""

from __future__ import annotations

import io
import os

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 with the project's fixed formula clamp(127.5 x + 128, 0, 255), truncated.

    127.5 x + 128 = 255 (x + 1)/2 + 0.5, so truncation rounds half up; the same formula everywhere keeps FID
    features comparable between runs and with the reference statistics.
    """
    return (127.5 * x.detach().float() + 128.0).clamp(0, 255).to(torch.uint8)


def _write_bytes(data: bytes, url: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        # Object stores have no directories; only a local path needs its parent created.
        fs.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def image_grid(images: torch.Tensor, nrow: int, upscale: int = 4, padding: int = 2) -> torch.Tensor:
    """images (N, C, H, W) in [-1, 1] -> uint8 grid (H_grid, W_grid, C) with ``nrow`` images per row.

    Nearest-neighbour upscaling keeps 8x8 digits' pixels sharp. Grid size: rows * (H*upscale + padding) + padding
    by min(N, nrow) * (W*upscale + padding) + padding, with rows = ceil(N / nrow); the padding is black.
    """
    from torchvision.utils import make_grid

    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, 1|3, H, W), got {tuple(images.shape)}")
    big = to_uint8(images.cpu()).repeat_interleave(upscale, dim=2).repeat_interleave(upscale, dim=3)
    grid = make_grid(big, nrow=nrow, padding=padding, pad_value=0)  # (3, H_grid, W_grid); grey is triplicated
    grid = grid[:1] if images.shape[1] == 1 else grid
    return grid.permute(1, 2, 0).contiguous()


def save_image_grid(images: torch.Tensor, url: str, nrow: int, upscale: int = 4) -> None:
    """Write ``image_grid(images, nrow, upscale)`` as a PNG (greyscale for one channel) to ``url``."""
    from PIL import Image

    grid = image_grid(images, nrow, upscale).numpy()
    # uint8 (H, W) is read as mode "L" and (H, W, 3) as "RGB" (fromarray's explicit mode= is deprecated).
    pil = Image.fromarray(grid[..., 0] if grid.shape[2] == 1 else grid)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    _write_bytes(buf.getvalue(), url)


def save_scatter_png(points: torch.Tensor, url: str, reference: torch.Tensor | None = None,
                     limit: float = 4.5, title: str | None = None) -> None:
    """Scatter plot of 2-D samples (N, 2), reference points drawn lightly behind; fixed axes [-limit, limit]^2 so
    plots of one run are comparable step to step."""
    # Figure + Agg canvas directly (no pyplot): no global backend state, safe in worker processes without a display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if reference is not None:
        ref = reference.detach().cpu().float().numpy()
        ax.scatter(ref[:, 0], ref[:, 1], s=1, c="0.75", alpha=0.5, zorder=1, linewidths=0)
    pts = points.detach().cpu().float().numpy()
    ax.scatter(pts[:, 0], pts[:, 1], s=1, c="tab:blue", zorder=2, linewidths=0)
    ax.set_xlim(-limit, limit)
    ax.set_ylim(-limit, limit)
    ax.set_aspect("equal")
    if title:
        ax.set_title(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _write_bytes(buf.getvalue(), url)
