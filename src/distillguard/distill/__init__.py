"""The distiller's side: prompts (files, ShareGPT, self-instruct), harvest a teacher through its API,
curate, train, evaluate, and ``run`` them all from one config."""

from distillguard.distill.harvest import HarvestConfig, HarvestReport, harvest
from distillguard.distill.prompts import Prompt, load_prompts
from distillguard.distill.store import ResponseStore

__all__ = ["HarvestConfig", "HarvestReport", "Prompt", "ResponseStore", "harvest", "load_prompts"]
