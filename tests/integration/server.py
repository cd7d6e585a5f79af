"""A real tuneforge server in a subprocess on loopback, for tests driven by the real SDK."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, data_dir: Path, models_dir: Path, env: dict[str, str] | None = None,
                 preload: tuple[str, ...] = ("tuneforge/tiny-qwen3",), threads: int = 1) -> None:
        self.data_dir = data_dir
        self.models_dir = models_dir
        self.extra_env = env or {}
        self.preload = preload
        self.threads = threads
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = data_dir / "server.log"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_key(self) -> str:
        return (self.data_dir / "api_key").read_text().strip()

    def start(self, timeout: float = 300.0) -> ServerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # fp32 unless a test asks otherwise: `--dtype auto` would pick bf16 on some CI-class
        # CPUs and fp32 on others, and the tests compare numbers across runs.
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "TUNEFORGE_DTYPE": "fp32", **self.extra_env}
        cmd = [sys.executable, "-m", "tuneforge", "serve", "--port", str(self.port),
               "--data-dir", str(self.data_dir), "--models-dir", str(self.models_dir),
               "--threads", str(self.threads), "--log-level", "warning"]
        for name in self.preload:
            cmd += ["--preload", name]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.base_url}/api/v1/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server did not become healthy in {timeout} s:\n{self.log()}")

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.base_url}/api/v1/healthz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def metrics(self) -> dict[str, float]:
        """GET /metrics as {name (with its labels): value}."""
        out = {}
        for line in httpx.get(f"{self.base_url}/metrics", timeout=30).text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
