"""The launch layer: a config plus cluster options -> SLURM jobs through submitit.

- :mod:`launch.plan`: the job plan of one command (pretrain -> export -> evaluations, chained
  with ``afterok``), printed by ``--dry-run`` or submitted.
- :mod:`launch.executors`: SLURM parameters, sbatch rendering, cluster checks, job states.
- :mod:`launch.pretrain`: the checkpointable callable every task runs (preemption -> requeue).
- :mod:`launch.evaljobs`: the export and evaluation callables (library calls, no CLI).
- :mod:`launch.profiles`: cluster profiles in ``configs/cluster/`` and option layering.
- ``launch/local_slurm.sh``: a real local SLURM cluster (one node, or two in network namespaces).

The command is ``avts launch``; see ``docs/slurm.md``.
"""
