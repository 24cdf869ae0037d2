"""Keep-last retention and quarantine: only checkpoints that verify are counted, and one that
does not is renamed ``<tag>.quarantined-<reason>`` with a ``QUARANTINED`` note, never deleted."""

from __future__ import annotations

import json
import logging
import time

from avts_dist.storage import StorageError
from avts_dist.train.checkpoint.refs import (
    CheckpointDamaged,
    CheckpointError,
    CheckpointRef,
    list_checkpoints,
    list_quarantined,
    manifest_of,
)
from avts_dist.train.checkpoint.storage import CheckpointStorage
from avts_dist.train.checkpoint.verify import validate

__all__ = ["Retention", "retention_order"]

log = logging.getLogger("avts.train")


def retention_order(refs: list[CheckpointRef], newest: str) -> list[CheckpointRef]:
    """The tag just published first, whatever its step (a resume from an older checkpoint may
    leave higher steps behind), then the rest newest first."""
    return sorted(refs, key=lambda r: (r.tag != newest, -r.step))


class Retention:
    """Quarantine and keep-last over one :class:`CheckpointStorage`; remembers the tags this
    process wrote or verified, so that none is hashed twice."""

    def __init__(self, storage: CheckpointStorage, keep_last: int) -> None:
        self.storage, self.keep_last = storage, keep_last
        self.verified: set[str] = set()

    def free_name(self, name: str) -> str:
        """``name``, or ``name.2``, ``name.3``... when a quarantined tag has it already."""
        taken = set(list_quarantined(self.storage.url, self.storage.options))
        candidate, n = name, 1
        while candidate in taken:
            n += 1
            candidate = f"{name}.{n}"
        return candidate

    def quarantine(self, tag: str, reason: str, detail: str) -> str:
        """Rank 0: renames ``tag`` to ``tag.quarantined-<reason>`` (never deleted), with a
        ``QUARANTINED`` note saying why; returns the new name."""
        name = self.free_name(f"{tag}.quarantined-{reason}")
        note = json.dumps({"reason": reason, "detail": detail, "time": time.time()})
        self.storage.quarantine(tag, name, note)
        return name

    def verifies(
        self, ref: CheckpointRef, sizes: dict[str, int] | None
    ) -> CheckpointDamaged | None:
        """None when ``ref`` verifies (this process verified it already, or it does now: the
        files' sizes and hashes locally; the sizes of a remote listing), else the damage."""
        if ref.tag in self.verified:
            return None
        if sizes is None:
            try:
                validate(self.storage.local_root / ref.tag, ref.meta, label=ref.url)
            except CheckpointDamaged as exc:
                return exc
        else:
            for name, entry in sorted(manifest_of(ref.meta).items()):
                if sizes.get(name) != entry["size"]:
                    detail = (
                        f"{name} has {sizes.get(name)} bytes, the manifest says {entry['size']}"
                    )
                    return CheckpointDamaged(detail, "size-mismatch", detail)
        self.verified.add(ref.tag)
        return None

    def retain(self, newest: str, *, rank: int, fs_leader: bool) -> None:
        """Keeps the newest ``checkpoint.keep_last`` checkpoints that verify, ``newest`` (just
        published) first; deletes older ones. One that does not verify is quarantined, not
        counted. Rank 0 for the checkpoints, each filesystem's first rank for its staged copies.
        Failures here are logged: a checkpoint is already safe."""
        try:
            if rank == 0:
                self._retain_checkpoints(newest)
            if fs_leader:
                staged = retention_order(list_checkpoints(str(self.storage.local_root)), newest)
                self.storage.prune_staged([r.tag for r in staged[self.keep_last :]])
        except (OSError, StorageError, CheckpointError) as exc:
            log.warning("keep-last retention after %s skipped: %s", newest, exc)

    def _retain_checkpoints(self, newest: str) -> None:
        keep = self.keep_last
        refs = list_checkpoints(self.storage.url, self.storage.options)
        for ref in retention_order(refs, newest):
            if keep <= 0:
                self.storage.delete(ref.tag)
                continue
            damage = self.verifies(ref, self.storage.listed_sizes(ref.tag))
            if damage is None:
                keep -= 1
                continue
            name = self.quarantine(ref.tag, damage.reason, damage.detail)
            log.warning(
                "keep-last: %s does not verify (%s), kept as %s", ref.tag, damage.detail, name
            )
