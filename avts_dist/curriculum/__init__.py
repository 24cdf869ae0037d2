"""avts_dist.curriculum: the negative-difficulty curriculum (``Curriculum(cfg.curriculum)``)."""

from avts_dist.curriculum.scheduler import Curriculum, CurriculumStateError

__all__ = ["Curriculum", "CurriculumStateError"]
