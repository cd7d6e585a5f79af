"""A data directory opened for use: its paths, metadata database and API keys."""

from __future__ import annotations

from pathlib import Path

from tuneforge.storage.db import Database
from tuneforge.storage.keys import KeyStore, register_default_key
from tuneforge.storage.paths import DataPaths


class DataDir:
    def __init__(self, root: Path, db_url: str) -> None:
        self.paths = DataPaths(root)
        self.paths.ensure()
        self.db = Database(db_url)
        self.keys = KeyStore(self.db)
        self.default_key = register_default_key(self.paths.api_key_file, self.keys)
