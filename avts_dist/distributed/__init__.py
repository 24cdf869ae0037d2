"""avts_dist.distributed"""
