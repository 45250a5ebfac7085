"""``distillguard forensics report``: every test of a suspect in one verdict, evidence.json and
report.html (registered on the forensics group in ``cli/__init__``: importing it from
``cli/forensics`` would be an import cycle, since it reuses that module's prompt and secret
readers)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from distillguard.cli.common import console, err_console
from distillguard.errors import ConfigError


def report_command(  # noqa: PLR0913 - one option per input of the report
    suspect: str = typer.Option(
        ..., "--suspect", "-s", help="the suspect: a model spec/dir or an OpenAI-compatible URL"
    ),
    teacher: str | None = typer.Option(
        None, "--teacher", "-t", help="the teacher: a model spec/dir or an OpenAI-compatible URL"
    ),
    controls: list[str] = typer.Option(
        [],
        "--controls",
        "-c",
        help="a model known not to be distilled from the teacher (spec/dir or URL); repeat it "
        "(none given: the default controls)",
    ),
    default_controls: bool = typer.Option(
        True,
        help="with no --controls: the suspect's untrained student and the same student trained "
        "on ShareGPT answers (read from the suspect's train_summary.json; the trained one is "
        "built once, ~16 CPU steps, and cached)",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="folder for evidence.json and report.html"),
    ledger: str | None = typer.Option(
        None,
        "--ledger",
        help="the provider's ledger (a file path, sqlite:///FILE or postgresql+psycopg://...): "
        "radioactivity and canaries need it",
    ),
    secret: str | None = typer.Option(
        None,
        envvar="DISTILLGUARD_WATERMARK_SECRET",
        help="master watermark secret (radioactivity and canaries need it)",
    ),
    secret_file: Path | None = typer.Option(None, help="file holding the master secret"),
    tests: str = typer.Option(
        "identity,similarity,radioactivity,canaries", help="comma-separated tests to run"
    ),
    probes: Path | None = typer.Option(
        None, help="identity probes, one per line (default: the 48 bundled paraphrases)"
    ),
    teacher_names: list[str] = typer.Option(
        [],
        "--teacher-names",
        help="names that are the teacher's identity (default: those the teacher uses itself)",
    ),
    prompts: str = typer.Option(
        "sharegpt",
        help="similarity and radioactivity prompts: FILE.txt (one per line), "
        ".jsonl/.csv/.parquet, a datasets dir, or sharegpt",
    ),
    limit: int = typer.Option(32, help="number of prompts used"),
    max_tokens: int = typer.Option(32, help="tokens per greedy answer"),
    scheme: str = typer.Option("synthid", help="watermark scheme the server used"),
    decoys: int = typer.Option(49, help="canaries: decoy endings per canary"),
    null_keys: int = typer.Option(
        200,
        help="radioactivity on weights: wrong keys ranked beside the exact p (0 skips them; "
        "the verdict uses the exact p)",
    ),
    filter_data: Path | None = typer.Option(
        None,
        "--filter-data",
        help="radioactivity: JSONL of the suspected training data (or a ledger export) for the "
        "training-data n-gram filter; default with --ledger: each account's served answers "
        "(green-list schemes; SynthID runs unfiltered and says why)",
    ),
    alpha: float = typer.Option(1e-3, help="significance level of the verdict, after Holm"),
    seed: int = typer.Option(0, help="seed of the permutation test and of sampling"),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    api_key: str | None = typer.Option(
        None, envvar="DISTILLGUARD_SUSPECT_API_KEY", help="bearer key for the URLs given"
    ),
    as_json: bool = typer.Option(False, "--json", help="print evidence.json's verdict as JSON"),
) -> None:
    """Run every test that can run on a suspect, against controls, and write one report.

    identity: does it claim the teacher's identity? similarity: does it answer like the teacher,
    more than the controls? radioactivity and canaries (with --ledger and the secret): did it
    learn the per-account watermark, the served canaries? Each test gives its statistic, its
    p-value and whether it could run; the verdict is Holm over the tests that ran, and says
    "distilled" only where the suspect is above every control. Exit code 0 either way. With no
    --controls, a suspect trained by `distill train` is compared with its untrained student and
    the same student trained on ShareGPT answers (built once, cached).

    Examples:

      distillguard forensics report --suspect ./student --teacher smollm2 --out report/

      distillguard forensics report -s http://suspect:8000/v1 -t smollm2 -c ./control --ledger ledger.db --out r/
    """
    from distillguard.cli.forensics import master_secret, read_prompts
    from distillguard.forensics.report import ReportConfig, run_report

    names = tuple(t.strip() for t in tests.split(",") if t.strip())
    wants_ledger = {"radioactivity", "canaries"} & set(names)
    if filter_data is not None and not filter_data.is_file():
        raise ConfigError(f"no such filter data file: {filter_data} (--filter-data: a JSONL file)")
    if ledger and "://" not in ledger and not Path(ledger).expanduser().is_file():
        raise ConfigError(f"no such ledger file: {ledger} (pass a path or a database URL)")
    key = (
        master_secret(secret, secret_file)
        if wants_ledger and ledger and (secret or secret_file)
        else None
    )
    probe_list = None
    if probes is not None:
        if not probes.is_file():
            raise ConfigError(f"no such probes file: {probes}")
        from distillguard.jsonl import read_text_lines

        probe_list = read_text_lines(probes)
        if not probe_list:
            raise ConfigError(f"no probes in {probes}")
    config = ReportConfig(
        suspect=suspect,
        teacher=teacher,
        controls=tuple(controls),
        default_controls=default_controls,
        tests=names,
        ledger=ledger,
        probes=str(probes) if probes else None,
        teacher_names=tuple(teacher_names),
        prompts=prompts,
        limit=limit,
        max_tokens=max_tokens,
        scheme=scheme,
        decoys=decoys,
        null_keys=null_keys,
        filter_data=str(filter_data) if filter_data else None,
        alpha=alpha,
        seed=seed,
        device=device,
        secret_given=key is not None,
    )
    needs_prompts = {"similarity", "radioactivity"} & set(names)
    prompt_list = read_prompts(prompts, limit) if needs_prompts else []
    with err_console.status("forensics report ...") as status:
        evidence = run_report(
            config,
            out,
            secret=key,
            api_key=api_key,
            identity_probes=probe_list,
            prompts=prompt_list,
            progress=lambda msg: status.update(msg),
        )
    if as_json:
        keys = ("verdict", "combined_p", "alpha", "p_holm", "significant_tests")
        print(json.dumps({k: evidence[k] for k in keys if k in evidence}))
        return
    for t in evidence["tests"]:
        if t["could_run"]:
            console.print(
                f"{t['name']}: {t['statistic']:.3g} ({t['statistic_name']}), p {t['p_value']:.3g}, "
                f"Holm {t['p_holm']:.3g}; controls: "
                + (", ".join(f"{v:.3g}" for v in t["controls"].values()) or "-")
            )
        else:
            console.print(f"{t['name']}: could not run: {t['why_not']}")
    defaults = evidence["default_controls"]
    if defaults["used"]:
        for c in evidence["controls"]:
            if c["default"]:
                console.print(f"default control ({c['kind']}): {c['spec']}")
    elif not controls:
        console.print(f"no default controls: {defaults['why_not']}")
    combined = evidence["combined_p"]
    console.print(
        f"verdict: [bold]{evidence['verdict']}[/]"
        + (f" (combined p {combined:.3g}, alpha {alpha})" if combined is not None else "")
    )
    console.print(f"wrote {out / 'evidence.json'} and {out / 'report.html'}")
