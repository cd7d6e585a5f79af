"""Operations on a data directory that need no running server: API keys, export, import.

They work directly on the metadata database and the checkpoint files, so they also work while
a server uses the same data directory (SQLite in WAL mode, or a shared database URL).
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

from tuneforge.engine.models import ModelRegistry
from tuneforge.errors import Unsupported, UserError
from tuneforge.export import formats
from tuneforge.settings import Settings
from tuneforge.storage import checkpoints
from tuneforge.storage.datadir import DataDir
from tuneforge.storage.db import CheckpointRow, SessionRow, TrainingRunRow, utcnow
from tuneforge.storage.keys import key_id
from tuneforge.storage.paths import check_name

# PEFT adapter_config fields we can honour, with the values we support.
_PEFT_REQUIRED = {"peft_type": "LORA", "bias": "none", "fan_in_fan_out": False,
                  "use_dora": False, "use_rslora": False}


class AdminData(DataDir):
    """A data directory opened for offline operations."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings.data_dir, settings.db_url)
        self.settings = settings

    def registry(self) -> ModelRegistry:
        return ModelRegistry.from_settings(self.settings, self.paths.models)

    def checkpoint_folder(self, source: str) -> Path:
        """A `tinker://RUN/KIND/NAME` path of this data directory, or a folder, as a folder."""
        if source.startswith("tinker://"):
            parts = source.removeprefix("tinker://").split("/")
            if len(parts) != 3:
                raise UserError(f"{source!r} must look like tinker://RUN_ID/KIND/NAME")
            folder = self.paths.checkpoint(*parts)
        else:
            folder = Path(source).expanduser().resolve()
        if not (folder / checkpoints.ADAPTER_FILE).exists():
            raise UserError(f"{source}: no {checkpoints.ADAPTER_FILE} there")
        return folder


def export(data: AdminData, source: str, dest: Path, fmt: str = "peft",
           dtype: str | None = None, require_vllm: bool = False) -> formats.Exported:
    """Write a checkpoint in one of `formats.FORMATS` into `dest` (new or empty)."""
    formats.check_args(fmt, dtype)
    folder = data.checkpoint_folder(source)
    if dest.exists() and any(dest.iterdir()):
        raise UserError(f"{dest} exists and is not empty")
    existed = dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    try:
        return formats.write(fmt, folder, dest, data.registry(), dtype, require_vllm)
    except BaseException:
        if existed:  # leave the empty folder the user gave, without our half-written files
            for child in dest.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        else:
            shutil.rmtree(dest, ignore_errors=True)
        raise


def import_adapter(data: AdminData, source: Path, base_model: str, name: str,
                   owner: str | None = None) -> str:
    """Register a PEFT LoRA adapter trained elsewhere as a training checkpoint.

    Returns its tinker:// path; `create_training_client_from_state` continues training it (with
    a fresh optimizer: a PEFT adapter carries no optimizer state).
    """
    check_name(name, "name")
    config = json.loads((source / checkpoints.CONFIG_FILE).read_text())
    for key, wanted in _PEFT_REQUIRED.items():
        if key in config and config[key] not in (wanted, None):
            raise Unsupported(f"adapter_config.{key} = {config[key]!r} is not supported "
                              f"(only {wanted!r})")
    for key in ("modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform"):
        if config.get(key):
            raise Unsupported(f"adapter_config.{key} is not supported")
    rank = int(config["r"])
    if not 1 <= rank <= data.settings.max_lora_rank:
        raise UserError(f"adapter_config.r = {rank} is outside [1, max_lora_rank="
                        f"{data.settings.max_lora_rank}]")
    ckpt = checkpoints.load(source)
    registry = data.registry()
    base = registry.get(base_model)
    known = {p: g for g, paths in base.targets.items() for p in paths}
    unknown = sorted(set(ckpt.A) - set(known))
    if unknown:
        raise Unsupported(f"the adapter targets modules tuneforge cannot adapt: {unknown[:3]}")
    for path in ckpt.A:
        out_f, in_f = base.model.get_submodule(path).base.weight.shape
        if tuple(ckpt.A[path].shape) != (rank, in_f) or tuple(ckpt.B[path].shape) != (out_f, rank):
            raise UserError(f"{path}: LoRA shapes {list(ckpt.A[path].shape)} / "
                            f"{list(ckpt.B[path].shape)} do not fit {base_model}")
    groups = {known[p] for p in ckpt.A}
    if owner is None and data.default_key is None:
        raise UserError("the data directory's admin key is revoked: give --key-id")
    owner = owner or key_id(data.default_key)
    if not any(row.id == owner and row.revoked_at is None for row in data.keys.list()):
        raise UserError(f"--key-id {owner!r} is not an active API key of this data directory")
    token = uuid.uuid4().hex[:12]
    session_id, run_id = f"s-import-{token}", f"import-{token}"
    data.db.add(SessionRow(id=session_id, owner=owner, sdk_version="import",
                           user_metadata={"imported_from": str(source)},
                           finished_at=utcnow(), finish_reason="import"))
    data.db.add(TrainingRunRow(
        id=run_id, session_id=session_id, owner=owner, base_model=base.name, lora_rank=rank,
        train_attn="attn" in groups, train_mlp="mlp" in groups,
        train_unembed="unembed" in groups, seed=None,
        user_metadata={"imported_from": str(source)}))
    alpha = float(config.get("lora_alpha", rank))
    adapter_config = checkpoints.peft_adapter_config(
        registry.peft_name(base.name), rank, alpha, list(ckpt.A),
        dropout=float(config.get("lora_dropout") or 0.0))
    meta = {"training_run_id": run_id, "kind": "weights", "name": name, "step": 0,
            "base_model": base.name, "created": utcnow().isoformat(),
            "lora": {"rank": rank, "alpha": alpha}, "user_metadata": {}}
    folder = data.paths.checkpoint(run_id, "weights", name)
    size = checkpoints.save(folder, ckpt.A, ckpt.B, adapter_config, meta)
    path = f"tinker://{run_id}/weights/{name}"
    data.db.add(CheckpointRow(tinker_path=path, training_run_id=run_id, owner=owner,
                              kind="weights", name=name, size_bytes=size))
    return path


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model",
                    "config.json", "generation_config.json")


def cache_tokenizer(data: AdminData, name: str, force: bool = False) -> Path:
    """Put the tokenizer of served model `name` into the local Hugging Face cache under `name`.

    Clients on this machine then load it offline by name: `SamplingClient.get_tokenizer()`,
    and the cookbook's `get_tokenizer(model_name)`. Aliases resolve to their target's tokenizer.
    """
    import hashlib

    from huggingface_hub import constants

    if name.count("/") != 1 or not all(name.split("/")):
        raise UserError(f"{name!r} is not a Hugging Face style name (ORG/NAME)")
    source = data.registry().resolve(name)
    repo = Path(constants.HF_HUB_CACHE) / f"models--{name.replace('/', '--')}"
    ours = list(repo.glob("snapshots/*/tuneforge.json"))
    if repo.exists() and not ours and not force:
        raise UserError(f"{repo} already holds files that tuneforge did not put there; "
                        "pass --force to replace them")
    files = [source / f for f in _TOKENIZER_FILES if (source / f).exists()]
    digest = hashlib.sha1(b"".join(f.read_bytes() for f in files)).hexdigest()
    snapshot = repo / "snapshots" / digest
    if repo.exists():
        shutil.rmtree(repo)
    snapshot.mkdir(parents=True)
    for f in files:
        shutil.copy2(f, snapshot / f.name)
    (snapshot / "tuneforge.json").write_text(json.dumps({"served_as": name,
                                                         "source": str(source)}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(digest)
    return snapshot
