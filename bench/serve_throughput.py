"""Generated tokens/s of the local backend: 1 client vs N concurrent clients, side by side.

Starts one ``distillguard serve`` subprocess on a free loopback port (or uses ``--base-url``),
waits for ``/healthz``, warms it up, then alternates a 1-client phase and an N-client phase
against the same server for ``--rounds`` rounds. Clients are closed-loop (each sends its next
request as soon as the previous answer arrives), send chat completions with varied prompts and
per-client sampling parameters, and count ``usage.completion_tokens``.

Requests stream (``stream_options.include_usage``). A phase lasts ``--duration`` seconds; its
rate is the completion tokens generated within it (``usage`` of the requests that finished,
plus the tokens streamed so far by those cut off at the end, which the server then cancels)
divided by its length, so a batch draining at the end does not skew the comparison.
Absolute rates on a shared machine are noisy; the ratio of phases run side by side is the
number to quote (the JSON records the load average before and after).

    python bench/serve_throughput.py                      # smollm2, 1 vs 16 clients, ~3.5 minutes
    python bench/serve_throughput.py --threads 1          # a busy machine: one torch thread
    python bench/serve_throughput.py --duration 10 --rounds 1
    python bench/serve_throughput.py --engine vllm,local  # vLLM (plugin on / off) and ours

``--engine vllm`` benches a vLLM server running distillguard's logits processor (started from
vLLM's own virtualenv, ``scripts/vllm_env.sh``, on the embedded teacher's HF directory, or
``--vllm-url``), in three variants per phase, side by side: ``plain`` requests (no key: the
plugin returns vLLM's logits as they came, so this is vLLM without it, sampling with each
request's temperature and top-p), ``neutral`` ones (no key, and the neutral sampler the gateway
asks vLLM for: temperature 1, top-p 1) and ``keyed`` ones (each client an account whose
default-scheme key and sampler ride in ``vllm_xargs`` with that neutral sampler, as the gateway
sends them). keyed / neutral is the plugin's own cost; keyed / plain what serving through it
changes. With several engines, every phase of a round runs on each in turn, the other servers
this script started frozen (SIGSTOP) meanwhile: an idle vLLM CPU worker keeps polling a core.

Progress goes to stderr, one JSON object to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True)

# Varied, realistic user questions (short and long, factual, creative, code, advice).
PROMPTS = [
    "What is the capital of Australia, and why isn't it Sydney?",
    "Explain photosynthesis to a ten-year-old.",
    "Write a haiku about a rainy Monday morning.",
    "How do I reverse a list in Python without modifying the original?",
    "What are three tips for sleeping better?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "Why is the sky blue?",
    "Give me a simple recipe for pancakes.",
    "What is the difference between a virus and a bacterium?",
    "Suggest a name for a small bakery that specialises in sourdough bread.",
    "How does compound interest work? Give an example with numbers.",
    "Translate 'Where is the train station?' into French and Spanish.",
    "What should I pack for a three-day hiking trip in the mountains?",
    "Write a short, polite email asking my manager for a day off next Friday.",
    "Explain what a hash table is and when I would use one.",
    "Is it healthy to drink coffee every day?",
    "What causes the seasons on Earth?",
    "List five fun things to do in Paris on a budget.",
    "How can I make my resume stand out when applying for a software engineering job?",
    "What is the Pythagorean theorem? Show a worked example.",
    "Tell me a short story about a robot who learns to paint.",
    "What are the main differences between SQL and NoSQL databases?",
    "How do vaccines train the immune system?",
    "My houseplant's leaves are turning yellow. What could be wrong?",
    "Write a limerick about a cat who loves cheese.",
    "Explain the difference between weather and climate.",
    "What is a good way to start learning to play the guitar as an adult?",
    "In JavaScript, what is the difference between let, const and var?",
    "Why do we have leap years?",
    "I have chicken, rice, spinach and garlic. What can I cook for dinner tonight?",
    "Describe the water cycle step by step.",
    "What are some strategies for staying focused while working from home? "
    "I get distracted easily by my phone and by household chores, and my desk is in the living room.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_params(
    client: int, request: int, max_tokens: int, model: str, variant: str = "plain"
) -> dict:
    """Sampling parameters of one client (its temperature, top_p and seed stream) and its next
    prompt. ``keyed``: the client is an account whose watermark key goes to vLLM's plugin in
    ``vllm_xargs`` with its sampler, and vLLM gets a neutral one (what the gateway sends).
    ``neutral``: the same neutral sampler without a key (the plugin leaves the row alone), so
    vLLM does exactly the sampling work it does for a keyed row: keyed vs neutral is the
    plugin's own cost, keyed vs plain what serving through the plugin changes."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPTS[(client * 7 + request) % len(PROMPTS)]}],
        "max_tokens": max_tokens,
        "temperature": round(0.7 + 0.3 * ((client * 5) % 16) / 15, 3),
        "top_p": (0.9, 0.95, 1.0)[client % 3],
        "seed": 1000 * client + request,
    }
    if variant == "neutral":
        body.update(temperature=1.0, top_p=1.0)
    elif variant == "keyed":
        from distillguard.serve.keymaterial import XARG, Sampler, encode
        from distillguard.watermark import WatermarkParams, account_key

        key = account_key(b"bench-secret", f"acct-{client}", WatermarkParams())
        sampler = Sampler(temperature=body["temperature"], top_p=body["top_p"])
        body.update(temperature=1.0, top_p=1.0, vllm_xargs={XARG: encode(key, sampler)})
    return body


async def run_phase(
    http: httpx.AsyncClient,
    clients: int,
    duration: float,
    max_tokens: int,
    model: str,
    progress: Progress,
    label: str,
    req_offset: int,
    variant: str = "plain",
) -> dict:
    """``clients`` closed-loop streaming clients for ``duration`` seconds; requests still running
    at the end are cut off (the server cancels them) and credited with the tokens they streamed."""
    tokens = 0  # completion tokens generated within the phase
    done: list[int] = []  # completion tokens of the requests that finished
    latencies: list[float] = []
    ttfts: list[float] = []
    cut = 0
    task = progress.add_task(label, total=duration, tok="0 tok")

    async def client(c: int) -> None:
        nonlocal tokens, cut
        r = req_offset
        while True:
            body = {
                **client_params(c, r, max_tokens, model, variant),
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            t0 = time.perf_counter()
            streamed = 0
            usage = None
            try:
                async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
                    resp.raise_for_status()
                    async for line in resp.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            raise RuntimeError(f"server error: {chunk['error']}")
                        if chunk.get("usage"):
                            usage = chunk["usage"]
                        for ch in chunk.get("choices") or ():
                            if ch["delta"].get("content"):
                                if not streamed:
                                    ttfts.append(time.perf_counter() - t0)
                                streamed += 1  # one delta per token here (no stop strings)
            finally:
                if usage is not None:
                    tokens += usage["completion_tokens"]
                    done.append(usage["completion_tokens"])
                    latencies.append(time.perf_counter() - t0)
                else:  # cut off at the end of the phase
                    tokens += streamed
                    cut += 1
            r += 1

    start = time.perf_counter()
    tasks = [asyncio.create_task(client(c)) for c in range(clients)]
    while (now := time.perf_counter()) < start + duration:
        failed = [t for t in tasks if t.done()]
        if failed:
            for t in tasks:
                t.cancel()
            failed[0].result()  # raises the client's error
        progress.update(task, completed=now - start, tok=f"{tokens} tok, {len(done)} req")
        await asyncio.sleep(min(0.25, start + duration - now))
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    elapsed = time.perf_counter() - start
    rate = tokens / elapsed
    progress.update(
        task, completed=duration, tok=f"{tokens} tok, {len(done)} req, {rate:.1f} tok/s"
    )
    return {
        "clients": clients,
        "completed_requests": len(done),
        "cut_off_requests": cut,
        "completion_tokens": tokens,
        "elapsed_s": round(elapsed, 2),
        "tokens_per_s": round(rate, 2),
        "latency_p50_s": round(statistics.median(latencies), 2) if latencies else None,
        "ttft_p50_s": round(statistics.median(ttfts), 2) if ttfts else None,
        "mean_completion_tokens": round(sum(done) / len(done), 1) if done else None,
    }


def start_server(args: argparse.Namespace, port: int, log_path: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "distillguard.cli",
        "serve",
        "--model",
        args.model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-batch-rows",
        str(args.max_batch_rows),
        "--no-guard",
        "--threads",
        str(args.threads),
    ]  # the local backend alone: no keys, limits, ledger
    env = dict(os.environ)
    if args.threads:  # torch's intra-op threads in the server (its default: one per core)
        env["OMP_NUM_THREADS"] = str(args.threads)
    log = open(log_path, "wb")
    return subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


def start_vllm(args: argparse.Namespace, port: int, log_path: str) -> subprocess.Popen:
    """vLLM's OpenAI server from its own virtualenv with distillguard's logits processor, on the
    embedded teacher's HF directory (the weights our engine serves)."""
    from distillguard.models.loader import _gguf_cache_dir, bundled_gguf_path, load_model

    model_dir = _gguf_cache_dir(bundled_gguf_path())
    if not (model_dir / "config.json").is_file():
        load_model("smollm2", device="cpu")  # converts the GGUF once and caches it
    cmd = [
        args.vllm_python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        args.model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "2048",
        "--logits-processors",
        "distillguard.integrations.vllm:WatermarkLogitsProcessor",
        "--logprobs-mode",
        "processed_logprobs",
    ]
    env = {
        **os.environ,
        "VLLM_USE_V2_MODEL_RUNNER": "0",  # the plugin's interface is the V1 runner's
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    log = open(log_path, "wb")
    return subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


async def wait_healthy(
    base_url: str,
    proc: subprocess.Popen | None,
    timeout: float,
    log_path: str | None,
    path: str = "/healthz",
) -> float:
    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=base_url, timeout=5) as http:
        with console.status(
            f"waiting for {base_url}{path} (a model load takes ~40 s, vLLM's minutes) ..."
        ):
            while time.perf_counter() - t0 < timeout:
                if proc is not None and proc.poll() is not None:
                    tail = open(log_path, errors="replace").read()[-3000:] if log_path else ""
                    raise SystemExit(f"server exited with code {proc.returncode}:\n{tail}")
                try:
                    if (await http.get(path)).status_code == 200:
                        return time.perf_counter() - t0
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.5)
    raise SystemExit(f"server not healthy after {timeout:.0f} s")


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of a process so far (Linux /proc), None when unknown."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def pause_others(targets: list[dict], current: dict) -> list[int]:
    """SIGSTOP the process groups of the other servers this script started, while ``current``
    is benched. An idle vLLM CPU worker keeps a core busy polling (our engine beside it got about
    a third of a core in the first run), so each engine is measured with the other frozen, not
    merely idle. Servers given by URL are not ours to stop."""
    stopped = []
    for t in targets:
        if t is not current and t["proc"] is not None:
            os.killpg(t["proc"].pid, signal.SIGSTOP)
            stopped.append(t["proc"].pid)
    return stopped


def resume(pgids: list[int]) -> None:
    for pgid in pgids:
        os.killpg(pgid, signal.SIGCONT)


async def bench(args: argparse.Namespace, targets: list[dict]) -> list[dict]:
    """Every round: 1 client then N (N then 1 on odd rounds), each on every target and variant
    in turn, so the variants compared share the machine's state as closely as they can."""
    limits = httpx.Limits(
        max_connections=args.clients + 4, max_keepalive_connections=args.clients + 4
    )
    phases = []
    https = [httpx.AsyncClient(base_url=t["base_url"], timeout=600, limits=limits) for t in targets]
    try:
        with console.status("warming up (one request, then a batch) ..."):
            for t, http in zip(targets, https):
                for variant in t["variants"]:
                    warm = client_params(0, 0, 8, args.model, variant)
                    (await http.post("/v1/chat/completions", json=warm)).raise_for_status()
                    rs = await asyncio.gather(
                        *(
                            http.post(
                                "/v1/chat/completions",
                                json=client_params(c, 0, 8, args.model, variant),
                            )
                            for c in range(args.clients)
                        )
                    )
                    for r in rs:
                        r.raise_for_status()
        with Progress(
            TextColumn("{task.description:<34}"),
            BarColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[tok]}"),
            console=console,
        ) as progress:
            for rnd in range(args.rounds):
                order = (
                    (1, args.clients) if rnd % 2 == 0 else (args.clients, 1)
                )  # ABBA: no order bias
                for n in order:
                    for t, http in zip(targets, https):
                        variants = t["variants"] if rnd % 2 == 0 else t["variants"][::-1]
                        for variant in variants:
                            label = f"round {rnd + 1}: {n} client{'s' if n > 1 else ''}"
                            if len(targets) > 1 or len(variants) > 1:
                                label += f" {t['engine']}/{variant}"
                            pid = t["proc"].pid if t["proc"] is not None else None
                            others = pause_others(targets, t)
                            cpu0 = cpu_seconds(pid)
                            res = await run_phase(
                                http,
                                n,
                                args.duration,
                                args.max_tokens,
                                args.model,
                                progress,
                                label,
                                req_offset=100 * rnd,
                                variant=variant,
                            )
                            cpu1 = cpu_seconds(pid)
                            resume(others)
                            if t["engine"] == "local" and cpu0 is not None and cpu1 is not None:
                                res["server_cpu_s"] = round(cpu1 - cpu0, 2)
                            phases.append(
                                {"round": rnd + 1, "engine": t["engine"], "variant": variant, **res}
                            )
                            await asyncio.sleep(1.0)  # let the server drop the cancelled rows
    finally:
        for http in https:
            await http.aclose()
    return phases


def summarise(phases: list[dict], clients: int) -> dict:
    def pooled(n: int) -> float:
        sel = [p for p in phases if p["clients"] == n]
        return sum(p["completion_tokens"] for p in sel) / sum(p["elapsed_s"] for p in sel)

    single, multi = pooled(1), pooled(clients)
    # On a machine shared with other work the server gets a varying share of the CPU; tokens
    # per CPU-second of the server process compare the batching itself, whatever that share.
    per_cpu = {}
    if all("server_cpu_s" in p for p in phases):

        def pooled_cpu(n: int) -> float:
            sel = [p for p in phases if p["clients"] == n]
            return sum(p["completion_tokens"] for p in sel) / max(
                1e-9, sum(p["server_cpu_s"] for p in sel)
            )

        c1, cn = pooled_cpu(1), pooled_cpu(clients)
        per_cpu = {
            "tokens_per_server_cpu_s_1_client": round(c1, 2),
            f"tokens_per_server_cpu_s_{clients}_clients": round(cn, 2),
            "ratio_per_server_cpu_s": round(cn / c1, 2),
        }
    per_round = []
    for rnd in sorted({p["round"] for p in phases}):
        a = next(p for p in phases if p["round"] == rnd and p["clients"] == 1)
        b = next(p for p in phases if p["round"] == rnd and p["clients"] == clients)
        per_round.append(round(b["tokens_per_s"] / a["tokens_per_s"], 2))
    return {
        "tokens_per_s_1_client": round(single, 2),
        f"tokens_per_s_{clients}_clients": round(multi, 2),
        "ratio": round(multi / single, 2),
        "ratio_per_round": per_round,
        **per_cpu,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model", default="smollm2", help="model spec passed to `distillguard serve --model`"
    )
    ap.add_argument(
        "--engine",
        default="local",
        help="local (distillguard serve --no-guard) | vllm (vLLM with distillguard's plugin, "
        "plain and keyed requests) | both, comma-separated (phases interleaved)",
    )
    ap.add_argument("--duration", type=float, default=40.0, help="seconds each phase lasts")
    ap.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request")
    ap.add_argument(
        "--clients", type=int, default=16, help="concurrent clients of the second phase"
    )
    ap.add_argument(
        "--rounds", type=int, default=2, help="rounds of (1 client, N clients), alternating order"
    )
    ap.add_argument("--max-batch-rows", type=int, default=16, help="server's --max-batch-rows")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads of the server (OMP_NUM_THREADS; 0: torch's default). On a busy "
        "machine 1 avoids stalls of threads waiting for each other",
    )
    ap.add_argument(
        "--base-url", default=None, help="bench an already running local server instead"
    )
    ap.add_argument(
        "--vllm-url", default=None, help="bench an already running vLLM (with the plugin) instead"
    )
    ap.add_argument(
        "--vllm-python",
        default=os.path.expanduser("~/.cache/distillguard/venv-vllm/bin/python"),
        help="Python of vLLM's virtualenv (scripts/vllm_env.sh)",
    )
    ap.add_argument("--startup-timeout", type=float, default=300.0)
    ap.add_argument("--vllm-startup-timeout", type=float, default=1200.0)
    args = ap.parse_args()
    engines = [e.strip() for e in args.engine.split(",") if e.strip()]
    if not engines or set(engines) - {"local", "vllm"}:
        raise SystemExit(f"--engine {args.engine!r}: give local, vllm or local,vllm")

    targets: list[dict] = []
    load_before = os.getloadavg()[0]
    try:
        for engine in engines:
            given = args.base_url if engine == "local" else args.vllm_url
            t = {
                "engine": engine,
                "proc": None,
                "log_path": None,
                "variants": ("plain", "neutral", "keyed") if engine == "vllm" else ("plain",),
            }
            targets.append(t)
            if given:
                t["base_url"] = given.rstrip("/")
            else:
                port = free_port()
                t["base_url"] = f"http://127.0.0.1:{port}"
                with tempfile.NamedTemporaryFile(
                    prefix=f"distillguard-{engine}-", suffix=".log", delete=False
                ) as f:
                    t["log_path"] = f.name
                start = start_server if engine == "local" else start_vllm
                t["proc"] = start(args, port, t["log_path"])
            t["startup_s"] = round(
                asyncio.run(
                    wait_healthy(
                        t["base_url"],
                        t["proc"],
                        args.startup_timeout if engine == "local" else args.vllm_startup_timeout,
                        t["log_path"],
                        "/healthz" if engine == "local" else "/health",
                    )
                ),
                1,
            )
            console.print(f"{engine} ready after {t['startup_s']} s at {t['base_url']}")
        t0 = time.perf_counter()
        phases = asyncio.run(bench(args, targets))
        wall = time.perf_counter() - t0
    finally:
        for t in targets:
            proc = t["proc"]
            if proc is not None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            if t["log_path"]:
                os.unlink(t["log_path"])
    result = {
        "bench": "serve_throughput",
        "model": args.model,
        "max_tokens": args.max_tokens,
        "clients": args.clients,
        "max_batch_rows": args.max_batch_rows,
        "server_threads": args.threads or "default",
        "duration_s": args.duration,
        "rounds": args.rounds,
    }
    if engines == ["local"]:  # the original single-engine report, unchanged
        result.update(summarise(phases, args.clients))
        for p in phases:
            del p["engine"], p["variant"]
    else:
        result["engines"] = {
            f"{t['engine']}/{v}": summarise(
                [p for p in phases if p["engine"] == t["engine"] and p["variant"] == v],
                args.clients,
            )
            for t in targets
            for v in t["variants"]
        }
        if "vllm" in engines:
            # the plugin's cost: keyed vs neutral tokens/s on the same vLLM (the same sampler
            # work for vLLM, the plugin's on top), phases side by side; keyed vs plain: what a
            # request's own temperature/top-p costs in vLLM's sampler against ours
            e = result["engines"]
            for name, base in (
                ("plugin_tokens_per_s_ratio", "neutral"),
                ("keyed_vs_plain", "plain"),
            ):
                result[name] = {
                    f"{n}_client{'s' if n > 1 else ''}": round(
                        e["vllm/keyed"][key] / e[f"vllm/{base}"][key], 3
                    )
                    for n, key in (
                        (1, "tokens_per_s_1_client"),
                        (args.clients, f"tokens_per_s_{args.clients}_clients"),
                    )
                }
            result["plugin_ratio_per_round"] = {
                f"{n}_client{'s' if n > 1 else ''}": [
                    round(k["tokens_per_s"] / p["tokens_per_s"], 3)
                    for p, k in zip(
                        [p for p in phases if p["variant"] == "neutral" and p["clients"] == n],
                        [p for p in phases if p["variant"] == "keyed" and p["clients"] == n],
                    )
                    if p["tokens_per_s"]
                ]
                for n in (1, args.clients)
            }
    result.update(
        {
            "phases": phases,
            "server_startup_s": {t["engine"]: t["startup_s"] for t in targets}
            if len(targets) > 1
            else targets[0]["startup_s"],
            "bench_wall_s": round(wall, 1),
            "cpu_count": os.cpu_count(),
            # Other work on the machine skews absolute rates (the ratio less so): 1-minute load
            # averages.
            "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "python": platform.python_version(),
        }
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
