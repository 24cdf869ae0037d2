"""avts_dist.losses"""
