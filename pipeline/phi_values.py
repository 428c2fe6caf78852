"""Patient data in DICOM headers: the values of PS3.15 Annex E's basic profile that one file holds.

Names, IDs, dates and times, institution, station, device serial, operators, descriptions,
comments and private tags. Read only to recognise them elsewhere (:mod:`pipeline.privacy`
rewrites paths and messages holding them); never logged. Placeholders that anonymisers leave
("Anonymous", "NONE", "Unknown") identify no one and are not collected.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline.io.dicom_tags import FastParseError, parse_prefix
from pipeline.io.dicom_text import text_elements

log = logging.getLogger(__name__)

MIN_LENGTH = 3  # shorter values ("M", "4", "Li") would match everywhere; they cannot be told from noise
PRIVATE_MIN_LENGTH = 6  # private tags hold mostly vendor words ("Fast", "None", "EPI"); only longer ones count
# What anonymisers and scanners write where a value was removed or never entered: it identifies no one, and
# treating it as PHI turned file names ("Unknown/...") and the words of messages ("none", "test") into tokens.
PLACEHOLDERS = frozenset({
    "none", "unknown", "anonymous", "anonymized", "anonymised", "anon", "n/a", "null", "nil", "removed",
    "deleted", "redacted", "deidentified", "de-identified", "unspecified", "not specified", "empty", "blank",
    "test", "phantom",
})
# Annex E basic-profile attributes that are not person names, dates or times (those VRs are all PHI), by tag
# (tests/unit/test_dicom_text.py checks the tags against pydicom's dictionary).
PHI_ATTRIBUTES: dict[int, str] = {
    0x00080050: "AccessionNumber", 0x00080080: "InstitutionName", 0x00080081: "InstitutionAddress",
    0x00080092: "ReferringPhysicianAddress", 0x00080094: "ReferringPhysicianTelephoneNumbers",
    0x00081010: "StationName", 0x00081030: "StudyDescription", 0x0008103E: "SeriesDescription",
    0x00081040: "InstitutionalDepartmentName", 0x00081080: "AdmittingDiagnosesDescription",
    0x00082111: "DerivationDescription", 0x00084000: "IdentifyingComments", 0x00100020: "PatientID",
    0x00100021: "IssuerOfPatientID", 0x00101000: "OtherPatientIDs", 0x00101001: "OtherPatientNames",
    0x00101005: "PatientBirthName", 0x00101010: "PatientAge", 0x00101040: "PatientAddress",
    0x00101060: "PatientMotherBirthName", 0x00101080: "MilitaryRank", 0x00101081: "BranchOfService",
    0x00101090: "MedicalRecordLocator", 0x00102000: "MedicalAlerts", 0x00102110: "Allergies",
    0x00102150: "CountryOfResidence", 0x00102152: "RegionOfResidence", 0x00102154: "PatientTelephoneNumbers",
    0x00102160: "EthnicGroup", 0x00102180: "Occupation", 0x001021B0: "AdditionalPatientHistory",
    0x001021F0: "PatientReligiousPreference", 0x00102297: "ResponsiblePerson", 0x00102299: "ResponsibleOrganization",
    0x00104000: "PatientComments", 0x00120030: "ClinicalTrialSiteID", 0x00120031: "ClinicalTrialSiteName",
    0x00120040: "ClinicalTrialSubjectID", 0x00120042: "ClinicalTrialSubjectReadingID",
    0x00120060: "ClinicalTrialCoordinatingCenterName", 0x00181000: "DeviceSerialNumber", 0x00181004: "PlateID",
    0x00181005: "GeneratorID", 0x00181007: "CassetteID", 0x00181008: "GantryID", 0x00181030: "ProtocolName",
    0x00181400: "AcquisitionDeviceProcessingDescription", 0x00184000: "AcquisitionComments",
    0x0018700A: "DetectorID", 0x00200010: "StudyID", 0x00203406: "ModifiedImageDescription",
    0x00204000: "ImageComments", 0x00284000: "ImagePresentationComments", 0x00321030: "ReasonForStudy",
    0x00321033: "RequestingService", 0x00321060: "RequestedProcedureDescription",
    0x00321070: "RequestedContrastAgent", 0x00324000: "StudyComments", 0x00380010: "AdmissionID",
    0x00380011: "IssuerOfAdmissionID", 0x00380040: "DischargeDiagnosisDescription", 0x00380050: "SpecialNeeds",
    0x00380060: "ServiceEpisodeID", 0x00380062: "ServiceEpisodeDescription", 0x00380300: "CurrentPatientLocation",
    0x00380400: "PatientInstitutionResidence", 0x00380500: "PatientState", 0x00384000: "VisitComments",
    0x00400001: "ScheduledStationAETitle", 0x00400007: "ScheduledProcedureStepDescription",
    0x00400009: "ScheduledProcedureStepID", 0x00400010: "ScheduledStationName",
    0x00400011: "ScheduledProcedureStepLocation", 0x00400241: "PerformedStationAETitle",
    0x00400242: "PerformedStationName", 0x00400243: "PerformedLocation", 0x00400253: "PerformedProcedureStepID",
    0x00400254: "PerformedProcedureStepDescription", 0x00400280: "CommentsOnThePerformedProcedureStep",
    0x00401001: "RequestedProcedureID", 0x00401005: "RequestedProcedureLocation",
    0x00402010: "OrderCallbackPhoneNumber", 0x00402016: "PlacerOrderNumberImagingServiceRequest",
    0x00402017: "FillerOrderNumberImagingServiceRequest", 0x00402400: "ImagingServiceRequestComments",
    0x00500020: "DeviceDescription", 0x00700084: "ContentCreatorName", 0x00880904: "TopicTitle",
    0x00880912: "TopicKeywords", 0x20300020: "TextString", 0x40004000: "TextComments",
    0x40080200: "InterpretationID",
}
_PHI_VRS = frozenset({"PN", "DA", "DT", "TM"})
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UT"})
_SKIPPED_SEQUENCES = frozenset({0x52009229, 0x52009230})  # functional groups: geometry per frame, thousands of items


def _parts(vr: str, text: str) -> set[str]:
    """The value and the pieces a file or folder name might embed (name parts, a date without its time)."""
    out = {text}
    if vr == "PN":
        out |= set(re.split(r"[\^=\s]+", text))
    elif vr == "TM" or vr == "DT":
        out.add(text.split(".")[0])
        if vr == "DT":
            out.add(text[:8])
    return out


def _minimum(tag: int, vr: str | None) -> int | None:
    """The shortest part of an element's value worth recognising, or None when it is not PHI (UIDs are
    recognised by their form instead, see UID_RE)."""
    if (tag >> 16) % 2 == 1:  # private: vendor text is mostly technical; only long values are matched
        return PRIVATE_MIN_LENGTH if tag & 0xFFFF >= 0x1000 and vr in _TEXT_VRS else None
    if tag in PHI_ATTRIBUTES:
        return MIN_LENGTH
    if vr in (None, "UN"):  # implicit VR: the dictionary knows
        from pydicom.datadict import dictionary_VR

        try:
            vr = dictionary_VR(tag)
        except KeyError:
            return None
    return MIN_LENGTH if vr in _PHI_VRS else None


def _add(found: dict[str, bool], vr: str, values: Iterable[Any], minimum: int) -> None:
    for item in values:
        if item is None:
            continue
        for part in _parts(vr, str(item).strip()):
            part = part.strip().strip("\0")
            if len(part) >= minimum and len(set(part)) > 1 and part.lower() not in PLACEHOLDERS:
                # names of 4+ letters match anywhere ("JANEDOE"); other values only where not glued
                found[part] = found.get(part, False) or (vr == "PN" and len(part) >= 4)


def _values(dataset: Any, found: dict[str, bool]) -> None:
    """Collect PHI values from a pydicom data set, converting only the elements that hold them."""
    for tag in list(dataset.keys()):
        if tag in _SKIPPED_SEQUENCES:
            continue
        vr = dataset.get_item(tag).VR
        if vr == "SQ":
            for item in dataset[tag].value or ():
                _values(item, found)
            continue
        minimum = _minimum(tag, vr)
        if minimum is None:
            continue
        elem = dataset[tag]
        if elem.VR == "SQ" or elem.value is None or isinstance(elem.value, bytes | bytearray):
            continue
        value = elem.value
        _add(found, elem.VR, value if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue"
             else [value], minimum)


def _fast_values(path: str | Path) -> dict[str, bool]:
    """PHI values read by :func:`text_elements` (no pydicom); FastParseError or UnicodeDecodeError when the
    file is left to pydicom."""
    with open(path, "rb") as handle:
        elements, _ = parse_prefix(handle, lambda data: text_elements(data, skip=_SKIPPED_SEQUENCES))
    found: dict[str, bool] = {}
    for element in elements:
        minimum = _minimum(element.tag, element.vr)
        if minimum is not None:
            _add(found, element.vr, element.values, minimum)
    return found


def phi_values(path: str | Path) -> dict[str, bool]:
    """PHI values in one DICOM file's header -> whether they match anywhere (names) or only as whole
    words; never logged, only used to recognise them elsewhere.

    Explicit VR little endian files are read without pydicom (whose import costs 0.2-0.3 s); the rest
    (implicit VR, UN elements, other character sets) through pydicom, with the same result.
    """
    try:
        return _fast_values(path)
    except (FastParseError, UnicodeDecodeError, OSError):
        pass
    import pydicom

    found: dict[str, bool] = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
            _values(dataset, found)
            if getattr(dataset, "file_meta", None) is not None:
                _values(dataset.file_meta, found)
    except Exception as exc:  # noqa: BLE001 - a file that cannot be read yields nothing to scrub
        log.debug("PHI values of one file could not be read (%s)", type(exc).__name__)
    return found
