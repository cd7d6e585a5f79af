"""Start-up handshake, feature flags, telemetry, health and capabilities."""

from __future__ import annotations

from fastapi import APIRouter

from tuneforge.server.deps import Owner, State

router = APIRouter(prefix="/api/v1")


@router.post("/client/config")
def client_config(state: State, _owner: Owner) -> dict:
    # Every SDK feature we do not serve is switched off here rather than failing later:
    # no JWT exchange, plain httpx, no zstd bodies, no batched polling, no server-side custom
    # losses, no sampling-session joins.
    return {
        "pjwt_auth_enabled": False,
        "credential_default_source": "api_key",
        "use_pyqwest_transport": False,
        "proto_compress_fwdbwd": False,
        "parallel_fwdbwd_chunks": True,
        "fwdbwd_max_chunk_len": state.settings.fwdbwd_max_chunk_len,
        "sample_use_retrieve_futures": False,
        "custom_loss_server_side": False,
        "sample_join_sampling_session": False,
        "sample_max_concurrent_requests": 256,
    }


@router.post("/client/dynamic_config")
def dynamic_config(_owner: Owner) -> dict:
    return {"refresh_interval_sec": 300, "sample_cancel_enabled": False}


@router.post("/telemetry")
def telemetry(_owner: Owner) -> dict:
    # Events are accepted and dropped: a local server has no use for client telemetry.
    return {"status": "accepted"}


@router.get("/healthz")
def healthz(state: State) -> dict:
    return {"status": "ok", "queue_depth": state.scheduler.depth,
            "pending_futures": state.futures.pending_count()}


@router.get("/get_server_capabilities")
def capabilities(state: State, _owner: Owner) -> dict:
    models = []
    for name in state.registry.offered():
        entry: dict = {"model_name": name, "trainable": True, "sampleable": True}
        if name in state.registry.loaded():
            entry["max_context_length"] = state.registry.card(name).max_context
        models.append(entry)
    return {"supported_models": models}
