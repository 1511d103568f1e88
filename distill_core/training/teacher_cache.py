"""Teacher outputs kept across runs (the data-free pool; trajectories of other phases alike).

Generating the data-free pool costs ``data_free_samples / batch * data_free_steps`` guided teacher
calls; a second run on the same model, prompts and settings needs exactly the same tensors. An entry is
one safetensors file in a cache folder, written atomically (:mod:`distill_core.safe_files`). Its name is
a digest of what the outputs depend on besides the model: the kind of entry, the settings (JSON) and a
fingerprint of the input tensors (the conditionings). Its metadata also holds the model's fingerprint
(:func:`tensor_fingerprint` of the weights the teacher runs with, computed by the host). A lookup
returns the stored tensors bit for bit when every part of the key matches, and refuses the entry when
it was made by another model (the caller regenerates and :meth:`TeacherCache.store` replaces it), so
a cache folder holds one entry per run setup, never a stale one.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..safe_files import UnsafeFileError, read_safetensors, write_safetensors

CACHE_FORMAT = "stride-teacher-cache-1"


def tensor_fingerprint(named_tensors: Iterable[tuple[str, Tensor]]) -> str:
    """A BLAKE2b-256 hex digest of each tensor's name, dtype, shape and bytes, in the order given."""
    digest = hashlib.blake2b(digest_size=32)
    for name, tensor in named_tensors:
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(json.dumps([name, str(flat.dtype), list(tensor.shape)]).encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


@dataclass(frozen=True)
class CacheKey:
    """What an entry's tensors depend on besides the model: its kind, settings and input tensors."""

    kind: str
    settings: str  # JSON, keys sorted
    inputs: str  # tensor_fingerprint of the inputs

    @classmethod
    def of(cls, kind: str, settings: Mapping[str, Any], inputs: Iterable[tuple[str, Tensor]]) -> CacheKey:
        return cls(kind, json.dumps(dict(settings), sort_keys=True), tensor_fingerprint(inputs))

    @property
    def file_name(self) -> str:
        digest = hashlib.blake2b(f"{self.kind}\n{self.settings}\n{self.inputs}".encode(), digest_size=16).hexdigest()
        return f"{self.kind}-{digest}.safetensors"


class TeacherCache:
    """A folder of cached teacher outputs for one model (``model_fingerprint``, from :func:`tensor_fingerprint`).

    :attr:`last` says what the latest :meth:`load` did: ``"hit"``, ``"miss"`` or ``"refused: <why>"``.
    """

    def __init__(self, folder: str | os.PathLike, model_fingerprint: str) -> None:
        self.folder = Path(folder)
        self.model_fingerprint = model_fingerprint
        self.last = ""

    def path(self, key: CacheKey) -> Path:
        return self.folder / key.file_name

    def load(self, key: CacheKey) -> dict[str, Tensor] | None:
        """The stored tensors of ``key`` for this model, or ``None`` (missing, refused: see :attr:`last`)."""
        path = self.path(key)
        if not path.is_file():
            self.last = "miss"
            return None
        try:
            tensors, metadata = read_safetensors(path)
        except UnsafeFileError as error:
            self.last = f"refused: {error}"
            return None
        stored = {name: metadata.get(name) for name in ("format", "kind", "settings", "inputs", "model")}
        wanted = {"format": CACHE_FORMAT, "kind": key.kind, "settings": key.settings, "inputs": key.inputs,
                  "model": self.model_fingerprint}
        changed = [name for name in wanted if stored[name] != wanted[name]]
        if changed:
            what = "made by another model" if changed == ["model"] else f"its {', '.join(changed)} differ"
            self.last = f"refused: {path.name} was {what}"
            return None
        self.last = "hit"
        return tensors

    def store(self, key: CacheKey, tensors: Mapping[str, Tensor]) -> None:
        """Write (or replace) ``key``'s entry for this model, atomically."""
        self.folder.mkdir(parents=True, exist_ok=True)
        metadata = {"format": CACHE_FORMAT, "kind": key.kind, "settings": key.settings, "inputs": key.inputs,
                    "model": self.model_fingerprint}
        write_safetensors(self.path(key), tensors, metadata)
