"""How much of the teacher a student kept: agreement of greedy answers, NLL of teacher answers,
size and speed, side by side on held-out prompts.

Headline numbers are the student's NLL on the teacher's answers next to the teacher's own NLL
(the floor), and ROUGE-L / exact match against the teacher's greedy answers. Two coherence
measures read the student's own greedy answers, next to the teacher's values on its own:
their NLL under the teacher (text the teacher finds implausible is not fluent) and the share of
repeated 4-grams within an answer (``rep4``, Welleck et al. 2019: a looping answer has a low
NLL but a high rep4, so the two are read together). "Gap closed"
against an untrained student is reported but flatters any student (a pruned, untrained
student is worse than uniform), so it is not the headline.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from distillguard.errors import ConfigError
from distillguard.models import LoadedModel


@dataclass
class ModelReport:
    spec: str
    parameters: int
    nll: float  # mean nats per answer token of the teacher's greedy answers
    tokens_per_s: float  # greedy generation, batched, measured in the same run as the others
    rouge_l: float | None = None  # vs the teacher's greedy answers (None for the teacher itself)
    exact_match: float | None = None
    nll_under_teacher: float | None = (
        None  # its own greedy answers scored by the teacher (nats/token)
    )
    rep4: float | None = (
        None  # share of 4-grams in its greedy answers that repeat one earlier in the answer
    )


@dataclass
class EvalReport:
    prompts: int
    max_new_tokens: int
    teacher: ModelReport
    student: ModelReport
    baseline: ModelReport | None = None
    gap_closed: float | None = None  # (baseline NLL - student NLL) / (baseline NLL - teacher NLL)
    # What it takes to reproduce the numbers: the exact prompts (SHA-256 of their JSON) and the
    # versions that generated and scored the answers.
    prompts_sha256: str = ""
    versions: dict = field(default_factory=dict)
    # per prompt, the answers scored: its messages, the teacher's and the student's greedy answers
    # and their agreement (kept out of to_dict: :func:`write_answers` saves them as JSONL)
    answers: list[dict] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        """As JSON-able data; an undefined number (NaN) is None, since NaN is not JSON. Without
        the answers (see :func:`write_answers`)."""

        def clean(value):
            if isinstance(value, float) and math.isnan(value):
                return None
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            return value

        out = clean(asdict(self))
        del out["answers"]
        return out


def write_answers(reports: list[EvalReport], path) -> int:
    """The answers the reports scored, one JSON line per prompt: its messages, the teacher's
    greedy answer, and per student (by spec) its answer with its ROUGE-L and exact match against
    the teacher's. The baseline has no line of its own: it is scored on the teacher's answers
    only (their NLL), and generates none. Returns the lines written."""
    with open(path, "w", encoding="utf-8") as fh:
        for i, first in enumerate(reports[0].answers):
            line = {
                "prompt": i,
                "messages": first["messages"],
                "teacher": first["teacher"],
                "students": {
                    r.student.spec: {
                        k: r.answers[i][k] for k in ("answer", "rouge_l", "exact_match")
                    }
                    for r in reports
                },
            }
            fh.write(json.dumps(line, ensure_ascii=False) + "\n")
    return len(reports[0].answers)


def within_prompt_cap(
    lm: LoadedModel, prompts: list[list[dict]], max_prompt_tokens: int
) -> tuple[list[list[dict]], int]:
    """The prompts of at most ``max_prompt_tokens`` in ``lm``'s chat template (0: all), and how
    many were over: one long prompt pads its whole batch of greedy answers to its length."""
    if not max_prompt_tokens:
        return prompts, 0
    kept = [m for m in prompts if len(lm.chat_ids(m)) <= max_prompt_tokens]
    return kept, len(prompts) - len(kept)


def prompts_digest(prompts: list[list[dict]]) -> str:
    """SHA-256 of the prompts' canonical JSON: two evaluations used the same prompts iff it matches."""
    return hashlib.sha256(
        json.dumps(prompts, sort_keys=True, ensure_ascii=False).encode()
    ).hexdigest()


def versions() -> dict:
    import platform

    import transformers

    from distillguard import __version__

    return {
        "distillguard": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def distinct_prompts(rows) -> list[list[dict]]:
    """The chat prompts of dataset rows, each once, in order: the ``n`` answers of one request (or
    one question asked twice) are one prompt to evaluate on, not ``n``."""
    seen: set[str] = set()
    out = []
    for row in rows:
        key = json.dumps(row["messages"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(row["messages"])
    return out


@torch.inference_mode()
def greedy_answers(
    lm: LoadedModel,
    prompts: list[list[dict]],
    max_new_tokens: int,
    batch_size: int = 16,
    advance: Callable[[int], None] | None = None,
    **generate_kwargs,
) -> tuple[list[list[int]], float]:
    """Greedy answers (token ids, end-of-turn excluded) and generated tokens per second.
    ``generate_kwargs`` go to ``generate`` (e.g. ``repetition_penalty``, ``no_repeat_ngram_size``);
    ``advance(k)`` is called after each batch of ``k`` prompts (a progress bar)."""
    tok = lm.tokenizer
    answers: list[list[int]] = []
    generated, seconds = 0, 0.0
    for start in range(0, len(prompts), batch_size):
        chunk = [lm.chat_ids(m) for m in prompts[start : start + batch_size]]
        width = max(map(len, chunk))
        ids = torch.tensor(
            [[tok.pad_token_id] * (width - len(c)) + c for c in chunk], device=lm.device
        )
        mask = torch.tensor(
            [[0] * (width - len(c)) + [1] * len(c) for c in chunk], device=lm.device
        )
        t0 = time.perf_counter()
        out = lm.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=sorted(lm.eos_token_ids),
            pad_token_id=tok.pad_token_id,
            **generate_kwargs,
        )
        seconds += time.perf_counter() - t0
        for row in out[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in lm.eos_token_ids), len(row))
            answers.append(row[:cut])
            generated += cut
        if advance is not None:
            advance(len(chunk))
    return answers, generated / max(seconds, 1e-9)


@torch.inference_mode()
def answer_nll(
    lm: LoadedModel,
    prompts: list[list[dict]],
    answers: list[list[int]],
    advance: Callable[[int], None] | None = None,
) -> float:
    """Mean negative log-likelihood (nats/token) of ``answers`` (token ids) given their prompts."""
    total, count = 0.0, 0
    for messages, answer in zip(prompts, answers):
        if advance is not None:
            advance(1)
        if not answer:
            continue
        prompt = lm.chat_ids(messages)
        ids = torch.tensor([prompt + answer], device=lm.device)
        logits = (
            lm.model(ids).logits[0, len(prompt) - 1 : -1].float()
        )  # positions predicting the answer
        nll = torch.nn.functional.cross_entropy(
            logits, torch.tensor(answer, device=lm.device), reduction="sum"
        )
        total += float(nll)
        count += len(answer)
    return total / max(count, 1)


def repeated_ngrams(answers: list[list[int]], n: int = 4) -> float:
    """Share of the n-grams (token ids) within each answer that already occurred earlier in that
    answer, pooled over answers ("seq-rep-n" of Welleck et al. 2019). 0 for no repetition."""
    repeated = total = 0
    for answer in answers:
        seen = set()
        for i in range(len(answer) - n + 1):
            gram = tuple(answer[i : i + n])
            repeated += gram in seen
            seen.add(gram)
            total += 1
    return repeated / total if total else 0.0


def evaluate(
    teacher: LoadedModel,
    student: LoadedModel,
    prompts: list[list[dict]],
    *,
    max_new_tokens: int = 128,
    baseline: LoadedModel | None = None,
) -> EvalReport:
    return evaluate_many(
        teacher, [student], prompts, max_new_tokens=max_new_tokens, baseline=baseline
    )[0]


def evaluate_many(
    teacher: LoadedModel,
    students: list[LoadedModel],
    prompts: list[list[dict]],
    *,
    max_new_tokens: int = 128,
    baseline: LoadedModel | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> list[EvalReport]:
    """One report per student against the same teacher answers (the teacher generates once).

    ``on_progress(what, done, total)``: after each batch of work, counted in prompts over all the
    passes (the teacher's answers and their NLL, the baseline's NLL, per student its answers, the
    teacher's answers' NLL under it and its answers' NLL under the teacher)."""
    from rouge_score import rouge_scorer

    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {max_new_tokens}: use 1 or more")
    if not prompts:  # every number below would be a mean over nothing
        raise ConfigError(
            "no prompts to evaluate on (an empty file, an empty eval split, or --skip past the end)"
        )
    for student in students:
        if teacher.tokenizer.get_vocab() != student.tokenizer.get_vocab():
            # NLL of teacher tokens under the student needs the same token ids; compare texts instead.
            raise ConfigError(
                f"teacher and student {student.spec} tokenizers differ; token-level NLL is undefined"
            )
    total = len(prompts) * (2 + (baseline is not None) + 3 * len(students))
    done = 0

    def step(what: str):
        def advance(k: int) -> None:
            nonlocal done
            done += k
            if on_progress is not None:
                on_progress(what, done, total)

        return advance

    teacher_answers, teacher_tps = greedy_answers(
        teacher, prompts, max_new_tokens, advance=step("teacher answers")
    )
    decode = teacher.tokenizer.decode
    t_text = [decode(a, skip_special_tokens=True).strip() for a in teacher_answers]
    scorer = rouge_scorer.RougeScorer(["rougeL"])

    def params(lm: LoadedModel) -> int:
        return sum(p.numel() for p in lm.model.parameters())

    teacher_nll = answer_nll(teacher, prompts, teacher_answers, advance=step("teacher NLL"))
    t_report = ModelReport(
        teacher.spec,
        params(teacher),
        teacher_nll,
        teacher_tps,
        nll_under_teacher=teacher_nll,
        rep4=repeated_ngrams(teacher_answers),
    )
    b_report = None
    if baseline is not None:
        b_report = ModelReport(
            baseline.spec,
            params(baseline),
            answer_nll(baseline, prompts, teacher_answers, advance=step("baseline NLL")),
            float("nan"),
        )
    reports = []
    digest, setup = prompts_digest(prompts), versions()
    for student in students:
        student_answers, student_tps = greedy_answers(
            student, prompts, max_new_tokens, advance=step(f"{student.spec}: answers")
        )
        s_text = [decode(a, skip_special_tokens=True).strip() for a in student_answers]
        # Identical answers agree fully even when ROUGE's word tokenizer finds no words in them.
        rouges = [
            1.0 if t == s else scorer.score(t, s)["rougeL"].fmeasure for t, s in zip(t_text, s_text)
        ]
        rouge = sum(rouges) / max(len(prompts), 1)
        exact = sum(t == s for t, s in zip(t_text, s_text)) / max(len(prompts), 1)
        s_report = ModelReport(
            student.spec,
            params(student),
            answer_nll(student, prompts, teacher_answers, advance=step(f"{student.spec}: NLL")),
            student_tps,
            rouge_l=rouge,
            exact_match=exact,
            nll_under_teacher=answer_nll(
                teacher,
                prompts,
                student_answers,
                advance=step(f"{student.spec}: under the teacher"),
            ),
            rep4=repeated_ngrams(student_answers),
        )
        report = EvalReport(
            prompts=len(prompts),
            max_new_tokens=max_new_tokens,
            teacher=t_report,
            student=s_report,
            baseline=b_report,
            prompts_sha256=digest,
            versions=setup,
            answers=[
                {
                    "messages": m,
                    "teacher": t,
                    "answer": a,
                    "rouge_l": r,
                    "exact_match": t == a,
                }
                for m, t, a, r in zip(prompts, t_text, s_text, rouges)
            ],
        )
        if b_report is not None:
            denom = b_report.nll - t_report.nll
            report.gap_closed = (b_report.nll - s_report.nll) / denom if denom > 0 else math.nan
        reports.append(report)
    return reports


def learning_curve_plot(reports: list[EvalReport], queries: list[int], path) -> None:
    """Quality vs teacher queries: held-out NLL (with the teacher's floor) and ROUGE-L, one point per student."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = sorted(range(len(reports)), key=lambda i: queries[i])
    xs = [queries[i] for i in order]
    fig, (ax_nll, ax_rouge) = plt.subplots(1, 2, figsize=(10, 4))
    ax_nll.plot(xs, [reports[i].student.nll for i in order], "o-", label="student")
    ax_nll.axhline(
        reports[0].teacher.nll, color="black", lw=1, label=f"teacher ({reports[0].teacher.nll:.2f})"
    )
    ax_rouge.plot(xs, [reports[i].student.rouge_l for i in order], "o-")
    for i in order:
        ax_nll.annotate(
            reports[i].student.spec.rsplit("/", 1)[-1],
            (queries[i], reports[i].student.nll),
            fontsize=7,
        )
    for ax, name in (
        (ax_nll, "NLL of teacher answers (nats/token)"),
        (ax_rouge, "ROUGE-L vs teacher greedy"),
    ):
        ax.set_xlabel("teacher queries (distinct training prompts)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    ax_nll.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
