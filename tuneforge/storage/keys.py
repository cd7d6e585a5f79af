"""API keys, stored hashed in the metadata database.

A key is `tml-<random>` (the SDK refuses other shapes before sending anything). Only its SHA-256
digest is stored; the plain key is shown once, when created. Each key has a stable id
(`key-<first 12 hex digits of the digest>`) that owns the sessions, runs and checkpoints made with
it. An admin key sees and manages everything. Revocation takes effect on the next request: the
server looks keys up in the database on every request, so a key revoked from the command line
(another process) is refused at once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from tuneforge.errors import NotFound, UserError
from tuneforge.storage.db import ApiKeyRow, Database, JobKeyRow, utcnow

logger = logging.getLogger(__name__)

KEY_PREFIX = "tml-"


@dataclass(frozen=True)
class Identity:
    owner: str
    admin: bool


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id(key: str) -> str:
    return f"key-{digest(key)[:12]}"


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(24)


class KeyStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def add(self, key: str, name: str = "", admin: bool = False) -> ApiKeyRow:
        """Register `key` (idempotent for a key that exists and is not revoked)."""
        if not key.startswith(KEY_PREFIX) or len(key) < len(KEY_PREFIX) + 16:
            raise UserError(f"API keys must start with {KEY_PREFIX!r} (the SDK requires it) "
                            "and carry at least 16 more characters")
        with self.db.session() as s:
            row = s.get(ApiKeyRow, key_id(key))
            if row is None:
                row = ApiKeyRow(id=key_id(key), digest=digest(key), name=name, admin=admin)
                s.add(row)
            elif row.revoked_at is not None:
                raise UserError(f"API key {row.id} was revoked; create a new one")
            return row

    def create(self, name: str = "", admin: bool = False) -> tuple[str, ApiKeyRow]:
        key = new_key()
        return key, self.add(key, name=name, admin=admin)

    def identify(self, key: str | None) -> Identity | None:
        """The identity of a valid, unrevoked key, else None."""
        if not key:
            return None
        row = self.db.select(select(ApiKeyRow).where(ApiKeyRow.digest == digest(key)))
        if not row:
            # a job's key acts for the key that started the job, while that key is valid
            job = self.db.get(JobKeyRow, digest(key))
            if job is None:
                return None
            row = self.db.select(select(ApiKeyRow).where(ApiKeyRow.id == job.owner))
        if not row or row[0].revoked_at is not None:
            return None
        return Identity(owner=row[0].id, admin=row[0].admin)

    def issue_job_key(self, job_id: str, owner: str) -> str:
        key = new_key()
        self.db.add(JobKeyRow(digest=digest(key), job_id=job_id, owner=owner))
        return key

    def drop_job_keys(self, job_id: str) -> None:
        with self.db.session() as s:
            for row in s.scalars(select(JobKeyRow).where(JobKeyRow.job_id == job_id)):
                s.delete(row)

    def is_admin(self, owner: str) -> bool:
        row = self.db.get(ApiKeyRow, owner)
        return row is not None and row.admin and row.revoked_at is None

    def list(self) -> list[ApiKeyRow]:
        return self.db.select(select(ApiKeyRow).order_by(ApiKeyRow.created_at))

    def revoke(self, kid: str) -> ApiKeyRow:
        with self.db.session() as s:
            row = s.get(ApiKeyRow, kid)
            if row is None:
                raise NotFound(f"no API key with id {kid!r}")
            if row.revoked_at is None:
                row.revoked_at = utcnow()
            return row


def ensure_default_key(path: Path) -> str:
    """The key stored at `path` (mode 0600), generated on first use."""
    if path.exists():
        return path.read_text().strip()
    key = new_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def register_default_key(path: Path, keys: KeyStore) -> str | None:
    """Create (first start) and register the data directory's admin key; None if revoked."""
    key = ensure_default_key(path)
    try:
        keys.add(key, name="default (data_dir/api_key)", admin=True)
    except UserError:
        logger.warning("the key in %s was revoked; use another key", path)
        return None
    return key
