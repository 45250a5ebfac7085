"""The distiller's side: prompts, harvest a teacher through its API, (curate, train, evaluate)."""

from distillguard.distill.harvest import HarvestConfig, HarvestReport, harvest
from distillguard.distill.prompts import Prompt, load_prompts
from distillguard.distill.store import ResponseStore

__all__ = ["HarvestConfig", "HarvestReport", "Prompt", "ResponseStore", "harvest", "load_prompts"]
