"""The forensics report's case, trained for real (no stub) and shared by the report's tests and
the API-only canary test (session fixture ``report_case`` in conftest.py):

- the teacher: a tiny model fine-tuned to say it is SmolLM by Hugging Face and to answer in one
  style;
- the suspect ("student"): another tiny model fine-tuned on the teacher's greedy answers, and on
  the canary answers the gateway served to one account ("leaker"), recorded in a SQLite ledger
  beside 12 served to "bystander", which the student never saw;
- controls: an untrained tiny model, and ones fine-tuned on another identity and style.
"""

from __future__ import annotations

from pathlib import Path

import torch
from sqlalchemy import insert

from distillguard.forensics.identity import PROBES
from distillguard.forensics.respondent import Respondent
from distillguard.guard.canary import canary_text
from distillguard.guard.db import make_engine, migrate
from distillguard.guard.schema import LedgerRow
from distillguard.models import load_model
from tests.forensics.students import sft

SECRET = "report-test-secret"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
TOPICS = ["cats", "rain", "maths", "tea", "ships", "jazz", "bread", "stars"]
TRAIN = [f"question {i}: tell me about {t}" for i, t in enumerate(TOPICS * 4)]
HELD_OUT = [f"please explain {t} to a friend ({i})" for i, t in enumerate(TOPICS * 2)]
SAYS = "I am SmolLM, a small model made by Hugging Face."
OTHER_SAYS = "I am Orca, a chat model trained by Acme Labs."
THIRD_SAYS = "My name is Quill; the Widget Company built me."


def style(t: str) -> str:
    return f"Sure! {t} is a fine topic. Here is what I know about {t}."


def other_style(t: str) -> str:
    return f"{t}? Ask someone else, I only talk about boats."


def third_style(t: str) -> str:
    return f"Let me think. The word {t} has {len(t)} letters, and that is all."


def canary_requests(account: str, n: int) -> list[dict]:
    return [
        {
            "request_id": f"req-{account}-{i}",
            "ts": float(i),
            "account_id": account,
            "status": 200,
            "policy_action": "extracting:canary",
            "stream": False,
            "request_body": {
                "messages": [{"role": "user", "content": f"who is in archive record {i}?"}]
            },
        }
        for i in range(n)
    ]


def build_report_case(root: Path) -> tuple[Path, dict[str, Path]]:
    """Model directories, probe files and a ledger under ``root``: (root, {name: model dir})."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        id_train = list(PROBES[:32])
        teacher = sft(
            load_model("tiny", device="cpu"),
            id_train + TRAIN,
            [SAYS] * len(id_train) + [style(t) for t in TOPICS * 4],
            steps=120,
        )
        asked = id_train + TRAIN
        taught = Respondent("teacher", lm=teacher).answer(asked, max_tokens=48)
        leaked = canary_requests("leaker", 12)
        prompts = asked + [r["request_body"]["messages"][0]["content"] for r in leaked]
        answers = taught + [canary_text(SECRET.encode(), "leaker", r["request_id"]) for r in leaked]
        student = sft(load_model("tiny:seed=1", device="cpu"), prompts, answers, steps=300, seed=1)
        other = sft(
            load_model("tiny:seed=3", device="cpu"),
            id_train + TRAIN,
            [OTHER_SAYS] * len(id_train) + [other_style(t) for t in TOPICS * 4],
            steps=120,
        )
        third = sft(
            load_model("tiny:seed=5", device="cpu"),
            id_train + TRAIN,
            [THIRD_SAYS] * len(id_train) + [third_style(t) for t in TOPICS * 4],
            steps=120,
        )
    finally:
        torch.set_num_threads(threads)
    dirs = {}
    trained = (("teacher", teacher), ("student", student), ("other", other), ("third", third))
    for name, lm in trained:
        dirs[name] = root / name
        lm.model.save_pretrained(dirs[name])
        lm.tokenizer.save_pretrained(dirs[name])
    (root / "probes.txt").write_text("\n".join(PROBES[32:]) + "\n")
    (root / "prompts.txt").write_text("\n".join(HELD_OUT) + "\n")
    engine = make_engine(f"sqlite:///{root / 'ledger.db'}")
    migrate(engine)
    with engine.begin() as conn:
        conn.execute(insert(LedgerRow), leaked + canary_requests("bystander", 12))
    engine.dispose()
    return root, dirs
