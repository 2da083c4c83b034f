"""What can go wrong reading data, told apart by what the user should do: ``ShardUnreadable`` is an outage a
rerun may get past (exit code 1); ``DataUnreadable`` and ``DataUnusable`` are bad input (exit code 2)."""


class ShardUnreadable(OSError):
    """A shard that cannot be read now: it vanished, or I/O kept failing past the retries. Storage may recover, so a
    rerun can continue from the last checkpoint (the trainer's exit code 1)."""


class DataUnreadable(ValueError):
    """Bad input, not an outage: a reader went through a whole epoch of its shards and every one was corrupt (not a
    tar, or truncated before its first record), so no record could be read. The message names the data URL."""


class DataUnusable(ValueError):
    """Bad input: a reader went through a whole epoch of its shards without one decodable record (records were read,
    but none decodes: a manifest whose sample_shape is not the data's, say). Where not even one record could be
    read, ``DataUnreadable`` is raised instead."""


UNUSABLE_DATA = (DataUnreadable, DataUnusable)
