"""File input/output every part shares: one atomic writer, and one safe reader for weight files.

A weight file is untrusted input: ``torch.load(weights_only=False)`` would run whatever its pickle says, so
every weight file is read with ``weights_only=True`` (tensors, plain containers and numbers only). A legacy file
that needs more is refused with an error naming the file and the switch that allows it for trusted files.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

TMP_SUFFIX = ".tmp"  # every temp file of atomic_write ends so: what a crashed writer left can be found and removed


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write through a temp file in the same folder, fsync and rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_torch(obj: Any, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def save_json(obj: Any, path: Path) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True).encode()))


def load_weights(path: str | Path, trust_pickle: bool, switch: str) -> Any:
    """``torch.load`` of a weight file on the CPU, tensors only unless ``trust_pickle``.

    ``switch`` is the config key that sets ``trust_pickle`` (named in the error, so the user knows what to set
    for a file they trust)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path}: not loadable as plain weights (weights_only=True refused it: {str(err).splitlines()[0]}). "
            f"Loading it would execute code stored in the file. Only if you trust where it came from, set "
            f"{switch}=true; better, re-save it as a plain state dict: torch.save(model.state_dict(), path)"
        ) from err


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
