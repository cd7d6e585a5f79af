"""Layout of the data directory, and the one place that turns names into paths.

    data_dir/
      tuneforge.db            metadata (SQLite by default)
      api_key                 the admin key generated on first start (mode 0600)
      url_secret              signs download URLs of exported weights (mode 0600)
      models/                 built-in and converted base models (unless models_dir is set)
      checkpoints/<run>/<kind>/<name>/   one folder per checkpoint (see checkpoints.py)
      samplers/<sampler>/     in-memory sampler snapshots written out when evicted
      offload/<model>.pt      training models offloaded from memory (dropped at start)

Every name that reaches a path is checked against a strict pattern first, and the resulting path
is verified to stay under the data directory.
"""

from __future__ import annotations

import re
from pathlib import Path

from tuneforge.errors import UserError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,255}$")
CHECKPOINT_KINDS = ("weights", "sampler_weights", "external_weights")


def check_name(name: str, field: str = "path") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise UserError(
            f"{field} {name!r} is not a valid checkpoint name: use 1-128 characters from "
            "letters, digits, '.', '_' and '-', starting with a letter or digit"
        )
    return name


class DataPaths:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    @property
    def db_file(self) -> Path:
        return self.root / "tuneforge.db"

    @property
    def api_key_file(self) -> Path:
        return self.root / "api_key"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def url_secret_file(self) -> Path:
        return self.root / "url_secret"

    @property
    def samplers(self) -> Path:
        return self.root / "samplers"

    @property
    def offload(self) -> Path:
        return self.root / "offload"

    @property
    def experiments(self) -> Path:
        """One folder per job (tuneforge.jobs)."""
        return self.root / "experiments"

    def checkpoint(self, run_id: str, kind: str, name: str) -> Path:
        if not RUN_ID_RE.match(run_id) or ".." in run_id:
            raise UserError(f"training run id {run_id!r} is not valid")
        if kind not in CHECKPOINT_KINDS:
            raise UserError(f"checkpoint kind {kind!r} is not one of {CHECKPOINT_KINDS}")
        check_name(name)
        path = (self.checkpoints / run_id / kind / name).resolve()
        if not path.is_relative_to(self.checkpoints.resolve()):
            raise UserError(f"checkpoint path {run_id}/{kind}/{name} leaves the data directory")
        return path

    def ensure(self) -> None:
        for d in (self.root, self.models, self.checkpoints, self.samplers, self.offload,
                  self.experiments):
            d.mkdir(parents=True, exist_ok=True)
