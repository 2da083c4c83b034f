"""Data: embedded datasets (sklearn digits, 2-D toys) as deterministic global-batch streams; WebDataset shards."""

from meanflow.data_pipeline.embedded import EMBEDDED_NAMES, EmbeddedStream, build_embedded_stream
from meanflow.data_pipeline.toys2d import TOY_NAMES, sample_toy

__all__ = ["EMBEDDED_NAMES", "EmbeddedStream", "build_embedded_stream", "TOY_NAMES", "sample_toy"]
