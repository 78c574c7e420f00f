"""A Bulk Data style folder: ``manifest.json`` plus one ``<ResourceType>.ndjson`` per type.

Files are written as ``*.part`` and renamed when complete; the manifest is written last, so a
folder without ``manifest.json`` is an interrupted one. At each ``flush`` the part files are
synced to disk and their sizes written to ``checkpoint.json`` (atomically); the state is
committed only after that. A later run completes an interrupted folder by cutting its part
files back to the last checkpoint (what the state knows was written) and writing the manifest,
or removes it when it never reached a checkpoint. The folder is made only when there is
something to put in it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO

import orjson

from ..errors import SinkError
from ..files import make_folder, make_new_folder, open_private
from .base import Resource

ERROR_TYPE = "OperationOutcome"
DELETED = "deleted"
CHECKPOINT = "checkpoint.json"


def _deletion(resource_type: str, resource_id: str) -> bytes:
    return orjson.dumps(
        {"resourceType": "Bundle", "type": "transaction", "entry": [{"request": {"method": "DELETE", "url": f"{resource_type}/{resource_id}"}}]}
    )


def write_manifest(folder: Path, counts: dict[str, int], transaction_time: str, request: str) -> None:
    manifest = {
        "transactionTime": transaction_time,
        "request": request,
        "requiresAccessToken": False,
        "output": [{"type": t, "url": f"{t}.ndjson", "count": n} for t, n in sorted(counts.items()) if t not in (ERROR_TYPE, DELETED) and n],
        "deleted": [{"type": "Bundle", "url": f"{DELETED}.ndjson", "count": counts[DELETED]}] if counts.get(DELETED) else [],
        "error": [{"type": ERROR_TYPE, "url": f"{ERROR_TYPE}.ndjson", "count": counts[ERROR_TYPE]}] if counts.get(ERROR_TYPE) else [],
    }
    part = folder / "manifest.json.part"
    with open_private(part, "w") as handle:
        handle.write(json.dumps(manifest, indent=2) + "\n")
    os.replace(part, folder / "manifest.json")


class NdjsonFolder:
    """``fresh``: the folder must not exist yet (a run folder: a run writes only into a folder it
    made); otherwise it may exist, empty (``export``)."""

    def __init__(self, folder: Path, *, transaction_time: str, request: str, always: bool = False, fresh: bool = False) -> None:
        self.folder = Path(folder)
        self.transaction_time = transaction_time
        self.request = request
        self.always = always
        self.fresh = fresh
        self._made = False
        self._files: dict[str, IO[bytes]] = {}
        self._counts: dict[str, int] = {}
        self._shared: dict[tuple[str, str], bytes] = {}

    def _file(self, name: str) -> IO[bytes]:
        handle = self._files.get(name)
        if handle is None:
            self._make()
            try:
                handle = open_private(self.folder / f"{name}.ndjson.part", "wb")
            except OSError as exc:
                raise SinkError(f"cannot write to {self.folder}: {exc.strerror}") from None
            self._files[name] = handle
            self._counts[name] = 0
        return handle

    def _make(self) -> None:
        if self._made:
            return
        try:
            if self.fresh:
                make_new_folder(self.folder)
            else:
                make_folder(self.folder)
        except FileExistsError:
            raise SinkError(
                f"run folder {self.folder} exists already: is a copy of this state used by another job? Nothing was written into it"
            ) from None
        except OSError as exc:
            raise SinkError(f"cannot write to {self.folder}: {exc.strerror}") from None
        self._made = True

    def _line(self, name: str, body: bytes) -> None:
        try:
            self._file(name).write(body + b"\n")
        except OSError as exc:
            raise SinkError(f"cannot write to {self.folder}: {exc.strerror}") from None
        self._counts[name] += 1

    def write(self, resource_type: str, body: bytes) -> None:
        self._line(resource_type, body)

    def add(self, key: str, resources: Sequence[Resource]) -> None:
        """Write each resource once per run: a shared resource (Endpoint, Patient) that comes again
        unchanged with another study is skipped (remembered by a short digest, not its body)."""
        for resource_type, resource_id, body in resources:
            if resource_type != "ImagingStudy":
                fingerprint = hashlib.blake2b(body, digest_size=12).digest()
                if self._shared.get((resource_type, resource_id)) == fingerprint:
                    continue
                self._shared[(resource_type, resource_id)] = fingerprint
            self._line(resource_type, body)

    def delete(self, key: str, resource_type: str, resource_id: str) -> None:
        self._line(DELETED, _deletion(resource_type, resource_id))

    def error(self, body: bytes) -> None:
        self._line(ERROR_TYPE, body)

    @property
    def written(self) -> int:
        return sum(n for t, n in self._counts.items() if t not in (ERROR_TYPE, DELETED))

    def flush(self) -> dict[str, str]:
        # after a checkpoint the state knows the shared resources written so far, and sends them
        # again only when they change, so remembering them here is needed only until then
        self._shared.clear()
        if not self._files:
            return {}
        try:
            sizes = {}
            for name, handle in self._files.items():
                handle.flush()
                os.fsync(handle.fileno())
                sizes[name] = [handle.tell(), self._counts[name]]
            part = self.folder / f"{CHECKPOINT}.part"
            with open_private(part, "w") as out:
                json.dump({"transactionTime": self.transaction_time, "request": self.request, "files": sizes}, out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(part, self.folder / CHECKPOINT)
        except OSError as exc:
            raise SinkError(f"cannot write to {self.folder}: {exc.strerror}") from None
        return {}

    def finish(self) -> str | None:
        if not self._files and not self.always:
            return None
        self._make()
        try:
            for name, handle in self._files.items():
                handle.flush()
                os.fsync(handle.fileno())
                handle.close()
                os.replace(self.folder / f"{name}.ndjson.part", self.folder / f"{name}.ndjson")
            write_manifest(self.folder, self._counts, self.transaction_time, self.request)
            (self.folder / CHECKPOINT).unlink(missing_ok=True)
        except OSError as exc:
            raise SinkError(f"cannot finish {self.folder}: {exc.strerror}") from None
        self._files.clear()
        return str(self.folder)

    def abort(self) -> None:
        """Stop: keep what the last checkpoint holds (the state knows it was sent), drop the rest."""
        for handle in self._files.values():
            handle.close()
        self._files.clear()
        if self._made and not (self.folder / "manifest.json").exists():
            complete(self.folder)


def _ours(name: str) -> bool:
    return name.endswith(".ndjson.part") or name in (f"{CHECKPOINT}.part", "manifest.json.part")


def complete(folder: Path) -> bool:
    """Finish an interrupted folder at its last checkpoint; remove it when it has none (only the
    files a run writes, then the folder if nothing else is in it).

    Returns True when the folder was completed (it then has its manifest), False if removed.
    """
    checkpoint = folder / CHECKPOINT
    if not checkpoint.exists():
        for path in folder.iterdir():
            if _ours(path.name):
                path.unlink()
        try:
            folder.rmdir()
        except OSError:
            pass
        return False
    saved = json.loads(checkpoint.read_text())
    counts = {}
    for name, (size, count) in saved["files"].items():
        part = folder / f"{name}.ndjson.part"
        with open(part, "r+b") as handle:
            handle.truncate(size)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(part, folder / f"{name}.ndjson")
        counts[name] = count
    for stray in folder.glob("*.part"):
        if _ours(stray.name):
            stray.unlink()
    write_manifest(folder, counts, saved["transactionTime"], saved["request"])
    checkpoint.unlink()
    return True


def recover(folders: Iterable[str | Path]) -> tuple[list[Path], list[Path]]:
    """Complete or remove the run folders that interrupted runs of this state left: only those
    ``folders`` (what the state recorded before making them), never others that merely look like
    run folders (another job's, being written, or anyone's).

    A folder with a checkpoint is cut back to it and given its manifest (everything up to the
    checkpoint is what the state recorded as sent); one without is removed. Returns
    (completed, removed).
    """
    completed: list[Path] = []
    removed: list[Path] = []
    for name in folders:
        folder = Path(name)
        if folder.is_dir() and not (folder / "manifest.json").exists():
            (completed if complete(folder) else removed).append(folder)
    return completed, removed
