"""Reading DICOM element values: a fast little-endian header walker, and one accessor over it and pydicom."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypeVar

# Tags are ints: (group << 16) | element.
PIXEL_DATA = 0x7FE00010
FLOAT_PIXEL_DATA = (0x7FE00008, 0x7FE00009)
TRANSFER_SYNTAX = 0x00020010
PER_FRAME_GROUPS = 0x52009230
SHARED_GROUPS = 0x52009229

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
_FAST_SYNTAXES = {EXPLICIT_LE, IMPLICIT_LE}  # plus every encapsulated syntax (explicit VR LE headers)
_NATIVE_OTHER = {"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}  # big endian, deflated: pydicom parses these

_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_ALL_VRS = _LONG_VRS | frozenset({b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO",
                                   b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"})
_BINARY_INT = {b"US": "<H", b"UL": "<I", b"SS": "<h", b"SL": "<i"}
_BINARY_FLOAT = {b"FL": "<f", b"FD": "<d"}
_BINARY = _BINARY_INT | _BINARY_FLOAT

_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_MAX_DEPTH = 16
_FIRST_GROUPS = (0x0008, 0x0010, 0x0018, 0x0020, 0x0028)  # where a data set without preamble or meta starts

# VRs of the tags ingest reads, for implicit VR files (the walker only ever interprets these).
VR_OF: dict[int, bytes] = {
    0x00080008: b"CS", 0x00080016: b"UI", 0x00080018: b"UI", 0x00080060: b"CS", 0x00180050: b"DS",
    0x00180086: b"IS", 0x00180088: b"DS", 0x00181120: b"DS", 0x0020000E: b"UI", 0x00200012: b"IS",
    0x00200013: b"IS", 0x00200032: b"DS", 0x00200037: b"DS", 0x00200100: b"IS", 0x00280002: b"US",
    0x00280004: b"CS", 0x00280008: b"IS", 0x00280010: b"US", 0x00280011: b"US", 0x00280030: b"DS",
    0x00280100: b"US", 0x00280101: b"US", 0x00280102: b"US", 0x00280103: b"US", 0x00281052: b"DS",
    0x00281053: b"DS", 0x00280301: b"CS", 0x00190010: b"LO", 0x0019100A: b"US", 0x00290010: b"LO",
    0x00291010: b"OB", 0x00020010: b"UI", 0x00020002: b"UI", 0x00020003: b"UI", 0x00200052: b"UI",
    0x00200011: b"IS", 0x20050010: b"LO", 0x2005100E: b"FL",
}
WANTED = frozenset(VR_OF) | {0x00283000}  # plus Modality LUT Sequence (presence only)
_META_KEPT = (0x00020002, 0x00020003)  # media storage SOP class / instance: fallbacks for empty UIDs


class FastParseError(Exception):
    """The fast walker cannot read this file with certainty; the caller falls back to pydicom."""


class NotDicom(FastParseError):
    """No DICM preamble and no plausible first element: a text file, an archive, a picture. Not worth
    handing to pydicom (whose import alone costs 0.2-0.4 s when a NIfTI scan folder holds a README)."""


class NeedMoreData(FastParseError):
    """The buffer ended before the pixel data; read the whole file and try again."""


@dataclass
class RawHeader:
    """What the walker found: wanted top-level values, sequences present, where the pixel data lies."""

    transfer_syntax: str | None
    has_meta: bool
    implicit: bool
    values: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # tag -> (VR, value bytes)
    sequences: set[int] = field(default_factory=set)  # top-level ones, of the groups walked (see _walk)
    pixel_offset: int | None = None
    pixel_length: int | None = None  # None: encapsulated (undefined length)
    pixel_available: int = 0  # bytes of the pixel value present in the buffer walked
    float_pixels: bool = False
    spans: dict[int, tuple[int, int]] = field(default_factory=dict)  # functional groups (explicit SQ): their values


def _skip_undefined(data: bytes, pos: int, *, implicit: bool, depth: int) -> int:
    """Skip an undefined-length sequence starting at ``pos``; return the position after its delimiter."""
    if depth > _MAX_DEPTH:
        raise FastParseError("sequences nested too deep")
    size = len(data)
    unpack = struct.unpack_from
    while True:
        if pos + 8 > size:
            raise NeedMoreData
        group, elem, length = unpack("<HHI", data, pos)
        tag = group << 16 | elem
        pos += 8
        if tag == _SEQ_END:
            return pos
        if tag != _ITEM:
            raise FastParseError(f"expected an item tag, found {tag:08X}")
        if length != _UNDEFINED:
            pos += length
            continue
        pos = _walk(data, pos, implicit=implicit, depth=depth + 1, raw=None)


_EXPLICIT_HEADER = struct.Struct("<HH2sH").unpack_from
_IMPLICIT_HEADER = struct.Struct("<HHI").unpack_from
_U32 = struct.Struct("<I").unpack_from
_TAG = struct.Struct("<HH").unpack_from
_TOP_SEQUENCES = frozenset({PER_FRAME_GROUPS, SHARED_GROUPS, 0x00283000})
_FUNCTIONAL_GROUPS = frozenset({PER_FRAME_GROUPS, SHARED_GROUPS})


def _last_read() -> dict[int, int]:
    """{group: its last element that the top-level walk reads} (values, sequences it looks for, pixel data)."""
    last: dict[int, int] = {}
    for tag in (*WANTED, *_TOP_SEQUENCES, PIXEL_DATA, *FLOAT_PIXEL_DATA):
        last[tag >> 16] = max(last.get(tag >> 16, -1), tag & 0xFFFF)
    return last


_LAST_READ = _last_read()


def _group_end(data: bytes, pos: int, group: int, *, implicit: bool) -> int:
    """Where a group ends by its group length element (gggg,0000), whose 4-byte value lies at ``pos``; -1 when
    that cannot be trusted. The retired element is often stale (an anonymiser that shortened a name), so the
    end counts only where it lands on the group length element of a later group, as in files that carry
    them throughout (GE's): 8 bytes that a wrong length meets by chance almost never."""
    end = pos + 4 + _U32(data, pos)[0]
    if end + 8 > len(data):
        return -1
    next_group, elem = _TAG(data, end)
    if elem != 0 or not group < next_group < 0xFFFE:
        return -1
    if implicit:
        return end if _U32(data, end + 4)[0] == 4 else -1
    return end if data[end + 4:end + 8] == b"UL\x04\x00" else -1


def _walk(data: bytes, pos: int, *, implicit: bool, depth: int, raw: RawHeader | None) -> int:
    """Walk elements from ``pos``; top level (``raw`` given) records values and stops at pixel data.

    Nested (``raw`` None) it returns after the item delimitation item. This loop is the
    discovery hot spot (hundreds of elements per file), hence the local names. At top level, a
    group that declares its length (see _group_end) is left at its last element read here: GE
    writes 340 elements a file, 150-190 of them in private and patient groups read by nobody here.
    """
    size = len(data)
    last = size - 8
    long_vrs, all_vrs, vr_of = _LONG_VRS, _ALL_VRS, VR_OF
    explicit_header, implicit_header, u32 = _EXPLICIT_HEADER, _IMPLICIT_HEADER, _U32
    wanted = WANTED if raw is not None else frozenset()
    last_read, group_end = _LAST_READ, -1
    while pos < size:
        if pos > last:
            raise NeedMoreData
        if implicit:
            group, elem, length = implicit_header(data, pos)
            tag = group << 16 | elem
            vr = vr_of.get(tag, b"")
            pos += 8
        else:
            group, elem, vr, length = explicit_header(data, pos)
            tag = group << 16 | elem
            if vr in long_vrs:
                if pos + 12 > size:
                    raise NeedMoreData
                length = u32(data, pos + 8)[0]
                pos += 12
            elif vr in all_vrs:
                pos += 8
            elif group == 0xFFFE:
                length = u32(data, pos + 4)[0]
                pos += 8
            else:
                raise FastParseError(f"invalid VR bytes at element {tag:08X}")
        if group == 0xFFFE:
            if raw is None and tag == _ITEM_END:
                return pos
            raise FastParseError(f"unexpected delimiter {tag:08X}")
        if group == 0x7FE0 and raw is not None and tag in (PIXEL_DATA, *FLOAT_PIXEL_DATA):
            raw.pixel_offset = pos
            raw.pixel_length = None if length == _UNDEFINED else length
            raw.float_pixels = tag != PIXEL_DATA
            raw.pixel_available = max(0, min(size - pos, length))
            return pos
        if length == _UNDEFINED:
            start, pos = pos, _skip_undefined(data, pos, implicit=implicit or vr == b"UN", depth=depth)
            if raw is not None:
                raw.sequences.add(tag)
                if tag in _FUNCTIONAL_GROUPS and vr == b"SQ":  # as UN, its items are implicit VR
                    raw.spans[tag] = (start, pos)
            continue
        end = pos + length
        if end > size:
            raise NeedMoreData
        if tag in wanted:
            raw.values[tag] = (vr, data[pos:end])  # type: ignore[union-attr]
        elif raw is not None:
            if vr == b"SQ" or (implicit and tag in _TOP_SEQUENCES):
                raw.sequences.add(tag)
                if tag in _FUNCTIONAL_GROUPS and vr == b"SQ":
                    raw.spans[tag] = (pos, end)
            if elem == 0 and length == 4:
                group_end = _group_end(data, pos, group, implicit=implicit)
            if end < group_end and elem > last_read.get(group, -1):
                pos = group_end  # the rest of this group: nothing read here
                continue
        pos = end
    if raw is None:
        raise NeedMoreData
    return pos


def _looks_explicit(data: bytes, pos: int) -> bool:
    return data[pos + 4:pos + 6] in _ALL_VRS


PREFIX_BYTES = 65536  # the first read of a file's header; most headers end well before it
_T = TypeVar("_T")


def parse_prefix(handle: BinaryIO, parse: Callable[[bytes], _T]) -> tuple[_T, bytes]:
    """``parse`` of the open file's shortest prefix it accepts (PREFIX_BYTES, doubled each time ``parse``
    raises NeedMoreData): (its result, the bytes read). NeedMoreData when the file ends first."""
    data = handle.read(PREFIX_BYTES)
    while True:
        try:
            return parse(data), data
        except NeedMoreData:
            more = handle.read(len(data))
            if not more:
                raise
            data += more


def walk_file_meta(data: bytes, pos: int) -> tuple[int, dict[int, tuple[bytes, bytes]]]:
    """The file meta group (group 0002, always explicit VR little endian) from ``pos``: where it ends and
    its elements {tag: (VR, value bytes)}. NeedMoreData when ``data`` ends inside an element."""
    size = len(data)
    values: dict[int, tuple[bytes, bytes]] = {}
    while pos + 8 <= size and struct.unpack_from("<H", data, pos)[0] == 0x0002:
        group, elem, vr, length = _EXPLICIT_HEADER(data, pos)
        if vr in _LONG_VRS:
            if pos + 12 > size:
                raise NeedMoreData
            length, start = _U32(data, pos + 8)[0], pos + 12
        elif vr in _ALL_VRS:
            start = pos + 8
        else:
            raise FastParseError("file meta is not explicit VR")
        if length == _UNDEFINED:
            raise FastParseError("bad file meta element")
        if start + length > size:
            raise NeedMoreData
        values[group << 16 | elem] = (vr, data[start:start + length])
        pos = start + length
    return pos, values


def parse_header(data: bytes) -> RawHeader:
    """Walk a little-endian DICOM file up to its pixel data.

    Raises NeedMoreData when ``data`` (a prefix of the file) ends first, and FastParseError
    for anything this walker does not handle (big endian, deflate, malformed structure).
    """
    if len(data) < 12:
        raise NotDicom("too short")
    pos = 132 if data[128:132] == b"DICM" else 0
    syntax: str | None = None
    has_meta = False
    meta_end = pos
    meta_values: dict[int, tuple[bytes, bytes]] = {}
    if pos + 8 <= len(data) and struct.unpack_from("<H", data, pos)[0] == 0x0002:
        has_meta = True
        meta_end, meta = walk_file_meta(data, pos)
        if TRANSFER_SYNTAX in meta:
            syntax = meta[TRANSFER_SYNTAX][1].rstrip(b"\0 ").decode("ascii", "replace")
        meta_values = {tag: meta[tag] for tag in _META_KEPT if tag in meta}
    elif pos == 0 and struct.unpack_from("<H", data, 0)[0] not in _FIRST_GROUPS:
        if struct.unpack_from(">H", data, 0)[0] in _FIRST_GROUPS:
            raise FastParseError("a big endian data set")
        raise NotDicom("does not start like a DICOM data set")
    if syntax is None:
        implicit = not _looks_explicit(data, meta_end)
    elif syntax == IMPLICIT_LE:
        implicit = True
    elif syntax in _NATIVE_OTHER or not syntax.startswith("1.2.840.10008.1.2"):
        raise FastParseError(f"transfer syntax {syntax} is left to pydicom")
    else:
        implicit = False
    raw = RawHeader(transfer_syntax=syntax, has_meta=has_meta and syntax is not None, implicit=implicit,
                    values=meta_values)
    _walk(data, meta_end, implicit=implicit, depth=0, raw=raw)
    return raw


# ---- one accessor over both readers --------------------------------------------------------


def _unpack_all(fmt: str, value: bytes) -> tuple[Any, ...]:
    """Every whole value of ``fmt`` (one little-endian number) in ``value``."""
    return struct.unpack_from(f"<{len(value) // struct.calcsize(fmt)}{fmt[1]}", value)


def _parts(found: tuple[bytes, Any] | None) -> list[str] | None:
    """An element's (VR, value) split on backslashes, numbers formatted back to text; None when absent."""
    if found is None:
        return None
    vr, value = found
    if isinstance(value, bytes):
        binary = _BINARY.get(vr)
        if binary is not None:
            return [repr(v) for v in _unpack_all(binary, value)]
        text = value.decode("latin-1").rstrip("\0 ").strip()
        return [part.strip() for part in text.split("\\")] if text else []
    if isinstance(value, str):
        return [part.strip() for part in value.split("\\")] if value.strip() else []
    if hasattr(value, "__iter__"):  # a pydicom MultiValue (or list) of numbers or strings
        return [str(v).strip() for v in value]
    return [str(value).strip()]


class Tags:
    """Typed element access over a RawHeader or a pydicom Dataset (nested items included)."""

    def __init__(self, raw: RawHeader | None = None, dataset: Any = None) -> None:
        self._raw, self._ds = raw, dataset

    def has(self, tag: int) -> bool:
        if self._raw is not None:
            return tag in self._raw.values or tag in self._raw.sequences
        return tag in self._ds

    def element(self, tag: int) -> tuple[bytes, Any] | None:
        """(VR, value) of an element: its bytes (walked) or pydicom's value; None when absent or empty (pydicom)."""
        return self._element(tag)

    def _element(self, tag: int) -> tuple[bytes, Any] | None:
        if self._raw is not None:
            return self._raw_element(tag)
        source = self._ds
        if tag >> 16 == 0x0002:
            source = getattr(self._ds, "file_meta", None)
            if source is None:
                return None
        elem = source.get(tag)
        if elem is None or elem.value is None:
            return None
        return elem.VR.encode(), elem.value

    def _raw_element(self, tag: int) -> tuple[bytes, bytes] | None:
        """(VR, value bytes) of a walked element; UN: a known element written without its VR."""
        found = self._raw.values.get(tag)  # type: ignore[union-attr]
        if found is not None and (self._raw.implicit or found[0] == b"UN"):  # type: ignore[union-attr]
            return VR_OF.get(tag, found[0]), found[1]
        return found

    def strings(self, tag: int) -> list[str] | None:
        """The value split on backslashes (numbers formatted back to text)."""
        return _parts(self._element(tag))

    def text(self, tag: int) -> str | None:
        parts = self.strings(tag)
        return None if parts is None else "\\".join(parts)

    def number(self, tag: int) -> int | None:
        """An integer (US/UL/SS/SL or IS); None when absent or not an integer."""
        found = self._element(tag)
        if found is not None and isinstance(found[1], bytes) and found[0] in _BINARY_INT:
            values = _unpack_all(_BINARY_INT[found[0]], found[1])  # what the text route gives, without the text
            return values[0] if values else None
        parts = _parts(found)
        if not parts:
            return None
        try:
            value = float(parts[0])
        except ValueError:
            return None
        return int(value) if value.is_integer() else None

    def floats(self, tag: int) -> tuple[list[float] | None, str | None]:
        """Decimal values; the second item is the raw text when it does not parse."""
        parts = self.strings(tag)
        if parts is None:
            return None, None
        try:
            return [float(p) for p in parts], None
        except ValueError:
            return None, "\\".join(parts)[:64]

    def raw_bytes(self, tag: int) -> bytes | None:
        found = self._element(tag)
        if found is None:
            return None
        value = found[1]
        return value if isinstance(value, bytes) else None


def value_tags(values: dict[int, Any]) -> Tags:
    """Typed access to elements gathered from elsewhere, ``{tag: (VR, value)}`` with explicit VRs (a frame's
    functional group elements): values as the walker reads them (bytes) or as pydicom does."""
    return Tags(raw=RawHeader(transfer_syntax=None, has_meta=False, implicit=False, values=values))
