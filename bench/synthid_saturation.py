"""Does SynthID evidence keep growing as watermarked text is added? The former rule (a table index
touched by several (n-gram, layer) pairs keeps the largest weight) against the served one (their
sum), side by side on the same answers.

The answers are those ``bench/radioactivity.py --scheme synthid --train 96`` caches: the bundled
teacher's answers (48 tokens, T = 0.7) to the first 96 usable ShareGPT prompts, once through one
account's served SynthID tournament and once without. For the first N of them (prompt n-grams
excluded, each n-gram once): the leaking key's z and log10 p under both rules, and, as controls,
``--wrong-keys`` other keys on the watermarked answers and every key on the clean answers.

    nice -n 10 python bench/radioactivity.py --scheme synthid --train 96 --teacher-only   # the answers (cached)
    nice -n 10 python bench/synthid_saturation.py                                        # ~1 min

One JSON object to stdout and ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="5,24,48,96", help="numbers of answers tested together")
    ap.add_argument("--wrong-keys", type=int, default=20)
    ap.add_argument(
        "--cache", default=str(Path.home() / ".cache" / "distillguard" / "bench-radioactivity")
    )
    ap.add_argument("--out", default="bench/results/synthid_saturation.json")
    args = ap.parse_args()

    import torch
    from radioactivity import LEAKER, SECRET, prompts_for

    from distillguard.forensics.radioactivity import _tokenize
    from distillguard.models import load_model
    from distillguard.watermark import WatermarkParams, account_key
    from distillguard.watermark.synthid import detect_synthid, processor_for

    torch.set_num_threads(1)
    sizes = [int(s) for s in args.sizes.split(",")]
    cache = Path(args.cache)
    wm_file, clean_file = (
        cache / f"train-wm-synthid-n{max(sizes)}-t48.json",
        cache / f"train-clean-n{max(sizes)}-t48.json",
    )
    if not (wm_file.is_file() and clean_file.is_file()):
        raise SystemExit(
            f"no cached answers in {cache}: run bench/radioactivity.py --scheme synthid "
            f"--train {max(sizes)} --teacher-only first"
        )
    params = WatermarkParams(scheme="synthid")
    teacher = load_model("smollm2", device="cpu")
    prompts = _tokenize(teacher.tokenizer, prompts_for(teacher, max(sizes), 0, 64))
    wm = _tokenize(teacher.tokenizer, json.loads(wm_file.read_text()))
    clean = _tokenize(teacher.tokenizer, json.loads(clean_file.read_text()))
    keys = [account_key(SECRET, LEAKER, params)] + [
        account_key(SECRET, f"other-{i:02d}", params) for i in range(args.wrong_keys)
    ]
    procs = {k.key_id: processor_for(k.hash_key, params.synthid) for k in keys}

    def z(key, texts, n, rule):
        d = detect_synthid(
            key, texts[:n], prompts[:n], params=params.synthid, proc=procs[key.key_id], reduce=rule
        )
        return d.z, d.log10_p, d.scored

    rows = []
    for n in sizes:
        row = {"answers": n}
        for rule in ("amax", "sum"):
            lz, lp, scored = z(keys[0], wm, n, rule)
            wrong = [z(k, wm, n, rule)[0] for k in keys[1:]]
            ctrl = [z(k, clean, n, rule)[0] for k in keys]
            row[rule] = {
                "leaker_z": lz,
                "leaker_log10_p": lp,
                "table_indices": scored,
                "wrong_keys_mean_z": statistics.mean(wrong),
                "wrong_keys_max_abs_z": max(map(abs, wrong)),
                "clean_answers_mean_z": statistics.mean(ctrl),
                "clean_answers_max_abs_z": max(map(abs, ctrl)),
            }
        print(json.dumps(row), file=sys.stderr)
        rows.append(row)
    report = {"config": vars(args), "rows": rows}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
