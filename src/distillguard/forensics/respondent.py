"""A model the forensics report questions: its weights in this process, or an OpenAI-compatible
URL; and the shape every report test returns (:class:`TestOutcome`).

The identity and similarity tests ask the suspect, the teacher and each control the same
prompts, greedily (a fingerprint, not a sample: the same model gives the same answers, so a
rerun reproduces every number).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from distillguard.errors import ConfigError
from distillguard.forensics.evidence import SuspectAPIError


def is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


@dataclass(frozen=True)
class TestOutcome:
    """One report test: its statistic for the suspect and each control, a p-value against the
    controls, or why it could not run."""

    __test__ = False  # a result, not a pytest class

    name: str
    could_run: bool
    why_not: str | None = None
    statistic: float | None = None  # the suspect's
    statistic_name: str = ""
    p_value: float | None = None
    controls: dict[str, float] = field(default_factory=dict)  # control label -> its statistic
    details: dict = field(default_factory=dict)

    @property
    def within_controls_range(self) -> bool:
        """The suspect's statistic is no higher than some control's: a fingerprint that a control
        matches is not evidence, however small the probe-level p-value."""
        if self.statistic is None or not self.controls:
            return True
        return self.statistic <= max(self.controls.values())

    def to_dict(self) -> dict:
        return {**asdict(self), "within_controls_range": self.within_controls_range}


def model_rank_p(statistic: float, controls: Sequence[float]) -> float:
    """(1 + controls scoring at least the suspect) / (controls + 1).

    Exact when the suspect is exchangeable with the controls as *models* (the null: "one more
    model that was not distilled"). A probe-level p-value (Fisher over answers, a permutation
    over probes) assumes the models differ only by probe noise; models trained on different
    data differ systematically, and on such controls a probe-level p of 1e-4 was measured for a
    control as the suspect (tests/forensics/test_report.py). The fingerprint tests report the
    larger of the two, valid under either null; its floor 1/(K+1) is what K controls can show.
    """
    return (1 + sum(c >= statistic for c in controls)) / (len(controls) + 1)


def cannot_run(name: str, why: str, **details) -> TestOutcome:
    return TestOutcome(name=name, could_run=False, why_not=why, details=details)


class PromptLogprobsRefused(SuspectAPIError):
    """The suspect's API answers, but not with logprobs of a given text (no ``/v1/completions``
    with ``echo``, or one that leaves them out)."""


class Respondent:
    """A model to question: ``spec`` is a model spec (loaded here) or an OpenAI-compatible URL.

    ``lm`` may be given already loaded (tests, or a caller that holds the model). ``template``:
    the chat template to write a conversation in when a URL is asked for the likelihood of a
    text (a tokenizer, or a model spec whose tokenizer to load; the investigator's guess at the
    suspect's template, e.g. the teacher's: a student distilled from it keeps it)."""

    def __init__(
        self,
        spec: str,
        *,
        lm=None,
        api_key: str | None = None,
        served_model: str | None = None,
        device: str = "cpu",
        concurrency: int = 8,
        timeout_s: float = 300.0,
        template=None,
    ):
        self.spec = spec
        self.api_key = api_key
        self.served_model = served_model
        self.device = device
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self._lm = lm
        self._template = template

    @property
    def template(self):
        """The tokenizer whose chat template formats conversations for :meth:`prompt_logprobs`
        (None when none was given to a URL)."""
        if isinstance(self._template, str):
            from distillguard.models import load_tokenizer

            self._template = load_tokenizer(self._template)
        if self._template is None and not self.is_api:
            return self.lm.tokenizer
        return self._template

    @property
    def is_api(self) -> bool:
        return self._lm is None and is_url(self.spec)

    @property
    def lm(self):
        """The loaded model (None behind an API)."""
        if self.is_api:
            return None
        if self._lm is None:
            from distillguard.models import load_model

            self._lm = load_model(self.spec, device=self.device)
        return self._lm

    def answer(self, prompts: Sequence[str], *, max_tokens: int = 48) -> list[str]:
        """Greedy answers, one per single-turn prompt."""
        if self.is_api:
            return self._answer_api(prompts, max_tokens)
        from distillguard.forensics.suspect import generate_answers

        return generate_answers(
            self.lm, prompts, max_new_tokens=max_tokens, temperature=0.0, progress=False
        )

    def _answer_api(self, prompts: Sequence[str], max_tokens: int) -> list[str]:
        return self.chat([[{"role": "user", "content": p}] for p in prompts], max_tokens=max_tokens)

    def _client(self):
        import openai

        base = self.spec.rstrip("/")
        base = base if base.endswith("/v1") else base + "/v1"
        client = openai.OpenAI(
            base_url=base, api_key=self.api_key or "none", timeout=self.timeout_s, max_retries=1
        )
        return client, base

    def _model(self, client, base: str) -> str:
        if self.served_model is not None:
            return self.served_model
        listed = list(client.models.list())
        if not listed:
            raise SuspectAPIError(f"{base}/models lists no model; pass the served model's name")
        return listed[0].id

    def prompt_logprobs(self, requests: Sequence[Sequence[str]]) -> list[list[EchoedText]]:
        """The API's logprob of every token of given texts: ``POST /v1/completions`` with
        ``echo``, ``logprobs=0`` and ``max_tokens=0`` (the legacy endpoint, as vLLM and
        ``distillguard serve --no-guard`` offer it), one request per group of texts (in
        parallel). The texts carry their template's special tokens, so none are added
        (``add_special_tokens``, vLLM's parameter). :class:`PromptLogprobsRefused` when the
        endpoint answers 4xx or leaves the logprobs out."""
        import openai

        client, base = self._client()
        try:
            model = self._model(client, base)

            def ask(texts: Sequence[str]) -> list[EchoedText]:
                out = client.completions.create(
                    model=model,
                    prompt=list(texts),
                    max_tokens=0,
                    echo=True,
                    logprobs=0,
                    extra_body={"add_special_tokens": False},
                )
                echoed = []
                for text, choice in zip(texts, sorted(out.choices, key=lambda c: c.index)):
                    lp = choice.logprobs
                    if lp is None or not lp.token_logprobs or lp.text_offset is None:
                        raise PromptLogprobsRefused(
                            f"{base}/completions answered without prompt logprobs (echo=true, "
                            "logprobs=0)"
                        )
                    echoed.append(EchoedText(text, list(lp.token_logprobs), list(lp.text_offset)))
                if len(echoed) != len(texts):
                    raise PromptLogprobsRefused(
                        f"{base}/completions answered {len(echoed)} choices for {len(texts)} prompts"
                    )
                return echoed

            with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
                return list(pool.map(ask, requests))
        except openai.APIStatusError as exc:
            cls = PromptLogprobsRefused if 400 <= exc.status_code < 500 else SuspectAPIError
            raise cls(f"{base}/completions answered {exc.status_code}: {str(exc)[:300]}") from None
        except openai.APIError as exc:
            raise SuspectAPIError(f"cannot query {base}: {exc}") from None
        finally:
            client.close()

    def chat(self, conversations: Sequence[list[dict]], *, max_tokens: int = 48) -> list[str]:
        """Greedy answers of the API to whole conversations (in parallel; the server batches)."""
        import openai

        client, base = self._client()
        try:
            model = self._model(client, base)

            def ask(messages: list[dict]) -> str:
                out = client.chat.completions.create(
                    model=model,
                    messages=messages,
                    max_tokens=max_tokens,
                    temperature=0.0,
                    seed=0,
                )
                return out.choices[0].message.content or ""

            with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
                return list(pool.map(ask, conversations))
        except openai.APIStatusError as exc:
            raise SuspectAPIError(f"{base} answered {exc.status_code}: {str(exc)[:200]}") from None
        except openai.APIError as exc:
            raise SuspectAPIError(f"cannot query {base}: {exc}") from None
        finally:
            client.close()

    def fingerprint(self) -> dict:
        """What identifies this model in ``evidence.json``: SHA-256 of its files (a directory
        or a file) and of its loaded weights; a URL has neither, only its address."""
        out: dict = {"spec": self.spec}
        if self.is_api:
            out["url"] = self.spec
            return out
        path = Path(self.spec).expanduser()
        if path.exists():
            out["files_sha256"] = sha256_path(path)
        else:
            from distillguard.models import bundled_gguf_path, parse_spec

            if parse_spec(self.spec).kind == "bundled":
                out["files_sha256"] = sha256_path(bundled_gguf_path())
        out["weights_sha256"] = weights_sha256(self.lm.model)
        return out


@dataclass(frozen=True)
class EchoedText:
    """A text as an API scored it: each token's logprob (None where it has no context) and the
    character offset in ``text`` where the token starts."""

    text: str
    token_logprobs: list[float | None]
    text_offset: list[int]

    def span_logprob(self, start: int, end: int) -> float:
        """Sum of the logprobs of the tokens starting in ``text[start:end]``."""
        got = [
            lp
            for lp, at in zip(self.token_logprobs, self.text_offset)
            if start <= at < end and lp is not None
        ]
        if not got:
            raise PromptLogprobsRefused(
                f"no scored token starts in characters {start}..{end} of a {len(self.text)}-"
                "character text: the API's text_offset does not index the text sent"
            )
        return float(sum(got))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_path(path: Path) -> str:
    """A file's SHA-256; a directory's: SHA-256 over its files' relative paths and hashes, sorted
    (so ``sha256sum`` over the listed files reproduces it)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        raise ConfigError(f"no such file or directory to hash: {path}")
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def weights_sha256(model) -> str:
    """SHA-256 over the parameters' names, shapes and bytes (in state-dict order)."""
    import torch

    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}\n".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
