"""`tuneforge` command line.

    tuneforge serve                      run the server
    tuneforge keys create|list|revoke    manage API keys (stored hashed)
    tuneforge export CHECKPOINT --to DIR [--format peft|merged|gguf-lora|gguf-merged|ollama]
    tuneforge import ADAPTER_DIR --base-model NAME --name NAME
    tuneforge cache-tokenizer NAME       put a served model's tokenizer in the local HF cache
    tuneforge train CONFIG.yaml          run a training job (SFT, DPO, RL, distill, atomic)
    tuneforge jobs submit|list|status|logs|metrics|cancel|evaluate   the REST job API
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from tuneforge.errors import TuneforgeError, UserError
from tuneforge.export import FORMATS
from tuneforge.settings import Settings


def _serve_parser(sub) -> None:
    from tuneforge.jobs.cli import alias_pair

    p = sub.add_parser(
        "serve",
        help="run the Tinker-compatible server",
        description="Run the Tinker-compatible server. Each option can also come from the "
        "environment variable in brackets; more settings (limits, aliases, API keys) are "
        "environment-only, see the README.",
    )
    p.add_argument("--host", help="interface to listen on (default 127.0.0.1) [TUNEFORGE_HOST]")
    p.add_argument("--port", type=int, help="TCP port (default 8000) [TUNEFORGE_PORT]")
    p.add_argument("--data-dir", help="metadata database, checkpoints, API key and models "
                   "(default ./data) [TUNEFORGE_DATA_DIR]")
    p.add_argument("--models-dir", help="cache of built-in and converted base models "
                   "(default DATA_DIR/models) [TUNEFORGE_MODELS_DIR]")
    p.add_argument("--preload", action="append", metavar="MODEL",
                   help="base model to load at start; repeat for several "
                   "(default: tuneforge/tiny-qwen3) [TUNEFORGE_PRELOAD_MODELS, a JSON list]")
    p.add_argument("--threads", type=int, help="torch threads for the engine "
                   "(default: all cores) [TUNEFORGE_NUM_THREADS]")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"],
                   help="compute dtype; auto (default) picks bf16 on CUDA or a CPU with "
                   "AVX512-BF16/AMX, else fp32 [TUNEFORGE_DTYPE]")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   help="recompute activations in the backward pass for every run "
                   "[TUNEFORGE_GRADIENT_CHECKPOINTING]")
    p.add_argument("--alias", action="append", metavar="NAME=MODEL", type=alias_pair,
                   help="serve MODEL (which may end in @nf4, @fp4 or @int8 for a quantized "
                   "copy) under NAME; repeat for several [TUNEFORGE_MODEL_ALIASES, a JSON object]")
    p.add_argument("--ray", metavar="auto|ADDRESS",
                   help="run the engine in Ray actors: auto starts Ray on this machine (on "
                   "127.0.0.1), an address joins a running cluster [TUNEFORGE_RAY]")
    p.add_argument("--workers", type=int, help="engine worker actors, one device each "
                   "(default 1; needs --ray) [TUNEFORGE_WORKERS]")
    p.add_argument("--worker-threads", type=int, help="torch threads of each CPU worker "
                   "(default 1) [TUNEFORGE_WORKER_THREADS]")
    p.add_argument("--data-parallel", action="append", metavar="MODEL=K", type=_data_parallel,
                   help="train MODEL's runs data-parallel over K workers; repeat for several "
                   "[TUNEFORGE_DATA_PARALLEL, a JSON object]")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _data_parallel(text: str) -> tuple[str, int]:
    name, sep, k = text.rpartition("=")
    if not sep or not name or not k.isdigit():
        raise argparse.ArgumentTypeError(f"--data-parallel {text!r}: expected MODEL=K, "
                                         "e.g. Qwen/Qwen3-8B=2")
    return name, int(k)


def _data_dir_option(p) -> None:
    p.add_argument("--data-dir", help="the server's data directory (default ./data) "
                   "[TUNEFORGE_DATA_DIR]")
    p.add_argument("--models-dir", help="base-model cache (default DATA_DIR/models) "
                   "[TUNEFORGE_MODELS_DIR]")


def _admin_parsers(sub) -> None:
    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="action",
                                                                           required=True)
    create = keys.add_parser("create", help="create a key; it is printed once")
    create.add_argument("--name", default="", help="a note to recognise the key by")
    create.add_argument("--admin", action="store_true", help="the key sees and manages all runs")
    _data_dir_option(create)
    _data_dir_option(keys.add_parser("list", help="list keys (ids, names, state)"))
    revoke = keys.add_parser("revoke", help="revoke a key; it is refused at once")
    revoke.add_argument("key_id", help="the key's id (key-...), as `keys list` shows it")
    _data_dir_option(revoke)

    export = sub.add_parser(
        "export", help="write a checkpoint as a PEFT adapter, merged model, GGUF or Ollama folder",
        description="Write a checkpoint in another tool's format. peft: the adapter files, with "
        "whether vLLM loads them and the --max-lora-rank it needs; merged: a full HF model; "
        "gguf-lora: a llama.cpp --lora adapter; gguf-merged: a merged llama.cpp model (bases "
        "that came as GGUF); ollama: a merged GGUF and a Modelfile.")
    export.add_argument("checkpoint", help="tinker://RUN/KIND/NAME of this data directory, "
                        "or a checkpoint folder")
    export.add_argument("--to", required=True, type=Path, help="output folder (new or empty)")
    export.add_argument("--format", dest="fmt", default=None, choices=FORMATS,
                        help="output format (default peft)")
    export.add_argument("--merged", action="store_true", help="the same as --format merged")
    export.add_argument("--dtype", choices=["f32", "f16", "bf16", "q8_0"],
                        help="weights dtype: merged f32|bf16; gguf-lora f32|f16|q8_0; "
                        "gguf-merged and ollama f32|f16|bf16|q8_0")
    export.add_argument("--vllm", action="store_true",
                        help="peft: refuse (write nothing) unless vLLM loads the adapter as is")
    _data_dir_option(export)

    imp = sub.add_parser("import", help="register a PEFT LoRA adapter as a training checkpoint")
    imp.add_argument("adapter", type=Path, help="folder with adapter_model.safetensors and "
                     "adapter_config.json")
    imp.add_argument("--base-model", required=True, help="base model the adapter was trained on")
    imp.add_argument("--name", required=True, help="checkpoint name")
    imp.add_argument("--key-id", help="owner key id (default: the data directory's admin key)")
    _data_dir_option(imp)

    cache = sub.add_parser(
        "cache-tokenizer",
        help="put a served model's tokenizer into the local Hugging Face cache under its name",
        description="Write the tokenizer of a model this server serves (built-in, converted or "
        "aliased with TUNEFORGE_MODEL_ALIASES) into the local Hugging Face cache under NAME, so "
        "that clients on this machine load it offline by name (SamplingClient.get_tokenizer, "
        "the cookbook's get_tokenizer).")
    cache.add_argument("name", help="the model name clients use, ORG/NAME")
    cache.add_argument("--force", action="store_true",
                       help="replace a cache entry that tuneforge did not write")
    _data_dir_option(cache)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tuneforge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _admin_parsers(sub)
    from tuneforge.jobs import cli as jobs_cli

    jobs_cli.add_parsers(sub)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command in ("train", "jobs"):
        return jobs_cli.main(args, _embedded_server)
    try:
        return _admin(args)
    except TuneforgeError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 1


@contextlib.contextmanager
def _embedded_server(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    """`tuneforge train` without --url: a server in this process, on the data directory."""
    from tuneforge.server.embedded import embedded_server

    overrides = {"data_dir": args.data_dir, "num_threads": args.threads, "preload_models": []}
    if args.alias:  # added to those of TUNEFORGE_MODEL_ALIASES
        overrides["model_aliases"] = {**Settings().model_aliases, **dict(args.alias)}
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    with embedded_server(settings) as (base_url, key):
        yield base_url, key


def _admin(args: argparse.Namespace) -> int:
    from tuneforge import admin

    overrides = {"data_dir": args.data_dir, "models_dir": args.models_dir}
    data = admin.AdminData(Settings(**{k: v for k, v in overrides.items() if v is not None}))
    if args.command == "keys" and args.action == "create":
        key, row = data.keys.create(name=args.name, admin=args.admin)
        print(f"{row.id}  {key}")
        print("Keep the key: it is stored hashed and cannot be shown again.", file=sys.stderr)
    elif args.command == "keys" and args.action == "list":
        for row in data.keys.list():
            state = f"revoked {row.revoked_at:%Y-%m-%d %H:%M}" if row.revoked_at else "active"
            role = "admin" if row.admin else "user"
            print(f"{row.id}  {role:5s}  {state:24s}  {row.created_at:%Y-%m-%d %H:%M}  {row.name}")
    elif args.command == "keys" and args.action == "revoke":
        print(f"revoked {data.keys.revoke(args.key_id).id}")
    elif args.command == "export":
        if args.merged and args.fmt not in (None, "merged"):
            raise UserError(f"--merged contradicts --format {args.fmt}")
        fmt = "merged" if args.merged else args.fmt or "peft"
        done = admin.export(data, args.checkpoint, args.to, fmt, args.dtype, args.vllm)
        for note in done.notes:
            print(note, file=sys.stderr)
        print(done.path)
    elif args.command == "cache-tokenizer":
        print(admin.cache_tokenizer(data, args.name, args.force))
    elif args.command == "import":
        print(admin.import_adapter(data, args.adapter, args.base_model, args.name, args.key_id))
    return 0


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from tuneforge.server.app import create_app
    from tuneforge.server.state import ServerState

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {
        "host": args.host, "port": args.port, "data_dir": args.data_dir,
        "models_dir": args.models_dir,
        "preload_models": args.preload, "num_threads": args.threads, "dtype": args.dtype,
        "gradient_checkpointing": args.gradient_checkpointing,
        "ray": args.ray, "workers": args.workers, "worker_threads": args.worker_threads,
        "data_parallel": dict(args.data_parallel) if args.data_parallel else None,
    }
    if args.alias:  # added to those of TUNEFORGE_MODEL_ALIASES
        overrides["model_aliases"] = {**Settings().model_aliases, **dict(args.alias)}
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_warning()
    state = ServerState(settings)
    logging.getLogger("tuneforge").info("settings: %s", settings.summary())
    app = create_app(settings, state)
    config = uvicorn.Config(app, host=settings.host, port=settings.port,
                            log_level=args.log_level, access_log=False)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            state.run_metrics.end_streams()  # an open metrics stream would hold the shutdown
            await super().shutdown(sockets)

    server = Server(config)

    base_url = f"http://{settings.host}:{settings.port}"
    print(f"tuneforge serving at {base_url}", flush=True)
    print(f"  TINKER_BASE_URL={base_url}", flush=True)
    if state.default_key:
        print(f"  TINKER_API_KEY={state.default_key}", flush=True)
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
