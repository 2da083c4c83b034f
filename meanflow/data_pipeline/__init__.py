"""Data: embedded datasets (sklearn digits, 2-D toys) and WebDataset shards at any fsspec URL, behind one stream
interface: ``next_batch()`` (this rank's rows), ``skip(n_samples)``, ``state_dict()``/``load_state_dict()``,
``metrics()``, ``name``, ``sample_shape``, ``num_classes``."""

from meanflow.data_pipeline.embedded import EMBEDDED_NAMES, EmbeddedStream, build_embedded_stream
from meanflow.data_pipeline.errors import UNUSABLE_DATA, ShardUnreadable
from meanflow.data_pipeline.toys2d import TOY_NAMES, sample_toy


def build_stream(data_cfg, seed: int, rank: int = 0, world_size: int = 1):
    """The stream a ``data:`` config section names."""
    if data_cfg.name == "webdataset":
        from meanflow.data_pipeline.webdataset_stream import ShardStream   # torch DataLoader, fsspec: only here
        return ShardStream(data_cfg.url, global_batch=data_cfg.global_batch, seed=seed, rank=rank,
                           world_size=world_size, num_workers=data_cfg.num_workers,
                           shuffle_block=data_cfg.shuffle_block, latent_norm=data_cfg.latent_norm,
                           latent_flip=data_cfg.latent_flip, pixel_flip=data_cfg.pixel_flip,
                           io_retries=data_cfg.io_retries)
    return build_embedded_stream(data_cfg.name, data_cfg.global_batch, seed, rank, world_size)


def merge_stream_states(states: list[dict]) -> dict:
    """Every rank's ``state_dict()`` as the one state a checkpoint stores (and any rank can load)."""
    if states[0].get("kind") == "webdataset":
        from meanflow.data_pipeline.webdataset_stream import merge_stream_states as merge_shard_states
        return merge_shard_states(states)
    return states[0]   # embedded: a pure function of the batch count, the same on every rank


__all__ = ["ShardUnreadable", "UNUSABLE_DATA", "EMBEDDED_NAMES", "EmbeddedStream", "build_embedded_stream", "build_stream", "merge_stream_states",
           "TOY_NAMES", "sample_toy"]
