"""avts_dist.data"""

from avts_dist.data.loader import AVLoader, build_loader  # noqa: F401
from avts_dist.data.shards import DatasetError, DatasetIndex, ShardWriter, read_member  # noqa: F401
