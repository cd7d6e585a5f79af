"""Bring the data directory and the database back into agreement after an unclean stop.

Checkpoints are written under a temporary name and renamed into place, then recorded in the
database. A crash can therefore leave: a temporary folder (an interrupted write: deleted), a
folder being deleted (deleted), a complete folder that was never recorded (recorded now, from
its own metadata), or a record whose folder is gone (dropped). Run once at start, before any
request.
"""

from __future__ import annotations

import json
import logging
import shutil

from sqlalchemy import select

from tuneforge.storage import checkpoints
from tuneforge.storage.db import CheckpointRow, Database, TrainingRunRow
from tuneforge.storage.paths import CHECKPOINT_KINDS, DataPaths

logger = logging.getLogger(__name__)


def recover(db: Database, paths: DataPaths) -> dict[str, int]:
    report = {"partial_removed": 0, "unrecorded_added": 0, "missing_dropped": 0}
    # training models offloaded by the previous process are gone with it
    for stale in paths.offload.glob("*") if paths.offload.exists() else []:
        if stale.is_dir():  # an engine worker's own folder
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink()
    for root in (paths.checkpoints, paths.samplers):
        if not root.exists():
            continue
        for leftover in [p for p in root.rglob(".tmp-*")] + [p for p in root.rglob(".del-*")]:
            if leftover.exists():
                logger.warning("removing interrupted write %s", leftover)
                shutil.rmtree(leftover, ignore_errors=True)
                report["partial_removed"] += 1

    recorded = {row.tinker_path: row for row in db.select(select(CheckpointRow))}
    for run_dir in (d for d in paths.checkpoints.iterdir() if d.is_dir()):
        for kind in CHECKPOINT_KINDS:
            for folder in sorted((run_dir / kind).glob("*")):
                path = f"tinker://{run_dir.name}/{kind}/{folder.name}"
                if path in recorded or not (folder / checkpoints.META_FILE).exists():
                    continue
                if _record(db, path, run_dir.name, kind, folder):
                    report["unrecorded_added"] += 1
    for path, row in recorded.items():
        folder = paths.checkpoints / row.training_run_id / row.kind / row.name
        if not folder.exists():
            logger.warning("dropping record of %s: its files are gone", path)
            with db.session() as s:
                s.delete(s.get(CheckpointRow, path))
            report["missing_dropped"] += 1
    return report


def _record(db: Database, path: str, run_id: str, kind: str, folder) -> bool:
    run = db.get(TrainingRunRow, run_id)
    if run is None:
        logger.warning("not recording %s: its training run is unknown to the database", path)
        return False
    meta = json.loads((folder / checkpoints.META_FILE).read_text())
    size = sum(f.stat().st_size for f in folder.iterdir())
    db.add(CheckpointRow(tinker_path=path, training_run_id=run_id, owner=run.owner, kind=kind,
                         name=folder.name, size_bytes=size,
                         user_metadata=meta.get("user_metadata") or {}))
    logger.warning("recorded %s, written before an unclean stop", path)
    return True
