"""Tools: dense prediction, aggregation into tables, evaluation."""

from __future__ import annotations

from typing import Any

from stpredict._lazy import lazy_getattr

_LAZY = {
    "EvaluationResult": "._evaluate",
    "aggregate": "._aggregate",
    "evaluate": "._evaluate",
    "evaluate_across_scales": "._evaluate",
    "highly_predictive_genes": "._evaluate",
    "predict_dense": "._predict_dense",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    return lazy_getattr(__name__, globals(), _LAZY, name)


def __dir__() -> list[str]:
    return __all__
