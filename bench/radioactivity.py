"""Radioactivity on the bundled teacher: does a small CPU student trained on partly watermarked
answers reveal the key, in closed mode (its text) and open mode (its probabilities)?

1. The teacher (SmolLM2-135M-Instruct) answers ``--train`` real ShareGPT first prompts twice,
   once watermarked with one account's key and once without, and ``--eval`` held-out prompts
   without watermark (the teacher control). Temperature 0.7, ``--max-new-tokens`` tokens,
   batched ``model.generate``; cached under ``--cache`` (resumable, chunk by chunk).
2. For each ρ in ``--rhos`` a student (``--student``, default ``prune:8``: 8 of the teacher's 30
   layers) is fine-tuned with SFT (``distillguard.distill.train``) on the ``--train`` answers, of
   which the first ρ·N are the watermarked ones and the rest the clean ones. ρ=0 is the
   clean-trained control. Cached per ρ.
3. Every suspect (each student, the untrained student, the teacher itself) answers two prompt
   sets (teacher: its cached clean answers): ``held_out``, ``--eval`` prompts nobody trained on
   (does the student generalise the watermark?), and ``leaked_prompts``, the training prompts,
   which an investigator has from the ledger (user text, independent of the key: asking them
   keeps the null valid, and a student that memorised watermarked answers repeats them). Each
   is tested against the leaking account's key and ``--accounts``-1 other accounts' keys:
   - closed: the exact binomial test on its answers (dedup across answers, prompt n-grams out),
   - open: the green probability mass on its own answers (Chernoff-bounded p, empirical p from
     ``--null-keys`` wrong keys, and Sander et al.'s top-1 test for comparison); with
     ``--scheme synthid`` (the served scheme: the tournament acts on the tempered distribution)
     the expected g mass over the tournament's layers, units = distinct table indices.
   The controls (teacher, untrained student, ρ=0 student) are also tested against ``--fpr-keys``
   keys of accounts that leaked nothing: their false-positive rates. Each student's NLL on (up
   to) 48 of its training answers, and the teacher's and the untrained student's on the
   watermarked ones, show how much it memorised.

    nice -n 10 python bench/radioactivity.py                        # ~1 h on 2 very busy cores
    nice -n 10 python bench/radioactivity.py --train 64 --eval 16 --rhos 0,1 --epochs 1   # smoke run
    nice -n 10 python bench/radioactivity.py --scheme synthid --train 96 --eval 16 --leaked-prompts 24
        --epochs 3 --student prune:8 --lr 5e-4 --batch-size 4 --null-keys 200 --top-k 32
        --out bench/results/radioactivity_synthid.json                 # the README's run, ~50 min

Progress goes to stderr; one JSON object to stdout and to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from rich.console import Console

err = Console(stderr=True)
SECRET = b"bench-radioactivity-secret"
LEAKER = "acct-leaker"


def prompts_for(lm, n: int, skip: int, max_prompt_tokens: int) -> list[str]:
    """The first usable ShareGPT first prompts (short enough, no duplicates), deterministic."""
    from distillguard.distill.prompts import load_prompts

    out, seen = [], set()
    for p in load_prompts("sharegpt", limit=(n + skip) * 4 + 200, max_chars=1000):
        text = p.messages[0][1].strip()
        if (
            text in seen
            or len(lm.chat_ids([{"role": "user", "content": text}])) > max_prompt_tokens
        ):
            continue
        seen.add(text)
        out.append(text)
        if len(out) == n + skip:
            break
    if len(out) < n + skip:
        raise SystemExit(f"only {len(out)} usable prompts; ask for fewer")
    return out[skip:]


def cached_answers(
    path: Path, lm, prompts: list[str], args, processors=(), label: str = "", after=()
) -> list[str]:
    """Answers generated chunk by chunk and saved after each chunk (a killed run resumes)."""
    from distillguard.forensics import generate_answers

    done: list[str] = json.loads(path.read_text()) if path.exists() else []
    chunk = 32
    while len(done) < len(prompts):
        t0 = time.time()
        part = prompts[len(done) : len(done) + chunk]
        done += generate_answers(
            lm,
            part,
            max_new_tokens=args.max_new_tokens,
            temperature=0.7,
            seed=args.seed + len(done),
            batch_size=16,
            logits_processors=processors,
            after_temperature=after,
            progress=False,
        )
        path.write_text(json.dumps(done))
        toks = sum(len(lm.tokenizer.encode(a)) for a in done[-len(part) :])
        err.log(
            f"{label}: {len(done)}/{len(prompts)} answers ({toks / (time.time() - t0):.0f} tok/s)"
        )
    return done


def train_student(
    args, rho: float, prompts: list[str], wm: list[str], clean: list[str], out: Path
) -> dict:
    from datasets import Dataset, DatasetDict

    from distillguard.distill.train import TrainConfig, train

    if (out / "train_summary.json").exists():
        return json.loads((out / "train_summary.json").read_text())
    n_wm = round(rho * len(prompts))
    rows = [
        {
            "id": str(i),
            "messages": [{"role": "user", "content": p}],
            "response": wm[i] if i < n_wm else clean[i],
            "logprobs": None,
        }
        for i, p in enumerate(prompts)
    ]
    data = out.parent / f"data-rho{rho}"
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(data))
    t0 = time.time()
    summary = train(
        TrainConfig(
            data=str(data),
            out=str(out),
            student=args.student,
            teacher="smollm2",
            lora=args.lora,
            epochs=args.epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            max_length=args.max_prompt_tokens + args.max_new_tokens + 8,
            seed=args.seed,
            unlikelihood=0.0,
        )
    )  # the measured configuration (plain SFT)
    summary["seconds"] = time.time() - t0
    summary["watermarked_answers"] = n_wm
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def answer_nll(lm, prompts: list[str], answers: list[str], max_length: int) -> float:
    """Mean NLL (nats per answer token) of ``lm`` on (prompt, answer) pairs, the trainer's own
    masking: how well a student learned (memorised) its training answers."""
    import torch

    from distillguard.distill.train import collate, sft_example

    total, tokens = 0.0, 0
    examples = [
        e
        for e in (
            sft_example(lm, [{"role": "user", "content": p}], a, max_length)
            for p, a in zip(prompts, answers)
        )
        if e is not None
    ]
    model = lm.model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), 8):
            batch = collate(examples[start : start + 8], lm.tokenizer.pad_token_id or 0)
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * n
            tokens += n
    return total / max(tokens, 1)


def wrong_key_fpr(lm, answers: list[str], prompts: list[str], params, args, tag: str) -> dict:
    """Rates of p <= 1e-3 / 1e-2 / 5e-2 over ``--fpr-keys`` keys of accounts that leaked nothing,
    closed and open (Chernoff, top-1), on one suspect's answers: the controls' false positives.
    Each answer set (``tag``) gets its own keys: with the same keys on every set, one key that
    happens to favour this model's common n-grams fires on all of them, and the pooled rate is
    that of a few keys, not of independent tests."""
    import numpy as np

    from distillguard.forensics import closed_test, open_test
    from distillguard.watermark import account_key

    keys = [
        account_key(b"bench-radioactivity-wrong", f"wrong-{tag}-{i}", params)
        for i in range(args.fpr_keys)
    ]
    closed = closed_test(keys, answers, lm.tokenizer, prompts=prompts)
    opened = open_test(
        lm,
        keys,
        answers,
        prompts=prompts,
        exclude=prompts,
        top_k=args.top_k,
        null_keys=0,
        progress=False,
    )
    tests = {
        "closed": [k.log10_p for k in closed.keys],
        "open": [k.log10_p for k in opened.keys],
        "open_top1": [k.extra["top1_log10_p"] for k in opened.keys],
    }
    return {
        "keys": args.fpr_keys,
        **{
            name: {str(a): float((np.array(lp) <= np.log10(a)).mean()) for a in (1e-3, 1e-2, 5e-2)}
            for name, lp in tests.items()
        },
    }


def score(lm, answers: list[str], prompts: list[str], keys, args) -> dict:
    """Both tests of one suspect's answers to one prompt set, for the leaking account's key."""
    from distillguard.forensics import closed_test, open_test

    closed = closed_test(keys, answers, lm.tokenizer, prompts=prompts, alpha=args.alpha)
    opened = open_test(
        lm,
        keys,
        answers,
        prompts=prompts,
        exclude=prompts,
        top_k=args.top_k,
        null_keys=args.null_keys,
        alpha=args.alpha,
        seed=args.seed,
    )
    leak_c = next(k for k in closed.keys if k.account == LEAKER)
    leak_o = next(k for k in opened.keys if k.account == LEAKER)
    return {
        "closed": {
            "scored_pairs": closed.scored,
            "green_fraction": leak_c.green_fraction,
            "z": leak_c.z,
            "log10_p": leak_c.log10_p,
            "traced": closed.traced,
            "min_log10_p_other_keys": min(k.log10_p for k in closed.keys if k.account != LEAKER),
        },
        "open": {
            "scored_contexts": opened.scored,
            "green_mass": leak_o.green_fraction,
            "z": leak_o.z,
            "log10_p": leak_o.log10_p,
            "empirical_p": leak_o.extra.get("empirical_p"),
            "top1_log10_p": leak_o.extra["top1_log10_p"],
            "top1_green_fraction": leak_o.extra["top1_green_fraction"],
            "null": opened.null,
            "traced": opened.traced,
            "min_log10_p_other_keys": min(k.log10_p for k in opened.keys if k.account != LEAKER),
        },
    }


def test_suspect(
    name: str,
    lm,
    sets: dict[str, tuple[list[str], list[str] | None]],
    keys,
    args,
    fpr: bool = False,
) -> dict:
    """``sets``: name -> (prompts, the suspect's answers or None to generate them). Two sets:
    ``held_out`` prompts nobody trained on (does the student generalise the watermark?) and
    ``leaked_prompts``, the prompts the leaking account sent (an investigator has them in the
    ledger; they are user text, independent of the key, so asking them keeps the null valid)."""
    from distillguard.forensics import generate_answers

    row: dict = {"suspect": name}
    for set_name, (prompts, answers) in sets.items():
        t0 = time.time()
        if answers is None:
            answers = generate_answers(
                lm,
                prompts,
                max_new_tokens=args.max_new_tokens,
                temperature=0.7,
                seed=args.seed + 10_000,
                batch_size=16,
            )
        row[set_name] = score(lm, answers, prompts, keys, args)
        if fpr and args.fpr_keys:
            row[set_name]["wrong_key_fpr"] = wrong_key_fpr(
                lm, answers, prompts, keys[0].params, args, tag=f"{name}/{set_name}"
            )
        row[set_name]["seconds"] = time.time() - t0
        c, o = row[set_name]["closed"], row[set_name]["open"]
        err.log(
            f"{name} / {set_name}: closed green {c['green_fraction']:.3f} log10 p {c['log10_p']:.1f} | open mass "
            f"{o['green_mass']:.3f} log10 p {o['log10_p']:.1f} emp p {o['empirical_p']} "
            f"top1 log10 p {o['top1_log10_p']:.1f}"
        )
    return row


def plot(results: dict, path: Path) -> None:
    """-log10 p of the leaking account's key per suspect, closed and open (and top-1) side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["students"] + results["controls"]
    names = [r["suspect"] for r in rows]
    sets = [k for k in ("held_out", "leaked_prompts") if k in rows[0]]
    fig, axes = plt.subplots(1, len(sets), figsize=(2.4 * len(rows) + 2, 4.2), squeeze=False)
    for ax, set_name in zip(axes[0], sets):
        series = {
            "closed (binomial, text)": [-r[set_name]["closed"]["log10_p"] for r in rows],
            "open (green mass, Chernoff)": [-r[set_name]["open"]["log10_p"] for r in rows],
            "open top-1 (Sander et al.)": [-r[set_name]["open"]["top1_log10_p"] for r in rows],
        }
        width = 0.8 / len(series)
        for j, (label, values) in enumerate(series.items()):
            ax.bar([i + j * width for i in range(len(rows))], values, width, label=label)
        ax.axhline(3, color="grey", ls="--", lw=1, label="p = 1e-3")
        ax.axhline(5, color="black", ls=":", lw=1, label="p = 1e-5 (Sander et al.'s goal)")
        ax.set_xticks(
            [i + 0.4 - width / 2 for i in range(len(rows))], names, rotation=20, ha="right"
        )
        ax.set_ylabel("-log10 p (leaking account's key)")
        ax.set_title(f"{set_name.replace('_', ' ')} prompts")
    axes[0][0].legend(fontsize=7)
    cfg = results["config"]
    fig.suptitle(
        f"radioactivity: {cfg['student']} fine-tuned on {cfg['train']} teacher answers, {cfg['epochs']} epoch(s)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--train", type=int, default=64, help="training prompts (answers per student)")
    ap.add_argument("--eval", type=int, default=24, help="held-out prompts each suspect answers")
    ap.add_argument(
        "--leaked-prompts",
        type=int,
        default=32,
        help="training prompts asked again (the first ones: they include every watermarked one for rho <= 0.5)",
    )
    ap.add_argument(
        "--rhos", default="1,0,0.25,0.05", help="fractions of watermarked training answers"
    )
    ap.add_argument("--student", default="prune:8")
    ap.add_argument(
        "--lora",
        action="store_true",
        help="train LoRA adapters (merged after) instead of all weights",
    )
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument(
        "--delta", type=float, default=3.0, help="watermark bias of the leaking account's answers"
    )
    ap.add_argument(
        "--scheme",
        default="keyed-hash",
        help="keyed-hash | lefthash-ref | synthid (served: 30 layers)",
    )
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--max-prompt-tokens", type=int, default=64)
    ap.add_argument(
        "--accounts", type=int, default=20, help="keys tested (the leaker's and others')"
    )
    ap.add_argument("--null-keys", type=int, default=1000)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument(
        "--fpr-keys",
        type=int,
        default=100,
        help="keys of accounts that leaked nothing, tested on the controls' answers (false-positive rates)",
    )
    ap.add_argument("--alpha", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--cache",
        default=str(Path.home() / ".cache" / "distillguard" / "bench-radioactivity"),
        help="teacher answers and students (large: kept out of the repository)",
    )
    ap.add_argument("--out", default="bench/results/radioactivity.json")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: least spin-waiting on a busy machine)",
    )
    ap.add_argument("--plot-from", help="only draw the plot of a results JSON")
    ap.add_argument("--skip-controls", action="store_true", help="test the students only")
    ap.add_argument(
        "--teacher-only",
        action="store_true",
        help="only generate (and cache) the teacher's answers",
    )
    args = ap.parse_args()
    if args.plot_from:
        plot(json.loads(Path(args.plot_from).read_text()), Path(args.plot_from).with_suffix(".png"))
        return

    import torch

    from distillguard.distill.train import load_student
    from distillguard.models import load_model
    from distillguard.watermark import WatermarkLogitsProcessor, WatermarkParams, account_key
    from distillguard.watermark.synthid import SynthIDTopK

    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    params = WatermarkParams(scheme=args.scheme, delta=args.delta)
    if args.scheme == "synthid":  # the served configuration (30 layers); δ does not apply
        params = WatermarkParams(scheme="synthid")
    keys = [account_key(SECRET, LEAKER, params)] + [
        account_key(SECRET, f"acct-{i:02d}", params) for i in range(args.accounts - 1)
    ]
    tag = (
        f"synthid-n{args.train}-t{args.max_new_tokens}"
        if args.scheme == "synthid"
        else f"{args.scheme}-d{args.delta}-n{args.train}-t{args.max_new_tokens}"
    )
    teacher = load_model("smollm2", device="cpu")
    train_prompts = prompts_for(teacher, args.train, 0, args.max_prompt_tokens)
    eval_prompts = prompts_for(teacher, args.eval, args.train, args.max_prompt_tokens)
    t0 = time.time()
    if (
        args.scheme == "synthid"
    ):  # the tournament acts on the sampled (tempered) distribution, as served
        before, after = (), [SynthIDTopK(keys[0].hash_key, params.synthid)]
    else:  # the green-list bias acts on the raw logits, as served
        before, after = [WatermarkLogitsProcessor(keys[0])], ()
    wm = cached_answers(
        cache / f"train-wm-{tag}.json",
        teacher,
        train_prompts,
        args,
        before,
        "teacher watermarked",
        after,
    )

    def clean_answers() -> list[str]:  # only when a student or a check needs them (ρ=1 does not)
        return cached_answers(
            cache / f"train-clean-n{args.train}-t{args.max_new_tokens}.json",
            teacher,
            train_prompts,
            args,
            (),
            "teacher clean",
        )

    gen_s = time.time() - t0
    if args.teacher_only:
        clean_answers()
        cached_answers(
            cache / f"eval-teacher-n{args.eval}-s{args.train}-t{args.max_new_tokens}.json",
            teacher,
            eval_prompts,
            args,
            (),
            "teacher eval",
        )
        return
    # The training data as a detector sees it: the watermark in the leaked answers themselves.
    from distillguard.forensics import closed_test

    data_check = {
        "watermarked_answers": closed_test(keys[:1], wm, teacher.tokenizer, prompts=train_prompts)
        .keys[0]
        .log10_p,
        "clean_answers": None,
    }

    results = {
        "config": {**{k: v for k, v in vars(args).items()}, "params": dataclasses.asdict(params)},
        "teacher_generation_s": gen_s,
        "training_data_log10_p": data_check,
        "students": [],
        "controls": [],
    }
    leaked = train_prompts[: args.leaked_prompts]
    max_len = args.max_prompt_tokens + args.max_new_tokens + 8
    for rho in [float(r) for r in args.rhos.split(",")]:
        out = cache / (
            f"student-{args.student.replace(':', '')}{'-lora' if args.lora else ''}-rho{rho}-e{args.epochs}"
            f"-lr{args.lr}{f'-b{args.batch_size}' if args.batch_size != 8 else ''}-{tag}"
        )
        err.log(f"training the student at rho={rho} ...")
        summary = train_student(
            args, rho, train_prompts, wm, clean_answers() if rho < 1 else wm, out
        )
        n_wm = summary["watermarked_answers"]
        train_data = wm[:n_wm] + (clean_answers()[n_wm:] if rho < 1 else [])
        student = load_model(str(out), device="cpu")
        row = test_suspect(
            f"student rho={rho}",
            student,
            {"held_out": (eval_prompts, None), "leaked_prompts": (leaked, None)},
            keys,
            args,
            fpr=rho == 0,
        )  # the clean-trained student is a control
        # did it learn its training answers? NLL per answer token on (up to) 48 of them, the
        # watermarked ones first; the untrained student's and the teacher's NLL are the references
        n_nll = min(48, len(train_prompts))
        row["train_answers_nll"] = answer_nll(
            student, train_prompts[:n_nll], train_data[:n_nll], max_len
        )
        row.update(
            rho=rho,
            watermarked_answers=summary["watermarked_answers"],
            train_seconds=summary.get("seconds"),
            final_loss=summary.get("final_loss"),
            steps=summary.get("steps"),
        )
        results["students"].append(row)
        Path(args.out).write_text(json.dumps(results, indent=2))
    if not args.skip_controls:
        results["training_data_log10_p"]["clean_answers"] = (
            closed_test(keys[:1], clean_answers(), teacher.tokenizer, prompts=train_prompts)
            .keys[0]
            .log10_p
        )
        teacher_eval = cached_answers(
            cache / f"eval-teacher-n{args.eval}-s{args.train}-t{args.max_new_tokens}.json",
            teacher,
            eval_prompts,
            args,
            (),
            "teacher eval",
        )
        results["controls"].append(
            test_suspect(
                "teacher",
                teacher,
                {
                    "held_out": (eval_prompts, teacher_eval),
                    "leaked_prompts": (leaked, clean_answers()[: len(leaked)]),
                },
                keys,
                args,
                fpr=True,
            )
        )
        results["controls"][-1]["train_answers_nll"] = answer_nll(
            teacher, train_prompts[:48], wm[:48], max_len
        )
    if (
        not args.skip_controls and args.student != "smollm2"
    ):  # else the untrained student is the teacher
        untrained = load_student(args.student, "smollm2")
        results["controls"].append(
            test_suspect(
                f"untrained {args.student}",
                untrained,
                {"held_out": (eval_prompts, None), "leaked_prompts": (leaked, None)},
                keys,
                args,
                fpr=True,
            )
        )
        results["controls"][-1]["train_answers_nll"] = answer_nll(
            untrained, train_prompts[:48], wm[:48], max_len
        )
        del untrained
    print(json.dumps(results, indent=2))
    Path(args.out).write_text(json.dumps(results, indent=2))
    plot(results, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    sys.exit(main())
