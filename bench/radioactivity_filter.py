"""The training-data n-gram filter of the radioactivity tests (Sander et al. 2024), measured where
the truth is known: its power on students of watermarked data, and its false positives on
suspects that never saw the filter data (which is watermarked, so depends on the key).

Two worlds, both keyed-hash (γ = 0.25), both tested through the real ``closed_test`` /
``open_test``:

1. **An n-gram language** (``tests/forensics/ngram_language.py``; ``--width`` 2, 26 one-byte
   letters, δ = ``--delta``): a fixed random next-letter table is the teacher; an account's data
   is the teacher sampled under its key. Its students are memorisers (they sample the data's own
   (width+1)-gram counts): a student of exactly that data. With a two-letter context one
   account's data holds only part of the contexts, so the filter selects, as on a real
   tokenizer's vocabulary.
   - power: the leaker's key on n texts of its memoriser, n in ``--sizes``, with no filter, with
     the filter (the whole leaked data), and with the filter minus the data's own pairs (of the
     whole data, and of half of it: an investigator who holds part of what the student saw);
     the texts each needs to reach p < 1e-3 are the smallest n of the grid that does;
   - null: ``--null-keys`` other accounts, each with its own watermarked data as the filter,
     against two suspects that never saw that data: the language itself (it writes the data's
     phrases) and the leaker's memoriser (trained on another key's text). The count of p < 0.01
     should be consistent with 1% (Clopper-Pearson 95% interval), and at 0.001 with 0.1%.
2. **Tiny models** (the tests' world of tests/forensics/test_radioactivity.py: the random 2-layer
   ``tiny`` teacher, printable ASCII only, one-byte context, δ = 8): the teacher answers
   ``--train`` prompts under the leaker's key, a student ``tiny:seed=S`` is trained on them
   (``--steps`` SFT steps) and answers other prompts. Closed and open test of the leaker's key on
   the first n answers; null: ``--tiny-null-keys`` other accounts' data against the untrained
   student and the trained one. With a one-byte context every context occurs in any data set,
   so here the filter keeps everything: this world shows the filter minus the data's pairs, not
   the selection.

    chrt -i 0 nice -n 19 .venv/bin/python bench/radioactivity_filter.py      # ~4 CPU-minutes
    .venv/bin/python bench/radioactivity_filter.py --quick                    # smoke

One JSON object to stdout and ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
from scipy.stats import beta as beta_dist
from transformers import LogitsProcessor

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.forensics.ngram_language
from _provenance import code_version  # noqa: E402

from distillguard.distill.train import collate, sft_example  # noqa: E402
from distillguard.forensics import closed_test, generate_answers, open_test  # noqa: E402
from distillguard.forensics.training_filter import training_filter  # noqa: E402
from distillguard.models import load_model  # noqa: E402
from distillguard.watermark import (  # noqa: E402
    WatermarkLogitsProcessor,
    WatermarkParams,
    account_key,
)

SECRET = b"radioactivity-filter-bench"
TOPICS = ["cats", "rain", "maths", "tea", "ships", "jazz", "bread", "stars"]


class PrintableOnly(LogitsProcessor):
    """Printable ASCII and newlines only: every answer round-trips through the byte tokenizer."""

    def __call__(self, input_ids, scores):
        banned = torch.ones(scores.shape[-1], dtype=torch.bool)
        banned[32:127] = False
        banned[10] = False
        return scores.masked_fill(banned, float("-inf"))


def sft(base, prompts, answers, steps, seed):
    """A plain SFT loop on the distillation trainer's own examples (as tests/forensics/students.py)."""
    lm = copy.copy(base)
    lm.model = copy.deepcopy(base.model).train()
    examples = [
        sft_example(lm, [{"role": "user", "content": p}], a, 256) for p, a in zip(prompts, answers)
    ]
    opt = torch.optim.AdamW(lm.model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        order = torch.randperm(len(examples), generator=gen)[:8].tolist()
        batch = collate([examples[i] for i in order], lm.tokenizer.pad_token_id)
        lm.model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    lm.model.eval()
    return lm


def clopper_pearson(k: int, n: int, conf: float = 0.95) -> list[float]:
    a = (1 - conf) / 2
    lo = 0.0 if k == 0 else float(beta_dist.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta_dist.ppf(1 - a, k + 1, n - k))
    return [lo, hi]


def null_summary(log10_ps: list[float]) -> dict:
    n = len(log10_ps)
    out = {"tests": n}
    for level in (0.01, 0.001):
        k = sum(lp < math.log10(level) for lp in log10_ps)
        out[f"p<{level}"] = {"count": k, "rate": k / n, "ci95": clopper_pearson(k, n)}
    out["median_log10_p"] = sorted(log10_ps)[n // 2]
    return out


def first_reaching(sizes, log10_ps, level=-3.0):
    """The smallest n of the grid whose log10 p is below ``level`` (None: none of them)."""
    return next((n for n, lp in zip(sizes, log10_ps) if lp < level), None)


def lang_world(args, tok) -> dict:
    """World 1: the n-gram language's memorisers and its 200-account null."""
    from tests.forensics.ngram_language import NgramLanguage

    params = WatermarkParams(delta=args.delta, context_width=args.width)
    lang = NgramLanguage(params)
    sizes = [int(s) for s in args.sizes.split(",")]

    def lp(key, texts, **kw) -> float:
        return round(closed_test([key], texts, tok, **kw).keys[0].log10_p, 3)

    leaker = account_key(SECRET, "leaker", params)
    power, filters = [], {}
    for seed in range(args.students):
        data = lang.watermarked(leaker.hash_key, args.data_texts, seed=100 + seed)
        full = training_filter(data, tok, args.width)
        half = training_filter(data[: len(data) // 2], tok, args.width)
        filters[f"student {seed}"] = {"all": full.describe(), "half": half.describe()}
        student = lang.memoriser(data, max(sizes), seed=200 + seed)
        variants = {
            "no filter": {},
            "filter": {"filters": full},
            "filter minus the data's pairs": {"filters": full, "exclude_data_pairs": True},
            "half the data: filter": {"filters": half},
            "half the data: filter minus its pairs": {"filters": half, "exclude_data_pairs": True},
        }
        for name, kw in variants.items():
            lps = [lp(leaker, student[:n], **kw) for n in sizes]
            power.append(
                {
                    "student": seed,
                    "test": name,
                    **{f"log10_p n={n}": v for n, v in zip(sizes, lps)},
                    "texts_to_p<1e-3": first_reaching(sizes, lps),
                }
            )
    suspects = {
        "the language (never saw any account's data)": lang.unwatermarked(args.data_texts, 999),
        "the leaker's memoriser (another key's text)": lang.memoriser(
            lang.watermarked(leaker.hash_key, args.data_texts, seed=100), args.data_texts, 201
        ),
    }
    rows = {(s, t): [] for s in suspects for t in ("no filter", "filter", "filter minus pairs")}
    kept = []
    for i in range(args.null_keys):
        key = account_key(SECRET, f"other-{i}", params)
        flt = training_filter(
            lang.watermarked(key.hash_key, args.data_texts, seed=i), tok, args.width
        )
        kept.append(len(flt.contexts) / lang.letters**args.width)
        for name, texts in suspects.items():
            rows[name, "no filter"].append(lp(key, texts))
            rows[name, "filter"].append(lp(key, texts, filters=flt))
            rows[name, "filter minus pairs"].append(
                lp(key, texts, filters=flt, exclude_data_pairs=True)
            )
    return {
        "params": {"delta": args.delta, "width": args.width, "letters": lang.letters},
        "data_texts": args.data_texts,
        "text_length": lang.length,
        "contexts_in_one_account_data": round(sum(kept) / max(1, len(kept)), 3),
        "filters": filters,
        "power": power,
        "null": [{"suspect": s, "test": t, **null_summary(v)} for (s, t), v in rows.items()],
    }


def tiny_world(args) -> dict:
    """World 2: tiny models, the tests' setting (one-byte context, δ = 8)."""
    params = WatermarkParams(delta=8.0)
    sizes = [int(s) for s in args.tiny_sizes.split(",")]
    train = [f"question {i}: tell me about {t}" for i, t in enumerate(TOPICS * 64)][: args.train]
    evals = [f"please explain {t} to a friend ({i})" for i, t in enumerate(TOPICS * 64)]
    evals = evals[: max(sizes)]
    teacher = load_model("tiny", device="cpu")
    tok = teacher.tokenizer

    def teach(key, prompts, seed):
        return generate_answers(
            teacher,
            prompts,
            max_new_tokens=48,
            temperature=1.0,
            seed=seed,
            logits_processors=[WatermarkLogitsProcessor(key), PrintableOnly()],
            progress=False,
        )

    def answers_of(lm):
        return generate_answers(
            lm,
            evals,
            max_new_tokens=48,
            temperature=0.7,
            seed=0,
            logits_processors=[PrintableOnly()],
            progress=False,
        )

    def closed_lp(texts, key, **kw):
        res = closed_test([key], texts, tok, prompts=evals[: len(texts)], **kw)
        return round(res.keys[0].log10_p, 3)

    def open_lp(lm, texts, key, **kw):
        n = len(texts)
        res = open_test(
            lm,
            [key],
            texts,
            prompts=evals[:n],
            exclude=evals[:n],
            null_keys=0,
            progress=False,
            **kw,
        )
        return round(res.keys[0].log10_p, 3)

    leaker = account_key(SECRET, "leaker", params)
    leaked = teach(leaker, train, seed=0)
    full = training_filter(leaked, tok, 1)
    untrained = load_model("tiny:seed=1", device="cpu")
    student = sft(untrained, train, leaked, args.steps, 1)
    answers = answers_of(student)
    variants = {
        "closed, no filter": lambda a: closed_lp(a, leaker),
        "closed, filter": lambda a: closed_lp(a, leaker, filters=full),
        "closed, filter minus the data's pairs": lambda a: closed_lp(
            a, leaker, filters=full, exclude_data_pairs=True
        ),
        "open, no filter": lambda a: open_lp(student, a, leaker),
        "open, filter": lambda a: open_lp(student, a, leaker, filter_data=full),
        "open, filter minus the data's pairs": lambda a: open_lp(
            student, a, leaker, filter_data=full, exclude_data_pairs=True
        ),
    }
    power = []
    for name, fn in variants.items():
        lps = [fn(answers[:n]) for n in sizes]
        power.append(
            {
                "test": name,
                **{f"log10_p n={n}": v for n, v in zip(sizes, lps)},
                "answers_to_p<1e-3": first_reaching(sizes, lps),
            }
        )
    suspects = {"untrained": answers_of(untrained), "student (another key's answers)": answers}
    rows = {(s, t): [] for s in suspects for t in ("no filter", "filter", "filter minus pairs")}
    for i in range(args.tiny_null_keys):
        key = account_key(SECRET, f"other-{i}", params)
        flt = training_filter(teach(key, train[: args.tiny_null_train], 1000 + i), tok, 1)
        for name, texts in suspects.items():
            rows[name, "no filter"].append(closed_lp(texts, key))
            rows[name, "filter"].append(closed_lp(texts, key, filters=flt))
            rows[name, "filter minus pairs"].append(
                closed_lp(texts, key, filters=flt, exclude_data_pairs=True)
            )
    return {
        "params": {"delta": 8.0, "width": 1, "steps": args.steps, "train": args.train},
        "filter": full.describe(),
        "power": power,
        "null": [{"suspect": s, "test": t, **null_summary(v)} for (s, t), v in rows.items()],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--delta", type=float, default=2.25, help="world 1's watermark strength")
    ap.add_argument("--width", type=int, default=2, help="world 1's context width")
    ap.add_argument("--data-texts", type=int, default=16, help="texts in one account's data")
    ap.add_argument("--sizes", default="1,2,4,8,16", help="world 1: suspect texts scored")
    ap.add_argument("--students", type=int, default=2, help="world 1: memoriser seeds")
    ap.add_argument("--null-keys", type=int, default=200)
    ap.add_argument("--train", type=int, default=48, help="world 2: leaked answers")
    ap.add_argument("--steps", type=int, default=80, help="world 2: SFT steps")
    ap.add_argument("--tiny-sizes", default="4,8,32,96", help="world 2: suspect answers scored")
    ap.add_argument("--tiny-null-keys", type=int, default=50)
    ap.add_argument("--tiny-null-train", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="smoke: tiny sizes, nothing written")
    ap.add_argument("--out", default="bench/results/radioactivity_filter.json")
    args = ap.parse_args()
    if args.quick:
        args.null_keys, args.students, args.tiny_null_keys = 5, 1, 3
        args.train, args.steps, args.tiny_sizes = 8, 5, "4,8"
    torch.set_num_threads(1)  # SCHED_IDLE on a shared 2-core machine: one thread spins least
    started = time.time()
    from distillguard.models import load_tokenizer

    report = {
        "bench": "radioactivity_filter",
        "code_version": code_version(),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "ngram_language": lang_world(args, load_tokenizer("tiny")),
        "tiny_models": tiny_world(args),
    }
    report["seconds"] = round(time.time() - started, 1)
    print(json.dumps(report))
    if not args.quick:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
