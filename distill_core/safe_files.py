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
import stat
from collections.abc import Callable, Mapping

import safetensors
import safetensors.torch
from torch import Tensor

MAX_HEADER_BYTES = 100 * 1024 * 1024
WRITE_CHUNK_BYTES = 16 * 1024 * 1024
ChunkCallback = Callable[[int, int], None]
"""``on_chunk(written, size)`` after each chunk of a write; raising from it abandons the write."""


def safetensors_bytes(state_dict: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """Tensors + string metadata serialised as a safetensors file (tensors moved to the CPU)."""
    metadata = dict(metadata or {})
    bad = [key for key, value in metadata.items() if not (isinstance(key, str) and isinstance(value, str))]
    if bad:
        raise TypeError(f"safetensors metadata must map str to str; offending keys: {bad[:5]}")
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in state_dict.items()}
    return safetensors.torch.save(tensors, metadata=metadata or None)


def write_safetensors(path: str | os.PathLike, state_dict: Mapping[str, Tensor],
                      metadata: Mapping[str, str] | None = None, on_chunk: ChunkCallback | None = None) -> None:
    """Write tensors + string metadata as safetensors, atomically (see :func:`write_atomically`)."""
    write_atomically(path, safetensors_bytes(state_dict, metadata), on_chunk)


def write_atomically(path: str | os.PathLike, payload: bytes, on_chunk: ChunkCallback | None = None) -> None:
    """Write ``payload`` to ``path`` so that readers see the old file or the whole new one, never a part.

    The bytes go to a temporary file in the target folder in chunks of 16 MiB, are fsynced, then
    renamed over ``path``; an error at any point (also one raised by ``on_chunk``, e.g. a Cancel)
    removes the temporary file and leaves ``path`` as it was. Temporary files of ``path`` that a
    killed writer left behind are removed first.
    """
    target = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(target)
    _remove_stale_temp_files(target)
    temp_path = os.path.join(folder, f".{os.path.basename(target)}.{secrets.token_hex(6)}.tmp")
    # os.open with mode 0o666 honours the umask, so the final file gets ordinary permissions.
    handle = os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(handle, "wb") as stream:
            view = memoryview(payload)
            for start in range(0, len(payload), WRITE_CHUNK_BYTES):
                stream.write(view[start:start + WRITE_CHUNK_BYTES])
                if on_chunk is not None:
                    on_chunk(min(start + WRITE_CHUNK_BYTES, len(payload)), len(payload))
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


class UnsafeFileError(ValueError):
    """A file that is not a well-formed safetensors file; the message names the file and what to do."""


# What the safetensors library's header errors mean, in plain words (its own text never reaches a user).
_HEADER_PROBLEMS = (
    ("unknown variant", "a tensor has an unknown dtype"),
    ("invalid shape, data type, or offset", "a tensor's shape and dtype do not match the bytes its offsets give it"),
    ("invalid offset", "two tensors overlap or a tensor's offsets leave a gap"),
    ("file not fully covered", "the tensor data does not fill the file exactly (truncated or padded)"),
    ("expected a string", "a metadata value is not a string"),
    ("expected usize", "a shape or offset is negative or not an integer"),
    ("invalid JSON", "the header is not valid JSON of the safetensors layout"),
    ("header too large", "the header is larger than safetensors allows"),
    ("header too small", "the file is too short to hold a safetensors header"),
)


def _header_problem(error: Exception) -> str:
    text = str(error)
    return next((plain for marker, plain in _HEADER_PROBLEMS if marker in text),
                "its header is not a valid safetensors header")


def check_safetensors_file(path: str | os.PathLike) -> None:
    """Raise :class:`UnsafeFileError` unless ``path`` is a complete, well-formed safetensors file.

    Checked before any tensor is read, in this order: a regular file (not a folder, device or pipe); an
    8-byte little-endian header length that fits the file; not a pickle or ``torch.save`` zip (named in the
    error, never unpickled); a JSON object header; then the safetensors library's own validation of the
    header (``safe_open`` without reading tensors): known dtypes, each shape's byte size equal to its
    offsets, offsets in bounds and non-overlapping, the data covering the file exactly, metadata mapping
    strings to strings. Library errors are translated; their text never reaches the caller.
    """
    name = os.fspath(path)
    try:
        info = os.stat(name)
    except FileNotFoundError:  # not a bad file: callers decide (a missing checkpoint means "start fresh")
        raise FileNotFoundError(f"{name} does not exist; check the file name") from None
    except OSError as error:
        raise UnsafeFileError(f"{name} cannot be read ({error.strerror}); check its permissions") from None
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeFileError(f"{name} is not a regular file (a folder, device or pipe); choose a .safetensors file")
    size = info.st_size
    with open(name, "rb") as stream:
        head = stream.read(8)
        header_size = int.from_bytes(head, "little") if len(head) == 8 else -1
        header = stream.read(header_size) if 2 <= header_size <= min(size - 8, MAX_HEADER_BYTES) else b""
    if header[:1] != b"{":
        if head.startswith(b"PK\x03\x04"):
            kind = "a zip archive (a torch.save checkpoint holding pickled data)"
        elif head[:1] == b"\x80":
            kind = "a Python pickle"
        elif size == 0:
            kind = "empty"
        else:
            kind = "not a safetensors file"
        raise UnsafeFileError(f"{name} is {kind}; only safetensors files are loaded and pickle is never unpickled")
    try:
        entries = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        entries = None
    if not isinstance(entries, dict):
        raise UnsafeFileError(f"{name} is not a safetensors file (its header is not a JSON object); only safetensors "
                              "files are loaded")
    try:
        with safetensors.safe_open(name, framework="pt", device="cpu"):
            pass
    except (safetensors.SafetensorError, OSError, ValueError) as error:  # never shown raw
        problem = _header_problem(error)
        if "not fully covered" in str(error):
            problem += (f" (its header describes {_described_tensor_bytes(entries)} bytes of tensor data, the file "
                        f"holds {size - 8 - header_size})")
        raise UnsafeFileError(f"{name} is a damaged safetensors file: {problem}; copy or download it again") from None


def _described_tensor_bytes(entries: dict) -> int:
    """How many tensor bytes a safetensors header describes (the largest end offset)."""
    ends = [entry["data_offsets"][1] for key, entry in entries.items()
            if key != "__metadata__" and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list)
            and len(entry["data_offsets"]) == 2 and isinstance(entry["data_offsets"][1], int)]
    return max(ends, default=0)


def read_safetensors(path: str | os.PathLike, require_finite: bool = True) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read ``(tensors, metadata)`` of a safetensors file onto the CPU after :func:`check_safetensors_file`.

    With ``require_finite`` a floating-point tensor holding NaN or inf is refused (named): such weights
    would silently turn every output into NaN.
    """
    check_safetensors_file(path)
    with safetensors.safe_open(os.fspath(path), framework="pt", device="cpu") as reader:
        metadata = dict(reader.metadata() or {})
        tensors = {key: reader.get_tensor(key) for key in reader.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    if require_finite:
        broken = [key for key, value in tensors.items()
                  if value.is_floating_point() and not bool(value.isfinite().all())]
        if broken:
            raise UnsafeFileError(f"{os.fspath(path)} holds NaN or infinite values in {len(broken)} tensor(s) (e.g. "
                                  f"{broken[0]!r}); the file is broken: re-create or download it again")
    return tensors, metadata
