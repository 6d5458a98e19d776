"""What a file holds, told from its first bytes rather than its name.

Training frameworks name the same torch archive `.pt`, `.pth`, `.ckpt` (Lightning), `.pth.tar`
(timm), `.bin` (Hugging Face) or nothing at all, so checkpoints and arrays are recognised by content:

- torch zip archive (torch.save since 1.6): a zip whose first member is `<archive>/data.pkl`;
- legacy torch file (torch.save before 1.6, or `_use_new_zipfile_serialization=False`): a pickle
  stream, which starts with the PROTO opcode (0x80) and a protocol number 2-5;
- safetensors: an 8-byte little-endian header length, then a JSON header starting with `{`;
- numpy: `.npy` starts with `\\x93NUMPY`, `.npz` is a zip whose first member is `<name>.npy`.

Reading a few bytes runs nothing; each loader still checks the whole file as it reads it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import BinaryIO

TORCH_ZIP, TORCH_PICKLE, SAFETENSORS, NPY, NPZ = "torch zip", "torch pickle", "safetensors", "npy", "npz"
TORCH_FORMATS = (TORCH_ZIP, TORCH_PICKLE)
TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".tar", ".pkl")  # what frameworks name torch files

_ZIP_LOCAL_HEADER = b"PK\x03\x04"
_ZIP_NAME_OFFSET = 30  # a zip local header is 30 bytes, then the member's name
_SAFETENSORS_MAX_HEADER = 100_000_000  # the limit of the safetensors library


def detect_format(path: Path) -> str | None:
    """The format of a file from its first bytes (one of the constants above), or None; a special
    file or one this user may not read is refused first (files.check_readable)."""
    from lip_cli.files import check_readable

    check_readable(path)
    with open(path, "rb") as handle:
        head = handle.read(512)
        size = os.fstat(handle.fileno()).st_size
        if _is_safetensors(handle, head, size):  # first: a header length may start like a pickle
            return SAFETENSORS
    if head.startswith(b"\x93NUMPY"):
        return NPY
    if head.startswith(_ZIP_LOCAL_HEADER) and len(head) >= _ZIP_NAME_OFFSET:
        name_length = int.from_bytes(head[26:28], "little")
        first = head[_ZIP_NAME_OFFSET : _ZIP_NAME_OFFSET + name_length].decode("utf-8", "replace")
        if first == "data.pkl" or first.endswith("/data.pkl"):
            return TORCH_ZIP
        return NPZ if first.endswith(".npy") else None
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return TORCH_PICKLE
    return None


def _is_safetensors(handle: BinaryIO, head: bytes, size: int) -> bool:
    """A safetensors header: its length fits the file and it is a JSON object."""
    if len(head) < 9 or head[8:9] != b"{":
        return False
    length = int.from_bytes(head[:8], "little")
    if not 2 <= length <= min(size - 8, _SAFETENSORS_MAX_HEADER):
        return False
    handle.seek(8)
    try:
        return isinstance(json.loads(handle.read(length)), dict)
    except (ValueError, RecursionError):
        return False
