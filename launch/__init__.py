"""The launch layer: a config plus cluster options -> SLURM jobs through submitit.

- :mod:`launch.plan`: the job plan of one command (pretrain -> export -> evaluations, chained
  with ``afterok``), printed by ``--dry-run`` or submitted.
- :mod:`launch.executors`: SLURM parameters, sbatch rendering, cluster checks.
- :mod:`launch.jobs`: SLURM job states and the one job waiter (``--wait``, ``avts study``).
- :mod:`launch.pretrain`: the checkpointable callable every task runs (preemption -> requeue).
- :mod:`launch.evaljobs`: the export and evaluation callables (library calls, no CLI).
- :mod:`launch.profiles`: cluster profiles in ``configs/cluster/`` and option layering.
- :mod:`launch.study`: ``avts study``: the protocol's grid of pretrainings and evaluations
  (schema, plan, reuse records, execution).
- ``launch/local_slurm.sh``: a real local SLURM cluster (one node, or two in network namespaces).

The commands are ``avts launch`` and ``avts study``; see ``docs/slurm.md`` and ``docs/study.md``.
"""
