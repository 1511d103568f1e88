"""Stride's file I/O: safetensors only, validated before use, written atomically.

Every file Stride writes (LoRAs, training checkpoints, exported teacher weights, saved schedules)
goes through :func:`write_safetensors` / :func:`write_atomically`: readers see the old file or the
whole new one, never a part. Every file it reads goes through :func:`read_safetensors`, which
refuses anything that is not a well-formed safetensors file before parsing it (pickle is never
unpickled).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from collections.abc import Mapping

import safetensors
import safetensors.torch
from torch import Tensor

MAX_HEADER_BYTES = 100 * 1024 * 1024


def write_safetensors(path: str | os.PathLike, state_dict: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors + string metadata as safetensors, atomically (see :func:`write_atomically`)."""
    metadata = dict(metadata or {})
    bad = [key for key, value in metadata.items() if not (isinstance(key, str) and isinstance(value, str))]
    if bad:
        raise TypeError(f"safetensors metadata must map str to str; offending keys: {bad[:5]}")
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in state_dict.items()}
    write_atomically(path, safetensors.torch.save(tensors, metadata=metadata or None))


def write_atomically(path: str | os.PathLike, payload: bytes) -> None:
    """Write ``payload`` to ``path`` so that readers see the old file or the whole new one, never a part.

    The bytes go to a temporary file in the target folder, are fsynced, then renamed over
    ``path``; an error at any point removes the temporary file and leaves ``path`` as it was.
    Temporary files of ``path`` that a killed writer left behind are removed first.
    """
    target = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(target)
    _remove_stale_temp_files(target)
    temp_path = os.path.join(folder, f".{os.path.basename(target)}.{secrets.token_hex(6)}.tmp")
    # os.open with mode 0o666 honours the umask, so the final file gets ordinary permissions.
    handle = os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_path)
        raise
    _fsync_folder(folder)


def _remove_stale_temp_files(target: str) -> None:
    """Delete ``.<name>.<12 hex>.tmp`` files of ``target``: what a writer killed mid-write leaves."""
    folder, name = os.path.split(target)
    pattern = re.compile(rf"\.{re.escape(name)}\.[0-9a-f]{{12}}\.tmp")
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(folder):
            if pattern.fullmatch(entry):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(folder, entry))


def _fsync_folder(folder: str) -> None:
    """Make the rename durable where the platform allows opening folders (not on Windows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def check_safetensors_file(path: str | os.PathLike) -> None:
    """Raise ``ValueError`` unless ``path`` has a safetensors layout (checked before any parsing).

    A safetensors file is an 8-byte little-endian header length, a JSON object header of that
    length, then exactly the tensor bytes the header's ``data_offsets`` describe. Pickle and
    ``torch.save`` zip files fail this test and are named in the error; a truncated file is
    named as such; nothing is ever unpickled.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as stream:
        head = stream.read(8)
        header_size = int.from_bytes(head, "little") if len(head) == 8 else -1
        header = stream.read(header_size) if 2 <= header_size <= min(size - 8, MAX_HEADER_BYTES) else b""
    if header[:1] == b"{":
        try:
            entries = json.loads(header.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            entries = None
        if isinstance(entries, dict):
            data_bytes = _described_tensor_bytes(entries)
            if 8 + header_size + data_bytes == size:
                return
            raise ValueError(f"{path} is a truncated or damaged safetensors file (its header describes {data_bytes} "
                             f"bytes of tensor data, the file holds {size - 8 - header_size}); copy or download it again")
    if head.startswith(b"PK\x03\x04"):
        kind = "a zip archive (a torch.save checkpoint holding pickled data)"
    elif head[:1] == b"\x80":
        kind = "a Python pickle"
    else:
        kind = "not a safetensors file"
    raise ValueError(f"{path} is {kind}; only safetensors files are loaded and pickle is never unpickled")


def _described_tensor_bytes(entries: dict) -> int:
    """How many tensor bytes a safetensors header describes (the largest end offset)."""
    ends = [entry["data_offsets"][1] for key, entry in entries.items()
            if key != "__metadata__" and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list)
            and len(entry["data_offsets"]) == 2 and isinstance(entry["data_offsets"][1], int)]
    return max(ends, default=0)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read ``(tensors, metadata)`` of a safetensors file onto the CPU; anything else is refused."""
    check_safetensors_file(path)
    with safetensors.safe_open(os.fspath(path), framework="pt", device="cpu") as reader:
        metadata = dict(reader.metadata() or {})
        tensors = {key: reader.get_tensor(key) for key in reader.keys()}
    return tensors, metadata
