"""What one MiniLM prompt embedding costs in CPU time, and what cheaper encoders would give up.

The detector's embeddings (``detect.embed.Embedder``: all-MiniLM-L6-v2, prompts cut to 32 word
pieces, mean pooling, unit length) on real prompts (first turns of the ShareGPT attack and
calibration pools), one torch thread, side by side in one process, two rounds:

- ``torch fp32``: what the detector uses, batched (1, 16, 64, 256 prompts a call);
- ``torch int8``: ``torch.ao.quantization.quantize_dynamic`` of every Linear layer;
- ``onnxruntime fp32`` / ``int8`` (if ``onnxruntime`` and ``onnx`` are installed; not project
  dependencies): the same BERT exported with ``torch.onnx.export``, then ORT's dynamic
  quantisation of the weight MatMuls (per channel), all of them or all but the feed-forward ones.

Per variant: CPU ms per prompt and the cosine between its embeddings and the fp32 ones (min, 1st
percentile, median): an encoder the detector could switch to must agree to >= 0.99 everywhere
(the reference, topics and calibrated tails would otherwise no longer describe what it embeds).
Prints JSON; ``--out`` writes it.

    nice -n 10 .venv/bin/python bench/detect_embed_cost.py --out bench/results/detect_embed_cost.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from distillguard.arena.pools import load_pools
from distillguard.detect.embed import Embedder


def cpu_ms(fn, n: int) -> tuple[float, np.ndarray]:
    c = time.process_time()
    out = fn()
    return 1000.0 * (time.process_time() - c) / n, out


def agreement(x: np.ndarray, ref: np.ndarray) -> dict:
    cos = (x * ref).sum(axis=1)
    return {
        "cos_min": round(float(cos.min()), 4),
        "cos_p1": round(float(np.quantile(cos, 0.01)), 4),
        "cos_median": round(float(np.median(cos)), 4),
    }


def onnx_variants(model, tok, tmp: Path, max_len: int):
    """(name, encode(texts) -> unit vectors) for ORT fp32 and int8 variants, or [] without ORT."""
    try:
        import onnx
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        return []

    class Bert(torch.nn.Module):  # positional inputs for the exporter
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    names = ["input_ids", "attention_mask", "token_type_ids"]
    enc = tok(
        ["a short prompt", "a somewhat longer prompt about something else"],
        padding=True,
        return_tensors="pt",
    )
    fp32 = tmp / "minilm.onnx"
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated and says so
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Bert(model[0].auto_model).eval(),
            tuple(enc[k] for k in names),
            str(fp32),
            input_names=names,
            output_names=["h"],
            opset_version=17,
            dynamo=False,
            dynamic_axes={k: {0: "b", 1: "t"} for k in [*names, "h"]},
        )
    matmuls = [n.name for n in onnx.load(str(fp32)).graph.node if n.op_type == "MatMul"]
    ffn = [
        n for n in matmuls if "intermediate" in n or ("output/dense" in n and "attention" not in n)
    ]
    files = {"onnxruntime fp32": fp32}
    for name, exclude in (
        ("onnxruntime int8 (all weight MatMuls)", []),
        ("onnxruntime int8 (feed-forward kept fp32)", ffn),
    ):
        out = tmp / f"{len(files)}.onnx"
        quantize_dynamic(
            str(fp32),
            str(out),
            weight_type=QuantType.QInt8,
            per_channel=True,
            nodes_to_exclude=exclude,
            extra_options={"MatMulConstBOnly": True},
        )
        files[name] = out

    def encoder(path):
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

        def encode(texts, bs=64):
            out = []
            for i in range(0, len(texts), bs):
                e = tok(
                    texts[i : i + bs],
                    padding=True,
                    truncation=True,
                    max_length=max_len,
                    return_tensors="np",
                )
                h = sess.run(None, {k: e[k].astype(np.int64) for k in names})[0]  # (B, T, 384)
                m = e["attention_mask"][..., None].astype(np.float32)  # (B, T, 1)
                v = (h * m).sum(1) / np.maximum(m.sum(1), 1e-9)  # mean pooling
                out.append(v / np.linalg.norm(v, axis=1, keepdims=True))
            return np.concatenate(out)

        encode(texts_warm)
        return encode

    return [(name, encoder(path)) for name, path in files.items()]


texts_warm = ["warm up"] * 8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    pools = load_pools()
    half = args.prompts // 2
    texts = [t.user_turns[0] for t in pools["attack"][:half]] + [
        t.user_turns[0] for t in pools["calibration"][:half]
    ]
    emb = Embedder()
    model, tok = emb.model, emb.model[0].tokenizer

    def st(m, bs=64):
        return lambda ts: m.encode(
            ts,
            batch_size=bs,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )

    with warnings.catch_warnings():  # torch deprecates quantize_dynamic (torchao) and says so
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        q = copy.deepcopy(model)
        q[0].model = quantize_dynamic(q[0].model, {torch.nn.Linear}, dtype=torch.qint8)
    ref = st(model)(texts)
    with tempfile.TemporaryDirectory() as tmp:
        variants = [
            ("torch fp32", st(model)),
            ("torch int8 (quantize_dynamic)", st(q)),
            *onnx_variants(model, tok, Path(tmp), emb.max_seq_length),
        ]
        out = {
            "prompts": len(texts),
            "max_seq_length": emb.max_seq_length,
            "threads": 1,
            "load_avg_1m_before": round(os.getloadavg()[0], 2),
            "batch_size": {},
            "variants": {},
        }
        for bs in (1, 16, 64, 256):  # batching, fp32 only
            n = 64 if bs == 1 else len(texts)
            out["batch_size"][bs] = round(
                min(
                    cpu_ms(lambda bs=bs, n=n: st(model, bs)(texts[:n]), n)[0]
                    for _ in range(args.rounds)
                ),
                2,
            )
        for name, enc in variants:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                runs = [cpu_ms(lambda enc=enc: enc(texts), len(texts)) for _ in range(args.rounds)]
            out["variants"][name] = {
                "cpu_ms_per_prompt": [round(ms, 2) for ms, _ in runs],
                **agreement(runs[0][1], ref),
            }
            print(name, json.dumps(out["variants"][name]), flush=True)
    base = min(out["variants"]["torch fp32"]["cpu_ms_per_prompt"])
    for r in out["variants"].values():
        r["cpu_vs_torch_fp32"] = round(min(r["cpu_ms_per_prompt"]) / base, 3)
    out["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
