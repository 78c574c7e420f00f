"""A Bulk Data style folder: ``manifest.json`` plus one ``<ResourceType>.ndjson`` per type.

Files are written as ``*.part`` and renamed when complete; the manifest is written last, so a
folder without ``manifest.json`` is an interrupted one. The folder is made only when there is
something to put in it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import IO

from ..errors import SinkError

ERROR_TYPE = "OperationOutcome"


class NdjsonFolder:
    def __init__(self, folder: Path, *, transaction_time: str, request: str, always: bool = False) -> None:
        self.folder = Path(folder)
        self.transaction_time = transaction_time
        self.request = request
        self.always = always
        self._files: dict[str, IO[bytes]] = {}
        self._counts: dict[str, int] = {}
        self._errors = 0

    def _file(self, name: str) -> IO[bytes]:
        handle = self._files.get(name)
        if handle is None:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                handle = open(self.folder / f"{name}.ndjson.part", "wb")
            except OSError as exc:
                raise SinkError(f"cannot write to {self.folder}: {exc.strerror}") from None
            self._files[name] = handle
            self._counts[name] = 0
        return handle

    def write(self, resource_type: str, body: bytes) -> None:
        try:
            self._file(resource_type).write(body + b"\n")
        except OSError as exc:
            raise SinkError(f"cannot write to {self.folder}: {exc.strerror}") from None
        self._counts[resource_type] += 1

    def error(self, body: bytes) -> None:
        self.write(ERROR_TYPE, body)

    @property
    def written(self) -> int:
        return sum(n for t, n in self._counts.items() if t != ERROR_TYPE)

    def finish(self) -> str | None:
        if not self._files and not self.always:
            return None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            for name, handle in self._files.items():
                handle.flush()
                os.fsync(handle.fileno())
                handle.close()
                os.replace(self.folder / f"{name}.ndjson.part", self.folder / f"{name}.ndjson")
            manifest = {
                "transactionTime": self.transaction_time,
                "request": self.request,
                "requiresAccessToken": False,
                "output": [
                    {"type": t, "url": f"{t}.ndjson", "count": n} for t, n in sorted(self._counts.items()) if t != ERROR_TYPE
                ],
                "deleted": [],
                "error": [{"type": ERROR_TYPE, "url": f"{ERROR_TYPE}.ndjson", "count": self._counts[ERROR_TYPE]}]
                if ERROR_TYPE in self._counts
                else [],
            }
            part = self.folder / "manifest.json.part"
            part.write_text(json.dumps(manifest, indent=2) + "\n")
            os.replace(part, self.folder / "manifest.json")
        except OSError as exc:
            raise SinkError(f"cannot finish {self.folder}: {exc.strerror}") from None
        self._files.clear()
        return str(self.folder)

    def abort(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()
        if self.folder.exists() and not (self.folder / "manifest.json").exists():
            shutil.rmtree(self.folder, ignore_errors=True)
