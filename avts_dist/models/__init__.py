"""avts_dist.models"""
