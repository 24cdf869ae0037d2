"""avts_dist.curriculum"""
