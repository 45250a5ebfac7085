"""Detection vs quality of the watermark on the bundled teacher, all schemes side by side in one run.

Answers: ``--prompts`` real ShareGPT first prompts (the first ones in file order, skipping very
long ones and duplicates), temperature 0.7, up to ``--max-new-tokens`` (128) tokens, generated
in-process by transformers' batched ``generate`` (``--batch`` prompts of similar length at a
time, left-padded) with the watermark as a logits processor (``WatermarkLogitsProcessor``, δ
added before the temperature as in the serve engine; SynthID's tournament after it). Every
configuration uses the same seed per batch (common random numbers). Each (configuration, batch)
is cached in ``--cache-dir``: the unwatermarked answers are generated once, a rerun with more
configurations generates only those, and ``--cached-only`` scores what an interrupted run left.
(The previous version went through the serve ``Engine``; its README run made ~6.4 tokens/s on the
shared 2-core machine, this one ~20-25 tokens/s under a similar load; not a controlled comparison.)

``--grid`` (the issue-4 comparison), generated in this order:

- ``baseline``                              no watermark,
- ``lefthash-ref d=2``                      the reference scheme (``--deltas``),
- ``keyed-hash d=2.25 min_entropy=1.25``    the shipped default, then ``synthid depth=30`` (SynthID-Text
                                            tournament sampling, ``watermark.synthid``) and
                                            ``keyed-hash g=0.5 d=2`` (γ = 0.5, ``--half-deltas``),
- the rest of ``--keyed-deltas`` x ``--keyed-min-entropy``, nearest the default first.

Without ``--grid`` (the older layout):

- ``baseline``                      no watermark,
- ``lefthash-ref d=1..4``           the reference scheme (Kirchenbauer et al. LeftHash, its default key),
- ``keyed-hash d=1..4``             the default scheme (one account's key, its default min_entropy),
- ``... (default)``                 ``WatermarkParams()``, the green-list default of the Python API,
                                    added when not among the above,
- ``keyed-hash d=.. min_entropy=0`` the default biasing every position (unless ``--no-ungated``),

all with γ=0.25 (``--schemes``, ``--deltas`` choose). Each answer, truncated to 16/32/64/128 tokens, is scored alone against its
configuration's key, its prompt's n-grams excluded, by:

- ``plain``        the exact binomial test on every distinct pair (``detect_tokens``),
- ``teacher-llr``  the entropy-aware detector (``watermark.entropy``): the teacher's distribution
                   at each position gives the chosen token's probability of being green under the
                   watermark, and the pairs are weighted by its quantised log-likelihood ratio (0
                   where the embedder skipped the position); an exact weighted test,
- ``sweet-H>=τ``   SWEET: the binomial test on the positions whose teacher entropy is >= τ nats.

The weights depend on the text and the teacher, never on the key, so the p-values stay exact.
For ``synthid`` the same two names mean: ``plain`` the exact binomial(1/2) test on the g-values
of the distinct table indices the answer's 5-grams touch, ``teacher-llr`` the same weighted by
the teacher's 1 - Σp² at each position (``synthid.position_weights``).

Quality: perplexity of the 64-token answers under the unwatermarked teacher, exp(mean token
NLL). The teacher's statistics at each position are taken from the very logits the model
computed before watermarking (``StatsRecorder``, first in the processor list), which saves a
second pass; ``--check-stats N`` recomputes them for N answers with ``entropy.teacher_stats``
(the forward pass a detector runs on text it receives) and reports the largest difference.

False positives: the baseline answers are tested against every configuration's key and against
``--null-keys`` further random keys of the default; and ``--fpr-texts`` (1,000) real ChatGPT
answers from ShareGPT, 64 tokens each, against ``--fpr-keys`` (20) account keys, by the plain and
the teacher-llr detectors (``--only-fpr`` runs this part alone). The fraction below each α is
reported per detector with its 3σ sampling bound (the p-values are exact, and conservative when
discrete).

    python bench/watermark_quality.py --grid --deltas 2 --batch 48 --threads 1 --fpr-texts 0   # the README's run
    python bench/watermark_quality.py --grid --deltas 2 --batch 48 --threads 1 --fpr-texts 0 --cached-only
    python bench/watermark_quality.py --only-fpr --fpr-scheme synthid --fpr-plain-only --fpr-texts 1000 \
        --json bench/results/watermark_fpr_synthid.json
    python bench/watermark_quality.py --only-fpr --fpr-texts 1000 --fpr-keys 20 --json bench/results/watermark_fpr.json
    python bench/watermark_quality.py --quick             # 16 prompts, 64 tokens
    python bench/watermark_quality.py --prompts 32 --skip 96 --dump /tmp/pilot.pt   # held-out prompts
    python bench/watermark_quality.py --from-dump /tmp/pilot.pt                     # re-score only

Progress goes to stderr; one JSON object to stdout and to ``--json`` (bench/results/...), and a
plot of detection rate vs answer length to ``--plot``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _engine_jobs import sharegpt_prompts  # noqa: E402
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper  # noqa: E402

from distillguard.guard.gateway import GuardConfig  # noqa: E402
from distillguard.models.loader import load_model  # noqa: E402
from distillguard.watermark import WatermarkParams, account_key, detect_tokens, reference_key  # noqa: E402
from distillguard.watermark.entropy import (  # noqa: E402
    PositionStats,
    position_stats,
    teacher_stats,
    teacher_weights,
)
from distillguard.watermark.processor import WatermarkLogitsProcessor  # noqa: E402
from distillguard.watermark.synthid import (  # noqa: E402
    SynthIDParams,
    SynthIDTopK,
    depth_weights,
    detect_synthid,
    layer_weights,
    position_weights,
    processor_for,
)

console = Console(stderr=True)
SERVED = GuardConfig.model_fields["watermark_scheme"].default  # the scheme distillguard serve uses
HERE = Path(__file__).resolve().parent
SECRET = b"bench-watermark-quality"
ALPHA = 1e-3
TEMPERATURE = 0.7
GAMMA = 0.25


# ---- generation -----------------------------------------------------------------------------

STAT_FIELDS = ("entropy", "nll", "token_prob", "collision")


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    scheme: str | None  # None: no watermark; "synthid": tournament sampling (watermark.synthid)
    delta: float = 0.0
    min_entropy: float | None = None  # None: the scheme's default
    gamma: float = GAMMA
    depth: int = 30  # synthid's tournament layers

    @property
    def params(self) -> WatermarkParams:
        if (
            self.scheme == "synthid"
        ):  # only its key derivation is shared with the green-list schemes
            return WatermarkParams(gamma=0.5, delta=0.0)
        return WatermarkParams(
            scheme=self.scheme, gamma=self.gamma, delta=self.delta, min_entropy=self.min_entropy
        )

    @property
    def synthid(self) -> SynthIDParams:
        return SynthIDParams(depth=self.depth)

    def key(self):
        if self.scheme is None:
            return None
        if self.scheme == "lefthash-ref":
            return reference_key(self.params)  # the reference implementation's default hash key
        return account_key(SECRET, "bench-account", self.params)


def configs_for(deltas, schemes, ungated: bool) -> list[Config]:
    """The baseline, each scheme at each δ (the scheme's default min_entropy), and the shipped
    default (``WatermarkParams()``, what ``distillguard serve`` uses) when not among them."""
    out = [Config("baseline", None)]
    for scheme in schemes:
        out += [Config(f"{scheme} d={d:g}", scheme, float(d)) for d in deltas]
    default = WatermarkParams()
    if not any(
        c.scheme == default.scheme and c.params == dataclasses.replace(default, gamma=GAMMA)
        for c in out
    ):
        out.append(
            Config(
                f"{default.scheme} d={default.delta:g} min_entropy={default.min_entropy:g} (default)",
                default.scheme,
                default.delta,
                default.min_entropy,
            )
        )
    if ungated and "keyed-hash" in schemes:
        # the default scheme as it was before min_entropy: every position biased
        out.append(
            Config(
                f"keyed-hash d={default.delta:g} min_entropy=0", "keyed-hash", default.delta, 0.0
            )
        )
    return out


def grid_configs(args) -> list[Config]:
    """``--grid``: the issue-4 comparison. The reference at ``--deltas``; keyed-hash γ=0.25 at
    every δ x min_entropy of ``--keyed-deltas`` x ``--keyed-min-entropy``; keyed-hash γ=0.5 at
    ``--half-deltas`` (min_entropy 1.25); SynthID tournament sampling at ``--synthid-depths``."""
    out = [Config("baseline", None)]
    out += [Config(f"lefthash-ref d={d:g}", "lefthash-ref", d) for d in args.deltas]
    keyed = [
        Config(f"keyed-hash d={d:g} min_entropy={h:g}", "keyed-hash", d, h)
        for d in args.keyed_deltas
        for h in args.keyed_min_entropy
    ]
    half = [
        Config(f"keyed-hash g=0.5 d={d:g} min_entropy=1.25", "keyed-hash", d, 1.25, gamma=0.5)
        for d in args.half_deltas
    ]
    synthid = [Config(f"synthid depth={m}", "synthid", depth=m) for m in args.synthid_depths]
    # Order of generation (an interrupted run keeps whole configurations): the shipped default,
    # then one of each alternative, then the rest of the grid, nearest the default first.
    d0 = WatermarkParams()
    keyed.sort(
        key=lambda c: (abs(c.delta - d0.delta) + abs(c.min_entropy - d0.min_entropy), -c.delta)
    )
    out += keyed[:1] + synthid[:1] + half[:1] + keyed[1:] + synthid[1:] + half[1:]
    default = dataclasses.replace(WatermarkParams(), gamma=GAMMA)
    for i, c in enumerate(out):
        if c.scheme == default.scheme and c.params == default:
            out[i] = dataclasses.replace(c, name=c.name + " (default)")
        if (
            SERVED == "synthid"
            and c.scheme == "synthid"
            and c.depth == WatermarkParams(scheme="synthid").synthid.depth
        ):
            out[i] = dataclasses.replace(c, name=c.name + " (served)")
    return out


def default_config(configs: list[Config]) -> Config | None:
    """The configuration ``distillguard serve`` uses (SynthID with its default depth), else the
    one with the green-list default parameters (γ as in this bench)."""
    served = next((c for c in configs if c.name.endswith("(served)")), None)
    if served is not None:
        return served
    want = dataclasses.replace(WatermarkParams(), gamma=GAMMA)
    return next((c for c in configs if c.scheme == want.scheme and c.params == want), None)


class StatsRecorder(LogitsProcessor):
    """First in the processor list: records the unwatermarked teacher's statistics of every
    step (``entropy.position_stats`` of the raw logits, at the token that was then chosen, which
    the next call sees as the last input id). Returns the scores unchanged."""

    def __init__(self):
        self.prev: torch.Tensor | None = None
        self.steps: list[PositionStats] = []
        self.calls = 0

    def _flush(self, chosen: torch.Tensor) -> None:
        self.steps.append(position_stats(self.prev, chosen, temperature=TEMPERATURE))

    def __call__(self, input_ids, scores):
        if self.prev is not None:
            self._flush(input_ids[:, -1])
        self.prev = scores.float().clone()
        self.calls += 1
        return scores

    def finish(self, last: torch.Tensor) -> dict[str, torch.Tensor]:
        self._flush(last)
        return {
            f: torch.stack([getattr(s, f) for s in self.steps], dim=1) for f in STAT_FIELDS
        }  # (B, steps)


def processors_for(cfg: Config, recorder: StatsRecorder) -> LogitsProcessorList:
    """The same order as the serve engine: a green-list bias is added before the temperature;
    the tournament acts on the tempered distribution that is sampled."""
    procs: list = [recorder]
    key = cfg.key()
    if cfg.scheme in ("keyed-hash", "lefthash-ref"):
        procs.append(WatermarkLogitsProcessor(key))
    procs.append(TemperatureLogitsWarper(TEMPERATURE))
    if cfg.scheme == "synthid":
        procs.append(SynthIDTopK(key.hash_key, cfg.synthid))
    return LogitsProcessorList(procs)


def _cache_path(args, prompts, cfg: Config, batch_index: int) -> Path:
    ident = json.dumps(
        [
            args.model,
            [p.conversation_id for p in prompts],
            args.max_new_tokens,
            args.seed,
            "by-length",
            args.batch,
            batch_index,
            dataclasses.asdict(cfg) | {"name": None},
            TEMPERATURE,
            2,
        ]
    )
    return args.cache_dir / (hashlib.sha256(ident.encode()).hexdigest()[:24] + ".pt")


@torch.inference_mode()
def generate_batch(lm, prompts, cfg: Config, seed: int, max_new_tokens: int) -> list[dict]:
    """HF ``generate`` on left-padded prompts; answers cut at the first end-of-turn token."""
    width = max(len(p.ids) for p in prompts)
    pad = lm.tokenizer.pad_token_id or 0
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p.ids) :] = torch.tensor(p.ids)
        mask[b, width - len(p.ids) :] = 1
    recorder = StatsRecorder()
    torch.manual_seed(seed)  # the same seed for every configuration: common random numbers
    out = lm.model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        logits_processor=processors_for(cfg, recorder),
        pad_token_id=pad,
        eos_token_id=sorted(lm.eos_token_ids),
    )
    gen = out[:, width:]
    stats = recorder.finish(gen[:, -1])
    assert stats["nll"].shape[1] == gen.shape[1]
    answers = []
    for b in range(len(prompts)):
        row = gen[b].tolist()
        end = next((i for i, t in enumerate(row) if t in lm.eos_token_ids), len(row))
        answers.append(
            {
                "tokens": row[:end],
                **{f: stats[f][b, :end].tolist() for f in STAT_FIELDS},
                "finish_reason": "stop" if end < len(row) else "length",
                "text": lm.tokenizer.decode(row[:end]),
            }
        )
    return answers


def prompt_batches(prompts, size: int) -> list[list[int]]:
    """Prompt indices in generation batches: sorted by length, ``size`` at a time."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].ids))
    return [order[i : i + size] for i in range(0, len(order), size)]


def generate(lm, prompts, configs, args) -> dict:
    """Every configuration on every batch of ``--batch`` prompts (prompts grouped by length, which
    saves most of the padding), one configuration after the other in the order given, so that
    an interrupted run leaves whole configurations behind. Each (configuration, batch) is cached
    in ``--cache-dir``, keyed by everything that determines it: a rerun with more configurations
    generates only the new ones, and the unwatermarked answers are made once."""
    batches = prompt_batches(prompts, args.batch)[: args.first_batches]
    answers = {c.name: [None] * len(prompts) for c in configs}
    per_config_s = {c.name: 0.0 for c in configs}
    cached = 0
    t0 = time.perf_counter()
    with Progress(
        TextColumn("generating {task.fields[what]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("gen", total=len(batches) * len(configs), what="")
        for cfg in configs:
            for bi, batch in enumerate(batches):
                progress.update(task, what=f"{cfg.name}, batch {bi + 1}/{len(batches)}")
                path = _cache_path(args, prompts, cfg, bi)
                if path.exists():
                    got = torch.load(path, weights_only=False)
                    cached += 1
                else:
                    t, c = time.perf_counter(), time.process_time()
                    got = generate_batch(
                        lm,
                        [prompts[i] for i in batch],
                        cfg,
                        args.seed + 7919 * bi,
                        args.max_new_tokens,
                    )
                    per_config_s[cfg.name] += time.perf_counter() - t
                    path.parent.mkdir(parents=True, exist_ok=True)
                    torch.save(got, path)
                    if not console.is_terminal:
                        console.print(
                            f"{cfg.name}, batch {bi + 1}/{len(batches)}: {time.perf_counter() - t:.0f} s wall, "
                            f"{time.process_time() - c:.0f} s CPU ({time.perf_counter() - t0:.0f} s in all)"
                        )
                for i, a in zip(batch, got):
                    answers[cfg.name][i] = a
                progress.advance(task)
    wall = time.perf_counter() - t0
    tokens = sum(len(a["tokens"]) for v in answers.values() for a in v)
    return {
        "answers": answers,
        "generation_wall_s": round(wall, 1),
        "generated_tokens": tokens,
        "generation_s_per_config": {k: round(v, 1) for k, v in per_config_s.items()},
        "cached_batches": cached,
    }


# ---- detectors --------------------------------------------------------------------------------


def detector_specs(args) -> list[tuple[str, dict]]:
    specs = [("plain", {}), ("teacher-llr", {"kind": "llr"})]
    specs += [(f"sweet-H>={t:g}", {"kind": "sweet", "threshold": t}) for t in args.sweet]
    # SynthID only: weights per (position, tournament layer), synthid.depth_weights (by layer,
    # no teacher) and synthid.layer_weights (the teacher's expected lift of each layer)
    specs += [
        ("layers", {"kind": "layers", "synthid_only": True}),
        ("teacher-layers", {"kind": "teacher-layers", "synthid_only": True}),
    ]
    return specs


def specs_for(specs, sid) -> list[tuple[str, dict]]:
    return [(n, s) for n, s in specs if sid is not None or not s.get("synthid_only")]


_WEIGHTS: dict[tuple, list[int] | None] = {}


def token_weights(
    answer: dict, spec: dict, params: WatermarkParams, levels: int
) -> list[int] | None:
    """One weight per answer token for the detector ``spec`` (None: the plain test); cached,
    since the false-positive check tests every answer under hundreds of keys."""
    kind = spec.get("kind")
    if kind is None:
        return None
    cache_key = (id(answer), kind, spec.get("threshold"), params, levels)
    if cache_key not in _WEIGHTS:
        if (
            kind == "sweet"
        ):  # SWEET: score the positions where the teacher's entropy reaches the threshold
            _WEIGHTS[cache_key] = [int(h >= spec["threshold"]) for h in answer["entropy"]]
        else:
            stats = PositionStats(**{f: torch.tensor(answer[f]) for f in STAT_FIELDS})
            _WEIGHTS[cache_key] = teacher_weights(
                params, stats, temperature=TEMPERATURE, levels=levels
            )
    return _WEIGHTS[cache_key]


_SYNTHID_PROCS: dict = {}


def detect_one(
    key,
    answer: dict,
    prompt_ids,
    length: int,
    spec: dict,
    args,
    synthid: SynthIDParams | None = None,
):
    """One answer, truncated to ``length`` tokens, scored alone against ``key``; its prompt's n-grams
    excluded. ``synthid``: the key is a SynthID one (tournament g-values, ``detect_synthid``); its
    entropy-aware weights are ``synthid.position_weights`` (the teacher's 1 - Σp² per position)."""
    toks = answer["tokens"][:length]
    if synthid is not None:
        pk = (key.hash_key, synthid)
        if pk not in _SYNTHID_PROCS:
            from distillguard.watermark.synthid import processor_for

            _SYNTHID_PROCS[pk] = processor_for(key.hash_key, synthid)
        w = None
        if spec.get("kind") == "sweet":
            w = [[int(h >= spec["threshold"]) for h in answer["entropy"][:length]]]
        elif spec.get("kind") == "layers":
            w = [depth_weights(len(toks), synthid.depth, args.levels)]
        elif spec.get("kind") == "teacher-layers":
            ck = (id(answer), "synthid-layers", args.layer_levels, synthid.depth)
            if ck not in _WEIGHTS:
                _WEIGHTS[ck] = layer_weights(
                    torch.tensor(answer["collision"]), synthid.depth, args.layer_levels
                )
            w = [_WEIGHTS[ck][:length]]
        elif spec.get("kind") is not None:
            ck = (id(answer), "synthid", args.levels)
            if ck not in _WEIGHTS:
                _WEIGHTS[ck] = position_weights(torch.tensor(answer["collision"]), args.levels)
            w = [_WEIGHTS[ck][:length]]
        return detect_synthid(
            key, [toks], [prompt_ids], params=synthid, weights=w, proc=_SYNTHID_PROCS[pk]
        )
    w = token_weights(answer, spec, key.params, args.levels)
    return detect_tokens(
        key,
        [toks],
        prompt_seqs=[prompt_ids],
        vocab_size=args.vocab,
        weights=None if w is None else [w[:length]],
    )


def perplexity(answers: list[dict], length: int) -> float:
    nll = [x for a in answers for x in a["nll"][:length]]
    return math.exp(statistics.fmean(nll)) if nll else float("nan")


def analyse(data: dict, prompts, configs, args) -> dict:
    lengths = [n for n in (16, 32, 64, 128) if n <= args.max_new_tokens]
    specs = detector_specs(args)
    out = {}
    for cfg in configs:
        answers = data["answers"][cfg.name]
        lens = [len(a["tokens"]) for a in answers]
        row = {
            "scheme": cfg.scheme or "none",
            "delta": cfg.delta,
            "min_entropy": cfg.params.min_entropy if cfg.scheme else None,
            "perplexity_64": round(perplexity(answers, 64), 3),
            "perplexity_full": round(perplexity(answers, args.max_new_tokens), 3),
            "mean_entropy_64": round(
                statistics.fmean(h for a in answers for h in a["entropy"][:64]), 3
            ),
            "answer_tokens_mean": round(statistics.fmean(lens), 1),
            "answers_reaching": {str(n): sum(x >= n for x in lens) for n in lengths},
        }
        key = cfg.key()
        sid = cfg.synthid if cfg.scheme == "synthid" else None
        if sid is not None:
            row["synthid"] = dataclasses.asdict(sid)
        if cfg.scheme == "keyed-hash":
            row["gamma"] = cfg.gamma
        if key is not None:
            row["detected"] = {}
            row["detected_64_among_answers_reaching_64"] = {}
            row["median_log10_p_64"] = {}
            row["mean_scored_64"] = {}
            for name, spec in specs_for(specs, sid):
                rates = {}
                for n in lengths:
                    dets = [
                        detect_one(key, a, prompts[i].ids, n, spec, args, sid)
                        for i, a in enumerate(answers)
                    ]
                    rates[str(n)] = round(sum(d.p_value < ALPHA for d in dets) / len(dets), 4)
                    if n == 64:
                        row["median_log10_p_64"][name] = round(
                            statistics.median(d.log10_p for d in dets), 2
                        )
                        row["mean_scored_64"][name] = round(
                            statistics.fmean(d.scored for d in dets), 1
                        )
                        full = [d for d, x in zip(dets, lens) if x >= 64]
                        row["detected_64_among_answers_reaching_64"][name] = (
                            round(sum(d.p_value < ALPHA for d in full) / len(full), 4)
                            if full
                            else None
                        )
                row["detected"][name] = rates
        out[cfg.name] = row
        console.print(f"scored {cfg.name}")
    base_ppl = out["baseline"]["perplexity_64"]
    for row in out.values():
        row["perplexity_cost_pct"] = round(100 * (row["perplexity_64"] / base_ppl - 1), 1)
    return out


def false_positives(data: dict, prompts, configs, args) -> dict:
    """Baseline (unwatermarked) answers against every configuration's key and ``--null-keys``
    random keyed-hash keys, 64 tokens: the fraction of p-values below each α, per detector."""
    specs = detector_specs(args)
    answers = data["answers"]["baseline"]
    out = {}
    green = [(c.key(), None) for c in configs if c.scheme not in (None, "synthid")]
    green += [
        (account_key(SECRET, f"null-{i}", WatermarkParams(gamma=GAMMA)), None)
        for i in range(args.null_keys)
    ]
    families = [
        ("green-list", green)
    ]  # each configuration's own key, then random keys of the default scheme
    for c in configs:
        if c.scheme == "synthid":
            sk = [(c.key(), c.synthid)] + [
                (account_key(SECRET, f"null-{i}", c.params), c.synthid)
                for i in range(args.null_keys)
            ]
            families.append((c.name, sk))
    for family, keys in families:
        fam = {
            "tests_per_detector": len(keys) * len(answers),
            "keys": len(keys),
            "answers": len(answers),
        }
        for name, spec in specs_for(specs, keys[0][1]):
            ps = [
                detect_one(k, a, prompts[i].ids, 64, spec, args, sid).p_value
                for k, sid in keys
                for i, a in enumerate(answers)
            ]
            fam[name] = {
                f"p<{a:g}": round(sum(p < a for p in ps) / len(ps), 5)
                for a in (0.1, 0.05, 0.01, 1e-3)
            }
            fam[name]["mean_p"] = round(statistics.fmean(ps), 4)
        out[family] = fam
        console.print(f"scored the baseline against the null keys ({family})")
    return out


def sharegpt_false_positives(lm, args) -> dict:
    """Real ChatGPT answers from ShareGPT (never watermarked by us): the first ``--fpr-texts``
    first answers, 64 tokens each, after their own prompt, tested alone against ``--fpr-keys``
    account keys of the default scheme, by the plain and the teacher-llr detectors. The
    empirical fraction below α must stay within sampling error of α (upper bound: α + 3σ)."""
    from distillguard.data import iter_conversations

    params = WatermarkParams()
    texts, prompts = [], []
    for conv in iter_conversations():
        if conv.first_prompt is None or not conv.first_answer:
            continue
        ans = lm.tokenizer.encode(conv.first_answer[:2000], add_special_tokens=False)[:64]
        if len(ans) < 16:
            continue
        # the teacher's context: the chat prompt, its last tokens when long (weights need
        # only some context, and never depend on the key)
        prompts.append(
            lm.chat_ids([{"role": "user", "content": conv.first_prompt[:4000]}])[
                -args.fpr_prompt_tokens :
            ]
        )
        texts.append(ans)
        if len(texts) == args.fpr_texts:
            break
    keys = [account_key(SECRET, f"fpr-{i}", params) for i in range(args.fpr_keys)]
    sid = SynthIDParams(depth=args.fpr_synthid_depth) if args.fpr_scheme == "synthid" else None
    progress = Progress(
        TextColumn("teacher pass over ShareGPT answers"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
    )
    weights, layered = [], []
    detectors = (
        (("plain", False),) if args.fpr_plain_only else (("plain", False), ("teacher-llr", True))
    )
    if sid:
        detectors += (("layers", "layers"),) + (
            () if args.fpr_plain_only else (("teacher-layers", "teacher-layers"),)
        )
    if args.fpr_detectors:
        detectors = tuple(d for d in detectors if d[0] in args.fpr_detectors.split(","))
    with progress if not args.fpr_plain_only else contextlib.nullcontext():
        task = progress.add_task("fpr", total=len(texts))
        for start in range(0, len(texts) if not args.fpr_plain_only else 0, 16):
            stats = teacher_stats(
                lm.model,
                prompts[start : start + 16],
                texts[start : start + 16],
                temperature=TEMPERATURE,
                pad_id=lm.tokenizer.pad_token_id or 0,
                batch_size=16,
            )
            weights += [
                position_weights(st.collision, args.levels)
                if sid
                else teacher_weights(params, st, temperature=TEMPERATURE, levels=args.levels)
                for st in stats
            ]
            if sid:
                layered += [
                    layer_weights(st.collision, sid.depth, args.layer_levels) for st in stats
                ]
            progress.advance(task, len(stats))
            if not console.is_terminal and (start // 16) % 16 == 15:
                console.print(f"teacher pass: {start + 16}/{len(texts)} ShareGPT answers")
    out = {
        "texts": len(texts),
        "keys": len(keys),
        "tokens_per_text_mean": round(statistics.fmean(map(len, texts)), 1),
        "scheme": dataclasses.asdict(sid) | {"scheme": "synthid"}
        if sid
        else dataclasses.asdict(params),
    }
    weights = weights or [None] * len(texts)
    for name, use_w in detectors:
        if sid:
            procs = {k.hash_key: processor_for(k.hash_key, sid) for k in keys}
            ws = (
                layered
                if use_w == "teacher-layers"
                else [depth_weights(len(t), sid.depth, args.levels) for t in texts]
                if use_w == "layers"
                else weights
            )
            dets = [
                [
                    detect_synthid(
                        k,
                        [t],
                        [p],
                        params=sid,
                        weights=[w] if use_w else None,
                        proc=procs[k.hash_key],
                    )
                    for t, p, w in zip(texts, prompts, ws)
                ]
                for k in keys
            ]
        else:
            dets = [
                [
                    detect_tokens(
                        k,
                        [t],
                        prompt_seqs=[p],
                        vocab_size=args.vocab,
                        weights=[w] if use_w else None,
                    )
                    for t, p, w in zip(texts, prompts, weights)
                ]
                for k in keys
            ]
        ps = [d.p_value for row in dets for d in row]
        n = len(ps)
        row = {"tests": n}
        for a in (1e-3, 1e-2, 5e-2):
            rate = sum(p < a for p in ps) / n
            bound = a + 3 * math.sqrt(a * (1 - a) / n)
            row[f"p<{a:g}"] = {
                "rate": round(rate, 5),
                "bound_3sigma": round(bound, 5),
                "within": rate <= bound,
            }
        mean_z = [statistics.fmean(d.z for d in r) for r in dets]
        row["mean_z_per_key"] = {
            "min": round(min(mean_z), 3),
            "max": round(max(mean_z), 3),
            "sd_expected": round(1 / math.sqrt(len(texts)), 3),
        }
        out[name] = row
    console.print("scored the ShareGPT answers against the null keys")
    return out


def check_stats(lm, data: dict, prompts, configs, n: int) -> dict:
    """Recompute the recorded statistics of ``n`` answers with ``entropy.teacher_stats`` (one
    forward pass over prompt + answer, as a detector does): the largest absolute differences."""
    cfg = default_config(configs) or next(
        c for c in configs if c.scheme in ("keyed-hash", "lefthash-ref")
    )
    answers = data["answers"][cfg.name][:n]
    stats = teacher_stats(
        lm.model,
        [prompts[i].ids for i in range(len(answers))],
        [a["tokens"] for a in answers],
        temperature=TEMPERATURE,
        pad_id=lm.tokenizer.pad_token_id or 0,
    )
    diff = dict.fromkeys(STAT_FIELDS, 0.0)
    weights_equal = True
    for a, s in zip(answers, stats):
        for f in STAT_FIELDS:
            diff[f] = max(diff[f], float((getattr(s, f) - torch.tensor(a[f])).abs().max()))
        recorded = PositionStats(**{f: torch.tensor(a[f]) for f in STAT_FIELDS})
        weights_equal &= teacher_weights(cfg.params, s, temperature=TEMPERATURE) == teacher_weights(
            cfg.params, recorded, temperature=TEMPERATURE
        )
    return {
        "answers": len(answers),
        "config": cfg.name,
        "max_abs_diff": {k: float(f"{v:.3g}") for k, v in diff.items()},
        "teacher_llr_weights_identical": weights_equal,
    }


# ---- report -----------------------------------------------------------------------------------

# The issue's reference curve (lefthash-ref, plain detector, 64 tokens, measured on this machine):
# δ -> (perplexity, detected); baseline perplexity 3.56.
ISSUE_REFERENCE = {1: (3.94, 0.33), 2: (4.80, 0.84), 3: (6.79, 0.99), 4: (9.54, 1.00)}
ISSUE_REFERENCE_BASELINE = 3.56


def _family(row: dict) -> str:
    if row["scheme"] == "keyed-hash" and row.get("gamma", GAMMA) != GAMMA:
        return f"keyed-hash γ={row['gamma']:g}"
    return row["scheme"]


def plot(results: dict, detectors: list[str], path: Path) -> None:
    """Detection rate vs answer length per detector (every configuration), and detection of
    64-token answers vs perplexity cost (the trade-off) for both detectors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(detectors) + 1, figsize=(6.5 * (len(detectors) + 1), 5.2), squeeze=False
    )
    axes = axes[0]
    colors = {
        "lefthash-ref": "black",
        "keyed-hash": "tab:blue",
        "keyed-hash γ=0.5": "tab:green",
        "synthid": "tab:red",
    }
    rows = {n: r for n, r in results.items() if "detected" in r}
    for ax, det in zip(axes, detectors):
        for name, row in rows.items():
            served = "(served)" in name
            # SynthID rows: the layer-weighted detector (the served one) bold, the unweighted thin
            variants = [(det, False)] + (
                [(LAYERED[det], True)] if LAYERED.get(det) in row["detected"] else []
            )
            for d, layered in variants:
                rates = row["detected"][d]
                xs = [int(n) for n in rates]
                bold = served and (layered or len(variants) == 1)
                ax.plot(
                    xs,
                    [100 * rates[str(x)] for x in xs],
                    "-" if bold or row["scheme"] != "keyed-hash" else ":",
                    marker="o",
                    ms=3,
                    lw=2.5 if bold else 1,
                    color=colors.get(_family(row), "tab:purple"),
                    alpha=1 if bold or row["scheme"] != "synthid" else 0.5,
                    label=f"{name}{' ' + d if layered else ''} (ppl {row['perplexity_cost_pct']:+.0f}%)",
                )
        ax.axhline(95, color="gray", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xticks([16, 32, 64, 128], labels=["16", "32", "64", "128"])
        ax.set_ylim(-2, 102)
        ax.set_xlabel("answer tokens")
        ax.set_ylabel(f"answers detected at p < {ALPHA:g} (%)")
        ax.set_title(f"detector: {det}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, loc="lower right")
    ax = axes[-1]
    for name, row in rows.items():
        for det, marker in zip(detectors, ("o", "s")):
            shown = (
                LAYERED[det] if LAYERED.get(det) in row["detected"] else det
            )  # SynthID: the served detectors
            y = 100 * row["detected"][shown].get("64", float("nan"))
            ax.scatter(
                row["perplexity_cost_pct"],
                y,
                marker=marker,
                s=40 if "(served)" in name else 18,
                facecolors=colors.get(_family(row), "tab:purple") if det != "plain" else "none",
                edgecolors=colors.get(_family(row), "tab:purple"),
            )
    for fam, c in colors.items():
        ax.scatter([], [], color=c, label=fam)
    ax.scatter([], [], marker="o", facecolors="none", edgecolors="gray", label="plain detector")
    ax.scatter([], [], marker="s", color="gray", label="entropy-aware detector")
    ax.scatter([], [], marker="", color="none", label="(synthid: its layer-weighted detectors)")
    ref = sorted(ISSUE_REFERENCE.items())
    base = ISSUE_REFERENCE_BASELINE
    ax.plot(
        [100 * (p / base - 1) for _, (p, _) in ref],
        [100 * d for _, (_, d) in ref],
        "x--",
        color="gray",
        lw=0.8,
        label="issue's reference curve (lefthash-ref, plain)",
    )
    ax.axvline(35, color="gray", lw=0.8, ls=":")
    ax.axhline(95, color="gray", lw=0.8, ls=":")
    ax.set_xlim(-5, 100)
    ax.set_xlabel("perplexity cost of 64-token answers (%; dotted: 35%)")
    ax.set_ylabel("64-token answers detected (%)")
    ax.set_ylim(-2, 102)
    ax.set_title("trade-off at 64 tokens (target: upper left of the dotted lines)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(
        "SmolLM2-135M-Instruct, 96 ShareGPT prompts, T=0.7, one 128-token run truncated to 16/32/64/128 tokens",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


LAYERED = {
    "plain": "layers",
    "teacher-llr": "teacher-layers",
}  # SynthID's layer-weighted counterparts


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompts", type=int, default=96, help="ShareGPT first prompts")
    ap.add_argument(
        "--skip",
        type=int,
        default=0,
        help="skip the first SKIP usable prompts (held-out pilot runs)",
    )
    ap.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=160,
        help="skip longer prompts (chat template included)",
    )
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--deltas", type=floats, default=[1.0, 2.0, 3.0, 4.0])
    ap.add_argument("--schemes", default="lefthash-ref,keyed-hash")
    ap.add_argument("--batch", type=int, default=16, help="engine rows generated together")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's choice)"
    )
    ap.add_argument(
        "--sweet",
        type=lambda s: [float(x) for x in s.split(",") if x],
        default=[],
        help="entropy thresholds (nats) of SWEET-style detectors, comma separated (empty: none)",
    )
    ap.add_argument(
        "--levels", type=int, default=8, help="weight levels of the teacher-llr detector"
    )
    ap.add_argument(
        "--layer-levels",
        type=int,
        default=16,
        help="weight levels of SynthID's teacher-layers detector",
    )
    ap.add_argument(
        "--no-ungated",
        action="store_true",
        help="leave out the extra keyed-hash δ=2 configuration with min_entropy=0 (every position biased)",
    )
    ap.add_argument(
        "--null-keys", type=int, default=200, help="extra random keys for the false-positive check"
    )
    ap.add_argument(
        "--fpr-texts",
        type=int,
        default=1000,
        help="real ShareGPT answers for the false-positive check (0: none)",
    )
    ap.add_argument(
        "--fpr-prompt-tokens",
        type=int,
        default=64,
        help="the teacher sees the last N prompt tokens before each ShareGPT answer (cost)",
    )
    ap.add_argument(
        "--only-fpr",
        action="store_true",
        help="only the ShareGPT false-positive check (no generation); JSON to --json",
    )
    ap.add_argument(
        "--fpr-keys",
        type=int,
        default=20,
        help="account keys each ShareGPT answer is tested against",
    )
    ap.add_argument(
        "--fpr-scheme",
        choices=("keyed-hash", "synthid"),
        default="keyed-hash",
        help="the scheme whose keys the ShareGPT answers are tested against",
    )
    ap.add_argument("--fpr-synthid-depth", type=int, default=30)
    ap.add_argument(
        "--fpr-detectors",
        default=None,
        help="ShareGPT check: only these detectors (comma separated, e.g. plain,teacher-layers)",
    )
    ap.add_argument(
        "--fpr-plain-only",
        action="store_true",
        help="ShareGPT check: the plain detector only (no teacher pass)",
    )
    ap.add_argument(
        "--grid",
        action="store_true",
        help="the issue-4 comparison (see grid_configs) instead of --schemes",
    )
    ap.add_argument("--keyed-deltas", type=floats, default=[2.0, 2.25, 2.5])
    ap.add_argument("--keyed-min-entropy", type=floats, default=[1.0, 1.25, 1.5])
    ap.add_argument(
        "--half-deltas", type=floats, default=[1.5, 2.0], help="keyed-hash γ=0.5 deltas in --grid"
    )
    ap.add_argument(
        "--synthid-depths", type=lambda s: [int(x) for x in s.split(",") if x], default=[30]
    )
    ap.add_argument(
        "--cache-dir",
        type=Path,
        default=Path.home() / ".cache" / "distillguard" / "watermark_quality",
        help="generations cached per (configuration, batch)",
    )
    ap.add_argument(
        "--only", default=None, help="regular expression: only the configurations it matches"
    )
    ap.add_argument(
        "--first-batches",
        type=int,
        default=None,
        help="only the first N generation batches (the shortest prompts): a partial run",
    )
    ap.add_argument(
        "--cached-only",
        action="store_true",
        help="only the configurations whose generations are all in --cache-dir (score an interrupted run)",
    )
    ap.add_argument(
        "--check-stats",
        type=int,
        default=8,
        help="answers whose statistics are recomputed by teacher_stats",
    )
    ap.add_argument("--quick", action="store_true", help="16 prompts, 64 tokens, 50 null keys")
    ap.add_argument(
        "--dump", type=Path, default=None, help="save the generations (tokens, statistics) here"
    )
    ap.add_argument(
        "--from-dump", type=Path, default=None, help="score saved generations instead of generating"
    )
    ap.add_argument("--json", type=Path, default=HERE / "results" / "watermark_quality.json")
    ap.add_argument("--plot", type=Path, default=HERE / "results" / "watermark_detection.png")
    ap.add_argument(
        "--plot-only", type=Path, default=None, help="redraw --plot from this result JSON and exit"
    )
    ap.add_argument(
        "--engine",
        choices=["local", "vllm"],
        default="local",
        help="vllm: the served scheme's detection rate through a real vLLM server with the "
        "plugin beside our engine, both behind `distillguard serve` (bench/_watermark_engines.py; "
        "--prompts, --engine-tokens; JSON to bench/results/watermark_quality_vllm.json)",
    )
    ap.add_argument("--engine-tokens", type=int, default=64, help="answer tokens with --engine")
    ap.add_argument(
        "--serve-threads",
        type=int,
        default=0,
        help="--engine vllm: torch threads of our engine's server (serve --threads; 0: one per "
        "core, 1 on a machine busy with other work)",
    )
    ap.add_argument(
        "--reference",
        type=Path,
        default=None,
        help="--engine vllm: take our engine's side from this earlier result on the same prompts "
        "instead of running it (a machine too loaded for both)",
    )
    ap.add_argument(
        "--vllm-url",
        default=None,
        help="--engine vllm: a vLLM server already started with the plugin",
    )
    args = ap.parse_args()
    if args.plot_only:
        plot(json.loads(args.plot_only.read_text())["results"], ["plain", "teacher-llr"], args.plot)
        return
    if args.quick:
        args.prompts, args.max_new_tokens, args.null_keys, args.fpr_texts = 16, 64, 50, 100
        args.check_stats = min(args.check_stats, 4)
    if args.threads:
        torch.set_num_threads(args.threads)

    t_start = time.perf_counter()
    lm = load_model(args.model)
    if args.engine == "vllm":
        from _watermark_engines import compare

        args.vocab = lm.vocab_size
        prompts = sharegpt_prompts(
            lm, args.prompts, skip=args.skip, max_prompt_tokens=args.max_prompt_tokens
        )
        result = compare(args, lm, prompts, SERVED, SECRET, ALPHA, detect_one)
        result["bench_wall_s"] = round(time.perf_counter() - t_start, 1)
        text = json.dumps(result, indent=2)
        print(text)
        if args.json == ap.get_default("json"):
            args.json = HERE / "results" / "watermark_quality_vllm.json"
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
        return
    if args.only_fpr:
        args.vocab = lm.vocab_size
        result = {
            "bench": "watermark_quality --only-fpr",
            "model": args.model,
            "temperature": TEMPERATURE,
            "alpha": ALPHA,
            "teacher_llr_levels": args.levels,
            "fpr_prompt_tokens": args.fpr_prompt_tokens,
            "false_positives_sharegpt_64": sharegpt_false_positives(lm, args),
            "bench_wall_s": round(time.perf_counter() - t_start, 1),
        }
        text = json.dumps(result, indent=2)
        print(text)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(text + "\n")
        return
    configs = (
        grid_configs(args)
        if args.grid
        else configs_for(args.deltas, args.schemes.split(","), ungated=not args.no_ungated)
    )
    if args.from_dump:
        data = torch.load(args.from_dump, weights_only=False)
        saved = data["args"]
        args.prompts, args.skip, args.max_new_tokens = (
            saved["prompts"],
            saved["skip"],
            saved["max_new_tokens"],
        )
        args.max_prompt_tokens, args.deltas = saved["max_prompt_tokens"], saved["deltas"]
        configs = [c for c in configs if c.name in data["answers"]]
    prompts = sharegpt_prompts(
        lm, args.prompts, skip=args.skip, max_prompt_tokens=args.max_prompt_tokens
    )
    console.print(
        f"{len(prompts)} prompts, {statistics.fmean(len(p.ids) for p in prompts):.0f} tokens on average; "
        f"{len(configs)} configurations"
    )
    if args.only:  # a subset of the configurations (the baseline always: it is the reference)
        configs = [c for c in configs if c.name == "baseline" or re.search(args.only, c.name)]
    if args.cached_only:  # score what an earlier (interrupted) run generated, nothing more
        n_batches = min(math.ceil(len(prompts) / args.batch), args.first_batches or 10**9)
        configs = [
            c
            for c in configs
            if all(_cache_path(args, prompts, c, b).exists() for b in range(n_batches))
        ]
        console.print(f"cached: {', '.join(c.name for c in configs)}")
    if not args.from_dump:
        data = generate(lm, prompts, configs, args)
        data["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        if args.first_batches:  # only the prompts of the first batches (the shortest ones)
            keep = sorted(
                i for b in prompt_batches(prompts, args.batch)[: args.first_batches] for i in b
            )
            prompts = [prompts[i] for i in keep]
            data["answers"] = {n: [a[i] for i in keep] for n, a in data["answers"].items()}
            console.print(
                f"scoring the {len(prompts)} prompts of the first {args.first_batches} batch(es) only"
            )
        if args.dump:
            args.dump.parent.mkdir(parents=True, exist_ok=True)
            torch.save(data, args.dump)
    t_score = time.perf_counter()
    args.vocab = lm.vocab_size
    results = analyse(data, prompts, configs, args)
    fpr = false_positives(data, prompts, configs, args)
    check = check_stats(lm, data, prompts, configs, args.check_stats) if args.check_stats else None
    sharegpt_fpr = sharegpt_false_positives(lm, args) if args.fpr_texts else None
    scoring = time.perf_counter() - t_score

    names = [n for n, _ in detector_specs(args)]
    default_cfg = default_config(configs)
    default_name = default_cfg.name if default_cfg else None
    default = results.get(default_name)
    targets = {}
    if default is not None:
        cost = default["perplexity_cost_pct"]
        for name in names:
            rate = default["detected"].get(name, {}).get("64")
            targets[name] = {
                "detected_64": rate,
                "perplexity_cost_pct": cost,
                "met": rate is not None and rate >= 0.95 and cost <= 35,
            }
    result = {
        "bench": "watermark_quality",
        "model": args.model,
        "prompts": len(prompts),
        "prompt_selection": {
            "skip": args.skip,
            "max_prompt_tokens": args.max_prompt_tokens,
            "mean_prompt_tokens": round(statistics.fmean(len(p.ids) for p in prompts), 1),
            "first_conversation_ids": [p.conversation_id for p in prompts[:5]],
        },
        "temperature": TEMPERATURE,
        "gamma": GAMMA,
        "alpha": ALPHA,
        "max_new_tokens": args.max_new_tokens,
        "batch_rows": args.batch,
        "detectors": names,
        "teacher_llr_levels": args.levels,
        "default_params": dataclasses.asdict(WatermarkParams()),
        "served_scheme": SERVED,
        "results": results,
        "false_positives_baseline_64": fpr,
        "teacher_stats_check": check,
        "false_positives_sharegpt_64": sharegpt_fpr,
        "default_config": default_name,
        "target": "the served scheme (default_config): >= 95% of 64-token answers detected at p < 1e-3, perplexity cost <= 35%",
        "target_by_detector": targets,
        "configs_meeting_target": {
            name: [
                c
                for c, r in results.items()
                if "detected" in r
                and r["detected"].get(name, {}).get("64", 0) >= 0.95
                and r["perplexity_cost_pct"] <= 35
            ]
            for name in names
        },
        "generation_s_per_config": data.get("generation_s_per_config"),
        "generation_wall_s": data.get("generation_wall_s"),
        "generated_tokens": data.get("generated_tokens"),
        "scoring_wall_s": round(scoring, 1),
        "bench_wall_s": round(time.perf_counter() - t_start, 1),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    if args.plot:
        plot(results, ["plain", "teacher-llr"], args.plot)
        console.print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
