"""Act 4's forensics report of ``distillguard demo``: the demo's student judged by the one report.

:func:`distillguard.forensics.report.run_report`, the code path of ``distillguard forensics
report``, runs on the student act 4 trained, with the untrained student as its control and the
demo's own ledger and watermark secret: identity, similarity, radioactivity per account key and
the canaries in the weights, Holm over the tests, one verdict. Its ``evidence.json`` and
``report.html`` are written to ``OUT/forensics/``.

Then the API-only canary test: the student and the control are each served by ``distillguard
serve --model SPEC --no-guard`` in a subprocess on a free loopback port, and the same report
(canaries only) asks them through their OpenAI-compatible endpoints, by the likelihood their
``/v1/completions`` echo gives each canary's ending (``OUT/forensics/api/``). A suspect that
exists only as a URL is what most investigators hold; here the URL serves a model whose weights
the first report also tested, so the two modes can be compared.

The similarity and radioactivity prompts are ShareGPT prompts that no account sent the gateway
(:func:`distillguard.arena.demo_quality.held_out_prompts`), written to ``OUT/forensics/
prompts.txt`` so the report's commands rerun on exactly them.
"""

from __future__ import annotations

import shlex
import shutil
from contextlib import ExitStack
from pathlib import Path

from distillguard.arena.demo_config import CANARY_DECOYS, DemoConfig, Say

FORENSICS = "forensics"  # OUT/forensics: the report on the student's weights; api/: on its URL
PROMPTS = 16  # held-out prompts for similarity and radioactivity (greedy answers of each model)
MAX_TOKENS = 32  # tokens per greedy answer, the report's default
ALPHA = 1e-3  # the report's level, after Holm, as the demo's other tests
# Radioactivity's empirical rank among random wrong keys is a check beside its exact p-value,
# not the verdict's: in the tiny demo 200 of them took 27 of the act's 146 s; the CLI adds them.
NULL_KEYS = 0


def _control_spec(cfg: DemoConfig) -> str:
    """The untrained student as a self-contained spec (``prune:K@TEACHER``), read from the
    student's own training record as the report's default controls read it."""
    from distillguard.forensics.controls import suspect_origin

    origin, _ = suspect_origin(str(cfg.out / "student"))
    if origin is not None:
        return origin.student
    return cfg.student  # a spec of its own (tiny:seed=1, a dir, a hub id)


def _write_prompts(cfg: DemoConfig, path: Path) -> list[str]:
    """``PROMPTS`` held-out prompts, one a line (the report's .txt format: inner whitespace,
    newlines included, becomes one space)."""
    from distillguard.arena.demo_quality import held_out_prompts

    prompts = [" ".join(m[-1]["content"].split()) for m in held_out_prompts(cfg, PROMPTS)]
    path.write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
    return prompts


def _strongest(result: dict) -> float | None:
    """The smallest Holm-adjusted p over accounts of a radioactivity or canary result."""
    rows = result.get("keys") or result.get("accounts") or []
    return min((r["p_holm"] for r in rows), default=None)


def _test(t: dict) -> dict:
    """One test of evidence.json as the demo reports it: ran or why not, statistic, p-values,
    the control's statistic and, for the tests that name accounts, whom it traced."""
    return {
        "ran": t["could_run"],
        "why_not": t["why_not"],
        "statistic": t["statistic"],
        "statistic_name": t["statistic_name"],
        "p_value": t["p_value"],
        "p_holm": t["p_holm"],
        "control": max(t["controls"].values(), default=None),
        "within_controls_range": t["within_controls_range"],
        "traced": t["details"].get("traced"),
    }


def _api_model(result: dict, spec: str, url: str) -> dict:
    return {
        "url": url,  # the loopback port it was served on while the test ran
        "command": shlex.join(["distillguard", "serve", "--model", spec, "--no-guard"]),
        "scoring": result["scoring"],
        "scoring_why": result["scoring_why"],
        "traced": result["traced"],
        "accounts": [
            {k: a[k] for k in ("account", "canaries", "top1", "mean_rank", "p_holm")}
            for a in result["accounts"]
        ],
    }


def summarise(evidence: dict, api: dict, control: str, served: dict[str, tuple[str, str]]) -> dict:
    """What demo.json keeps of the two reports (the rest is in their evidence.json);
    ``served``: model name -> (its spec, the URL it was served on)."""
    from distillguard.forensics.report import holm

    tests = {t["name"]: t for t in evidence["tests"]}
    traced = sorted(
        {
            a
            for name in evidence.get("significant_tests", [])
            for a in tests[name]["details"].get("traced") or []
        }
    )
    (api_test,) = api["tests"]
    label = next(iter(api_test["details"].get("controls") or {}), None)
    api_models = {}
    if api_test["could_run"]:
        api_models = {
            "student": _api_model(api_test["details"]["suspect"], *served["student"]),
            "untrained_student": _api_model(
                api_test["details"]["controls"][label], *served["untrained_student"]
            ),
        }
    # The control judged by the same tests with exact nulls (the fingerprint tests' p-values
    # are ranks among controls, which a control as the only model cannot have): Holm over them.
    control_p = {}
    for name in ("radioactivity", "canaries"):
        t = tests.get(name)
        if t and t["could_run"]:
            (result,) = t["details"]["controls"].values()
            control_p[name] = _strongest(result)
    if api_models:
        control_p["api_canaries"] = min(
            a["p_holm"] for a in api_models["untrained_student"]["accounts"]
        )
    control_traced = sorted(
        {
            a
            for t in (tests.get("radioactivity"), tests.get("canaries"))
            if t and t["could_run"]
            for r in t["details"]["controls"].values()
            for a in r["traced"]
        }
        | set(api_models.get("untrained_student", {}).get("traced", []))
    )
    combined = min(holm(list(control_p.values()))) if control_p else None
    return {
        "verdict": evidence["verdict"],
        "combined_p": evidence["combined_p"],
        "alpha": evidence["alpha"],
        "significant_tests": evidence.get("significant_tests", []),
        "traced": traced,
        "tests": {name: _test(t) for name, t in tests.items()},
        "control": {
            "spec": control,
            "traced": control_traced,
            "p_holm": control_p,
            "combined_p": combined,
            "distilled": combined is not None and combined < evidence["alpha"],
        },
        "api_canaries": {
            "ran": api_test["could_run"],
            "why_not": api_test["why_not"],
            "verdict": api["verdict"],
            "combined_p": api["combined_p"],
            **api_models,
        },
        "report": f"{FORENSICS}/report.html",
        "evidence": f"{FORENSICS}/evidence.json",
        "api_report": f"{FORENSICS}/api/report.html",
        "command": evidence["command"],
        "seconds": evidence["seconds"] + api["seconds"],
    }


def act_forensics(cfg: DemoConfig, say: Say) -> dict:
    """The forensics report on the student's weights, then the API-only canary test on the
    student and its control served on loopback; both written under ``OUT/forensics``."""
    from distillguard.forensics.report import ReportConfig, run_report
    from distillguard.serve.process import serve_subprocess

    out = cfg.out / FORENSICS
    shutil.rmtree(out, ignore_errors=True)  # a rerun reports on its own student
    out.mkdir(parents=True)
    secret = (cfg.out / "watermark.secret").read_text().strip().encode()
    ledger = f"sqlite:///{cfg.out / 'ledger.db'}"
    control = _control_spec(cfg)
    prompts_file = out / "prompts.txt"
    prompts = _write_prompts(cfg, prompts_file)
    common = dict(
        teacher=cfg.model,
        ledger=ledger,
        decoys=CANARY_DECOYS,
        alpha=ALPHA,
        seed=cfg.seed,
        secret_given=True,
    )
    say(
        f"the forensics report on the student, the untrained student ({control}) as its control, "
        "with the demo's ledger and secret ..."
    )
    evidence = run_report(
        ReportConfig(
            suspect=str(cfg.out / "student"),
            controls=(control,),
            prompts=str(prompts_file),
            limit=len(prompts),
            max_tokens=MAX_TOKENS,
            null_keys=NULL_KEYS,
            **common,
        ),
        out,
        secret=secret,
        prompts=prompts,
        progress=lambda msg: say(f"   {msg}"),
    )
    say("the API-only canary test: the student and its control served with --no-guard ...")
    specs = {"student": str(cfg.out / "student"), "untrained_student": control}
    urls = {}
    with ExitStack() as stack:
        for name, spec in specs.items():
            server = stack.enter_context(
                serve_subprocess(
                    "--model", spec, "--no-guard", "--threads", str(cfg.threads),
                    log_path=out / f"serve-{name}.log",
                    timeout_s=cfg.startup_timeout_s,
                    poll_s=0.2,
                )
            )  # fmt: skip
            urls[name] = server.url
        api = run_report(
            ReportConfig(
                suspect=urls["student"],
                controls=(urls["untrained_student"],),
                tests=("canaries",),
                **common,
            ),
            out / "api",
            secret=secret,
        )
    return summarise(evidence, api, control, {n: (specs[n], urls[n]) for n in specs})


__all__ = ["FORENSICS", "act_forensics", "summarise"]
