"""avts_dist.data"""

from avts_dist.data.shards import DatasetError, DatasetIndex, ShardWriter, read_member  # noqa: F401
