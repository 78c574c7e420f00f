"""A large, deterministic benchmark corpus of tiny CT Part-10 files, generated fast.

    python benchmarks/corpus.py OUT_DIR [--studies 300] [--series 3] [--instances 30]

writes ``studies x series x instances`` files (default 27,000, about 2 kB each). The benchmark
itself (``bench_crawl.py``) does not write files: it takes the bytes from :func:`iter_files` and
posts them to Orthanc straight away.

Speed comes from building one template dataset (file meta, patient/study/series/image modules,
8x8 16-bit pixels), changing only what differs per study and series, letting pydicom write one
file per series, and making that series' instances by re-encoding the few per-instance elements
(SOP Instance UID in the file meta and the dataset, InstanceNumber, ImagePositionPatient,
SliceLocation) in its bytes: about 0.1 ms per instance, 3 s for the default 27,000, and
byte-for-byte what pydicom itself writes for each instance. Instance UIDs are 44 characters long
so that the file meta group length never changes.

Deterministic: no clock and no randomness. UIDs are ``2.25.`` UIDs derived from a fixed UUID
namespace and the study/series/instance numbers; the other values are arithmetic on the
numbers. The same pydicom version gives the same bytes.

What it looks like (a hospital CT archive in miniature):

* patients: about two studies per patient (``BENCH`` + 6 digits), names from a small list;
* StudyDate spread over 2021-01-01 .. 2024-12-31 (deterministic scatter), StudyTime during the
  working day with seconds, AccessionNumber, StudyID, StudyDescription, ReferringPhysicianName,
  InstitutionName;
* per series: Modality CT, SeriesNumber, SeriesDescription, BodyPartExamined from a list of
  Annex L values (CHEST, ABDOMEN, HEAD, PELVIS, NECK, ...), Manufacturer and model, ProtocolName;
* per instance: CT Image Storage, InstanceNumber, ImagePositionPatient/SliceLocation, 8x8
  MONOCHROME2 pixels (16 bits allocated, 12 stored).
"""

from __future__ import annotations

import argparse
import io
import sys
import uuid
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

NAMESPACE = uuid.UUID("6f2b1c1e-4d7a-5b55-9a43-0c2b3e0d9a17")
FIRST_DAY = date(2021, 1, 1)
DAYS = (date(2024, 12, 31) - FIRST_DAY).days + 1

FAMILY = ("Lindqvist", "Okonkwo", "Moreau", "Haddad", "Novak", "Ferreira", "Kowalczyk", "Tanaka",
          "Brennan", "Oyelaran", "Castellanos", "Vasquez", "Halvorsen", "Marchetti", "Dubois", "Petrov")
GIVEN = ("Astrid", "Chidi", "Elodie", "Karim", "Jana", "Tiago", "Marta", "Haruki", "Siobhan",
         "Femi", "Lucia", "Mateo", "Ingrid", "Paolo", "Camille", "Dmitri")
REFERRERS = ("Abernathy^Ruth^^Dr", "Nakamura^Ken^^Dr", "Osei^Ama^^Dr", "Delacroix^Jean^^Dr")
PROTOCOLS = (
    # (StudyDescription, [(SeriesDescription, BodyPartExamined), ...])
    ("CT THORAX W CONTRAST", [("Scout", "CHEST"), ("Thorax 1.0 B31f", "CHEST"), ("Thorax 5.0 B70f", "CHEST"), ("MIP cor", "CHEST")]),
    ("CT ABDOMEN PELVIS", [("Topogram", "ABDOMEN"), ("Abdomen arterial", "ABDOMEN"), ("Pelvis venous", "PELVIS"), ("Abdomen delayed", "ABDOMEN")]),
    ("CT HEAD WO CONTRAST", [("Localizer", "HEAD"), ("Head 5mm axial", "HEAD"), ("Head bone", "HEAD"), ("Head sag MPR", "HEAD")]),
    ("CT NECK SOFT TISSUE", [("Scout", "NECK"), ("Neck 2mm", "NECK"), ("Neck cor MPR", "NECK"), ("Neck sag MPR", "NECK")]),
    ("CT SPINE LUMBAR", [("Scout", "LSPINE"), ("L-spine bone", "LSPINE"), ("L-spine soft", "LSPINE"), ("L-spine sag", "LSPINE")]),
)
SCANNERS = (("SIEMENS", "SOMATOM Force"), ("GE MEDICAL SYSTEMS", "Revolution CT"), ("Philips", "IQon Spectral CT"))
PIXELS = bytes(range(64)) * 2  # 8x8 x 2 bytes, values < 4096


def uid(*parts: object) -> str:
    """A deterministic ``2.25.`` UID for a path like ("study", 7) or ("instance", 7, 2, 15)."""
    return f"2.25.{uuid.uuid5(NAMESPACE, '/'.join(map(str, parts))).int}"


def _scatter(i: int, modulus: int) -> int:
    """A fixed, well-spread permutation-like value in [0, modulus) for study ``i``."""
    return (i * 2654435761 + 97) % modulus


def template() -> Dataset:
    ds = Dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = uid("template")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "QIDOBENCH1"
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20210101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "080000"
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = ""
    ds.InstitutionName = "Riverside General Hospital"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = ""
    ds.SeriesDescription = ""
    ds.ManufacturerModelName = ""
    ds.PatientName = ""
    ds.PatientID = ""
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.BodyPartExamined = ""
    ds.SliceThickness = "1.0"
    ds.KVP = "120"
    ds.ProtocolName = ""
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = ""
    ds.SeriesInstanceUID = ""
    ds.StudyID = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = [-200.0, -200.0, 0.0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = ""
    ds.SliceLocation = 0.0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 8
    ds.Columns = 8
    ds.PixelSpacing = [0.75, 0.75]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.PixelData = PIXELS
    return ds


def fixed_uid(*parts: object) -> str:
    """Like :func:`uid`, but always 44 characters (a 39-digit UUID integer), so that files can be
    patched in place: the first of ``parts + (k,)`` for k = 0, 1, ... whose UUID is that long."""
    k = 0
    while True:
        value = uuid.uuid5(NAMESPACE, "/".join(map(str, (*parts, k)))).int
        if value >= 10**38:
            return f"2.25.{value}"
        k += 1


_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
# Per-instance elements, in file order: (group, element, VR).
_PATCHED = ((0x0002, 0x0003, b"UI"), (0x0008, 0x0018, b"UI"), (0x0020, 0x0013, b"IS"), (0x0020, 0x0032, b"DS"), (0x0020, 0x1041, b"DS"))


def _segments(body: bytes) -> list[bytes]:
    """``body`` (Explicit VR Little Endian, no sequences) cut around the _PATCHED elements:
    len(_PATCHED) + 1 pieces to put the freshly encoded elements between."""
    wanted = {(g, e): vr for g, e, vr in _PATCHED}
    pieces, start, offset = [], 0, 132
    while offset < len(body):
        group = int.from_bytes(body[offset:offset + 2], "little")
        element = int.from_bytes(body[offset + 2:offset + 4], "little")
        vr = body[offset + 4:offset + 6]
        if vr in _LONG_VRS:
            end = offset + 12 + int.from_bytes(body[offset + 8:offset + 12], "little")
        else:
            end = offset + 8 + int.from_bytes(body[offset + 6:offset + 8], "little")
        if (group, element) in wanted:
            assert vr == wanted[(group, element)], (group, element, vr)
            pieces.append(body[start:offset])
            start = end
        offset = end
    pieces.append(body[start:])
    assert len(pieces) == len(_PATCHED) + 1, "template lacks a patched element"
    return pieces


def _element(group: int, element: int, vr: bytes, text: str) -> bytes:
    value = text.encode("ascii")
    if len(value) % 2:
        value += b"\0" if vr == b"UI" else b" "
    return group.to_bytes(2, "little") + element.to_bytes(2, "little") + vr + len(value).to_bytes(2, "little") + value


def iter_files(studies: int, series: int, instances: int) -> Iterator[tuple[str, bytes]]:
    """``(relative name, Part-10 bytes)`` for every instance, study by study.

    pydicom writes one file per series; its instances are that file with the per-instance
    elements (SOP Instance UID, InstanceNumber, ImagePositionPatient, SliceLocation) re-encoded.
    """
    ds = template()
    for s in range(studies):
        study_uid = uid("study", s)
        patient = s // 2 + (s % 7 == 0)  # most patients have two studies, some one or three
        day = FIRST_DAY + timedelta(days=_scatter(s, DAYS))
        seconds = 7 * 3600 + _scatter(s, 11 * 3600)  # 07:00:00 .. 17:59:59
        hhmmss = f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"
        description, plan = PROTOCOLS[s % len(PROTOCOLS)]
        vendor, model = SCANNERS[s % len(SCANNERS)]
        ds.StudyInstanceUID = study_uid
        ds.FrameOfReferenceUID = uid("frame", s)
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = day.strftime("%Y%m%d")
        ds.StudyTime = hhmmss
        ds.StudyID = str(1000 + s)
        ds.AccessionNumber = f"RGH{day.year}{s:06d}"
        ds.StudyDescription = description
        ds.ReferringPhysicianName = REFERRERS[s % len(REFERRERS)]
        ds.PatientID = f"BENCH{patient:06d}"
        ds.PatientName = f"{FAMILY[patient % len(FAMILY)]}^{GIVEN[(patient // len(FAMILY)) % len(GIVEN)]}"
        ds.PatientBirthDate = f"{1930 + patient % 70}{1 + patient % 12:02d}{1 + patient % 28:02d}"
        ds.PatientSex = "FM"[patient % 2]
        ds.Manufacturer = vendor
        ds.ManufacturerModelName = model
        ds.ProtocolName = description.title()
        for r in range(series):
            series_description, body_part = plan[r % len(plan)]
            series_seconds = seconds + 60 * r
            ds.SeriesInstanceUID = uid("series", s, r)
            ds.SeriesNumber = r + 1
            ds.SeriesDescription = series_description
            ds.BodyPartExamined = body_part
            ds.SeriesTime = ds.ContentTime = f"{series_seconds // 3600 % 24:02d}{series_seconds // 60 % 60:02d}{series_seconds % 60:02d}"
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = fixed_uid("template")
            buffer = io.BytesIO()
            dcmwrite(buffer, ds, enforce_file_format=True)
            pieces = _segments(buffer.getvalue())
            for i in range(instances):
                sop = fixed_uid("instance", s, r, i)
                encoded = _element(0x0002, 0x0003, b"UI", sop), _element(0x0008, 0x0018, b"UI", sop), _element(
                    0x0020, 0x0013, b"IS", str(i + 1)
                ), _element(0x0020, 0x0032, b"DS", f"-200\\-200\\{-i}"), _element(0x0020, 0x1041, b"DS", str(-i))
                parts = [pieces[0]]
                for element, piece in zip(encoded, pieces[1:]):
                    parts += (element, piece)
                yield f"{s:05d}/{r:03d}/{i:05d}.dcm", b"".join(parts)


def write(out: Path, studies: int, series: int, instances: int) -> int:
    count = 0
    for name, body in iter_files(studies, series, instances):
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
        count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the benchmark corpus as DICOM Part-10 files.")
    parser.add_argument("out", type=Path)
    parser.add_argument("--studies", type=int, default=300)
    parser.add_argument("--series", type=int, default=3)
    parser.add_argument("--instances", type=int, default=30)
    args = parser.parse_args(argv)
    count = write(args.out, args.studies, args.series, args.instances)
    print(f"{count} files in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
