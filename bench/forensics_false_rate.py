"""How often ``forensics report`` calls a model "distilled" that was not (issue 27), and how often
it says so of one that was.

Truth known by construction, on tiny models (so that many repeats fit on a CPU):

- the **teacher**: ``tiny`` fine-tuned by ``distill train``'s trainer to say it is SmolLM by
  Hugging Face and to answer in one style; it served 12 canary answers to account ``leaker`` and
  12 to ``bystander`` (a SQLite ledger, a master secret);
- **null suspects, trained on non-teacher data**: ``tiny:seed=S`` trained by the same trainer on
  a slice of ShareGPT first turns (ChatGPT's answers) no other model here saw, seed S; their
  ``train_summary.json`` gives the report its **default controls** (the untrained
  ``tiny:seed=S``, and ``tiny:seed=S`` trained on ShareGPT's first slice: what an investigator
  gets with no ``--controls``);
- **null suspects, untrained**: ``tiny:seed=S`` as initialised, against the two controls the
  defaults would give its architecture (an untrained ``tiny:seed=S+1``, and it trained on
  ShareGPT's first slice), passed as ``--controls``: an untrained model has no record to read;
- **distilled suspects** (the positive side): ``tiny:seed=S`` trained on the teacher's greedy
  answers to its own prompts plus the 12 canary answers served to ``leaker``, default controls.

Every suspect goes through the report's own code (:func:`run_report`: identity, similarity,
radioactivity, canaries, Holm, the verdict). Counted: "distilled" verdicts at the report's α and
at looser levels (recomputed from the same tests with :func:`verdict`), each with its one-sided
95% Clopper-Pearson upper bound; per test, how often its reported p (the one the verdict uses)
is below each level, and for identity and similarity how often the probe-level p alone (Fisher
over answers, the permutation over probes) is, which is what the report would use without its
model-rank floor. With K controls the fingerprint tests cannot go below 1/(K+1), so a
"distilled" verdict at α = 1e-3 rests on radioactivity and canaries, whose nulls are exact.

    nice -n 10 .venv/bin/python bench/forensics_false_rate.py --trained 6 --untrained 6 \\
        --distilled 2 --out bench/results/forensics_false_rate.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from distillguard.forensics.report import TESTS
from distillguard.forensics.respondent import Respondent

LEVELS = (1e-3, 1e-2, 5e-2, 1e-1)
SECRET = b"forensics-false-rate"
TOPICS = ["cats", "rain", "maths", "tea", "ships", "jazz", "bread", "stars"]
TRAIN = [f"question {i}: tell me about {t}" for i, t in enumerate(TOPICS * 4)]
HELD_OUT = [f"please explain {t} to a friend ({i})" for i, t in enumerate(TOPICS * 2)]
SAYS = "I am SmolLM, a small model made by Hugging Face."


def style(t: str) -> str:
    return f"Sure! {t} is a fine topic. Here is what I know about {t}."


def _train(root: Path, name: str, student: str, pairs, *, epochs: float, lr: float, seed: int):
    from distillguard.distill.curate import save_dataset
    from distillguard.distill.train import TrainConfig, train

    rows = [
        {"id": str(i), "messages": [{"role": "user", "content": p}], "response": a}
        for i, (p, a) in enumerate(pairs)
    ]
    save_dataset(rows, [], root / f"{name}-data")
    config = TrainConfig(
        data=str(root / f"{name}-data"),
        out=str(root / name),
        student=student,
        teacher="tiny",
        loss="sft",
        epochs=epochs,
        lr=lr,
        max_length=256,
        seed=seed,
        save_steps=0,
    )
    train(config)
    return root / name


def canary_rows(account: str, n: int) -> list[dict]:
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


def setup(root: Path, teacher_epochs: float = 15, distilled: bool = True) -> dict:
    """The teacher, its ledger, and what distilled students learn from it."""
    from sqlalchemy import insert

    from distillguard.forensics.identity import PROBES, teacher_names
    from distillguard.guard.canary import canary_text
    from distillguard.guard.db import make_engine, migrate
    from distillguard.guard.schema import LedgerRow

    asked = list(PROBES[:32]) + TRAIN
    teacher = _train(
        root,
        "teacher",
        "tiny",
        list(zip(asked, [SAYS] * 32 + [style(t) for t in TOPICS * 4])),
        epochs=teacher_epochs,
        lr=3e-3,
        seed=0,
    )
    taught = Respondent(str(teacher)).answer(asked, max_tokens=48) if distilled else []
    leaked = canary_rows("leaker", 12)
    distill_pairs = list(zip(asked, taught)) + [
        (
            r["request_body"]["messages"][0]["content"],
            canary_text(SECRET, "leaker", r["request_id"]),
        )
        for r in leaked
    ]
    engine = make_engine(f"sqlite:///{root / 'ledger.db'}")
    migrate(engine)
    with engine.begin() as conn:
        conn.execute(insert(LedgerRow), leaked + canary_rows("bystander", 12))
    engine.dispose()
    # the names the teacher uses for itself, found once as the report would (the same every time)
    names = teacher_names(Respondent(str(teacher)).answer(PROBES[32:], max_tokens=48), PROBES[32:])
    # a teacher trained briefly (the suite's) may not say them yet: the names it was taught, as
    # an investigator who knows them passes --teacher-names
    names = names or ["SmolLM", "Hugging Face"]
    return {
        "names": tuple(names),
        "teacher": str(teacher),
        "ledger": str(root / "ledger.db"),
        "distill_pairs": distill_pairs,
        "probes": list(PROBES[32:]),
    }


def suspects(root: Path, case: dict, kind: str, i: int, recipe) -> tuple[str, tuple[str, ...]]:
    """(the suspect's spec, its --controls: empty for the default ones)."""
    from distillguard.forensics.controls import Origin, trained_control

    if kind == "trained":
        # one initialisation (so one pair of default controls, built once), each suspect its own
        # ShareGPT slice (slice 0 is the default control's) and its own training seed
        from dataclasses import replace

        own = replace(recipe, offset=recipe.pairs * (i + 1), seed=i + 1)
        return str(trained_control(Origin("tiny:seed=1000", "tiny"), own)[0]), ()
    if kind == "untrained":
        other = "tiny:seed=2500"
        return f"tiny:seed={2000 + i}", (
            other,
            str(trained_control(Origin(other, "tiny"), recipe)[0]),
        )
    spec = _train(
        root,
        f"distilled-{i}",
        "tiny:seed=3000",  # one initialisation, each its own data order
        case["distill_pairs"],
        epochs=40,
        lr=3e-3,
        seed=i,
    )
    return str(spec), ()


def one_report(root: Path, case: dict, kind: str, i: int, args, held: dict) -> dict:
    from distillguard.forensics.controls import ControlRecipe
    from distillguard.forensics.report import ReportConfig, run_report

    recipe = ControlRecipe()
    t0 = time.perf_counter()
    spec, controls = suspects(root, case, kind, i, recipe)
    config = ReportConfig(
        suspect=spec,
        teacher=case["teacher"],
        controls=controls,
        teacher_names=case["names"],
        ledger=case["ledger"],
        prompts="held-out topic prompts",
        limit=len(HELD_OUT),
        max_tokens=args.max_tokens,
        decoys=args.decoys,
        null_keys=0,  # the wrong keys' rank is shown beside the exact p, which decides
        tests=getattr(args, "tests", TESTS),
        alpha=args.alpha,
        device="cpu",
        secret_given=True,
    )
    evidence = run_report(
        config,
        root / "reports" / f"{kind}-{i}",
        secret=SECRET,
        identity_probes=case["probes"],
        prompts=HELD_OUT,
        respondents=held,
    )
    held.pop(spec, None)  # the teacher and the shared controls stay loaded, suspects do not
    for c in controls or [c["spec"] for c in evidence["controls"]]:
        if not isinstance(held.get(c), Remembering):
            held[c] = Remembering(c, device="cpu")
    tests = {}
    for t in evidence["tests"]:
        d = t["details"]
        tests[t["name"]] = {
            "could_run": t["could_run"],
            "why_not": t["why_not"],
            "statistic": t["statistic"],
            "controls": t["controls"],
            "p_value": t["p_value"],
            "within_controls_range": t["within_controls_range"],
            "probe_p": d.get("fisher_p", d.get("permutation_p")),
            "traced": d.get("traced"),
        }
    return {
        "kind": kind,
        "index": i,
        "suspect": spec,
        "controls": [c["spec"] for c in evidence["controls"]],
        "default_controls": evidence["default_controls"]["used"],
        "verdict": evidence["verdict"],
        "combined_p": evidence["combined_p"],
        "tests": tests,
        "seconds": round(time.perf_counter() - t0, 1),
    }


class Remembering(Respondent):
    """A respondent that answers the same prompts once: greedy answers of the same weights are
    the same, and the teacher and the shared controls are asked them in every report."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._said: dict = {}

    def answer(self, prompts, *, max_tokens=48):
        key = (tuple(prompts), max_tokens)
        if key not in self._said:
            self._said[key] = super().answer(prompts, max_tokens=max_tokens)
        return list(self._said[key])


def rate(k: int, n: int) -> dict:
    from distillguard.detect.calibrate import cp_upper

    return {"count": k, "n": n, "rate": k / n if n else None, "upper_95": cp_upper(k, n)}


def summarise(runs: list[dict], alpha: float) -> dict:
    """Verdict and per-test rates per kind of suspect, at the report's α and looser levels."""
    from distillguard.forensics.report import verdict
    from distillguard.forensics.respondent import TestOutcome

    out = {}
    for kind in sorted({r["kind"] for r in runs}):
        rs = [r for r in runs if r["kind"] == kind]
        n = len(rs)

        def outcomes(r):
            return [
                TestOutcome(
                    name,
                    could_run=t["could_run"],
                    statistic=t["statistic"],
                    p_value=t["p_value"],
                    controls=t["controls"],
                )
                for name, t in r["tests"].items()
            ]

        levels = sorted({alpha, *LEVELS})
        per_test = {}
        for name in rs[0]["tests"]:
            ran = [r["tests"][name] for r in rs if r["tests"][name]["could_run"]]
            per_test[name] = {
                "ran": len(ran),
                "below": {
                    str(a): rate(sum(t["p_value"] < a for t in ran), len(ran)) for a in levels
                },
            }
            probe = [t["probe_p"] for t in ran if t["probe_p"] is not None]
            if probe:
                per_test[name]["probe_level_below"] = {
                    str(a): rate(sum(p < a for p in probe), len(probe)) for a in levels
                }
            traced = [t["traced"] for t in ran if t["traced"] is not None]
            if traced:
                per_test[name]["traced_leaker_only"] = rate(
                    sum(t == ["leaker"] for t in traced), len(traced)
                )
        out[kind] = {
            "n": n,
            "distilled": {
                str(a): rate(sum(verdict(outcomes(r), a)["verdict"] == "distilled" for r in rs), n)
                for a in levels
            },
            "named_leaker": rate(
                sum(
                    r["verdict"] == "distilled"
                    and (r["tests"].get("canaries", {}).get("traced") == ["leaker"])
                    for r in rs
                ),
                n,
            ),
            "combined_p_max": max(r["combined_p"] for r in rs if r["combined_p"] is not None),
            "per_test": per_test,
        }
    return out


def measure(
    root: Path, *, trained: int, untrained: int, distilled: int, args, teacher_epochs: float = 15
) -> dict:
    """Every report of the run and their summary; the trained controls cached under ``root``.
    ``args``: alpha, max_tokens, decoys, and optionally tests (default: all four)."""
    os.environ["DISTILLGUARD_CACHE_DIR"] = str(root / "cache")
    t0 = time.perf_counter()
    case = setup(root, teacher_epochs, distilled > 0)
    setup_s = time.perf_counter() - t0
    held: dict = {case["teacher"]: Remembering(case["teacher"], device="cpu")}
    runs = []
    plan = [("trained", i) for i in range(trained)] + [("untrained", i) for i in range(untrained)]
    plan += [("distilled", i) for i in range(distilled)]
    for kind, i in plan:
        r = one_report(root, case, kind, i, args, held)
        runs.append(r)
        print(
            f"{kind} {i}: {r['verdict']} (combined p {r['combined_p']:.3g}; "
            + ", ".join(f"{k} {t['p_value']:.3g}" for k, t in r["tests"].items() if t["could_run"])
            + f") {r['seconds']} s",
            file=sys.stderr,
            flush=True,
        )
    return {
        "summary": summarise(runs, args.alpha),
        "runs": runs,
        "seconds": {"setup": round(setup_s, 1), "total": round(time.perf_counter() - t0, 1)},
    }


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trained", type=int, default=6, help="null suspects on non-teacher data")
    ap.add_argument("--untrained", type=int, default=6, help="null suspects, untrained")
    ap.add_argument("--distilled", type=int, default=2, help="suspects distilled (positive side)")
    ap.add_argument("--alpha", type=float, default=1e-3)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--decoys", type=int, default=19)
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=None)
    return ap


def main() -> None:
    import torch
    from _provenance import code_version

    args = parser().parse_args()
    torch.set_num_threads(1)  # tiny models: threads cost more than they give on a shared machine
    with tempfile.TemporaryDirectory(prefix="forensics-false-rate-") as tmp:
        root = args.work or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        result = measure(
            root,
            trained=args.trained,
            untrained=args.untrained,
            distilled=args.distilled,
            args=args,
        )
    out = {
        "code_version": code_version(),
        "command": " ".join(["python", *sys.argv]),
        "alpha": args.alpha,
        "setup": {
            "model": "tiny (random init, byte tokenizer), trained by distill train's trainer",
            "controls": "default: the suspect's untrained student + it trained on ShareGPT slice 0 "
            "(ControlRecipe: 128 pairs, 1 epoch, 16 steps); untrained suspects: the same two "
            "for another seed, as --controls",
            "identity_probes": 16,
            "prompts": len(HELD_OUT),
            "max_tokens": args.max_tokens,
            "decoys": args.decoys,
            "canaries": {"leaker": 12, "bystander": 12},
        },
        **result,
    }
    text = json.dumps(out, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(json.dumps(out["summary"], indent=2))


if __name__ == "__main__":
    main()
