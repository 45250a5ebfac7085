"""Detection vs quality of the watermark on the bundled teacher, all schemes side by side in one run.

Answers: ``--prompts`` real ShareGPT first prompts (the first ones in file order, skipping very
long ones and duplicates), temperature 0.7, up to ``--max-new-tokens`` (128) tokens, generated
through the in-process serve ``Engine`` (continuous batching, ``--batch`` rows at a time, the
watermark applied per row inside ``Engine._choose`` as behind the HTTP server). Configurations,
their jobs interleaved prompt by prompt so that a change of machine load hits them all alike:

- ``baseline``                      no watermark,
- ``lefthash-ref d=1..4``           the reference scheme (Kirchenbauer et al. LeftHash, its default key),
- ``keyed-hash d=1..4``             the default scheme (one account's key, its default min_entropy),
- ``... (default)``                 the shipped ``WatermarkParams()`` (what ``distillguard serve`` uses),
                                    added when not among the above,
- ``keyed-hash d=.. min_entropy=0`` the default biasing every position (unless ``--no-ungated``),

all with γ=0.25 (``--schemes``, ``--deltas`` choose). Each answer, truncated to 16/32/64/128 tokens, is scored alone against its
configuration's key, its prompt's n-grams excluded, by:

- ``plain``        the exact binomial test on every distinct pair (``detect_tokens``),
- ``teacher-llr``  the entropy-aware detector (``watermark.entropy``): the teacher's distribution
                   at each position gives the chosen token's probability of being green under the
                   watermark, and the pairs are weighted by its quantised log-likelihood ratio (0
                   where the embedder skipped the position); an exact weighted test,
- ``sweet-H>=τ``   SWEET: the binomial test on the positions whose teacher entropy is >= τ nats.

The weights depend on the text and the teacher, never on the key, so the p-values stay exact.

Quality: perplexity of the 64-token answers under the unwatermarked teacher, exp(mean token
NLL). The teacher's statistics at each position are taken from the very logits the engine
computed before watermarking (an ``Engine`` subclass records them in ``_choose``), which saves a
second pass; ``--check-stats N`` recomputes them for N answers with ``entropy.teacher_stats``
(the forward pass a detector runs on text it receives) and reports the largest difference.

False positives: the baseline answers are tested against every configuration's key and against
``--null-keys`` further random keys of the default; and ``--fpr-texts`` (1,000) real ChatGPT
answers from ShareGPT, 64 tokens each, against ``--fpr-keys`` (20) account keys, by the plain and
the teacher-llr detectors (``--only-fpr`` runs this part alone). The fraction below each α is
reported per detector with its 3σ sampling bound (the p-values are exact, and conservative when
discrete).

    python bench/watermark_quality.py                     # 96 prompts, 128 tokens, 10 configurations
    python bench/watermark_quality.py --prompts 96 --max-new-tokens 64 --schemes lefthash-ref --deltas 2 \
        --no-ungated --fpr-texts 0 --threads 1 --batch 24     # the README's run (reference δ=2 vs the default)
    python bench/watermark_quality.py --only-fpr --fpr-texts 1000 --fpr-keys 20 --json bench/results/watermark_fpr.json
    python bench/watermark_quality.py --quick             # 16 prompts, 64 tokens
    python bench/watermark_quality.py --prompts 32 --skip 96 --dump /tmp/pilot.pt   # held-out prompts
    python bench/watermark_quality.py --from-dump /tmp/pilot.pt                     # re-score only

Progress goes to stderr; one JSON object to stdout and to ``--json`` (bench/results/...), and a
plot of detection rate vs answer length to ``--plot``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _engine_jobs import run_jobs, sharegpt_prompts  # noqa: E402

from distillguard.models.loader import load_model  # noqa: E402
from distillguard.serve.engine import Engine, GenParams  # noqa: E402
from distillguard.watermark import WatermarkParams, account_key, detect_tokens, reference_key  # noqa: E402
from distillguard.watermark.entropy import PositionStats, position_stats, teacher_stats, teacher_weights  # noqa: E402

console = Console(stderr=True)
HERE = Path(__file__).resolve().parent
SECRET = b"bench-watermark-quality"
ALPHA = 1e-3
TEMPERATURE = 0.7
GAMMA = 0.25


# ---- generation -----------------------------------------------------------------------------

class RecordingEngine(Engine):
    """The serve Engine, also recording for every row the unwatermarked teacher's statistics at
    each step (``entropy.position_stats`` of the logits before any watermark, and the token chosen)."""

    def __init__(self, lm, **kwargs):
        super().__init__(lm, **kwargs)
        self.records: dict[int, dict[str, list]] = {}

    def _choose(self, rows, logits):
        chosen = super()._choose(rows, logits)  # logits (B, V): as the model produced them
        st = position_stats(logits, chosen, temperature=TEMPERATURE)
        for b, row in enumerate(rows):
            rec = self.records.setdefault(id(row.job), {f: [] for f in ("tokens", *STAT_FIELDS)})
            rec["tokens"].append(int(chosen[b]))
            for f in STAT_FIELDS:
                rec[f].append(float(getattr(st, f)[b]))
        return chosen


STAT_FIELDS = ("entropy", "nll", "token_prob", "collision")


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    scheme: str | None  # None: no watermark
    delta: float = 0.0
    min_entropy: float | None = None  # None: the scheme's default

    @property
    def params(self) -> WatermarkParams:
        return WatermarkParams(scheme=self.scheme, gamma=GAMMA, delta=self.delta, min_entropy=self.min_entropy)

    def key(self):
        if self.scheme is None:
            return None
        if self.scheme == "lefthash-ref":
            return reference_key(self.params)  # the reference implementation's default hash key
        return account_key(SECRET, "bench-account", self.params)


def configs_for(deltas, schemes, ungated: bool) -> list[Config]:
    """The baseline, each scheme at each δ (the scheme's default min_entropy), and the shipped
    default (``WatermarkParams()``, what ``distillguard serve`` uses) when not among them."""
    out = [Config("baseline", None)]
    for scheme in schemes:
        out += [Config(f"{scheme} d={d:g}", scheme, float(d)) for d in deltas]
    default = WatermarkParams()
    if not any(c.scheme == default.scheme and c.params == dataclasses.replace(default, gamma=GAMMA) for c in out):
        out.append(Config(f"{default.scheme} d={default.delta:g} min_entropy={default.min_entropy:g} (default)",
                          default.scheme, default.delta, default.min_entropy))
    if ungated and "keyed-hash" in schemes:
        # the default scheme as it was before min_entropy: every position biased
        out.append(Config(f"keyed-hash d={default.delta:g} min_entropy=0", "keyed-hash", default.delta, 0.0))
    return out


def default_config(configs: list[Config]) -> Config:
    """The configuration with the shipped default parameters (γ as in this bench)."""
    want = dataclasses.replace(WatermarkParams(), gamma=GAMMA)
    return next(c for c in configs if c.scheme == want.scheme and c.params == want)


def generate(lm, prompts, configs, args) -> dict:
    engine = RecordingEngine(lm, max_batch_rows=args.batch)
    engine.start()
    order = [(c, p) for p in range(len(prompts)) for c in range(len(configs))]  # prompt-major: interleaved
    # One seed per prompt, shared by the configurations: the same sampling noise, so that they
    # differ by the watermark only (common random numbers).
    params = [GenParams(max_new_tokens=args.max_new_tokens, temperature=TEMPERATURE,
                        seed=args.seed + 7919 * p, watermark=configs[c].key()) for c, p in order]
    progress = Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, disable=not console.is_terminal)
    t0 = time.perf_counter()
    done = [0]

    def on_done(i: int) -> None:
        progress.advance(task)
        done[0] += 1
        if not console.is_terminal and (done[0] % args.batch == 0 or done[0] == len(order)):
            console.print(f"generated {done[0]}/{len(order)} answers in {time.perf_counter() - t0:.0f} s")

    with progress:
        task = progress.add_task("gen", total=len(order))
        results, jobs = run_jobs(engine, [prompts[p].ids for _, p in order], params, on_done=on_done)
    wall = time.perf_counter() - t0
    engine.stop()
    answers = {c.name: [None] * len(prompts) for c in configs}
    for (c, p), res, job in zip(order, results, jobs):
        rec = engine.records[id(job)]
        assert len(rec["tokens"]) == res.completion_tokens
        answers[configs[c].name][p] = {**rec, "finish_reason": res.finish_reason, "text": res.text}
    tokens = sum(len(a["tokens"]) for v in answers.values() for a in v)
    return {"answers": answers, "generation_wall_s": round(wall, 1), "generated_tokens": tokens}


# ---- detectors --------------------------------------------------------------------------------

def detector_specs(args) -> list[tuple[str, dict]]:
    specs = [("plain", {}), ("teacher-llr", {"kind": "llr"})]
    specs += [(f"sweet-H>={t:g}", {"kind": "sweet", "threshold": t}) for t in args.sweet]
    return specs


_WEIGHTS: dict[tuple, list[int] | None] = {}


def token_weights(answer: dict, spec: dict, params: WatermarkParams, levels: int) -> list[int] | None:
    """One weight per answer token for the detector ``spec`` (None: the plain test); cached,
    since the false-positive check tests every answer under hundreds of keys."""
    kind = spec.get("kind")
    if kind is None:
        return None
    cache_key = (id(answer), kind, spec.get("threshold"), params, levels)
    if cache_key not in _WEIGHTS:
        if kind == "sweet":  # SWEET: score the positions where the teacher's entropy reaches the threshold
            _WEIGHTS[cache_key] = [int(h >= spec["threshold"]) for h in answer["entropy"]]
        else:
            stats = PositionStats(**{f: torch.tensor(answer[f]) for f in STAT_FIELDS})
            _WEIGHTS[cache_key] = teacher_weights(params, stats, temperature=TEMPERATURE, levels=levels)
    return _WEIGHTS[cache_key]


def detect_one(key, answer: dict, prompt_ids, length: int, spec: dict, args):
    """One answer, truncated to ``length`` tokens, scored alone against ``key``; its prompt's n-grams excluded."""
    toks = answer["tokens"][:length]
    w = token_weights(answer, spec, key.params, args.levels)
    return detect_tokens(key, [toks], prompt_seqs=[prompt_ids], vocab_size=args.vocab,
                         weights=None if w is None else [w[:length]])


def perplexity(answers: list[dict], length: int) -> float:
    nll = [x for a in answers for x in a["nll"][:length]]
    return math.exp(statistics.fmean(nll)) if nll else float("nan")


def analyse(data: dict, prompts, configs, args) -> dict:
    lengths = [n for n in (16, 32, 64, 128) if n <= args.max_new_tokens]
    specs = detector_specs(args)
    out = {}
    for cfg in configs:
        answers = data["answers"][cfg.name]
        lens = [len(a["tokens"]) for a in answers]
        row = {
            "scheme": cfg.scheme or "none", "delta": cfg.delta,
            "min_entropy": cfg.params.min_entropy if cfg.scheme else None,
            "perplexity_64": round(perplexity(answers, 64), 3),
            "perplexity_full": round(perplexity(answers, args.max_new_tokens), 3),
            "mean_entropy_64": round(statistics.fmean(h for a in answers for h in a["entropy"][:64]), 3),
            "answer_tokens_mean": round(statistics.fmean(lens), 1),
            "answers_reaching": {str(n): sum(x >= n for x in lens) for n in lengths},
        }
        key = cfg.key()
        if key is not None:
            row["detected"] = {}
            row["detected_64_among_answers_reaching_64"] = {}
            row["median_log10_p_64"] = {}
            row["mean_scored_64"] = {}
            for name, spec in specs:
                rates = {}
                for n in lengths:
                    dets = [detect_one(key, a, prompts[i].ids, n, spec, args) for i, a in enumerate(answers)]
                    rates[str(n)] = round(sum(d.p_value < ALPHA for d in dets) / len(dets), 4)
                    if n == 64:
                        row["median_log10_p_64"][name] = round(statistics.median(d.log10_p for d in dets), 2)
                        row["mean_scored_64"][name] = round(statistics.fmean(d.scored for d in dets), 1)
                        full = [d for d, x in zip(dets, lens) if x >= 64]
                        row["detected_64_among_answers_reaching_64"][name] = (
                            round(sum(d.p_value < ALPHA for d in full) / len(full), 4) if full else None)
                row["detected"][name] = rates
        out[cfg.name] = row
        console.print(f"scored {cfg.name}")
    base_ppl = out["baseline"]["perplexity_64"]
    for row in out.values():
        row["perplexity_cost_pct"] = round(100 * (row["perplexity_64"] / base_ppl - 1), 1)
    return out


def false_positives(data: dict, prompts, configs, args) -> dict:
    """Baseline (unwatermarked) answers against every configuration's key and ``--null-keys``
    random keyed-hash keys, 64 tokens: the fraction of p-values below each α, per detector."""
    specs = detector_specs(args)
    answers = data["answers"]["baseline"]
    keys = [c.key() for c in configs if c.scheme is not None]
    keys += [account_key(SECRET, f"null-{i}", WatermarkParams(gamma=GAMMA)) for i in range(args.null_keys)]
    # (each configuration's own key, then random keys of the default scheme)
    out = {"tests_per_detector": len(keys) * len(answers), "keys": len(keys), "answers": len(answers)}
    for name, spec in specs:
        ps = [detect_one(k, a, prompts[i].ids, 64, spec, args).p_value
              for k in keys for i, a in enumerate(answers)]
        out[name] = {f"p<{a:g}": round(sum(p < a for p in ps) / len(ps), 5) for a in (0.1, 0.05, 0.01, 1e-3)}
        out[name]["mean_p"] = round(statistics.fmean(ps), 4)
    console.print("scored the baseline against the null keys")
    return out


def sharegpt_false_positives(lm, args) -> dict:
    """Real ChatGPT answers from ShareGPT (never watermarked by us): the first ``--fpr-texts``
    first answers, 64 tokens each, after their own prompt, tested alone against ``--fpr-keys``
    account keys of the default scheme, by the plain and the teacher-llr detectors. The
    empirical fraction below α must stay within sampling error of α (upper bound: α + 3σ)."""
    from distillguard.data import iter_conversations

    params = WatermarkParams()
    texts, prompts = [], []
    for conv in iter_conversations():
        if conv.first_prompt is None or not conv.first_answer:
            continue
        ans = lm.tokenizer.encode(conv.first_answer[:2000], add_special_tokens=False)[:64]
        if len(ans) < 16:
            continue
        # the teacher's context: the chat prompt, its last tokens when long (weights need
        # only some context, and never depend on the key)
        prompts.append(lm.chat_ids([{"role": "user", "content": conv.first_prompt[:4000]}])[-args.fpr_prompt_tokens:])
        texts.append(ans)
        if len(texts) == args.fpr_texts:
            break
    keys = [account_key(SECRET, f"fpr-{i}", params) for i in range(args.fpr_keys)]
    progress = Progress(TextColumn("teacher pass over ShareGPT answers"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, disable=not console.is_terminal)
    weights = []
    with progress:
        task = progress.add_task("fpr", total=len(texts))
        for start in range(0, len(texts), 16):
            stats = teacher_stats(lm.model, prompts[start:start + 16], texts[start:start + 16],
                                  temperature=TEMPERATURE, pad_id=lm.tokenizer.pad_token_id or 0, batch_size=16)
            weights += [teacher_weights(params, st, temperature=TEMPERATURE, levels=args.levels) for st in stats]
            progress.advance(task, len(stats))
            if not console.is_terminal and (start // 16) % 16 == 15:
                console.print(f"teacher pass: {start + 16}/{len(texts)} ShareGPT answers")
    out = {"texts": len(texts), "keys": len(keys), "tokens_per_text_mean": round(statistics.fmean(map(len, texts)), 1),
           "scheme": dataclasses.asdict(params)}
    for name, use_w in (("plain", False), ("teacher-llr", True)):
        dets = [[detect_tokens(k, [t], prompt_seqs=[p], vocab_size=args.vocab, weights=[w] if use_w else None)
                 for t, p, w in zip(texts, prompts, weights)] for k in keys]
        ps = [d.p_value for row in dets for d in row]
        n = len(ps)
        row = {"tests": n}
        for a in (1e-3, 1e-2, 5e-2):
            rate = sum(p < a for p in ps) / n
            bound = a + 3 * math.sqrt(a * (1 - a) / n)
            row[f"p<{a:g}"] = {"rate": round(rate, 5), "bound_3sigma": round(bound, 5), "within": rate <= bound}
        mean_z = [statistics.fmean(d.z for d in r) for r in dets]
        row["mean_z_per_key"] = {"min": round(min(mean_z), 3), "max": round(max(mean_z), 3),
                                 "sd_expected": round(1 / math.sqrt(len(texts)), 3)}
        out[name] = row
    console.print("scored the ShareGPT answers against the null keys")
    return out


def check_stats(lm, data: dict, prompts, configs, n: int) -> dict:
    """Recompute the recorded statistics of ``n`` answers with ``entropy.teacher_stats`` (one
    forward pass over prompt + answer, as a detector does): the largest absolute differences."""
    cfg = default_config(configs)
    answers = data["answers"][cfg.name][:n]
    stats = teacher_stats(lm.model, [prompts[i].ids for i in range(len(answers))], [a["tokens"] for a in answers],
                          temperature=TEMPERATURE, pad_id=lm.tokenizer.pad_token_id or 0)
    diff = dict.fromkeys(STAT_FIELDS, 0.0)
    weights_equal = True
    for a, s in zip(answers, stats):
        for f in STAT_FIELDS:
            diff[f] = max(diff[f], float((getattr(s, f) - torch.tensor(a[f])).abs().max()))
        recorded = PositionStats(**{f: torch.tensor(a[f]) for f in STAT_FIELDS})
        weights_equal &= teacher_weights(cfg.params, s, temperature=TEMPERATURE) == teacher_weights(
            cfg.params, recorded, temperature=TEMPERATURE)
    return {"answers": len(answers), "config": cfg.name, "max_abs_diff": {k: float(f"{v:.3g}") for k, v in diff.items()},
            "teacher_llr_weights_identical": weights_equal}


# ---- report -----------------------------------------------------------------------------------

# The issue's reference curve (lefthash-ref, plain detector, 64 tokens, measured on this machine):
# δ -> (perplexity, detected); baseline perplexity 3.56.
ISSUE_REFERENCE = {1: (3.94, 0.33), 2: (4.80, 0.84), 3: (6.79, 0.99), 4: (9.54, 1.00)}


def plot(results: dict, detectors: list[str], path: Path) -> None:
    """Detection rate vs answer length per detector, and detection at 64 tokens vs perplexity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(detectors) + 1, figsize=(6 * (len(detectors) + 1), 4.8), squeeze=False)
    axes = axes[0]
    colors = {1.0: "tab:blue", 2.0: "tab:orange", 3.0: "tab:green", 4.0: "tab:red"}
    for ax, det in zip(axes, detectors):
        for row in results.values():
            if "detected" not in row:
                continue
            rates = row["detected"][det]
            xs = [int(n) for n in rates]
            gated = row["scheme"] == "keyed-hash" and row["min_entropy"]
            style = "--" if row["scheme"] == "lefthash-ref" else "-" if gated else ":"
            extra = f", min_entropy={row['min_entropy']:g}" if row["scheme"] == "keyed-hash" else ""
            ax.plot(xs, [100 * rates[str(x)] for x in xs], style, marker="o", color=colors.get(row["delta"], "tab:purple"),
                    label=f"{row['scheme']} δ={row['delta']:g}{extra} (ppl +{row['perplexity_cost_pct']:.0f}%)")
        ax.axhline(95, color="gray", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xticks([16, 32, 64, 128], labels=["16", "32", "64", "128"])
        ax.set_ylim(-2, 102)
        ax.set_xlabel("answer tokens")
        ax.set_ylabel(f"answers detected at p < {ALPHA:g} (%)")
        ax.set_title(f"detector: {det}")
        ax.grid(alpha=0.3)
    axes[len(detectors) - 1].legend(fontsize=7, loc="lower right")
    # trade-off: detection of 64-token answers vs perplexity
    ax = axes[-1]
    base = results["baseline"]["perplexity_64"]
    curves = [("lefthash-ref", "plain", "tab:gray", "--"), ("keyed-hash", "plain", "tab:blue", "-"),
              ("keyed-hash", "teacher-llr", "tab:red", "-")]
    for scheme, det, color, style in curves:
        pts = sorted((r["perplexity_64"], 100 * r["detected"][det]["64"]) for r in results.values()
                     if r["scheme"] == scheme and "64" in r.get("detected", {}).get(det, {})
                     and (scheme != "keyed-hash" or r["min_entropy"]))
        if pts:
            ax.plot(*zip(*pts), style, marker="o", color=color, label=f"{scheme}, {det}")
    ref = sorted(ISSUE_REFERENCE.values())
    ax.plot([p for p, _ in ref], [100 * d for _, d in ref], "x", color="black", label="issue's reference numbers")
    ax.axvline(base * 1.35, color="gray", lw=0.8, ls=":")
    ax.axhline(95, color="gray", lw=0.8, ls=":")
    ax.set_xlabel(f"perplexity of 64-token answers (baseline {base:.2f}; dotted: +35%)")
    ax.set_ylabel("64-token answers detected (%)")
    ax.set_ylim(-2, 102)
    ax.set_title("trade-off (δ = 1..4)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("SmolLM2-135M-Instruct, ShareGPT prompts, T=0.7, γ=0.25 "
                 "(solid: keyed-hash, dotted: keyed-hash min_entropy=0, dashed: lefthash-ref)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompts", type=int, default=96, help="ShareGPT first prompts")
    ap.add_argument("--skip", type=int, default=0, help="skip the first SKIP usable prompts (held-out pilot runs)")
    ap.add_argument("--max-prompt-tokens", type=int, default=160, help="skip longer prompts (chat template included)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--deltas", type=lambda s: [float(x) for x in s.split(",")], default=[1.0, 2.0, 3.0, 4.0])
    ap.add_argument("--schemes", default="lefthash-ref,keyed-hash")
    ap.add_argument("--batch", type=int, default=16, help="engine rows generated together")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--sweet", type=lambda s: [float(x) for x in s.split(",") if x], default=[1.0],
                    help="entropy thresholds (nats) of SWEET-style detectors, comma separated (empty: none)")
    ap.add_argument("--levels", type=int, default=8, help="weight levels of the teacher-llr detector")
    ap.add_argument("--no-ungated", action="store_true",
                    help="leave out the extra keyed-hash δ=2 configuration with min_entropy=0 (every position biased)")
    ap.add_argument("--null-keys", type=int, default=200, help="extra random keys for the false-positive check")
    ap.add_argument("--fpr-texts", type=int, default=1000, help="real ShareGPT answers for the false-positive check (0: none)")
    ap.add_argument("--fpr-prompt-tokens", type=int, default=64,
                    help="the teacher sees the last N prompt tokens before each ShareGPT answer (cost)")
    ap.add_argument("--only-fpr", action="store_true",
                    help="only the ShareGPT false-positive check (no generation); JSON to --json")
    ap.add_argument("--fpr-keys", type=int, default=20, help="account keys each ShareGPT answer is tested against")
    ap.add_argument("--check-stats", type=int, default=8, help="answers whose statistics are recomputed by teacher_stats")
    ap.add_argument("--quick", action="store_true", help="16 prompts, 64 tokens, 50 null keys")
    ap.add_argument("--dump", type=Path, default=None, help="save the generations (tokens, statistics) here")
    ap.add_argument("--from-dump", type=Path, default=None, help="score saved generations instead of generating")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "watermark_quality.json")
    ap.add_argument("--plot", type=Path, default=HERE / "results" / "watermark_detection.png")
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.max_new_tokens, args.null_keys, args.fpr_texts = 16, 64, 50, 100
        args.check_stats = min(args.check_stats, 4)
    if args.threads:
        torch.set_num_threads(args.threads)

    t_start = time.perf_counter()
    lm = load_model(args.model)
    if args.only_fpr:
        args.vocab = lm.vocab_size
        result = {"bench": "watermark_quality --only-fpr", "model": args.model, "temperature": TEMPERATURE,
                  "alpha": ALPHA, "teacher_llr_levels": args.levels, "fpr_prompt_tokens": args.fpr_prompt_tokens,
                  "false_positives_sharegpt_64": sharegpt_false_positives(lm, args),
                  "bench_wall_s": round(time.perf_counter() - t_start, 1)}
        text = json.dumps(result, indent=2)
        print(text)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(text + "\n")
        return
    configs = configs_for(args.deltas, args.schemes.split(","), ungated=not args.no_ungated)
    if args.from_dump:
        data = torch.load(args.from_dump, weights_only=False)
        saved = data["args"]
        args.prompts, args.skip, args.max_new_tokens = saved["prompts"], saved["skip"], saved["max_new_tokens"]
        args.max_prompt_tokens, args.deltas = saved["max_prompt_tokens"], saved["deltas"]
        configs = [c for c in configs if c.name in data["answers"]]
    prompts = sharegpt_prompts(lm, args.prompts, skip=args.skip, max_prompt_tokens=args.max_prompt_tokens)
    console.print(f"{len(prompts)} prompts, {statistics.fmean(len(p.ids) for p in prompts):.0f} tokens on average; "
                  f"{len(configs)} configurations")
    if not args.from_dump:
        data = generate(lm, prompts, configs, args)
        data["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        if args.dump:
            args.dump.parent.mkdir(parents=True, exist_ok=True)
            torch.save(data, args.dump)
    t_score = time.perf_counter()
    args.vocab = lm.vocab_size
    results = analyse(data, prompts, configs, args)
    fpr = false_positives(data, prompts, configs, args)
    check = check_stats(lm, data, prompts, configs, args.check_stats) if args.check_stats else None
    sharegpt_fpr = sharegpt_false_positives(lm, args) if args.fpr_texts else None
    scoring = time.perf_counter() - t_score

    names = [n for n, _ in detector_specs(args)]
    default_name = default_config(configs).name
    default = results.get(default_name)
    targets = {}
    if default is not None:
        cost = default["perplexity_cost_pct"]
        for name in names:
            rate = default["detected"][name].get("64")
            targets[name] = {"detected_64": rate, "perplexity_cost_pct": cost,
                             "met": rate is not None and rate >= 0.95 and cost <= 35}
    result = {
        "bench": "watermark_quality",
        "model": args.model,
        "prompts": len(prompts),
        "prompt_selection": {"skip": args.skip, "max_prompt_tokens": args.max_prompt_tokens,
                             "mean_prompt_tokens": round(statistics.fmean(len(p.ids) for p in prompts), 1),
                             "first_conversation_ids": [p.conversation_id for p in prompts[:5]]},
        "temperature": TEMPERATURE, "gamma": GAMMA, "alpha": ALPHA, "max_new_tokens": args.max_new_tokens,
        "batch_rows": args.batch,
        "detectors": names,
        "teacher_llr_levels": args.levels,
        "default_params": dataclasses.asdict(WatermarkParams()),
        "results": results,
        "false_positives_baseline_64": fpr,
        "teacher_stats_check": check,
        "false_positives_sharegpt_64": sharegpt_fpr,
        "default_config": default_name,
        "target": "the default: >= 95% of 64-token answers detected at p < 1e-3, perplexity cost <= 35%",
        "target_by_detector": targets,
        "generation_wall_s": data.get("generation_wall_s"),
        "generated_tokens": data.get("generated_tokens"),
        "scoring_wall_s": round(scoring, 1),
        "bench_wall_s": round(time.perf_counter() - t_start, 1),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    if args.plot:
        plot(results, ["plain", "teacher-llr"], args.plot)
        console.print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
