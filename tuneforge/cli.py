"""`tuneforge` command line: `serve` starts the server."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from tuneforge.settings import Settings


def _serve_parser(sub) -> None:
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
    p.add_argument("--precision", choices=["fp32", "bf16"],
                   help="fp32 (default) or bf16 autocast [TUNEFORGE_PRECISION]")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tuneforge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args)
    return 2


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from tuneforge.server.app import create_app
    from tuneforge.server.state import ServerState

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {
        "host": args.host, "port": args.port, "data_dir": args.data_dir,
        "models_dir": args.models_dir,
        "preload_models": args.preload, "num_threads": args.threads, "precision": args.precision,
    }
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
    server = uvicorn.Server(config)

    base_url = f"http://{settings.host}:{settings.port}"
    print(f"tuneforge serving at {base_url}", flush=True)
    print(f"  TINKER_BASE_URL={base_url}", flush=True)
    print(f"  TINKER_API_KEY={state.default_key}", flush=True)
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
