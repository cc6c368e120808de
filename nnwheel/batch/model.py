"""The installed model a batch job runs: its distribution, version, manifest and `batch` module."""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from ..errors import MissingDependencyError, ModelNotFoundError
from ..models import installed_models


@dataclass(frozen=True)
class BatchModel:
    distribution: str  # as pip names it: digits-mlp
    version: str
    batch: ModuleType  # the package's batch module: predict_table, map_arrow, Predictor, ...

    @property
    def manifest(self) -> dict[str, Any]:
        return self.batch._MANIFEST

    @property
    def requirement(self) -> str:
        """What the workers install: this very version."""
        return f"{self.distribution}=={self.version}"


def find_model(name: str) -> BatchModel:
    distribution, import_name = _installed(name)
    try:
        batch = importlib.import_module(f"{import_name}.batch")
    except ModuleNotFoundError as error:
        if error.name == "pyarrow":
            raise MissingDependencyError("nnwheel batch needs pyarrow: pip install 'nnwheel[batch]'") from None
        if error.name == f"{import_name}.batch":
            raise ModelNotFoundError(
                f"{distribution} was wrapped by an nnwheel without batch scoring; wrap it again with this nnwheel"
            ) from None
        raise
    return BatchModel(distribution, importlib.metadata.version(distribution), batch)


def _installed(name: str) -> tuple[str, str]:
    models = installed_models()
    wanted = _normalize(name)
    for distribution, import_name in models.items():
        if wanted in (_normalize(distribution), _normalize(import_name)):
            return distribution, import_name
    known = ", ".join(sorted(models)) or "none"
    raise ModelNotFoundError(
        f"no installed model named {name!r} in this environment (installed: {known}); pip install {name} here first"
    )


def _normalize(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")
