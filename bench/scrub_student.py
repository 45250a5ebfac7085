"""Against a distiller who scrubs: does the watermark survive in a STUDENT trained on the scrubbed
harvest (radioactivity, Sander et al. 2024), and what did the scrub cost that student?

``bench/scrub_evidence.py`` measures the evidence left in the scrubbed *text*; this bench trains
a student on it and tests the student.

**Sizes: a tiny teacher, not the embedded one.** On the embedded teacher (SmolLM2-135M, SynthID)
a pruned 8-layer student traces only after 8 epochs of memorising 96 answers
(``bench/results/radioactivity_synthid_rho1_e8.json``: 1,375 s of training for one student on
this machine); a grid of scrubs x seeds of that does not fit the ~25 CPU-minutes this bench has.
So teacher and student are the tests' tiny random models (``tiny`` and ``tiny:seed=S``, a
2-layer, 64-wide Llama over a 259-token byte vocabulary): the numbers show the *mechanism* (how
each scrub moves the evidence a trained student carries, against the wrong key's null, at the
same training budget), not the embedded teacher's power.

1. The teacher writes in words. A random byte model writes random bytes, which no word-level
   scrub acts on as it would on prose; so its sampling is restricted (before the temperature,
   as a model that only knows these words would be) to a lexicon: the ``--lexicon`` commonest
   lower-case whole-word tokens of the embedded teacher's vocabulary that have an embedding
   neighbour (what ``--scrub-substitute`` replaces them with), words separated by one space.
   It answers ``--train`` short real ShareGPT first prompts under account ``distiller``'s
   SynthID key (the default scheme and parameters, the tournament after the temperature, as
   served), temperature 1, ``--max-new-tokens`` bytes; and ``--held-out`` other prompts without
   a watermark, sampled (for the NLL) and greedy (for ROUGE-L).
2. For each condition (``CONDITIONS``: none, and ``distill curate``'s own scrubs through
   ``distill.scrub.scrub_records``: delete 25% / 50% of words, swap 25%, substitute 50% with
   the embedded teacher's embedding neighbours, and mixing with ShareGPT's ChatGPT answers at
   ρ = 0.5, cut to the teacher answers' mean length so ρ is also the share of text) and each
   seed S, the student ``tiny:seed=S+1`` is trained with SFT (the trainer's own example builder
   and collator) for the same ``--steps`` steps of batch 8 (same seed, same steps: the distiller's
   budget is fixed, so mixed-in rows take steps from the teacher's). The default 800 steps
   memorise the harvest (a student must, on this scale, to carry a 5-gram watermark at all: a
   probe run's unscrubbed student was not traced after 300 steps). The training text's own
   evidence (as ``watermark detect`` scores it) is recorded beside the student's.
3. Evidence: the student answers the training prompts (what an investigator has from the
   ledger: user text, independent of the key) and the open test
   (``forensics.open_radioactivity``: its SynthID g mass on its own answers, the prompts'
   n-grams excluded, Chernoff-bounded p) is run against the distiller's key and, as the null,
   another account's (``bystander``); each key's own log10 p (no Holm), and the distiller key's
   rank among ``--null-keys`` random wrong keys (an assumption-free p). The code has no
   training-data n-gram filter (Sander et al.'s), so none is applied. Controls: the untrained
   students.
4. Cost: the student's mean token NLL of the teacher's held-out answers given their prompts,
   and ROUGE-L F1 of its greedy answers to the teacher's greedy answers on those prompts, beside
   the untrained student's.

    # the docs' run: one seed per process, side by side, then merged (~25 CPU-minutes in all)
    nice -n 5 .venv/bin/python bench/scrub_student.py --seeds 1 --out /tmp/s0.json --plot /tmp/s0.png &
    nice -n 5 .venv/bin/python bench/scrub_student.py --seeds 1 --first-seed 1 \
        --out /tmp/s1.json --plot /tmp/s1.png; wait
    .venv/bin/python bench/scrub_student.py --merge /tmp/s0.json /tmp/s1.json
    nice -n 5 .venv/bin/python bench/scrub_student.py --quick    # smoke: 3 conditions, tiny sizes

One JSON object to stdout and ``--out``; log10 p per condition to ``--plot``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from transformers import LogitsProcessor

from distillguard.distill.evaluate import answer_nll
from distillguard.distill.examples import collate, sft_example
from distillguard.distill.scrub import Scrub, SynonymTable, other_answers, scrub_records
from distillguard.forensics import generate_answers, open_radioactivity
from distillguard.models import load_model
from distillguard.watermark import WatermarkParams, account_key, trace
from distillguard.watermark.detect import tokenize
from distillguard.watermark.synthid import SynthIDTopK

console = Console(stderr=True)
HERE = Path(__file__).resolve().parent
SECRET = b"bench-scrub-student"
ALPHA = 1e-3
# name -> what `distill curate` would be told (Scrub's fields)
CONDITIONS = {
    "none": {},
    "delete 25%": {"scrub_delete": 0.25},
    "delete 50%": {"scrub_delete": 0.5},
    "swap 25%": {"scrub_swap": 0.25},
    "substitute 50%": {"scrub_substitute": 0.5},
    "mix rho=0.5": {"mix_other": 0.5},
}
QUICK = ("none", "substitute 50%", "mix rho=0.5")  # every code path: table, other rows
SPACE = 32


class Lexicon:
    """Words as byte strings, and a trie of their prefixes for :class:`LexiconOnly`."""

    def __init__(self, words: list[str]) -> None:
        self.words = words
        self.next: dict[bytes, set[int]] = {}  # prefix -> bytes that extend it
        self.complete: set[bytes] = set()
        for w in words:
            b = w.encode()
            for i in range(len(b)):
                self.next.setdefault(b[:i], set()).add(b[i])
            self.complete.add(b)

    @classmethod
    def from_table(cls, table: SynonymTable, tok, n: int) -> Lexicon:
        """The n commonest lower-case whole words (BPE merges come in order of frequency, so
        lower token ids are commoner words) that the synonym table can replace."""
        words, seen = [], set()
        for i in range(len(tok)):
            piece = tok.decode([i])
            w = piece[1:]
            if not (piece.startswith(" ") and 3 <= len(w) <= 8 and w.isascii() and w.isalpha()):
                continue
            if w != w.lower() or w in seen or table.neighbour(w) is None:
                continue
            seen.add(w)
            words.append(w)
            if len(words) == n:
                break
        return cls(words)


class LexiconOnly(LogitsProcessor):
    """Only bytes that continue a lexicon word, or a space after a whole word (the tiny byte
    tokenizer's ids are the bytes): the random teacher then writes words of the lexicon."""

    def __init__(self, lexicon: Lexicon, vocab: int) -> None:
        self.lexicon, self.vocab = lexicon, vocab
        self._masks: dict[bytes, torch.Tensor] = {}

    def _mask(self, partial: bytes) -> torch.Tensor:
        if partial not in self._masks:
            banned = torch.ones(self.vocab, dtype=torch.bool)
            allowed = list(self.lexicon.next.get(partial, ()))
            if partial in self.lexicon.complete:
                allowed.append(SPACE)
            if not allowed:  # off the lexicon (cannot happen from a boundary): restart a word
                allowed = [SPACE]
            banned[allowed] = False
            self._masks[partial] = banned
        return self._masks[partial]

    def __call__(self, input_ids, scores):
        out = scores.clone()
        for b, row in enumerate(input_ids.tolist()):
            start = len(row)  # the partial word: the letters since the last non-letter byte
            while start > 0 and 97 <= row[start - 1] <= 122:
                start -= 1
            out[b] = scores[b].masked_fill(self._mask(bytes(row[start:])), float("-inf"))
        return out


def short_prompts(n: int, skip: int, max_chars: int) -> list[str]:
    """ShareGPT first prompts of at most ``max_chars`` characters (bytes are tokens here), ASCII,
    in file order, distinct; the first ``skip`` usable ones left out."""
    from distillguard.data.sharegpt import iter_conversations

    out, seen = [], set()
    for conv in iter_conversations():
        text = (conv.first_prompt or "").strip()
        if not text or len(text) > max_chars or not text.isascii() or text in seen:
            continue
        seen.add(text)
        out.append(text)
        if len(out) == n + skip:
            return out[skip:]
    raise SystemExit(f"only {len(out)} short ShareGPT prompts; ask for fewer")


def others_cut(cut: int, max_chars: int, held_out: list[str]):
    """``scrub_records``' source of non-teacher rows: ShareGPT's ChatGPT answers to other short
    prompts (neither the training nor the held-out ones), each cut to ``cut`` characters (so the
    share of rows is also the share of text)."""
    held = {" ".join(p.lower().split()) for p in held_out}

    def others(n: int, prompts: set[str]) -> list[dict]:
        pool = other_answers(n * 20 + 200, exclude_prompts=prompts | held)
        rows = [r for r in pool if len(r["messages"][0]["content"]) <= max_chars][:n]
        if len(rows) < n:
            raise SystemExit(f"only {len(rows)} short other answers for {n}")
        return [{**r, "response": r["response"][:cut]} for r in rows]

    return others


def train(base, rows: list[dict], steps: int, seed: int, lr: float, max_length: int):
    """SFT for ``steps`` steps of batch 8 (batches drawn with ``seed``): the trainer's own
    example builder and collator in a plain loop, as tests/forensics/students.py does."""
    lm = copy.copy(base)
    lm.model = copy.deepcopy(base.model).train()
    examples = [sft_example(lm, r["messages"], r["response"], max_length) for r in rows]
    examples = [e for e in examples if e is not None]
    opt = torch.optim.AdamW(lm.model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        pick = torch.randint(len(examples), (8,), generator=gen).tolist()
        batch = collate([examples[i] for i in pick], lm.tokenizer.pad_token_id)
        lm.model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    lm.model.eval()
    return lm, len(examples)


def text_evidence(tok, keys, params, rows: list[dict]) -> list[float]:
    """log10 p of each key in the training text itself, as ``watermark detect`` scores it
    (SynthID's depth weights, prompt n-grams excluded, exact test): what the scrub left."""
    seqs = tokenize(tok, [r["response"] for r in rows])
    prompts = tokenize(tok, [r["messages"][0]["content"] for r in rows])
    weights = params.impl.default_weights(params, seqs)
    r = trace(keys, seqs, prompt_seqs=prompts, vocab_size=len(tok), weights=weights)
    return [round(d.log10_p, 2) for d in r.results]


def rouge_l(refs: list[str], hyps: list[str]) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return statistics.fmean(scorer.score(r, h)["rougeL"].fmeasure for r, h in zip(refs, hyps))


def measure(lm, keys, train_prompts, held, args) -> dict:
    """The open test on the student's own answers to the training prompts, and its quality."""
    res = open_radioactivity(
        lm,
        keys,
        train_prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=0.7,
        seed=0,
        null_keys=args.null_keys,
        top_k=64,
        progress=False,
    )
    by = {k.account: k for k in res.keys}
    with torch.no_grad():
        nll = answer_nll(
            lm,
            [[{"role": "user", "content": p}] for p in held["prompts"]],
            [lm.tokenizer.encode(a, add_special_tokens=False) for a in held["sampled"]],
        )
    greedy = generate_answers(
        lm, held["prompts"], max_new_tokens=args.max_new_tokens, temperature=0, progress=False
    )
    return {
        "right_log10_p": round(by["distiller"].log10_p, 2),
        "wrong_log10_p": round(by["bystander"].log10_p, 2),
        "right_empirical_p": by["distiller"].extra.get("empirical_p"),
        "right_g_mass": round(by["distiller"].green_fraction, 4),
        "wrong_g_mass": round(by["bystander"].green_fraction, 4),
        "scored_contexts": res.scored,
        "held_out_nll": round(nll, 4),
        "rouge_l": round(rouge_l(held["greedy"], greedy), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--train", type=int, default=48, help="training prompts (harvested answers)")
    ap.add_argument("--held-out", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=96, help="bytes per answer")
    ap.add_argument("--max-prompt-chars", type=int, default=100)
    ap.add_argument("--lexicon", type=int, default=400)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="seeds run: first-seed .. first-seed + seeds - 1 (split a run over processes)",
    )
    ap.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="combine the runs of these result files (other seeds of the same configuration) "
        "into --out and --plot, and run nothing",
    )
    ap.add_argument(
        "--null-keys", type=int, default=100, help="random wrong keys: the right key's rank"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 conditions, small sizes")
    ap.add_argument("--out", default=str(HERE / "results" / "scrub_student.json"))
    ap.add_argument("--plot", default=str(HERE / "results" / "scrub_student.png"))
    args = ap.parse_args()
    if args.quick:
        args.train, args.held_out, args.max_new_tokens, args.steps, args.seeds = 16, 8, 48, 40, 1
        args.null_keys = 20
    if args.merge:
        merge([json.loads(Path(f).read_text()) for f in args.merge], args)
        return
    torch.set_num_threads(args.threads)
    t_start = time.time()
    conditions = {k: v for k, v in CONDITIONS.items() if not args.quick or k in QUICK}

    embedded = load_model("smollm2")  # its embedding neighbours: the substitutions, the lexicon
    table = SynonymTable.from_model(embedded)
    lexicon = Lexicon.from_table(table, embedded.tokenizer, args.lexicon)
    teacher = load_model("tiny", device="cpu")
    vocab = teacher.vocab_size
    params = WatermarkParams(scheme="synthid")
    right, wrong = (account_key(SECRET, a, params) for a in ("distiller", "bystander"))
    prompts = short_prompts(args.train + args.held_out, 0, args.max_prompt_chars)
    train_prompts, held_prompts = prompts[: args.train], prompts[args.train :]
    only = LexiconOnly(lexicon, vocab)
    t0 = time.time()
    answers = generate_answers(
        teacher,
        train_prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=1.0,
        seed=1,
        logits_processors=[only],
        after_temperature=[SynthIDTopK(right.hash_key, params.synthid)],
        progress=False,
    )
    held = {
        "prompts": held_prompts,
        "sampled": generate_answers(
            teacher,
            held_prompts,
            max_new_tokens=args.max_new_tokens,
            temperature=1.0,
            seed=2,
            logits_processors=[only],
            progress=False,
        ),
        "greedy": generate_answers(
            teacher,
            held_prompts,
            max_new_tokens=args.max_new_tokens,
            temperature=0,
            logits_processors=[only],
            progress=False,
        ),
    }
    console.log(
        f"teacher: {len(answers)} + {2 * len(held_prompts)} answers ({time.time() - t0:.0f} s)"
    )
    rows = [
        {"id": str(i), "messages": [{"role": "user", "content": p}], "response": a}
        for i, (p, a) in enumerate(zip(train_prompts, answers))
    ]
    cut = round(statistics.fmean(len(a) for a in answers))
    others = others_cut(cut, args.max_prompt_chars, held_prompts)

    results: dict[str, list[dict]] = {"untrained": []}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        student = load_model(f"tiny:seed={seed + 1}", device="cpu")
        t0 = time.time()
        results["untrained"].append(
            {"seed": seed, **measure(student, (right, wrong), train_prompts, held, args)}
        )
        console.log(f"untrained seed {seed}: {results['untrained'][-1]} ({time.time() - t0:.0f} s)")
        for name, fields in conditions.items():
            t0 = time.time()
            scrub = Scrub(**fields, scrub_seed=seed)
            data, scrubbed = scrub_records(rows, scrub, model=embedded, others=others)
            lm, used = train(student, data, args.steps, seed, args.lr, 256)
            text = text_evidence(teacher.tokenizer, (right, wrong), params, data)
            t_train = time.time() - t0
            got = measure(lm, (right, wrong), train_prompts, held, args)
            results.setdefault(name, []).append(
                {
                    "seed": seed,
                    **got,
                    "data_right_log10_p": text[0],
                    "data_wrong_log10_p": text[1],
                    "rows": used,
                    "scrub": scrubbed.to_dict(),
                    "train_s": round(t_train, 1),
                }
            )
            console.log(f"{name} seed {seed}: {got} ({time.time() - t0:.0f} s)")

        # after each seed, so that a run cut short leaves its finished seeds
        info = {
            "lexicon_words": len(lexicon.words),
            "train_answers": len(answers),
            "answer_words": sum(len(a.split()) for a in answers),
            "other_answers_cut_to_chars": cut,
        }
        report = write(results, vars(args), info, round(time.time() - t_start))
    print(json.dumps(report))


def merge(parts: list[dict], args) -> None:
    """Runs of several processes (disjoint seeds, one configuration) as one result."""
    keep = ("seeds", "first_seed", "out", "plot", "merge")
    configs = [{k: v for k, v in p["config"].items() if k not in keep} for p in parts]
    if any(c != configs[0] for c in configs):
        raise SystemExit("--merge: the files were run with different configurations")
    results: dict[str, list[dict]] = {}
    for part in parts:
        for name, cond in part["conditions"].items():
            results.setdefault(name, []).extend(cond["runs"])
    seeds = sorted({r["seed"] for r in results["untrained"]})
    if len(seeds) != len(results["untrained"]):
        raise SystemExit(f"--merge: a seed appears twice ({seeds})")
    for runs in results.values():
        runs.sort(key=lambda r: r["seed"])
    info = {
        k: v
        for k, v in parts[0].items()
        if k in ("lexicon_words", "train_answers", "answer_words", "other_answers_cut_to_chars")
    }
    config = {**parts[0]["config"], "seeds": len(seeds), "first_seed": seeds[0], "merge": None}
    config.update(out=args.out, plot=args.plot)
    info["processes"] = [
        {"seeds": p["seeds_run"], "seconds": p["seconds"], "load_avg_1m": p["load_avg_1m"]}
        for p in parts
    ]
    # the processes ran side by side: the wall time is the longest one's
    write(
        results,
        config,
        info,
        max(p["seconds"] for p in parts),
        max(p["load_avg_1m"] for p in parts),
    )


def write(
    results: dict[str, list[dict]], config: dict, info: dict, seconds: int, load=None
) -> dict:
    level = math.log10(ALPHA / 2)
    summary = {
        name: {
            "right_log10_p_median": round(statistics.median(r["right_log10_p"] for r in runs), 3),
            "wrong_log10_p_min": min(r["wrong_log10_p"] for r in runs),
            "traced_seeds": sum(r["right_log10_p"] < level for r in runs),
            "wrong_traced_seeds": sum(r["wrong_log10_p"] < level for r in runs),
            "held_out_nll_mean": round(statistics.fmean(r["held_out_nll"] for r in runs), 4),
            "rouge_l_mean": round(statistics.fmean(r["rouge_l"] for r in runs), 4),
        }
        for name, runs in results.items()
    }
    report = {
        "bench": "scrub_student",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
        "load_avg_1m": os.getloadavg()[0] if load is None else load,
        "seconds": seconds,
        "config": config,
        "seeds_run": sorted({r["seed"] for r in results["untrained"]}),
        "teacher": "tiny (random 2-layer byte model) writing only lexicon words, SynthID default "
        "parameters as served, temperature 1: shows the mechanism, not the embedded teacher's power",
        "student": "tiny:seed=S+1, SFT, same steps for every condition",
        "scheme": "synthid",
        "alpha": ALPHA,
        "level": "log10(alpha / 2): two keys tested",
        "test": "open mode, the student's own answers to the training prompts, prompt n-grams "
        "excluded, no training-data n-gram filter (the code has none)",
        **info,
        "conditions": {k: {"fields": CONDITIONS.get(k, {}), "runs": v} for k, v in results.items()},
        "summary": summary,
    }
    Path(config["out"]).write_text(json.dumps(report, indent=2) + "\n")
    plot(report, Path(config["plot"]))
    return report


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["conditions"])
    fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(15, 4.8), width_ratios=(2, 1, 1))
    for i, name in enumerate(names):
        runs = report["conditions"][name]["runs"]
        for field, colour, dx, mark in (
            ("right_log10_p", "C3", -0.15, "o"),
            ("wrong_log10_p", "C0", 0.0, "o"),
            ("data_right_log10_p", "0.5", 0.15, "x"),
        ):
            ys = [r[field] for r in runs if field in r]
            ax.scatter([i + dx] * len(ys), ys, color=colour, s=20, marker=mark)
        bx.scatter([i] * len(runs), [r["held_out_nll"] for r in runs], color="C2", s=18)
        cx.scatter([i] * len(runs), [r["rouge_l"] for r in runs], color="C4", s=18)
    ax.scatter([], [], color="C3", label="student, distiller's key")
    ax.scatter([], [], color="C0", label="student, another account's key (null)")
    ax.scatter([], [], color="0.5", marker="x", label="its training text, distiller's key")
    ax.axhline(
        math.log10(report["alpha"] / 2), color="k", ls="--", lw=0.8, label="α/2 (traced below)"
    )
    ax.set_yscale("symlog", linthresh=10)
    for a in (ax, bx, cx):
        a.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("log10 p (open mode: the student's own answers)")
    ax.legend(fontsize=8)
    bx.set_ylabel("NLL of the teacher's held-out answers (nats/byte)")
    cx.set_ylabel("ROUGE-L F1, greedy, vs the teacher's")
    fig.suptitle(
        "Student trained on the scrubbed harvest (tiny teacher and student: the mechanism, "
        f"not the embedded teacher's power; {len(report['seeds_run'])} seed(s))"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
