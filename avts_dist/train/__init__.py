"""avts_dist.train"""
