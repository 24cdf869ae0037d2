"""avts_dist.data"""
