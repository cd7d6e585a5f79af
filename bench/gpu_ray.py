"""The engine in a Ray actor on one GPU: LoRA training and sampling through the SDK, and the
loss of the worker process on CUDA.

A prepared check for one CUDA GPU (an H200) without network. In one run of a few minutes:

  build     a random-initialised Qwen3 of a real model's shape (default Qwen3-1.7B: hidden 2048,
            28 layers, 16 heads, 8 KV heads, intermediate 6144, vocab 151936, tied embeddings;
            `--shape 4b|8b` for larger) written with `save_pretrained` into a local folder,
            with the tokenizer files of the built-in `tuneforge/tiny-qwen3` (8192 tokens: the
            data stays below that id, the model's vocabulary is the real one); bf16, built
            on the GPU in a subprocess, so its memory is free again before the server starts
  server    `tuneforge serve` with TUNEFORGE_RAY=auto, TUNEFORGE_WORKERS=1, TUNEFORGE_DEVICE=auto,
            TUNEFORGE_DTYPE=auto (bf16 autocast on CUDA): the worker actor takes num_gpus=1
            because Ray sees the GPU; the folder is served under an alias
            (TUNEFORGE_MODEL_ALIASES) and preloaded
  train     the real `tinker` SDK: a LoRA training client (rank 16), timed forward_backward +
            optim_step steps of batch x seq random tokens: step time (median), tokens/s, loss
            per token (a random model starts near ln(vocab))
  sample    a sampling client of the trained weights: N samples of M tokens, tokens/s
  cuda      `/metrics` tuneforge_worker_cuda_memory_bytes > 0 and the `/api/system` worker
            (kind ray, alive, pid, cuda_memory_bytes > 0)
  fault     save_state; one more step of the live client is the uninterrupted reference;
            SIGKILL the worker process (its pid from /api/system "workers"); the next request
            fails with "worker lost", /api/v1/healthz stays 200, the worker comes back (alive,
            a new pid, losses 1, tuneforge_worker_losses_total 1), and
            create_training_client_from_state_with_optimizer resumes: its next two losses
            (the second after an Adam step from the restored moments) against the reference:
            "match" within --match-rtol, else "finite" or "FAIL"

Prints one table; writes gpu_ray.json and the server's log under $OUT (or --out).

On the GPU machine (torch, transformers, peft there; everything else copied over as wheels
from `bash bench/gpu_setup.sh prepare-ray`, 57 MB in .cache/gpu-wheels-ray, to the same path in
the checkout there), one command of about 9 minutes at most:

    bash bench/gpu_setup.sh install-ray && python3 bench/gpu_ray.py

and again, while /tmp/tuneforge-site is still there, without the install:

    python3 bench/gpu_ray.py

Here, on CPU (tiny smoke configuration: the config of tuneforge/tiny-qwen3 built by the same
path, fp32, a few steps; about a minute):

    .venv/bin/python bench/gpu_ray.py --smoke
    .venv/bin/python bench/gpu_ray.py --record-from gpu_ray.json   # a GPU run's row
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SITE = Path(os.environ.get("TUNEFORGE_GPU_SITE", "/tmp/tuneforge-site"))  # gpu_setup.sh install-ray
for p in (SITE, REPO):
    if p.is_dir() and str(p) not in sys.path:
        sys.path.insert(0, str(p))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the server and the Ray processes it starts import tuneforge and the carried packages
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(p) for p in (SITE, REPO) if p.is_dir()] + [os.environ.get("PYTHONPATH", "")]
).rstrip(os.pathsep)

TINY = "tuneforge/tiny-qwen3"
ALIAS = "random/qwen3"
TOKENIZER_VOCAB = 8192  # the tiny model's tokenizer: data tokens stay below it
SHAPES = {
    "1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                 vocab_size=151936, tie_word_embeddings=True),
    "4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
               tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
               tie_word_embeddings=False),
    "tiny": None,  # the config of tuneforge/tiny-qwen3 itself (the smoke run)
}


# ---- the model folder (run in a subprocess) ------------------------------------------------------

def build_folder(shape: str, folder: Path, models_dir: Path) -> dict:
    """A random Qwen3 of `shape`, saved with save_pretrained, beside the tiny tokenizer."""
    import torch
    from gpu_qlora import build_random

    from tuneforge.engine.models import ModelRegistry

    tiny = ModelRegistry(models_dir, torch.device("cpu")).resolve(TINY)
    base = json.loads((tiny / "config.json").read_text())
    spec = dict(base) if SHAPES[shape] is None else {
        **{k: base[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in base},
        **SHAPES[shape], "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0}
    for key in ("architectures", "transformers_version", "dtype", "torch_dtype", "model_type"):
        spec.pop(key, None)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    model = build_random(spec, dtype, device, quantize=False, compute_dtype=None)
    params = sum(p.numel() for p in model.parameters())
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    for f in tiny.iterdir():  # tokenizer, chat template, generation config
        if f.is_file() and f.name != "config.json" and not f.name.startswith("model"):
            shutil.copy2(f, tmp / f.name)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return {"shape": shape, "params": params, "build_device": device.type,
            "saved_dtype": str(dtype).removeprefix("torch."),
            "build_s": time.perf_counter() - t0,
            "folder_bytes": sum(f.stat().st_size for f in folder.iterdir())}


# ---- the run --------------------------------------------------------------------------------

class Report:
    """Checks and numbers, in order, rewritten to gpu_ray.json as they come."""

    def __init__(self, path: Path, meta: dict) -> None:
        self.path, self.data = path, {**meta, "rows": [], "numbers": {}}

    def row(self, name: str, ok: bool | None, value: str) -> None:
        status = {True: "ok", False: "FAIL", None: "–"}[ok]
        self.data["rows"].append({"check": name, "status": status, "value": value})
        print(f"[{name}] {status}: {value}", flush=True)
        self.save()

    def number(self, **kw) -> None:
        self.data["numbers"].update(kw)
        self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=1, default=str))

    @property
    def failed(self) -> list[str]:
        return [r["check"] for r in self.data["rows"] if r["status"] == "FAIL"]


def _batch(step: int, batch: int, seq: int):
    import numpy as np
    from tinker import types

    rng = np.random.default_rng(1000 + step)
    out = []
    for _ in range(batch):
        t = rng.integers(1, TOKENIZER_VOCAB, seq + 1)
        out.append(types.Datum(model_input=types.ModelInput.from_ints(t[:-1].tolist()),
                               loss_fn_inputs={"target_tokens": t[1:].astype(np.int64)}))
    return out


def _step(tc, data, adam) -> float:
    fb = tc.forward_backward(data, "cross_entropy")
    opt = tc.optim_step(adam)
    loss = fb.result().metrics["loss:sum"]
    opt.result()
    return loss


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


def _system(server) -> dict:
    import httpx

    return httpx.get(f"{server.base_url}/api/system", headers={"X-API-Key": server.api_key},
                     timeout=30).json()


def _worker(server) -> dict:
    return next(w for w in _system(server)["workers"] if w.get("kind") == "ray")


def run(args, report: Report, workdir: Path) -> None:
    import tinker
    from tinker import types

    from tests.integration.server import ServerProcess

    smoke = args.smoke
    models_dir = REPO / ".cache" / "gpu-ray-models"
    models_dir.mkdir(parents=True, exist_ok=True)
    folder = models_dir / f"random-qwen3-{args.shape}"
    tokens_per_step = args.batch * args.seq

    # build -------------------------------------------------------------------------------------
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--build", str(folder),
                           "--shape", args.shape, "--models-dir", str(models_dir)],
                          cwd=REPO, capture_output=True, text=True, timeout=args.build_timeout)
    if proc.returncode != 0:
        report.row("build", False, (proc.stdout + proc.stderr)[-1500:])
        return
    built = json.loads(proc.stdout.strip().splitlines()[-1])
    report.number(build=built)
    report.row("build", True, f"Qwen3 {args.shape}: {built['params'] / 1e6:,.0f} M params, "
               f"{built['folder_bytes'] / 2**30:.2f} GiB {built['saved_dtype']} on disk, "
               f"built on {built['build_device']} in {time.time() - t0:.0f} s ({folder})")

    # server ------------------------------------------------------------------------------------
    env = {"TUNEFORGE_RAY": "auto", "TUNEFORGE_WORKERS": "1", "TUNEFORGE_DEVICE": "auto",
           "TUNEFORGE_DTYPE": "fp32" if smoke else "auto", "TUNEFORGE_BATCH_WAIT_MS": "0",
           "TUNEFORGE_MODEL_ALIASES": json.dumps({ALIAS: str(folder)}),
           "TUNEFORGE_ADAPTER_MEMORY_MB": str(16384 if not smoke else 1024)}
    server = ServerProcess(workdir / "server", models_dir, env=env, preload=(ALIAS,),
                           threads=args.threads)
    report.data["server_log"] = str(server.log_path)
    t0 = time.time()
    try:
        server.start(timeout=args.server_timeout)
    except Exception as e:
        report.row("server", False, f"{type(e).__name__}: {str(e)[-1500:]}")
        return
    try:
        worker = _worker(server)
        report.number(server_start_s=time.time() - t0, worker_before=worker)
        report.row("server", bool(worker["alive"]),
                   f"up in {time.time() - t0:.0f} s with Ray worker {worker['name']} "
                   f"(pid {worker['pid']}, node {worker['node']}), {ALIAS} preloaded")
        service = tinker.ServiceClient(base_url=server.base_url, api_key=server.api_key)
        _train_sample_fault(args, report, server, service, types, tokens_per_step)
    finally:
        server.stop()
        if server.log_path.exists():
            shutil.copy2(server.log_path, args.out_dir / "gpu_ray_server.log")


def _train_sample_fault(args, report, server, service, types, tokens_per_step) -> None:
    import tinker

    adam = types.AdamParams(learning_rate=args.lr)
    tc = service.create_lora_training_client(base_model=ALIAS, rank=args.rank, seed=0).result()

    # train -------------------------------------------------------------------------------------
    losses, times = [], []
    for step in range(args.warmup + args.steps):
        data = _batch(step, args.batch, args.seq)
        t0 = time.perf_counter()
        losses.append(_step(tc, data, adam) / tokens_per_step)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    report.number(train_losses_per_token=losses, train_step_s=times, step_median_s=med,
                  train_tokens_per_s=tokens_per_step / med)
    report.row("train", all(map(_finite, losses)),
               f"{args.steps} timed steps (+{args.warmup} warm-up) of {args.batch}x{args.seq} "
               f"tokens, LoRA r{args.rank}: median step {med * 1e3:.0f} ms, "
               f"{tokens_per_step / med:.0f} tokens/s, loss/token {losses[0]:.3f} -> "
               f"{losses[-1]:.3f}")
    step = args.warmup + args.steps

    # sample ------------------------------------------------------------------------------------
    sc = tc.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints(list(range(1, args.prompt + 1)))
    params = types.SamplingParams(max_tokens=args.sample_tokens, temperature=1.0, stop=[])
    sc.sample(prompt, 1, params).result()  # warm-up (the sampler's first load)
    t0 = time.perf_counter()
    out = sc.sample(prompt, args.samples, params).result()
    dt = time.perf_counter() - t0
    generated = sum(len(s.tokens) for s in out.sequences)
    report.number(sample_s=dt, sample_tokens=generated, sample_tokens_per_s=generated / dt)
    report.row("sample", generated > 0,
               f"{args.samples} samples x {args.sample_tokens} tokens after a {args.prompt}-token "
               f"prompt: {generated} tokens in {dt:.2f} s, {generated / dt:.0f} tokens/s")

    # cuda --------------------------------------------------------------------------------------
    metrics = server.metrics()
    worker = _worker(server)
    cuda_bytes = metrics.get(f'tuneforge_worker_cuda_memory_bytes{{worker="{worker["name"]}"}}')
    report.number(worker_after_training=worker, metrics_cuda_memory_bytes=cuda_bytes,
                  system_gpus=_system(server).get("gpus"))
    if args.smoke:
        report.row("cuda", None, f"CPU smoke run: /metrics cuda_memory_bytes {cuda_bytes}, "
                   f"/api/system worker cuda_memory_bytes {worker.get('cuda_memory_bytes')}")
    else:
        ok = bool(cuda_bytes and cuda_bytes > 0 and (worker.get("cuda_memory_bytes") or 0) > 0
                  and worker["kind"] == "ray" and worker["alive"])
        report.row("cuda", ok, f"/metrics tuneforge_worker_cuda_memory_bytes "
                   f"{(cuda_bytes or 0) / 2**30:.2f} GiB; /api/system {worker['name']}: kind "
                   f"{worker['kind']}, alive {worker['alive']}, pid {worker['pid']}, "
                   f"cuda_memory_bytes {(worker.get('cuda_memory_bytes') or 0) / 2**30:.2f} GiB")

    # fault -------------------------------------------------------------------------------------
    path = tc.save_state("before-kill").result().path
    reference = [_step(tc, _batch(step + i, args.batch, args.seq), adam) / tokens_per_step
                 for i in range(2)]  # what the uninterrupted run gives next
    victim = _worker(server)
    report.number(checkpoint=path, reference_losses=reference, victim=victim)
    os.kill(victim["pid"], signal.SIGKILL)
    t_kill = time.time()
    try:
        tc.forward_backward(_batch(step + 2, args.batch, args.seq), "cross_entropy").result()
        report.row("fault: next request", False, "succeeded after the worker was killed")
    except tinker.RequestFailedError as e:
        msg = str(e)
        report.row("fault: next request", "worker lost" in msg,
                   f"failed in {time.time() - t_kill:.1f} s: {msg[:160]}")
    except Exception as e:  # any other failure is reported as it is
        report.row("fault: next request", False, f"{type(e).__name__}: {str(e)[:200]}")
    report.row("fault: server healthy", server.healthy(), "GET /api/v1/healthz after the kill")
    deadline, back = time.time() + args.restart_timeout, None
    while time.time() < deadline:
        w = _worker(server)
        if w["alive"] and w["pid"] not in (None, victim["pid"]):
            back = w
            break
        time.sleep(0.5)
    losses_metric = server.metrics().get(
        f'tuneforge_worker_losses_total{{worker="{victim["name"]}"}}')
    if back is None:
        report.row("fault: worker back", False, f"not alive with a new pid within "
                   f"{args.restart_timeout:.0f} s: {_worker(server)}")
        return
    report.number(worker_restarted=back, restart_s=time.time() - t_kill)
    report.row("fault: worker back", back["losses"] == 1 and losses_metric == 1,
               f"alive again in {time.time() - t_kill:.1f} s, pid {victim['pid']} -> "
               f"{back['pid']}, losses {back['losses']}, tuneforge_worker_losses_total "
               f"{losses_metric}")
    t0 = time.time()
    resumed = service.create_training_client_from_state_with_optimizer(path).result()
    got = [_step(resumed, _batch(step + i, args.batch, args.seq), adam) / tokens_per_step
           for i in range(2)]
    rel = [abs(a - b) / max(abs(b), 1e-30) for a, b in zip(got, reference, strict=True)]
    report.number(resumed_losses=got, resumed_rel=rel, resume_s=time.time() - t0)
    if all(r <= args.match_rtol for r in rel):
        verdict, ok = "match", True
    elif all(map(_finite, got)):
        verdict, ok = "finite (differs from the uninterrupted run)", not args.smoke
    else:
        verdict, ok = "FAIL (not finite)", False
    report.number(resume_verdict=verdict)
    report.row("fault: resume", ok,
               f"{verdict}: losses/token {got[0]:.5f}, {got[1]:.5f} vs uninterrupted "
               f"{reference[0]:.5f}, {reference[1]:.5f} (rel {max(rel):.1e}, "
               f"tolerance {args.match_rtol:g}); resumed in {time.time() - t0:.1f} s")


def print_table(report: Report) -> None:
    d, n = report.data, report.data["numbers"]
    print(f"\ngpu_ray: {d['device']}; torch {d.get('torch')}, transformers "
          f"{d.get('transformers')}, ray {d.get('ray')}, tinker {d.get('tinker')}")
    print(f"model: random Qwen3 {d['shape']} served as {ALIAS}, LoRA r{d['rank']}, "
          f"{d['batch']}x{d['seq']} tokens per step, dtype {d['dtype']}, 1 Ray worker")
    print(f"{'check':24s} {'status':6s}  value")
    for r in d["rows"]:
        print(f"{r['check']:24s} {r['status']:6s}  {r['value']}")
    if "train_tokens_per_s" in n:
        print(f"train {n['train_tokens_per_s']:.0f} tokens/s (step {n['step_median_s'] * 1e3:.0f}"
              f" ms); sample {n.get('sample_tokens_per_s', 0):.0f} tokens/s; resume: "
              f"{n.get('resume_verdict', '–')}; {d.get('seconds', 0):.0f} s in all")


def record_from(path: str) -> None:
    """Append the row of a results JSON (copied back from the GPU machine) to RESULTS.md."""
    sys.path.insert(0, str(REPO / "bench"))
    from common import record

    d = json.loads(Path(path).read_text())
    n, rows = d["numbers"], {r["check"]: r["status"] for r in d["rows"]}
    gpus = n.get("system_gpus") or []
    gpu = gpus[0].get("name") if gpus and isinstance(gpus[0], dict) else None
    losses = n.get("train_losses_per_token") or []
    cuda = n.get("metrics_cuda_memory_bytes")
    fault = " / ".join(rows.get(c, "–") for c in ("fault: next request", "fault: worker back"))
    record("gpu_ray", " | ".join([
        f"{gpu or d['device']}, torch {d.get('torch')}, ray {d.get('ray')}",
        f"random Qwen3 {d['shape']}, {d['batch']}x{d['seq']}, r{d['rank']}",
        (f"{n['train_tokens_per_s']:.0f} ({n['step_median_s'] * 1e3:.0f})"
         if "train_tokens_per_s" in n else "–"),
        f"{losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "–",
        f"{n['sample_tokens_per_s']:.0f}" if "sample_tokens_per_s" in n else "–",
        f"{cuda / 2**30:.1f}" if cuda else "–",
        f"{fault} / {n.get('resume_verdict', '–')}"]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true",
                    help="CPU smoke run: tuneforge/tiny-qwen3's config, fp32, a few steps")
    ap.add_argument("--shape", choices=list(SHAPES), default=None,
                    help="model shape (default 1.7b; tiny with --smoke)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default 4)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 1024)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 8; 3 smoke)")
    ap.add_argument("--samples", type=int, default=None, help="samples (default 16; 4 smoke)")
    ap.add_argument("--sample-tokens", type=int, default=None,
                    help="tokens per sample (default 128; 16 smoke)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--threads", type=int, default=None,
                    help="server torch threads (default 8; 1 smoke)")
    ap.add_argument("--match-rtol", type=float, default=None,
                    help="resumed vs uninterrupted losses (default 2e-3 on CUDA: bf16 autocast "
                         "kernels need not be bitwise deterministic; 1e-5 smoke, fp32)")
    ap.add_argument("--build-timeout", type=float, default=300)
    ap.add_argument("--server-timeout", type=float, default=300)
    ap.add_argument("--restart-timeout", type=float, default=120)
    ap.add_argument("--out", help="folder for gpu_ray.json and the server log (default $OUT, "
                    "else a new temporary folder)")
    ap.add_argument("--record-from", metavar="JSON", help="append a results file's row to "
                    "bench/RESULTS.md and exit (run here, not on the GPU machine)")
    ap.add_argument("--build", metavar="FOLDER", help=argparse.SUPPRESS)
    ap.add_argument("--models-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.record_from:
        record_from(args.record_from)
        return 0
    smoke = args.smoke
    args.shape = args.shape or ("tiny" if smoke else "1.7b")
    if args.build:
        print(json.dumps(build_folder(args.shape, Path(args.build), Path(args.models_dir))))
        return 0
    args.batch = args.batch or (2 if smoke else 4)
    args.seq = args.seq or (32 if smoke else 1024)
    args.steps = args.steps or (3 if smoke else 8)
    args.warmup = min(args.warmup, 1) if smoke else args.warmup
    args.samples = args.samples or (4 if smoke else 16)
    args.sample_tokens = args.sample_tokens or (16 if smoke else 128)
    args.threads = args.threads or (1 if smoke else 8)
    args.match_rtol = args.match_rtol or (1e-5 if smoke else 2e-3)

    import torch

    if not smoke and not torch.cuda.is_available():
        print("gpu_ray: no CUDA device is visible to torch; this check needs one GPU. Use "
              "--smoke to exercise it on CPU.")
        return 2
    out = args.out or os.environ.get("OUT") or tempfile.mkdtemp(prefix="gpu-ray-out-")
    args.out_dir = Path(out)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="gpu-ray-"))
    meta = {"script": "bench/gpu_ray.py", "smoke": smoke, "shape": args.shape,
            "batch": args.batch, "seq": args.seq, "rank": args.rank,
            "dtype": "fp32" if smoke else "auto (bf16 autocast on CUDA)",
            "device": "CPU smoke run" if smoke else
            f"CUDA: {torch.cuda.get_device_name(0)} (torch sees {torch.cuda.device_count()})",
            "torch": torch.__version__}
    try:  # versions only: this process never starts Ray
        from importlib.metadata import version

        import tinker  # noqa: F401
        import transformers

        meta.update(ray=version("ray"), tinker=version("tinker"),
                    transformers=transformers.__version__)
    except ImportError as e:
        print(f"gpu_ray: {e} (run `bash bench/gpu_setup.sh install-ray` first)")
        return 2
    report = Report(args.out_dir / "gpu_ray.json", meta)
    started = time.time()
    try:
        run(args, report, workdir)
    except BaseException as e:  # reported in the table; the server is stopped by run()
        report.row("error", False, f"{type(e).__name__}: {str(e)[:300]}")
        report.data["traceback"] = traceback.format_exc()[-6000:]
        traceback.print_exc()
    report.data["seconds"] = time.time() - started
    report.save()
    print_table(report)
    print(f"results: {report.path}")
    if not report.failed:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"failed: {', '.join(report.failed)}; server data and log kept in {workdir}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
