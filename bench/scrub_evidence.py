"""Against a distiller who scrubs: how the evidence degrades with the strength of each scrub.

1. The embedded teacher answers ``--answers`` real ShareGPT first prompts through the serve
   ``Engine`` in process (continuous batching, the per-row watermark as served), every answer
   under the account ``distiller``'s SynthID key (what ``serve`` uses by default), temperature
   0.7, ``--max-new-tokens`` tokens. Cached under ``--cache``.
2. Text level: for each edit of ``distillguard.distill.scrub`` (delete, substitute, swap,
   reorder at rates r; truncate to the first k words) and each of ``--seeds`` seeds, the
   scrubbed answers are tested as ``watermark detect`` does (SynthID's depth weights, prompt
   n-grams excluded, exact test) against the distiller's key and, as the control, against
   another account's key (``bystander``): log10 p of each. Mixing: the teacher's answers plus
   ChatGPT's ShareGPT answers to other prompts at share ρ (``--mix-other``), drawn per seed.
   "Stops working": the smallest strength whose median log10 p over seeds is above
   log10(α / 2) (two keys tested; α = 10⁻³).
3. What scrubbing costs the distiller, per strength (seed 0): ROUGE-L F1 of the scrubbed
   answers to the unedited ones (how much of the teacher's text is left to learn from), and
   with ``--nll-answers N`` the teacher's mean token NLL of the first N scrubbed answers given
   their prompts (off by default: a forward pass per answer and strength). Mixing costs the
   share ρ of the data itself; the other answers are cut to the teacher answers' mean length
   in characters, so ρ is also the share of the text.
4. Canaries under the outlier filter: per seed, ``--canaries`` of the answers replaced by
   canaries for the distiller's requests (as the gateway's ``canary`` countermeasure serves
   them: ``guard.canary``), then ``--drop-outliers`` q at several shares by each score
   (rarity; with ``--canary-nll`` also the teacher's NLL): the share of canaries dropped and
   of normal answers dropped.

No student is trained here (the radioactivity of a student of scrubbed data is not measured).

    nice -n 10 python bench/scrub_evidence.py --answers 64 --max-new-tokens 96 --seeds 3 \
        --canaries 6 --canary-nll      # the docs' run: ~45 min of generation on the loaded
                                       # 2-core machine (cached), then ~5 min
    nice -n 10 python bench/scrub_evidence.py --answers 32 --seeds 2 --max-new-tokens 48   # smoke

One JSON object to stdout and ``--out``; the curves to ``--plot``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _engine_jobs import run_jobs, sharegpt_prompts  # noqa: E402

from distillguard.distill.scrub import (  # noqa: E402
    Scrub,
    SynonymTable,
    edit_text,
    mix_count,
    nll_scores,
    other_answers,
    outliers,
    rarity_scores,
)
from distillguard.guard.canary import canary_text  # noqa: E402
from distillguard.models import load_model  # noqa: E402
from distillguard.serve.engine import Engine, GenParams  # noqa: E402
from distillguard.watermark import WatermarkParams, account_key, trace  # noqa: E402
from distillguard.watermark.detect import tokenize  # noqa: E402

console = Console(stderr=True)
HERE = Path(__file__).resolve().parent
SECRET = b"bench-scrub-evidence"
ALPHA = 1e-3
GRID = {  # each curve starts at the unedited answers (scored once)
    "delete": [0.1, 0.25, 0.5, 0.75],
    "substitute": [0.1, 0.25, 0.5, 0.75],
    "swap": [0.1, 0.25, 0.5, 1.0],
    "reorder": [0.5, 1.0],
    "truncate": [64, 32, 16, 8],
    "mix": [0.25, 0.5, 0.75],
}
FIELD = {
    "delete": "scrub_delete",
    "substitute": "scrub_substitute",
    "swap": "scrub_swap",
    "reorder": "scrub_reorder",
    "truncate": "scrub_truncate",
}
QS = [0.05, 0.1, 0.2]


def generate(lm, prompts, key, args) -> list[str]:
    path = Path(args.cache) / f"answers-{args.answers}-{args.max_new_tokens}.json"
    if path.exists():
        return json.loads(path.read_text())
    engine = Engine(lm, max_batch_rows=16, batch_wait_s=0.01)
    engine.start()
    t0 = time.time()
    try:
        params = [
            GenParams(max_new_tokens=args.max_new_tokens, temperature=0.7, seed=i, watermark=key)
            for i in range(len(prompts))
        ]
        results, _ = run_jobs(engine, [p.ids for p in prompts], params)
    finally:
        engine.stop()
    texts = [r.text for r in results]
    tokens = sum(r.completion_tokens for r in results)
    console.log(f"{len(texts)} answers, {tokens} tokens in {time.time() - t0:.0f} s")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(texts))
    return texts


def evidence(tok, keys, params, answers: list[str], prompts: list[str]) -> list[float]:
    """log10 p of each key, alone (no Holm), as `watermark detect` scores: depth weights."""
    seqs = tokenize(tok, answers)
    weights = params.impl.default_weights(params, seqs)
    r = trace(keys, seqs, prompt_seqs=tokenize(tok, prompts), vocab_size=len(tok), weights=weights)
    return [round(d.log10_p, 2) for d in r.results]  # each key's own p, before Holm


def rouge_l(originals: list[str], edited: list[str]) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return statistics.fmean(
        scorer.score(o, e)["rougeL"].fmeasure for o, e in zip(originals, edited)
    )


def stops_at(points: list[dict]) -> object:
    """The first strength whose median log10 p is above the level ("unedited" when even the
    unedited answers are not traced; None when every strength tried is still traced)."""
    level = math.log10(ALPHA / 2)
    for p in points:
        if p["right_median"] > level:
            return "unedited" if p["strength"] is None else p["strength"]
    return None


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--answers", type=int, default=96)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument(
        "--nll-answers",
        type=int,
        default=0,
        help="the teacher's NLL of the first N scrubbed answers per strength (0: ROUGE-L only)",
    )
    ap.add_argument(
        "--canary-nll",
        action="store_true",
        help="also filter canaries by the teacher's NLL (a forward pass per answer)",
    )
    ap.add_argument("--canaries", type=int, default=8)
    ap.add_argument(
        "--cache", default=str(Path.home() / ".cache" / "distillguard" / "bench-scrub-evidence")
    )
    ap.add_argument("--out", default=str(HERE / "results" / "scrub_evidence.json"))
    ap.add_argument("--plot", default=str(HERE / "results" / "scrub_evidence.png"))
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    t_start = time.time()
    lm = load_model("smollm2")
    tok = lm.tokenizer
    params = WatermarkParams(scheme="synthid")
    right, wrong = (account_key(SECRET, a, params) for a in ("distiller", "bystander"))
    prompts = sharegpt_prompts(lm, args.answers, max_prompt_tokens=200)
    texts = [p.text for p in prompts]
    answers = generate(lm, prompts, right, args)
    table = SynonymTable.from_model(lm)
    messages = [[{"role": "user", "content": t}] for t in texts]
    k_nll = min(args.nll_answers, len(answers))
    # the other model's answers, to other prompts, as many as the largest share needs
    pool = other_answers(
        mix_count(len(answers), max(GRID["mix"])),
        exclude_prompts={" ".join(t.lower().split()) for t in texts},
    )

    # other answers cut to the teacher answers' mean length: rho is then also the share of text
    cut = round(statistics.fmean(len(a) for a in answers))
    pool = [{**r, "response": r["response"][:cut]} for r in pool]
    base = evidence(tok, (right, wrong), params, answers, texts)
    unedited = {
        "strength": None,
        "right_log10_p": [base[0]] * args.seeds,
        "wrong_log10_p": [base[1]] * args.seeds,
        "right_median": base[0],
        "wrong_min": base[1],
        "rouge_l": 1.0,
        "words": sum(len(a.split()) for a in answers),
        "non_teacher_share": 0.0,
    }
    if k_nll:
        unedited["teacher_nll"] = round(nll_mean(lm, messages[:k_nll], answers[:k_nll]), 4)
    console.log(f"unedited: right {base[0]} wrong {base[1]}")
    curves: dict[str, list[dict]] = {}
    for kind, strengths in GRID.items():
        points = [unedited]
        for strength in strengths:
            t0 = time.time()
            rights, wrongs, cost = [], [], {}
            for seed in range(args.seeds):
                if kind == "mix":
                    n = mix_count(len(answers), strength)
                    extra = random.Random(seed).sample(pool, n)
                    got = evidence(
                        tok,
                        (right, wrong),
                        params,
                        answers + [r["response"] for r in extra],
                        texts + [r["messages"][0]["content"] for r in extra],
                    )
                    if seed == 0:
                        cost = {"non_teacher_share": n / (n + len(answers))}
                else:
                    scrub = Scrub(**{FIELD[kind]: strength})
                    edited = [
                        edit_text(a, scrub, random.Random(f"{seed}:{i}"), table)[0]
                        for i, a in enumerate(answers)
                    ]
                    got = evidence(tok, (right, wrong), params, edited, texts)
                    if seed == 0:
                        cost = {
                            "rouge_l": round(rouge_l(answers, edited), 4),
                            "words": sum(len(e.split()) for e in edited),
                        }
                        if k_nll:
                            nll = nll_mean(lm, messages[:k_nll], edited[:k_nll])
                            cost["teacher_nll"] = round(nll, 4)
                rights.append(got[0])
                wrongs.append(got[1])
            points.append(
                {
                    "strength": strength,
                    "right_log10_p": rights,
                    "wrong_log10_p": wrongs,
                    "right_median": statistics.median(rights),
                    "wrong_min": min(wrongs),
                    **cost,
                }
            )
            console.log(
                f"{kind} {strength}: right {rights} wrong {wrongs} {cost} ({time.time() - t0:.0f} s)"
            )
        curves[kind] = points

    canaries = canary_filter(lm, answers, messages, args)
    report = {
        "bench": "scrub_evidence",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
        "load_avg_1m": os.getloadavg()[0],
        "seconds": round(time.time() - t_start),
        "config": vars(args),
        "teacher": "smollm2 (SmolLM2-135M-Instruct Q4_1), SynthID as served, temperature 0.7",
        "alpha": ALPHA,
        "level": "log10(alpha / 2): two keys tested",
        "answers": len(answers),
        "answer_words": sum(len(a.split()) for a in answers),
        "other_answers_cut_to_chars": cut,
        "curves": curves,
        "stops_working_at": {k: stops_at(v) for k, v in curves.items()},
        "canary_filter": canaries,
        "not_measured": "radioactivity of a student trained on scrubbed data",
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    plot(report, Path(args.plot))
    print(json.dumps(report))


def nll_mean(lm, messages, texts) -> float:
    scores = nll_scores(lm, messages, texts)
    return statistics.fmean(scores)


def canary_filter(lm, answers, messages, args) -> dict:
    """Per score and share q: the share of planted canaries and of teacher answers dropped."""
    names = ("rarity", "nll") if args.canary_nll else ("rarity",)
    base = {"nll": nll_scores(lm, messages, answers) if args.canary_nll else []}
    out: dict = {"canaries": args.canaries, "answers": len(answers), "seeds": args.seeds, "by": {}}
    tallies = {(s, q): [0, 0] for s in names for q in QS}
    for seed in range(args.seeds):
        where = random.Random(1000 + seed).sample(range(len(answers)), args.canaries)
        texts = list(answers)
        for k, i in enumerate(where):
            texts[i] = canary_text(SECRET, "distiller", f"req-{seed}-{k}")
        scores = {"rarity": rarity_scores(texts)}
        if args.canary_nll:
            nll = list(base["nll"])
            fresh = nll_scores(lm, [messages[i] for i in where], [texts[i] for i in where])
            for i, v in zip(where, fresh):
                nll[i] = v
            scores["nll"] = nll
        for s, sc in scores.items():
            for q in QS:
                dropped = outliers(sc, q)
                tallies[s, q][0] += len(dropped & set(where))
                tallies[s, q][1] += len(dropped - set(where))
    for (s, q), (canary, normal) in tallies.items():
        out["by"].setdefault(s, []).append(
            {
                "q": q,
                "canaries_dropped": round(canary / (args.canaries * args.seeds), 4),
                "answers_dropped": round(normal / ((len(answers) - args.canaries) * args.seeds), 4),
            }
        )
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = report["curves"]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    level = math.log10(report["alpha"] / 2)
    labels = {
        "delete": "words deleted (rate r)",
        "substitute": "words substituted (rate r)",
        "swap": "adjacent words swapped (rate r)",
        "reorder": "adjacent sentences swapped (rate r)",
        "truncate": "answer cut to its first k words",
        "mix": "share ρ of non-teacher answers",
    }
    for ax, (kind, points) in zip(axes.flat, curves.items()):
        xs = [p["strength"] if p["strength"] is not None else 0 for p in points]
        if kind == "truncate":  # the unedited answers at their mean length in words
            words = report["answer_words"] / report["answers"]
            xs = [p["strength"] if p["strength"] is not None else round(words) for p in points]
        for side, colour, name in (
            ("right", "C3", "distiller's key"),
            ("wrong", "C0", "another account's key"),
        ):
            ys = [statistics.median(p[f"{side}_log10_p"]) for p in points]
            lo = [min(p[f"{side}_log10_p"]) for p in points]
            hi = [max(p[f"{side}_log10_p"]) for p in points]
            ax.plot(xs, ys, "o-", color=colour, label=name)
            ax.fill_between(xs, lo, hi, color=colour, alpha=0.2)
        ax.axhline(level, color="k", ls="--", lw=0.8, label="traced below (α/2)")
        ax.set_xlabel(labels[kind])
        ax.set_ylabel("log10 p")
        if kind == "truncate":
            ax.invert_xaxis()
        stop = report["stops_working_at"][kind]
        ax.set_title(
            f"{kind}: "
            + (
                "traced at every strength tried"
                if stop is None
                else "not traced even unedited"
                if stop == "unedited"
                else f"not traced from {stop}"
            )
        )
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(
        f"Watermark evidence vs scrub strength ({report['answers']} SynthID answers of the embedded "
        f"teacher; median and range over {report['config']['seeds']} seeds)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
