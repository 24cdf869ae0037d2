"""avts_dist: distributed audio-visual temporal synchronization (AVTS) pretraining."""

__version__ = "0.1.0"
