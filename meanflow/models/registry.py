"""Size registries and `build_model(cfg)`: the one place a config turns into a model."""

from .dit import MFDiT
from .imf_dit import IMFDiT
from .mlp import ToyMLP

# --------------------------------------------------------------------------------------------------------------
# Size registry: (depth, width, heads). MF and iMF name different shapes by the same letters (docs/objectives.md).
# --------------------------------------------------------------------------------------------------------------

MF_DIT_SIZES = {
    "tiny": (4, 128, 4),
    "S": (12, 384, 6),
    "B": (12, 768, 12),  # B/2: 131M
    "M": (16, 1024, 16),  # M/2: 308M
    "L": (24, 1024, 16),  # L/2: 459M
    "XL": (28, 1152, 16),  # XL/2: 676M
}

IMF_DIT_SIZES = {
    "tiny": (4, 128, 4),
    "S": (12, 384, 6),
    "B": (12, 768, 12),  # B/2: 89M
    "M": (24, 768, 12),
    "L": (32, 1024, 16),  # L/2: 409M
    "XL": (48, 1024, 16),  # XL/2: 610M
}

FAMILIES = ("mf_dit", "imf_dit", "mlp")
PATCH_SIZES = (2, 4, 8)


def _dit_shape(cfg, family, sizes):
    """(depth, width, heads) from the registry, with any of cfg.depth / width / heads overriding."""
    size = getattr(cfg, "size", None)
    if size not in sizes:
        raise ValueError(f"model.size: unknown size {size!r} for family {family}; known: {', '.join(sizes)}")
    depth, width, heads = sizes[size]
    depth = getattr(cfg, "depth", None) or depth
    width = getattr(cfg, "width", None) or width
    heads = getattr(cfg, "heads", None) or heads
    if width % heads:
        raise ValueError(f"model.heads: width {width} is not divisible by heads {heads}")
    return depth, width, heads


def _image_args(cfg):
    patch_size = getattr(cfg, "patch_size", 2)
    image_size = getattr(cfg, "image_size", 32)
    if patch_size not in PATCH_SIZES:
        raise ValueError(f"model.patch_size: unknown patch size {patch_size!r}; known: {PATCH_SIZES}")
    if image_size % patch_size:
        raise ValueError(f"model.patch_size: image_size {image_size} is not divisible by patch size {patch_size}")
    return dict(image_size=image_size, patch_size=patch_size, in_channels=getattr(cfg, "in_channels", 4),
                num_classes=getattr(cfg, "num_classes", 0))


def build_model(cfg):
    """Build the model a config's `model` section names (fields read with getattr, so any namespace works)."""
    family = getattr(cfg, "family", None)
    if family == "mlp":
        return ToyMLP(data_dim=getattr(cfg, "data_dim", 2), hidden=getattr(cfg, "mlp_hidden", 128),
                      layers=getattr(cfg, "mlp_layers", 3))
    if family == "mf_dit":
        depth, width, heads = _dit_shape(cfg, family, MF_DIT_SIZES)
        return MFDiT(**_image_args(cfg), depth=depth, width=width, heads=heads,
                     conditioning=getattr(cfg, "conditioning", "standard"), dmf_depth=getattr(cfg, "dmf_depth", 0))
    if family == "imf_dit":
        depth, width, heads = _dit_shape(cfg, family, IMF_DIT_SIZES)
        if (width // heads) % 2:
            raise ValueError(f"model.heads: RoPE needs an even head dim, got {width}/{heads}")
        v_head = bool(getattr(cfg, "v_head", False))
        v_head_depth = getattr(cfg, "v_head_depth", 8)
        if v_head and not 0 < v_head_depth < depth:
            raise ValueError(f"model.v_head_depth: must be in [1, depth - 1] = [1, {depth - 1}] for depth {depth}, "
                             f"got {v_head_depth} (the trunk before the v-head needs at least one block)")
        return IMFDiT(**_image_args(cfg), depth=depth, width=width, heads=heads, v_head=v_head,
                      v_head_depth=v_head_depth, **_prefix_arg(cfg))
    raise ValueError(f"model.family: unknown family {family!r}; known: {', '.join(FAMILIES)}")


def _prefix_arg(cfg):
    tokens = getattr(cfg, "prefix_tokens", None)
    if tokens is None:
        return {}
    if len(tokens) != 5 or min(tokens) < 1:
        raise ValueError(f"model.prefix_tokens: need 5 positive counts (class, omega, t_min, t_max, h), got {tokens}")
    return {"prefix_tokens": tuple(tokens)}


def count_parameters(model, include_v_head=False):
    """Number of parameters; the iMF v-head (dropped at inference) only when include_v_head is True."""
    return sum(
        p.numel() for name, p in model.named_parameters()
        if include_v_head or "v_head" not in name.split(".")
    )
