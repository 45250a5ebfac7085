"""distillguard: LLM distillation through an API, from the provider's, the distiller's and the
investigator's side.

Subpackages (see DESIGN.md): ``models`` (load any causal LM), ``serve`` (OpenAI-compatible
teacher server).
"""

from distillguard.errors import DistillguardError

__version__ = "0.1.0"
__all__ = ["DistillguardError", "__version__"]
