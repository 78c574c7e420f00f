"""The attributes the mappers read from a study's, a series' or an instance's dataset.

WADO-RS metadata carries every attribute of every instance (pixel module, geometry, private
tags ...), and decoding all of it was most of the crawler's work on the metadata path. The
decoder keeps only these (see ``crawler.leanjson``): ``READ_TAGS`` of the first instance of each
series, which is where the mapping reads the series' (and the study's) attributes, and
``INSTANCE_TAGS`` of the others. Tests check that every ``Tag`` named in the mapping modules is
in ``READ_TAGS``, and that studies whose instances disagree on their series' attributes map the
same from the reduced datasets as from the whole ones.
"""

from __future__ import annotations

from ..dicomjson import Tag

INSTANCE_TAGS: frozenset[str] = frozenset({
    Tag.SeriesInstanceUID, Tag.SOPInstanceUID, Tag.SOPClassUID, Tag.InstanceNumber, Tag.ImageType,
    Tag.DocumentTitle, Tag.SpecimenDescriptionSequence,
})  # fmt: skip
"""What the mapping reads from every instance result, not only from the first of its series."""

READ_TAGS: frozenset[str] = frozenset({
    Tag.SpecificCharacterSet, Tag.ImageType, Tag.SOPClassUID, Tag.SOPInstanceUID,
    Tag.StudyDate, Tag.SeriesDate, Tag.StudyTime, Tag.SeriesTime, Tag.AccessionNumber,
    Tag.IssuerOfAccessionNumberSequence, Tag.RetrieveAETitle, Tag.InstanceAvailability,
    Tag.ModalitiesInStudy, Tag.Modality, Tag.Manufacturer, Tag.InstitutionName,
    Tag.ReferringPhysicianName, Tag.ReferringPhysicianIdentificationSequence,
    Tag.TimezoneOffsetFromUTC, Tag.RetrieveURL, Tag.StudyDescription, Tag.ProcedureCodeSequence,
    Tag.SeriesDescription, Tag.InstitutionalDepartmentName, Tag.InstitutionalDepartmentTypeCodeSequence,
    Tag.PerformingPhysicianName, Tag.PerformingPhysicianIdentificationSequence, Tag.OperatorsName,
    Tag.OperatorIdentificationSequence, Tag.ManufacturerModelName, Tag.AnatomicRegionSequence,
    Tag.PatientName, Tag.PatientID, Tag.IssuerOfPatientID, Tag.IssuerOfPatientIDQualifiersSequence,
    Tag.PatientBirthDate, Tag.PatientSex, Tag.BodyPartExamined, Tag.StudyInstanceUID,
    Tag.SeriesInstanceUID, Tag.StudyID, Tag.SeriesNumber, Tag.InstanceNumber, Tag.Laterality,
    Tag.NumberOfStudyRelatedSeries, Tag.NumberOfStudyRelatedInstances, Tag.NumberOfSeriesRelatedInstances,
    Tag.ReasonForTheRequestedProcedure, Tag.ReasonForRequestedProcedureCodeSequence,
    Tag.SpecimenDescriptionSequence, Tag.SpecimenIdentifier, Tag.SpecimenUID,
    Tag.IssuerOfTheSpecimenIdentifierSequence, Tag.DocumentTitle,
    # read inside sequence items (a sequence kept is kept whole); listed so that this set is
    # simply every attribute the mapping names
    Tag.CodeValue, Tag.CodingSchemeDesignator, Tag.CodingSchemeVersion, Tag.CodeMeaning,
    Tag.LongCodeValue, Tag.URNCodeValue, Tag.LocalNamespaceEntityID, Tag.UniversalEntityID,
    Tag.UniversalEntityIDType, Tag.PersonIdentificationCodeSequence,
})  # fmt: skip
