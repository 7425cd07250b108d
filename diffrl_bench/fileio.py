"""Atomic file writes: a reader, or a crash, sees a file's old content or its new one, never half of it."""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Union


def atomic_write(path: Union[str, Path], data: Union[bytes, str]) -> Path:
    """Write `data` (bytes, or text as UTF-8) to `path` through a temporary file beside it, renamed over it.

    The temporary name is unique per process and call, so concurrent writers (threads of one sweep, processes of
    another) never share one; the data reaches the disk before the rename, so a machine crash cannot leave an
    empty marker file; a failed write removes its temporary file and leaves `path` as it was.
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        # A plain open() rather than mkstemp keeps the umask's permissions (mkstemp files are owner-only).
        with open(tmp, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
