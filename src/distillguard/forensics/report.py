"""One forensics report on a suspect: every test that can run with what was given, one verdict.

Tests (each a :class:`~distillguard.forensics.respondent.TestOutcome`: statistic, p-value
against its null or the controls, could it run and why not):

- ``identity``: does the suspect claim the teacher's identity (:mod:`.identity`)?
- ``similarity``: does it answer like the teacher, more than the controls (:mod:`.similarity`)?
- ``radioactivity``: did it learn the per-account watermark (a ledger's accounts and the
  master secret; open mode on weights, closed mode on a URL)? The p-value is the exact one
  of :mod:`.radioactivity`, Holm over accounts; the controls get the same test.
- ``canaries``: does it prefer the served canaries' endings to decoys (the ledger's canary rows
  and the secret; weights by likelihood, a URL by its prompt logprobs where it gives them, else
  by its answers)? Exact rank p-values, Fisher per account, Holm over accounts.

The verdict: Holm over the tests that ran (family-wise error control over the report's claims).
It says "distilled" only when some test is significant after Holm *and* the suspect's statistic
lies above every control's: a fingerprint a control shares is not evidence, however small its
probe-level p-value.

``evidence.json`` carries every number, the SHA-256 of every input, and the command that
reproduces each test; ``report.html`` shows it with its plots embedded, no script, no URL.
"""

from __future__ import annotations

import json
import math
import platform
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from distillguard.errors import ConfigError
from distillguard.forensics.controls import ControlRecipe, default_controls
from distillguard.forensics.report_html import render_html
from distillguard.forensics.respondent import Respondent, TestOutcome, cannot_run, sha256_path

TESTS = ("identity", "similarity", "radioactivity", "canaries")
VERDICTS = ("distilled", "not shown distilled", "no test could run")


@dataclass(frozen=True)
class ReportConfig:
    """What the report was asked to do; :meth:`command` renders it back as a command line."""

    suspect: str
    teacher: str | None = None
    controls: tuple[str, ...] = ()
    # with no controls given: the suspect's untrained student and one trained on non-teacher
    # data (:mod:`.controls`)
    default_controls: bool = True
    tests: tuple[str, ...] = TESTS
    ledger: str | None = None
    probes: str | None = None  # identity probes file (None: the bundled paraphrases)
    teacher_names: tuple[str, ...] = ()
    prompts: str = "sharegpt"
    limit: int = 32
    max_tokens: int = 32
    scheme: str = "synthid"
    decoys: int = 49
    # open-mode radioactivity's wrong keys: an empirical rank beside the exact p (not the verdict's)
    null_keys: int = 200
    # radioactivity's training-data n-gram filter (:mod:`.training_filter`): a JSONL of the
    # suspected training data; with --ledger and none given, each account's own served answers
    filter_data: str | None = None
    alpha: float = 1e-3
    seed: int = 0
    device: str = "auto"
    secret_given: bool = field(default=False, compare=False)

    def __post_init__(self):
        unknown = sorted(set(self.tests) - set(TESTS))
        if unknown:
            raise ConfigError(f"unknown test(s) {', '.join(unknown)}: use {', '.join(TESTS)}")
        if not 0 < self.alpha < 1:
            raise ConfigError(f"alpha={self.alpha} must be in (0, 1)")
        if self.null_keys < 0:
            raise ConfigError(f"--null-keys {self.null_keys}: use 0 (none) or more")

    def command(self, tests: Sequence[str] | None = None, out: str = "OUT") -> str:
        """The command line that reruns the report (or only ``tests``); the secret and API key
        are read from their environment variables, never written here."""
        args = ["distillguard", "forensics", "report", "--suspect", self.suspect]
        if self.teacher:
            args += ["--teacher", self.teacher]
        for c in self.controls:
            args += ["--controls", c]
        if not self.default_controls:
            args += ["--no-default-controls"]
        if self.ledger:
            args += ["--ledger", self.ledger]
        if self.probes:
            args += ["--probes", self.probes]
        for n in self.teacher_names:
            args += ["--teacher-names", n]
        args += ["--tests", ",".join(tests or self.tests)]
        args += ["--prompts", self.prompts, "--limit", str(self.limit)]
        args += ["--max-tokens", str(self.max_tokens), "--scheme", self.scheme]
        args += ["--decoys", str(self.decoys), "--alpha", repr(self.alpha)]
        if self.null_keys != ReportConfig.null_keys:
            args += ["--null-keys", str(self.null_keys)]
        if self.filter_data:
            args += ["--filter-data", self.filter_data]
        args += ["--seed", str(self.seed), "--device", self.device, "--out", out]
        line = shlex.join(args)
        return f"DISTILLGUARD_WATERMARK_SECRET=... {line}" if self.secret_given else line


def holm(pvalues: Sequence[float]) -> list[float]:
    # statsmodels is not a dependency and scipy has no Holm; the project's one implementation.
    from distillguard.watermark.detect import holm as _holm

    return _holm(pvalues)


def verdict(outcomes: Sequence[TestOutcome], alpha: float) -> dict:
    """Holm over the tests that ran; "distilled" needs a significant test whose statistic is
    above every control's."""
    ran = [o for o in outcomes if o.could_run and o.p_value is not None]
    if not ran:
        return {"verdict": "no test could run", "p_holm": {}, "combined_p": None, "alpha": alpha}
    adjusted = dict(zip((o.name for o in ran), holm([o.p_value for o in ran])))
    evidence = [o.name for o in ran if adjusted[o.name] < alpha and not o.within_controls_range]
    return {
        "verdict": "distilled" if evidence else "not shown distilled",
        "p_holm": adjusted,
        "combined_p": min(adjusted.values()),  # Holm's family-wise p of the whole report
        "significant_tests": evidence,
        "alpha": alpha,
    }


# ---- the tests that need a ledger and the secret ----------------------------------------------


def _ledger_accounts(engine) -> list[str]:
    from sqlalchemy import select, union

    from distillguard.guard.schema import Account, LedgerRow

    query = union(select(Account.id), select(LedgerRow.account_id).distinct())
    with engine.connect() as conn:
        return sorted({r[0] for r in conn.execute(query) if r[0]})


def _strength(p: float) -> float:
    """-log10 p, the larger the stronger; p = 1 gives 0.0 (not -0.0, which would print "-0")."""
    return 0.0 - math.log10(max(p, 1e-300))


def radioactivity_outcome(
    suspect: Respondent,
    controls: Mapping[str, Respondent],
    accounts: Sequence[str],
    secret: bytes,
    prompts: Sequence[str],
    config: ReportConfig,
    filter_texts: Mapping[str | None, Sequence[str]] | None = None,
    filter_sha256: str | None = None,
) -> TestOutcome:
    """The per-account watermark test on the suspect and on each control; statistic: -log10 of
    the smallest Holm-adjusted p over accounts (the strongest trace). ``filter_texts``: the
    training-data filter's answers by account (None: rows for every account), from
    ``--filter-data`` or the ledger; the same filter applies to the controls."""
    from distillguard.forensics import closed_radioactivity, open_radioactivity
    from distillguard.models import load_tokenizer
    from distillguard.watermark import WatermarkParams, account_key

    if not accounts:
        return cannot_run("radioactivity", "the ledger has no accounts")
    if config.teacher is None or Respondent(config.teacher).is_api:
        return cannot_run(
            "radioactivity", "needs the teacher's model spec for its tokenizer (--teacher SPEC)"
        )
    keys = [account_key(secret, a, WatermarkParams(scheme=config.scheme)) for a in accounts]
    tokenizer = load_tokenizer(config.teacher)
    filters, filter_record = _report_filters(
        filter_texts, filter_sha256, accounts, tokenizer, keys[0].params, config
    )

    def run(r: Respondent):
        if r.is_api:
            return closed_radioactivity(
                r.spec,
                keys,
                prompts,
                tokenizer,
                api_key=r.api_key,
                seed=config.seed,
                max_tokens=config.max_tokens,
                alpha=config.alpha,
                filters=filters,
            )
        if r.lm.tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ConfigError(
                f"{r.spec} does not share the teacher's tokenizer: serve it and pass its URL "
                "(closed mode)"
            )
        return open_radioactivity(
            r.lm,
            keys,
            prompts,
            max_new_tokens=config.max_tokens,
            seed=config.seed,
            alpha=config.alpha,
            null_keys=config.null_keys,
            progress=False,
            filter_data=_union(filters),
        )

    def strength(result) -> float:
        return _strength(min(k.p_holm for k in result.keys))

    try:
        result = run(suspect)
        control_results = {label: run(c) for label, c in controls.items()}
    except ConfigError as exc:
        return cannot_run("radioactivity", str(exc))
    return TestOutcome(
        "radioactivity",
        could_run=True,
        statistic=strength(result),
        statistic_name="-log10 of the smallest Holm-adjusted p over accounts",
        p_value=min(k.p_holm for k in result.keys),
        controls={label: strength(r) for label, r in control_results.items()},
        details={
            # whether the training-data filter ran (and why not), its data's SHA-256, and the
            # units it kept (per account in closed mode: suspect.filter)
            "filter": filter_record,
            "suspect": result.to_dict(),
            "traced": result.traced,
            "controls": {label: r.to_dict() for label, r in control_results.items()},
        },
    )


def _report_filters(texts, sha256, accounts, tokenizer, params, config):
    """The radioactivity test's training-data filters (None when it does not run) and what
    evidence.json says of them."""
    from distillguard.forensics.training_filter import filters_by_account

    source = config.filter_data or "the ledger's served answers, each account its own"
    if params.scheme == "synthid":
        why = (
            "SynthID's units are table entries shared across n-grams, so the filter's validity "
            "argument does not hold for it (forensics/radioactivity.py); ran unfiltered"
        )
        return None, {"ran": False, "why": why, "source": source}
    if texts is None:
        return None, {"ran": False, "why": "no filter data (--filter-data or --ledger answers)"}
    filters = filters_by_account(
        texts, accounts, tokenizer, params.context_width, source=source, sha256=sha256
    )
    if not filters:
        return None, {"ran": False, "why": "no tested account has answers in the filter data"}
    return filters, {"ran": True, "source": source, "sha256": sha256}


def _union(filters):
    """Open mode scores one set of contexts: the union of the accounts' filters (another
    account's answers do not depend on this key, so adding their contexts keeps the test valid)."""
    from distillguard.forensics.training_filter import TrainingFilter

    if not filters:
        return None
    parts = list({id(f): f for f in filters.values()}.values())
    if len(parts) == 1:
        return parts[0]
    return TrainingFilter(
        frozenset().union(*(f.contexts for f in parts)),
        frozenset().union(*(f.pairs for f in parts)),
        parts[0].width,
        sum(f.texts for f in parts),
        source=parts[0].source.split(" (account")[0],
        sha256=parts[0].sha256,
    )


def canary_outcome(
    suspect: Respondent,
    controls: Mapping[str, Respondent],
    served: Sequence,
    secret: bytes,
    config: ReportConfig,
) -> TestOutcome:
    """Canary exposure of the suspect and of each control: their weights ranked by likelihood
    (:mod:`.canaries`), or through their API (:mod:`.api_canaries`): by likelihood where the
    endpoint gives prompt logprobs, the conversation in the teacher's chat template, else by
    their answers' overlap; statistic: -log10 of the smallest Holm-adjusted p over accounts."""
    from distillguard.forensics.api_canaries import api_canary_test
    from distillguard.forensics.canaries import canary_test

    if not served:
        return cannot_run("canaries", "the ledger holds no canary answers (policy action 'canary')")
    template = None
    if config.teacher is not None and not Respondent(config.teacher).is_api:
        from distillguard.models import load_tokenizer

        template = load_tokenizer(config.teacher)

    def run(r: Respondent):
        if r.is_api:
            # a canary is about 120 characters: room for it whatever the tokenizer
            return api_canary_test(
                r,
                secret,
                served,
                decoys=config.decoys,
                alpha=config.alpha,
                seed=config.seed,
                max_tokens=max(128, config.max_tokens),
                template=r.template if r.template is not None else template,
            )
        return canary_test(r.lm, secret, served, decoys=config.decoys, alpha=config.alpha)

    def strength(result) -> float:
        return _strength(min(a.p_holm for a in result.accounts))

    result = run(suspect)
    control_results = {label: run(c) for label, c in controls.items()}
    return TestOutcome(
        "canaries",
        could_run=True,
        statistic=strength(result),
        statistic_name="-log10 of the smallest Holm-adjusted p over accounts",
        p_value=min(a.p_holm for a in result.accounts),
        controls={label: strength(r) for label, r in control_results.items()},
        details={
            "mode": "api" if suspect.is_api else "weights",
            # "likelihood" or "greedy-answer" (an API that refused prompt logprobs), and why
            "scoring": result.scoring,
            "scoring_why": result.scoring_why,
            "suspect": result.to_dict(),
            "traced": result.traced,
            "controls": {label: r.to_dict() for label, r in control_results.items()},
        },
    )


# ---- the report --------------------------------------------------------------------------------


def _versions() -> dict:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("distillguard", "torch", "transformers", "scipy", "numpy", "matplotlib", "openai"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _sha256_text(lines: Sequence[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def run_report(
    config: ReportConfig,
    out_dir: Path,
    *,
    secret: bytes | None = None,
    api_key: str | None = None,
    identity_probes: Sequence[str] | None = None,
    prompts: Sequence[str] = (),
    respondents: Mapping[str, Respondent] | None = None,
    control_recipe: ControlRecipe | None = None,
    progress=None,
) -> dict:
    """Run the tests, write ``evidence.json`` and ``report.html`` to ``out_dir``, return the
    evidence. ``respondents`` (by spec) lets a caller pass models it holds already;
    ``control_recipe`` changes how the default non-teacher control is trained (the bench's
    repeated controls; evidence.json records it)."""
    from distillguard.forensics.identity import PROBES, identity_test
    from distillguard.forensics.similarity import similarity_test

    def say(msg: str) -> None:
        if progress is not None:
            progress(msg)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    held = dict(respondents or {})

    def respondent(spec: str) -> Respondent:
        if spec not in held:
            held[spec] = Respondent(spec, api_key=api_key, device=config.device)
        return held[spec]

    suspect = respondent(config.suspect)
    teacher = respondent(config.teacher) if config.teacher else None
    controls = {f"control {i + 1}: {c}": respondent(c) for i, c in enumerate(config.controls)}
    control_record = [
        {"label": label, "spec": c, "default": False} for label, c in zip(controls, config.controls)
    ]
    defaults: dict = {"used": False}
    if config.controls:
        defaults["why_not"] = "controls given (--controls)"
    elif not config.default_controls:
        defaults["why_not"] = "turned off (--no-default-controls)"
    else:
        made, why = default_controls(config.suspect, control_recipe or ControlRecipe(), say)
        defaults = {"used": bool(made)} if made else {"used": False, "why_not": why}
        for c in made:
            controls[c.label()] = respondent(c.spec)
            control_record.append(
                {"label": c.label(), "spec": c.spec, "default": True, "kind": c.kind, **c.built}
            )
    probes = list(identity_probes or PROBES)
    inputs: dict = {
        "identity_probes": {
            "source": config.probes or "bundled (distillguard.forensics.identity.PROBES)",
            "sha256": _sha256_text(probes),
            "count": len(probes),
        },
        "similarity_prompts": {
            "source": config.prompts,
            "sha256": _sha256_text(prompts),
            "count": len(prompts),
        },
    }
    if config.probes and Path(config.probes).is_file():
        inputs["identity_probes"]["file_sha256"] = sha256_path(Path(config.probes))
    if Path(config.prompts).is_file():
        inputs["similarity_prompts"]["file_sha256"] = sha256_path(Path(config.prompts))

    outcomes: list[TestOutcome] = []
    if "identity" in config.tests:
        say("identity probes ...")
        outcomes.append(
            identity_test(
                suspect, teacher, controls, probes=probes, names=list(config.teacher_names) or None
            )
        )
    if "similarity" in config.tests:
        say("behavioural similarity ...")
        outcomes.append(
            similarity_test(
                suspect,
                teacher,
                controls,
                prompts=prompts,
                max_tokens=config.max_tokens,
                seed=config.seed,
            )
        )
    wants_ledger = [t for t in ("radioactivity", "canaries") if t in config.tests]
    if wants_ledger and (config.ledger is None or secret is None):
        missing = " and ".join(
            n for n, v in (("--ledger", config.ledger), ("the secret", secret)) if v is None
        )
        why = f"needs the provider's ledger and secret: {missing} not given"
        outcomes += [cannot_run(t, why) for t in wants_ledger]
    elif wants_ledger:
        outcomes += _ledger_tests(config, suspect, controls, secret, prompts, inputs, out_dir, say)
    decision = verdict(outcomes, config.alpha)
    fingerprints = {"suspect": suspect.fingerprint()}
    if teacher is not None:
        fingerprints["teacher"] = teacher.fingerprint()
    fingerprints["controls"] = {label: c.fingerprint() for label, c in controls.items()}
    inputs["models"] = fingerprints
    for c in control_record:
        c["sha256"] = fingerprints["controls"][c["label"]]
    if secret is not None:
        # a commitment: whoever is later shown the secret can check it is the one used here
        import hashlib

        inputs["secret_sha256"] = hashlib.sha256(secret).hexdigest()
    evidence = {
        "report": "distillguard forensics report",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
        "config": {k: v for k, v in asdict(config).items() if k != "secret_given"},
        **decision,
        "controls": control_record,
        "default_controls": defaults,
        "tests": [
            {
                **o.to_dict(),
                "p_holm": decision["p_holm"].get(o.name),
                "command": config.command([o.name]),
            }
            for o in outcomes
        ],
        "command": config.command(),
        "inputs": inputs,
        "versions": _versions(),
    }
    (out_dir / "evidence.json").write_text(json.dumps(evidence, indent=2, default=str))
    (out_dir / "report.html").write_text(render_html(evidence), encoding="utf-8")
    return evidence


def _ledger_tests(config, suspect, controls, secret, prompts, inputs, out_dir, say):
    from distillguard.forensics.canaries import served_canaries
    from distillguard.guard.db import make_engine, migrate

    engine = make_engine(config.ledger)
    try:
        migrate(engine)
        accounts = _ledger_accounts(engine)
        served = served_canaries(engine)
        # the filter's default input; SynthID runs unfiltered (see _report_filters)
        wants_answers = "radioactivity" in config.tests and not config.filter_data
        answers = _ledger_answers(engine) if wants_answers and config.scheme != "synthid" else {}
    finally:
        engine.dispose()
    # what the report read from the ledger, exported beside it and hashed
    export = out_dir / "ledger_export.jsonl"
    with open(export, "w", encoding="utf-8") as f:
        f.write(json.dumps({"accounts": accounts}) + "\n")
        for c in served:
            f.write(json.dumps({"canary": asdict(c)}) + "\n")
        for account, texts in answers.items():  # the training-data filter's input
            for t in texts:
                f.write(json.dumps({"account": account, "response": {"text": t}}) + "\n")
    inputs["ledger_export"] = {"path": export.name, "sha256": sha256_path(export)}
    filter_texts, filter_sha = (answers or None), inputs["ledger_export"]["sha256"]
    if config.filter_data:
        from distillguard.forensics.training_filter import read_filter_data

        filter_texts, filter_sha = read_filter_data(config.filter_data)
        inputs["filter_data"] = {"path": config.filter_data, "sha256": filter_sha}
    out = []
    if "radioactivity" in config.tests:
        say("watermark radioactivity ...")
        out.append(
            radioactivity_outcome(
                suspect, controls, accounts, secret, prompts, config, filter_texts, filter_sha
            )
        )
    if "canaries" in config.tests:
        say("canaries ...")
        out.append(canary_outcome(suspect, controls, served, secret, config))
    return out


def _ledger_answers(engine) -> dict[str, list[str]]:
    """Each account's served answers (canaries, the gateway's own text, left out): the data a
    student of that account would have trained on, for the training-data filter."""
    from sqlalchemy import select

    from distillguard.forensics.training_filter import row_answers
    from distillguard.guard.ledger import is_canary_action
    from distillguard.guard.schema import LedgerRow

    query = select(LedgerRow.account_id, LedgerRow.response_text, LedgerRow.policy_action).where(
        LedgerRow.response_text.is_not(None)
    )
    out: dict[str, list[str]] = {}
    with engine.connect() as conn:
        for account, text, action in conn.execute(query):
            if account and not (action and is_canary_action(action)):
                out.setdefault(account, []).extend(row_answers({"response": {"text": text}}))
    return out


__all__ = [
    "TESTS",
    "ReportConfig",
    "canary_outcome",
    "radioactivity_outcome",
    "render_html",
    "run_report",
    "verdict",
]
