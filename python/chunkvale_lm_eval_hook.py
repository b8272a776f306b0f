"""Registers chunkvale's lm-eval backend (``lm_eval --model chunkvale``) when lm-eval loads its
model registry.

lm-eval 0.4.13 has no entry points for models: it knows the models of ``lm_eval.models`` and
whatever a module registered with ``@register_model`` once imported. ``chunkvale_lm_eval.pth``
imports this module at interpreter start-up; it imports nothing heavy itself, only waits for
``lm_eval.models`` to load, then adds ``chunkvale`` as a lazy entry
(``chunkvale.lm_eval_model:ChunkvaleLM``), imported only when that model is asked for.
"""

import sys
from importlib.abc import MetaPathFinder

NAME, TARGET = "chunkvale", "chunkvale.lm_eval_model:ChunkvaleLM"


def register(registry) -> None:
    if NAME not in registry:
        registry.register(NAME, target=TARGET)


class _AfterLmEvalModels(MetaPathFinder):
    """Finds ``lm_eval.models`` as the other finders do, and registers chunkvale once it ran."""

    def find_spec(self, name, path=None, target=None):
        if name != "lm_eval.models":
            return None
        from importlib.util import find_spec

        sys.meta_path.remove(self)  # once: the real finders locate the module
        spec = find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            from lm_eval.api.registry import model_registry

            register(model_registry)

        spec.loader.exec_module = exec_module
        return spec


if not any(isinstance(f, _AfterLmEvalModels) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterLmEvalModels())
