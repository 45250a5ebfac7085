"""Resumable training: the run's fingerprint, complete-checkpoint marks, and SIGTERM as a clean stop.

A checkpoint is resumed only by the same run (settings, exact examples, a given student's
starting weights); one cut off while being written has no mark and is deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import Trainer, TrainerCallback

from distillguard.errors import ConfigError

if TYPE_CHECKING:
    from distillguard.distill.train_config import TrainConfig

CHECKPOINT_MARK = "distillguard_checkpoint.json"


def run_fingerprint(
    config: TrainConfig, examples: list[dict], given_student: torch.nn.Module | None = None
) -> str:
    """What makes two runs the same run: every setting but where things are, the exact examples,
    and the starting weights of a student the caller built (``train(student=...)``)."""
    settings = {
        k: v
        for k, v in config.model_dump().items()
        if k not in ("data", "out", "save_steps", "resume")
    }
    settings["unlikelihood"] = (
        config.unlikelihood_weight
    )  # the weight used, whether spelled out or the default
    for name, default in (("precision", "fp32"), ("ce_weight", 0.0), ("unlikelihood", 0.0)):
        if (
            settings[name] == default
        ):  # a later setting at its default: checkpoints from before it still resume
            del settings[name]
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    digest.update(json.dumps(examples).encode())
    if given_student is not None:
        for name, tensor in given_student.state_dict().items():
            digest.update(name.encode())
            digest.update(
                tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            )
    return digest.hexdigest()


def resume_point(directory: Path, fingerprint: str, resume: bool) -> tuple[Path | None, dict]:
    """The last complete checkpoint of this run under ``directory`` and its mark, or ``(None, {})``.

    Checkpoints without a mark were cut off while being written and are deleted; with ``resume``
    off every checkpoint is. A checkpoint of another run is refused rather than silently mixed in.
    """
    if not directory.is_dir():
        return None, {}
    if not resume:
        shutil.rmtree(directory)
        return None, {}
    complete = []
    for d in directory.glob("checkpoint-*"):
        if (d / CHECKPOINT_MARK).is_file():
            complete.append(d)
        else:
            shutil.rmtree(d, ignore_errors=True)
    if not complete:
        return None, {}
    last = max(complete, key=lambda d: int(d.name.rsplit("-", 1)[1]))
    mark = json.loads((last / CHECKPOINT_MARK).read_text())
    if mark.get("fingerprint") != fingerprint:
        raise ConfigError(
            f"{directory} holds a checkpoint of a different training run (other data or settings); "
            "rerun with the original settings to continue it, or with --no-resume to start over"
        )
    return last, mark


class CheckpointMarks(TrainerCallback):
    """Marks a checkpoint complete once the Trainer has written all of it, then deletes the older ones.

    The Trainer's own rotation (``save_total_limit``) deletes the previous checkpoint as soon as the
    new one is written, so nothing tells a whole checkpoint from one cut off by a crash; the mark,
    written last and atomically, does. It also carries what the Trainer's state does not: the run's
    fingerprint, the training seconds so far and gkd's count of on-policy batches.
    """

    def __init__(self, fingerprint: str, trainer: Trainer, seconds_before: float):
        self.fingerprint, self.trainer, self.seconds_before = fingerprint, trainer, seconds_before
        self.started = time.perf_counter()

    def on_save(self, args, state, control, **kwargs):
        here = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        mark = {
            "fingerprint": self.fingerprint,
            "step": state.global_step,
            "train_seconds": self.seconds_before + time.perf_counter() - self.started,
            "on_policy_batches": getattr(self.trainer, "on_policy_batches", None),
        }
        tmp = here / (CHECKPOINT_MARK + ".tmp")
        tmp.write_text(json.dumps(mark))
        os.replace(tmp, here / CHECKPOINT_MARK)
        for old in here.parent.glob("checkpoint-*"):
            if old != here:
                shutil.rmtree(old, ignore_errors=True)


class LogToLogger(TrainerCallback):
    """The Trainer's log dicts (loss, learning rate, epoch) to the train module's logger at debug
    level (shown with ``-v``; the CLI shows its own info lines without it), in place of
    transformers' PrinterCallback, which prints them to stdout."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            logging.getLogger("distillguard.distill.train").debug(
                "step %d: %s",
                state.global_step,
                ", ".join(
                    f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in logs.items()
                ),
            )


class StopOnSigterm(TrainerCallback):
    """SIGTERM (``kill``, a container stop, a cluster's pre-emption notice) ends training at the end
    of the current optimiser step with a checkpoint, instead of losing the steps since the last
    ``--save-steps`` with the process. The HF Trainer has no such switch; its control flags do it."""

    def __init__(self):
        self.requested = False
        self.stopped_at: int | None = None

    @contextlib.contextmanager
    def installed(self, enabled: bool = True):
        import signal
        import threading

        if not enabled or threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGTERM, self._request)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _request(self, signum, frame) -> None:
        self.requested = True

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested and self.stopped_at is None:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
