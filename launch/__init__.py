"""The launch layer: a config plus cluster options -> SLURM jobs through submitit.

- ``launch/local_slurm.sh``: a real local SLURM cluster (one node, or two in network namespaces).
- :mod:`launch.executors`: SLURM parameters, sbatch rendering for ``--dry-run``, cluster checks,
  waiting for jobs.
- :mod:`launch.pretrain`: the checkpointable callable every task runs (preemption -> requeue).
- :mod:`launch.evaljobs`: export and evaluation jobs, chained with ``afterok``.
- :mod:`launch.profiles`: cluster profiles in ``configs/cluster/``.

The entry point is ``avts launch`` (``avts_dist/cli/launch.py``); see ``docs/slurm.md``.
"""
