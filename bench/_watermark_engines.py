"""``bench/watermark_quality.py --engine vllm``: the served watermark's detection rate at 64 tokens
through a real vLLM server with distillguard's plugin, side by side with our engine, in one run.

Both answer through the same gateway code, for one account under one secret (so one key):

- ``local``: ``distillguard serve --model smollm2`` (our engine embeds the watermark);
- ``vllm``:  ``distillguard serve --upstream URL --upstream-engine vllm`` in front of vLLM started
  with ``--logits-processors distillguard.integrations.vllm:WatermarkLogitsProcessor`` (the
  plugin embeds it; ``scripts/vllm_env.sh`` builds vLLM's virtualenv).

The same ``--prompts`` ShareGPT first prompts, temperature 0.7, ``--engine-tokens`` (64) tokens,
16 clients, seed = the prompt's index, with serve's default scheme. Each answer's *text* is
tokenised with the teacher's tokenizer, as ``watermark detect`` does with text it receives, and
scored alone against the account's key with the prompt's n-grams excluded, by the main bench's
``plain`` and ``teacher-llr`` detectors (``detect_one``); detected means p < ``ALPHA``.

Noise: two independent samples of answers (the engines draw different random numbers, so the
same prompt gives different texts). Per engine the Wilson 95% interval of its detection rate;
for the difference, Newcombe's hybrid-score 95% interval (method 10) and Fisher's exact
two-sided test. "Within noise" means Fisher's p > 0.05; the interval says how large a gap the
run could still hide.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
from scipy.stats import binomtest, fisher_exact

from distillguard.models.loader import _gguf_cache_dir, bundled_gguf_path, cache_dir
from distillguard.serve.process import process_until_healthy, serve_subprocess
from distillguard.watermark import WatermarkParams, account_key
from distillguard.watermark.entropy import teacher_stats

REPO = Path(__file__).resolve().parents[1]
ACCOUNT = "bench-account"
PROCESSOR = "distillguard.integrations.vllm:WatermarkLogitsProcessor"
CLIENTS = 16
STAT_FIELDS = ("entropy", "nll", "token_prob", "collision")


def vllm_python() -> Path:
    """vLLM's own virtualenv (built or reused by scripts/vllm_env.sh, as the tests do)."""
    import subprocess

    venv = Path(os.environ.get("DISTILLGUARD_VLLM_VENV") or cache_dir() / "venv-vllm")
    subprocess.run(["bash", str(REPO / "scripts" / "vllm_env.sh"), str(venv)], check=True, cwd=REPO)
    return venv / "bin" / "python"


def start_vllm(stack: ExitStack, log: Path) -> str:
    from distillguard.serve.process import free_port

    port = free_port("127.0.0.1")
    cmd = [
        str(vllm_python()),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(_gguf_cache_dir(bundled_gguf_path())),
        "--served-model-name",
        "smollm2",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "2048",
        "--seed",
        "0",
        "--logits-processors",
        PROCESSOR,
        "--logprobs-mode",
        "processed_logprobs",
    ]
    env = {
        "VLLM_USE_V2_MODEL_RUNNER": "0",  # the plugin's interface is the V1 runner's
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    url = f"http://127.0.0.1:{port}"
    stack.enter_context(
        process_until_healthy(
            cmd, url, port=port, log_path=log, env=env, timeout_s=1800, health_path="/health"
        )
    )
    return url


def wait_healthy(url: str, timeout_s: float = 1800) -> None:
    """A vLLM server given with --vllm-url may still be starting (minutes on a loaded machine)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"vLLM at {url} not healthy after {timeout_s:.0f} s")
        time.sleep(5)


def ask_all(url: str, admin: str, prompts, max_tokens: int) -> tuple[list[str], float]:
    key = httpx.post(
        f"{url}/admin/keys", json={"account": ACCOUNT}, headers={"Authorization": f"Bearer {admin}"}
    ).json()["key"]

    def ask(i: int) -> str:
        for _ in range(10):  # a busy gateway's 429/503 is waited out, as a client would
            r = httpx.post(
                f"{url}/v1/chat/completions",
                headers={"Authorization": f"Bearer {key}"},
                json={
                    "model": "smollm2",
                    "messages": [{"role": "user", "content": prompts[i].text}],
                    "max_tokens": max_tokens,
                    "temperature": 0.7,
                    "seed": i,
                },
                timeout=1800,
            )
            if r.status_code not in (429, 503):
                break
            time.sleep(float(r.headers.get("retry-after", 5)))
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        texts = list(pool.map(ask, range(len(prompts))))
    return texts, time.perf_counter() - t0


def wilson(k: int, n: int) -> tuple[float, float]:
    ci = binomtest(k, n).proportion_ci(0.95, method="wilson")
    return ci.low, ci.high


def newcombe(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float]:
    """95% interval of p1 - p2 from the two Wilson intervals (Newcombe 1998, method 10);
    hand-written: scipy has no two-proportion interval and statsmodels is not a dependency."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson(k1, n1)
    l2, u2 = wilson(k2, n2)
    d = p1 - p2
    return d - math.hypot(p1 - l1, u2 - p2), d + math.hypot(u1 - p1, p2 - l2)


def reference(path: Path, prompts: int, n: int, alpha: float, args) -> dict:
    """Our engine's side from an earlier ``watermark_quality.py`` run on the same prompts (its
    served configuration's detection rates at ``n`` tokens), for a machine too loaded to run
    our engine here as well: not side by side in time, and its answers were scored as token ids
    (no text round trip)."""
    import json

    ref = json.loads(Path(path).read_text())
    sel = ref["prompt_selection"]
    same = (ref["prompts"], sel["skip"], sel["max_prompt_tokens"], ref["alpha"], ref["temperature"])
    want = (prompts, args.skip, args.max_prompt_tokens, alpha, 0.7)
    if same != want:
        raise SystemExit(
            f"{path} used (prompts, skip, max_prompt_tokens, alpha, T) = {same}, not {want}"
        )
    name, row = next((k, v) for k, v in ref["results"].items() if k.endswith("(served)"))
    detectors = {}
    for det in ("plain", "teacher-llr"):
        k = round(row["detected"][det][str(n)] * prompts)
        detectors[det] = {
            "detected": k,
            "answers": prompts,
            "rate": round(k / prompts, 4),
            "wilson95": [round(x, 4) for x in wilson(k, prompts)],
            "rate_among_reaching": row["detected_64_among_answers_reaching_64"][det]
            if n == 64
            else None,
            "median_log10_p": row["median_log10_p_64"][det] if n == 64 else None,
        }
    return {
        "detectors": detectors,
        "answers_reaching": row["answers_reaching"][str(n)],
        "source": f"{path}: configuration {name!r} (HF generate with the watermark processor, "
        f"{ref['max_new_tokens']} tokens cut to {n}; scored on token ids)",
    }


def compare(args, lm, prompts, served_scheme: str, secret: bytes, alpha: float, detect_one):
    """Run both engines, score their answers, and return the JSON result."""
    admin = "admin-" + uuid.uuid4().hex
    params = WatermarkParams(scheme=served_scheme)
    key = account_key(secret, ACCOUNT, params)
    env = {"DISTILLGUARD_WATERMARK_SECRET": secret.decode(), "DISTILLGUARD_ADMIN_KEY": admin}
    # answers are kept per (scheme, prompts, length, engine): a rerun after a failure in
    # scoring does not generate them again
    work = Path(args.cache_dir) / (
        f"engines-{served_scheme}-{args.skip}-{len(prompts)}-{args.max_prompt_tokens}-"
        f"{args.engine_tokens}"
    )
    work.mkdir(parents=True, exist_ok=True)
    common = ("--watermark-scheme", served_scheme)
    texts, wall = {}, {}
    t0 = time.perf_counter()

    def run(engine: str, *serve_args: str) -> None:
        saved = work / f"{engine}.json"
        if saved.exists():
            texts[engine], wall[engine] = json.loads(saved.read_text())
            return
        with serve_subprocess(
            *serve_args, "--db", f"sqlite:///{work / engine}.db", *common, env=env, timeout_s=600
        ) as gw:
            texts[engine], wall[engine] = ask_all(gw.url, admin, prompts, args.engine_tokens)
        saved.write_text(json.dumps([texts[engine], wall[engine]]))

    # our engine first; a vLLM this run starts comes up after it, so the two never share the
    # cores (with both alive our engine starved in bench/serve_throughput.py's run)
    if not args.reference:
        # --serve-threads 1 on a machine shared with other work: two torch threads stall waiting
        # for each other whenever one is descheduled (serve --threads' help)
        run("local", "--model", args.model, "--threads", str(args.serve_threads))
    with ExitStack() as stack:
        upstream = args.vllm_url or start_vllm(stack, work / "vllm.log")
        wait_healthy(upstream)
        run("vllm", "--upstream", upstream, "--upstream-engine", "vllm")
    generation_s = time.perf_counter() - t0

    tok = lm.tokenizer
    n = args.engine_tokens
    synthid = params.synthid if params.scheme == "synthid" else None
    engines = {}
    for engine, said in texts.items():
        ids = [tok(t, add_special_tokens=False)["input_ids"][:n] for t in said]
        stats = teacher_stats(lm.model, [list(p.ids) for p in prompts], ids, temperature=0.7)
        # kept alive for the whole loop: detect_one caches weights by id(answer)
        answers = [
            {"tokens": a, **{f: getattr(s, f).tolist() for f in STAT_FIELDS}}
            for a, s in zip(ids, stats)
        ]
        rows = {}
        for name, spec in (("plain", {}), ("teacher-llr", {"kind": "llr"})):
            ps, log10 = [], []
            for p, answer in zip(prompts, answers):
                found = detect_one(key, answer, list(p.ids), n, spec, args, synthid)
                ps.append(found.p_value)
                log10.append(found.log10_p)
            k = sum(p < alpha for p in ps)
            reaching = [p for p, a in zip(ps, ids) if len(a) >= n]
            rows[name] = {
                "detected": k,
                "answers": len(ps),
                "rate": round(k / len(ps), 4),
                "wilson95": [round(x, 4) for x in wilson(k, len(ps))],
                "rate_among_reaching": round(sum(p < alpha for p in reaching) / len(reaching), 4)
                if reaching
                else None,
                "median_log10_p": round(statistics.median(log10), 2),
            }
        engines[engine] = {
            "detectors": rows,
            "answers_reaching": sum(len(a) >= n for a in ids),
            "mean_tokens": round(sum(map(len, ids)) / len(ids), 1),
            "wall_s": round(wall[engine], 1),
            "tokens_per_s": round(sum(map(len, ids)) / wall[engine], 1),
        }
    if args.reference:
        engines["local"] = reference(args.reference, len(prompts), n, alpha, args)
    comparison = {}
    for name in ("plain", "teacher-llr"):
        a, b = engines["vllm"]["detectors"][name], engines["local"]["detectors"][name]
        k1, n1, k2, n2 = a["detected"], a["answers"], b["detected"], b["answers"]
        p = fisher_exact([[k1, n1 - k1], [k2, n2 - k2]]).pvalue
        comparison[name] = {
            "vllm_minus_local": round(k1 / n1 - k2 / n2, 4),
            "newcombe95": [round(x, 4) for x in newcombe(k1, n1, k2, n2)],
            "fisher_p": round(float(p), 4),
            "within_noise": bool(p > 0.05),
        }
    return {
        "bench": "watermark_quality --engine vllm",
        "model": args.model,
        "scheme": served_scheme,
        "params": {"scheme": params.scheme, "synthid": synthid and vars(synthid)},
        "prompts": len(prompts),
        "prompt_selection": f"ShareGPT first prompts {args.skip}..{args.skip + len(prompts) - 1} "
        f"(usable, <= {args.max_prompt_tokens} template tokens)",
        "temperature": 0.7,
        "max_tokens": n,
        "clients": CLIENTS,
        "alpha": alpha,
        "engines": engines,
        "comparison": comparison,
        "generation_wall_s": round(generation_s, 1),
        "vllm_url_given": bool(args.vllm_url),
    }
