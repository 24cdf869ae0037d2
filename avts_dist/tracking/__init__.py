"""avts_dist.tracking"""
