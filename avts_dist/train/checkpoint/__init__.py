"""The checkpoint component: find, verify, fetch, convert and save complete-or-invisible sharded
checkpoints, on local disk or behind an fsspec URL; quarantine the damaged ones, never delete them.

Layout of ``checkpoint.dir``::

    step_000040/              one tag: DeepSpeed's shards (their names are engine.py's business),
        rng_rank_00000.pt     per-rank RNG states,
        COMPLETE              JSON: step, world_size, zero_stage, ..., and ``files``, the manifest
                              of every rank's files: ``{name: {"size": n, "sha256": hex}}``
    step_000040_universal/    DeepSpeed's universal form, made on demand for a new world size
    step_000030.quarantined-sha256-mismatch/
                              a tag that failed verification, renamed (with a ``QUARANTINED``
                              note saying why); ``.quarantined-nonfinite``: the state a run
                              stopped on after non-finite losses, kept for debugging
    latest                    the newest published tag (DeepSpeed's pointer file)

**Saving.** Every rank writes into the hidden tag ``.tmp-step_000040``, taking each file's size
and sha256 from the bytes on their way to the disk (``avts_dist.integrity``: no second read), and
reports them; rank 0 confirms every file (a stat, or one listing of the remote tag), writes
``COMPLETE`` into the tag and only then renames it and rewrites ``latest``. A kill at any point
leaves the previous checkpoint the newest; ``.tmp-*`` leftovers are removed at the next save.
Before writing, the free space is checked against the previous checkpoint's size (or an
estimate); a full disk during the write is the same one-line error, the partial tag is removed and
``latest`` stays. The first save after a resume reads back what it wrote and compares hashes.

**Verifying.** :func:`validate` checks the marker, then every file's size (a stat), then every
file's sha256, before any file of a tag is read: resume, export and evaluation all go through
:func:`fetch_checkpoint`, which verifies. ``resume=auto`` walks back from the newest tag to the
newest one that verifies; each one it skips is quarantined (renamed ``<tag>.quarantined-<reason>``,
kept) and named, with its reason, in one warning line. Keep-last counts only tags that verify.

Remote destinations (``s3://...``): DeepSpeed writes to a local staging folder
(``checkpoint.staging_dir``, default ``<run.dir>/checkpoint_staging``), then every rank uploads the
files it wrote and rank 0 writes ``COMPLETE`` once all of them are listed remotely. The staging
folder may be node-local: the ranks find out which of them share a filesystem, and to resume, the
first rank of each filesystem fetches the remote tag (so every node has it). An endpoint that does
not answer is reported at start (``storage.check_bucket``), not at the first save.

Resume (:meth:`CheckpointManager.plan_resume`) returns a typed :class:`ResumePlan`;
:func:`resolve_checkpoint` turns any path or URL (run dir, checkpoints dir, tag dir, ``s3://``,
``file://``) into a :class:`CheckpointRef`, which export and evaluation use too.

The package, one concern per module:

- ``refs``: references and listing (light: no trainer, no DeepSpeed; what ``avts status``,
  ``avts export`` and ``avts eval`` need to find a checkpoint);
- ``verify``: verification against the manifest, and the verified fetch of a remote tag;
- ``storage``: where checkpoints live, one protocol with a local and a remote implementation;
- ``states``: the resumable parts of a run, each a ``Stateful`` under a fixed key;
- ``save``: :class:`CheckpointManager`, the collective save protocol and the load of a resume;
- ``upload``: the background upload of ``checkpoint.async_upload`` (no process group: the ranks
  meet through markers on the store; rank 0 publishes once every rank's upload is verified);
- ``retention``: keep-last and quarantine;
- ``resume``: resume planning and DeepSpeed's universal conversion.
"""

from avts_dist.train.checkpoint.refs import (
    CHECKPOINT_FORMAT_VERSION,
    COMPLETE,
    LATEST,
    QUARANTINED,
    CheckpointDamaged,
    CheckpointError,
    CheckpointRef,
    list_checkpoints,
    list_quarantined,
    manifest_bytes,
    manifest_of,
    resolve_checkpoint,
    rng_file_name,
    tag_for,
)
from avts_dist.train.checkpoint.resume import ResumePlan
from avts_dist.train.checkpoint.save import CheckpointManager
from avts_dist.train.checkpoint.states import (
    STATE_KEYS,
    RNGState,
    Stateful,
    get_rng_state,
    set_rng_state,
)
from avts_dist.train.checkpoint.verify import fetch_checkpoint, validate

__all__ = [
    "CHECKPOINT_FORMAT_VERSION",
    "COMPLETE",
    "LATEST",
    "QUARANTINED",
    "STATE_KEYS",
    "CheckpointDamaged",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointRef",
    "RNGState",
    "ResumePlan",
    "Stateful",
    "fetch_checkpoint",
    "get_rng_state",
    "list_checkpoints",
    "list_quarantined",
    "manifest_bytes",
    "manifest_of",
    "resolve_checkpoint",
    "rng_file_name",
    "set_rng_state",
    "tag_for",
    "validate",
]
