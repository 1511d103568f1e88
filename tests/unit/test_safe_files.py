"""Safe file I/O: atomic writes, and structural validation of every safetensors file before use.

Crafted files (unknown dtype, shapes that disagree with offsets, overlapping tensors, truncation, padding,
non-string metadata, pickles, zips, folders, empty files, NaN weights) are refused with a message that names
the file and what is wrong in plain words; the safetensors library's own text never reaches the caller.
"""
from __future__ import annotations

import json
import os
import pickle
import stat
import struct

import pytest
import safetensors.torch
import torch

from distill_core.safe_files import UnsafeFileError, check_safetensors_file, read_safetensors, write_safetensors

LIBRARY_TEXT = ("SafetensorError", "Error while deserializing", "variant", "usize", "HeaderTooLarge")


def crafted(path, header: dict, data: bytes) -> str:
    """A file with this JSON header and these data bytes, laid out as safetensors is."""
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return str(path)


F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
CRAFTED = {
    "unknown dtype": ({"w": {**F32_2, "dtype": "Q99"}}, 8, "unknown dtype"),
    "shape larger than its bytes": ({"w": {**F32_2, "shape": [3]}}, 8, "shape and dtype do not match"),
    "overlapping tensors": ({"w": F32_2, "v": F32_2}, 8, "overlap"),
    "negative shape": ({"w": {**F32_2, "shape": [-2]}}, 8, "negative or not an integer"),
    "offsets past the end": ({"w": {**F32_2, "data_offsets": [0, 64]}}, 8, "damaged safetensors file"),
    "padded data": ({"w": F32_2}, 16, "truncated or padded"),
    "truncated data": ({"w": F32_2}, 4, "truncated or padded"),
    "non-string metadata": ({"w": F32_2, "__metadata__": {"steps": 3}}, 8, "metadata value is not a string"),
    "header is a list": ([1, 2], 0, "not a safetensors file"),
    "header is a JSON string": ("{}", 0, "not a safetensors file"),
}


@pytest.mark.parametrize("case", CRAFTED, ids=str)
def test_crafted_headers_are_refused_in_plain_words(tmp_path, case):
    header, data_bytes, message = CRAFTED[case]
    path = crafted(tmp_path / "crafted.safetensors", header, b"\0" * data_bytes)
    for read in (check_safetensors_file, read_safetensors):
        with pytest.raises(UnsafeFileError, match=message) as refused:
            read(path)
        assert path in str(refused.value)
        assert not any(text in str(refused.value) for text in LIBRARY_TEXT), str(refused.value)


def test_valid_out_of_order_tensors_are_accepted(tmp_path):
    """The format allows tensors in any order as long as they tile the data exactly."""
    path = crafted(tmp_path / "ok.safetensors", {"w": {**F32_2, "data_offsets": [8, 16]}, "v": F32_2},
                   struct.pack("<4f", 1, 2, 3, 4))
    tensors, _ = read_safetensors(path)
    assert tensors["v"].tolist() == [1, 2] and tensors["w"].tolist() == [3, 4]


def test_headers_that_do_not_fit_the_file_empty_files_and_folders_are_refused(tmp_path):
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x02\x00")
    not_json = tmp_path / "not_json.safetensors"
    not_json.write_bytes(struct.pack("<Q", 6) + b"{oops}")
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    for path, message in ((huge, "not a safetensors file"), (empty, "is empty"), (short, "not a safetensors file"),
                          (not_json, "not a JSON object"),
                          (folder, "not a regular file")):
        with pytest.raises(UnsafeFileError, match=message):
            read_safetensors(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_safetensors(tmp_path / "missing.safetensors")


def test_non_finite_weights_are_refused_unless_allowed(tmp_path):
    path = tmp_path / "nan.safetensors"
    write_safetensors(path, {"good": torch.ones(2), "bad": torch.tensor([1.0, float("nan")]), "ints": torch.arange(3)})
    with pytest.raises(UnsafeFileError, match=r"NaN or infinite values in 1 tensor.*'bad'"):
        read_safetensors(path)
    tensors, _ = read_safetensors(path, require_finite=False)
    assert tensors["bad"].isnan().any()


def test_a_symlink_to_a_valid_file_is_read(tmp_path):
    target = tmp_path / "real.safetensors"
    write_safetensors(target, {"w": torch.ones(2)})
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    assert torch.equal(read_safetensors(link)[0]["w"], torch.ones(2))


def test_atomic_save_leaves_no_temp_files_and_survives_a_failed_write(tmp_path, monkeypatch):
    path = tmp_path / "lora.safetensors"
    write_safetensors(path, {"a": torch.ones(3)}, {"version": "1"})
    assert sorted(os.listdir(tmp_path)) == ["lora.safetensors"]
    reference = tmp_path / "reference"
    reference.write_bytes(b"")  # a file created the ordinary way: same permissions expected
    assert stat.S_IMODE(os.stat(path).st_mode) == stat.S_IMODE(os.stat(reference).st_mode)
    reference.unlink()
    original = path.read_bytes()

    def failing_fsync(descriptor: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_safetensors(path, {"a": torch.zeros(1000)}, {"version": "2"})
    with pytest.raises(OSError, match="disk full"):
        write_safetensors(tmp_path / "new.safetensors", {"a": torch.zeros(3)})
    assert sorted(os.listdir(tmp_path)) == ["lora.safetensors"]
    assert path.read_bytes() == original
    with pytest.raises(TypeError, match="str to str"):
        write_safetensors(path, {"a": torch.ones(1)}, {"steps": 3})


class _Exploit:
    def __reduce__(self):
        return (os.mkdir, (os.environ["STRIDE_PICKLE_MARKER"],))


def test_pickle_and_torch_save_files_are_refused_before_unpickling(tmp_path, monkeypatch):
    marker = tmp_path / "unpickled"
    monkeypatch.setenv("STRIDE_PICKLE_MARKER", str(marker))
    raw_pickle = tmp_path / "raw.ckpt"
    raw_pickle.write_bytes(pickle.dumps(_Exploit(), protocol=2))
    with pytest.raises(UnsafeFileError, match="Python pickle"):
        read_safetensors(raw_pickle)
    zipped = tmp_path / "torch.pt"
    torch.save({"weights": _Exploit()}, zipped)
    with pytest.raises(UnsafeFileError, match="zip archive"):
        read_safetensors(zipped)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(UnsafeFileError, match="not a safetensors file"):
        read_safetensors(garbage)
    assert not marker.exists()


def test_a_safetensors_header_length_that_looks_like_a_pickle_opcode_is_accepted(tmp_path):
    """0x80 is pickle's PROTO opcode and also a possible first byte of a header length."""
    path = tmp_path / "lora.safetensors"
    for pad in range(64):
        payload = safetensors.torch.save({"w": torch.ones(2)}, metadata={"pad": "x" * pad})
        if payload[0] == 0x80:
            break
    else:
        pytest.fail("no padding gave a header length ending in 0x80")
    path.write_bytes(payload)
    tensors, metadata = read_safetensors(path)
    assert torch.equal(tensors["w"], torch.ones(2)) and metadata["pad"] == "x" * pad
