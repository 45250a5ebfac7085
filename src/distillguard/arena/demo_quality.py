"""Act 5 of ``distillguard demo``: what the student learned, scored against the teacher on
held-out prompts that no account sent, by ``distill eval``'s own measures."""

from __future__ import annotations

from pathlib import Path

from distillguard.arena.demo_config import DemoConfig, Say


def _sent_prompts(db: Path) -> set[str]:
    """The last user turn of every request any account sent the gateway (the ledger's record)."""
    from sqlalchemy import select

    from distillguard.guard.db import make_engine
    from distillguard.guard.schema import LedgerRow

    engine = make_engine(f"sqlite:///{db}")
    try:
        with engine.connect() as conn:
            bodies = conn.execute(select(LedgerRow.request_body)).scalars().all()
    finally:
        engine.dispose()
    return {str(((body or {}).get("messages") or [{}])[-1].get("content", "")) for body in bodies}


def held_out_prompts(cfg: DemoConfig, n: int | None = None) -> list[list[dict]]:
    """``n`` (default ``cfg.quality_prompts``) ShareGPT prompts that no account sent: from just
    after the distiller's slice of the pool (the users ask from 5000 on), less any whose text
    the ledger holds (ShareGPT repeats some prompts word for word, "hi" among them). Act 4's
    forensics report asks the first of the same prompts."""
    from distillguard.distill.prompts import load_prompts

    n = cfg.quality_prompts if n is None else n
    sent = _sent_prompts(cfg.out / "ledger.db")
    pool = load_prompts(
        "sharegpt",
        skip=cfg.extract,
        limit=4 * n,
        max_chars=cfg.max_prompt_chars,
    )
    held: list[list[dict]] = []
    for p in pool:
        text = p.messages[-1][1]
        if text not in sent and len(held) < n:
            sent.add(text)  # and each prompt once
            held.append([{"role": role, "content": content} for role, content in p.messages])
    return held


def act_quality(cfg: DemoConfig, say: Say) -> dict:
    """The student and its untrained control against the teacher on held-out prompts, by
    ``distill eval``'s measures: NLL of the teacher's greedy answers (the teacher's own NLL is
    the floor) and ROUGE-L against them, and the share of repeated 4-grams of each one's own
    greedy answers (a looping student can score a low NLL)."""
    from distillguard.distill.evaluate import evaluate_many
    from distillguard.distill.train import load_student
    from distillguard.models import load_model

    prompts = held_out_prompts(cfg)
    say(
        f"scoring the student and the untrained student on {len(prompts)} held-out prompts "
        f"(the teacher answers each greedily, up to {cfg.max_tokens} tokens) ..."
    )
    teacher = load_model(cfg.model)
    # the untrained student is pruned from the teacher loaded here (act 4's control, loaded once)
    students = [load_model(str(cfg.out / "student")), load_student(cfg.student, teacher)]
    reports = evaluate_many(teacher, students, prompts, max_new_tokens=cfg.max_tokens)

    def scores(m) -> dict:
        return {
            "parameters": m.parameters,
            "nll": m.nll,
            "rouge_l": m.rouge_l,
            "exact_match": m.exact_match,
            "rep4": m.rep4,
        }

    return {
        "prompts": len(prompts),
        "max_new_tokens": cfg.max_tokens,
        "prompts_sha256": reports[0].prompts_sha256,
        "teacher": {
            "parameters": reports[0].teacher.parameters,
            "nll": reports[0].teacher.nll,
            "rep4": reports[0].teacher.rep4,
        },
        "student": scores(reports[0].student),
        "untrained_student": scores(reports[1].student),
    }


__all__ = ["act_quality", "held_out_prompts"]
