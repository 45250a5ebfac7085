"""Does decoding fix a distilled student's loops? Greedy vs repetition controls, side by side.

The students of ``bench/distill_curves.py`` (kept with ``--keep-students``) write on-topic text
that loops (rep4 0.32-0.45 at 4,000 queries, the teacher's own greedy answers 0.13). This bench
decodes the same 32 held-out prompts with the teacher and each student under plain greedy,
``repetition_penalty`` (CTRL, Keskar et al. 2019) and ``no_repeat_ngram_size`` (transformers'
``generate`` options), and reports per (model, decoding): rep4, the answers' NLL under the teacher
(plausibility: blocking repeats can force odd tokens), ROUGE-L against the teacher's plain greedy
answers, and three sample answers. It measures decoding, not learning: a student that needs a
repetition control still learned less than its teacher.

    nice -n 5 python bench/distill_decoding.py --student ~/.cache/distillguard/bench/distill_curves/students/topk-kd-prune11-influence-n4000

``--decodings greedy --samples 32`` keeps every held-out answer (and its rep4) of every model, to read.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

console = Console(stderr=True)
ROOT = Path(__file__).resolve().parent.parent
WORK = Path.home() / ".cache" / "distillguard" / "bench" / "distill_curves"
DECODINGS = {
    "greedy": {},
    "repetition_penalty=1.3": {"repetition_penalty": 1.3},
    "no_repeat_ngram_size=4": {"no_repeat_ngram_size": 4},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--student", action="append", required=True, help="a kept student directory (repeat)"
    )
    p.add_argument("--teacher", default="smollm2")
    p.add_argument(
        "--prompts",
        type=Path,
        default=WORK / "prompts-300.json",
        help="distill_curves' prompt cache; the last --eval-prompts are its held-out prompts",
    )
    p.add_argument("--eval-prompts", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--decodings", default=",".join(DECODINGS), help="which of them, comma-separated"
    )
    p.add_argument(
        "--samples",
        type=int,
        default=3,
        help="answers kept per (model, decoding) in the report; "
        "--samples 32 keeps every held-out answer, to read",
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "distill_decoding.json")
    args = p.parse_args()
    decodings = {d: DECODINGS[d] for d in args.decodings.split(",")}
    if "greedy" not in decodings:
        raise SystemExit(
            "--decodings must include greedy (the teacher's greedy answers are the ROUGE-L reference)"
        )

    import torch
    from rouge_score import rouge_scorer

    sys.path.insert(0, str(Path(__file__).parent))
    from distill_curves import held_out_messages

    from distillguard.distill.evaluate import answer_nll, greedy_answers, repeated_ngrams
    from distillguard.models import load_model

    torch.set_num_threads(args.threads)
    messages = held_out_messages(args.prompts, args.eval_prompts)
    teacher = load_model(args.teacher, device="cpu")
    models = {
        "teacher": teacher,
        **{Path(s).name: load_model(s, device="cpu") for s in args.student},
    }
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    reference: list[str] = []
    rows = []
    with Progress(console=console) as progress:
        task = progress.add_task("decode", total=len(models) * len(decodings))
        for name, lm in models.items():
            for decoding, kwargs in decodings.items():
                answers, tps = greedy_answers(lm, messages, args.max_tokens, **kwargs)
                texts = [lm.tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]
                if name == "teacher" and decoding == "greedy":
                    reference = texts
                rouge = [
                    1.0 if t == s else scorer.score(t, s)["rougeL"].fmeasure
                    for t, s in zip(reference, texts)
                ]
                per_answer = [repeated_ngrams([a]) for a in answers]
                rows.append(
                    {
                        "model": name,
                        "decoding": decoding,
                        "rep4": repeated_ngrams(answers),
                        # how many answers loop, a little and much (the README's reading of rep4)
                        "answers_rep4_over": {
                            str(t): sum(r > t for r in per_answer) for t in (0.25, 0.4)
                        },
                        "nll_under_teacher": answer_nll(teacher, messages, answers),
                        "rouge_l_vs_teacher_greedy": sum(rouge) / len(rouge),
                        "tokens_per_s": tps,
                        "samples": texts[: args.samples],
                        "rep4_per_answer": per_answer[: args.samples],
                    }
                )
                progress.advance(task)
    report = {
        "bench": "distill_decoding",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
        "config": {k: str(v) for k, v in vars(args).items()},
        "rows": rows,
    }
    args.out.write_text(json.dumps(report, indent=2))
    for r in rows:
        over = r["answers_rep4_over"]
        console.print(
            f"{r['model']:40s} {r['decoding']:24s} rep4 {r['rep4']:.3f}  NLL under teacher "
            f"{r['nll_under_teacher']:.3f}  ROUGE-L {r['rouge_l_vs_teacher_greedy']:.3f}  answers with "
            f"rep4 > 0.25: {over['0.25']}, > 0.4: {over['0.4']} of {len(messages)}"
        )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
