"""From an added child to a DPS allocate request: sn, orgId and deviceData (pure)."""

from __future__ import annotations

import string
from typing import Any

import msgspec

from pipeline.errors import ConfigError, MappingError
from pipeline.schemas import AddedChild, AllocateRequest, DeviceInfo

__all__ = ["Mapped", "Mapper", "check_settings"]

_CHILD = msgspec.json.Decoder(AddedChild)
_DEVICE = msgspec.json.Decoder(DeviceInfo)
_FIELDS = frozenset(DeviceInfo.__struct_fields__) - {"extension_info"}
_EXTENSION = "extension_info."


class Mapped(msgspec.Struct, frozen=True, kw_only=True):
    """A child ready for DPS."""

    child: AddedChild
    device: DeviceInfo
    sn: str
    org_id: str
    request: AllocateRequest


def _check_source(source: str, key: str) -> None:
    if source in _FIELDS or (source.startswith(_EXTENSION) and len(source) > len(_EXTENSION)):
        return
    reason = (
        f"{source!r} is neither a DeviceInfo field "
        f"({', '.join(sorted(_FIELDS))}) nor extension_info.<key>"
    )
    raise ConfigError.at(key, reason)


def _sn_parts(sn_from: str) -> list[tuple[str, str | None]]:
    """``sink.sn_from`` as (literal, field) parts, checked; a field alone is one part."""
    if "{" not in sn_from:
        _check_source(sn_from, "sink.sn_from")
        return [("", sn_from)]
    # Parsed here and substituted by hand: str.format would read "extension_info.x" as
    # attribute access.
    try:
        parsed = list(string.Formatter().parse(sn_from))
    except ValueError as exc:
        reason = f"not a valid template ({exc})"
        raise ConfigError.at("sink.sn_from", reason) from None
    for _, field, spec, conversion in parsed:
        if field == "":
            raise ConfigError.at("sink.sn_from", "'{}' names no field")
        if spec or conversion:
            reason = f"{{{field}...}}: format specs and conversions are not supported"
            raise ConfigError.at("sink.sn_from", reason)
    parts = [(literal, field) for literal, field, _, _ in parsed]
    fields = [field for _, field in parts if field]
    if not fields:
        raise ConfigError.at("sink.sn_from", "the template names no field")
    for field in fields:
        _check_source(field, "sink.sn_from")
    return parts


def _checked(
    sn_from: str, org_id: str, device_data: dict[str, str]
) -> list[tuple[str, str | None]]:
    parts = _sn_parts(sn_from)
    for ident, source in device_data.items():
        _check_source(source, f"sink.device_data.{ident}")
    if not org_id:
        raise ConfigError.at("sink.org_id", "must not be empty")
    return parts


def check_settings(*, sn_from: str, org_id: str, device_data: dict[str, str]) -> None:
    """The rules of the ``[sink]`` mapping settings, as :class:`Mapper` applies them.

    Raises:
        ConfigError: naming ``sink.sn_from``, ``sink.device_data.<id>`` or ``sink.org_id``.
    """
    _checked(sn_from, org_id, device_data)


def _lookup(device: DeviceInfo, source: str) -> Any:
    if source.startswith(_EXTENSION):
        return (device.extension_info or {}).get(source.removeprefix(_EXTENSION))
    return getattr(device, source)


class Mapper:
    """Maps added children using the ``[sink]`` settings; checks them once, at start-up.

    Args:
        sn_from: ``node_id``, ``device_id``, or a template such as ``{product_id}-{node_id}``
            over DeviceInfo fields and ``extension_info.<key>``.
        org_id: the default orgId.
        org_overrides: ``product_id`` -> orgId.
        device_data: master-data identifier -> DeviceInfo field or ``extension_info.<key>``.

    Raises:
        ConfigError: as :func:`check_settings`.
    """

    def __init__(
        self,
        *,
        sn_from: str,
        org_id: str,
        org_overrides: dict[str, str],
        device_data: dict[str, str],
    ) -> None:
        self._sn_parts = _checked(sn_from, org_id, device_data)
        self._sn_fields = [field for _, field in self._sn_parts if field]
        self._sn_from = sn_from
        self._org_id = org_id
        self._org_overrides = dict(org_overrides)
        self._device_data = dict(device_data)

    def map(self, value: bytes) -> Mapped:
        """Map one ``iotda.subdevices.added`` value.

        Raises:
            MappingError: the record cannot be read, or yields no usable sn/orgId/deviceData.
        """
        try:
            child = _CHILD.decode(value)
            device = _DEVICE.decode(child.device)
        except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError) as exc:
            msg = f"not an added-child record: {exc}"
            raise MappingError(msg) from None
        except RecursionError:
            msg = "not an added-child record: it nests deeper than the decoder allows"
            raise MappingError(msg) from None
        sn = self._sn(device)
        org_id = self._org_overrides.get(device.product_id or "", self._org_id)
        data: dict[str, Any] = {}
        for ident, source in self._device_data.items():
            item = _lookup(device, source)
            if item is None:
                continue
            if not isinstance(item, str | int | float) or isinstance(item, bool):
                msg = (
                    f"deviceData.{ident}: {source} is {type(item).__name__}; "
                    "DPS master data takes strings, numbers and dates"
                )
                raise MappingError(msg)
            data[ident] = item
        request = AllocateRequest(sn=sn, device_data=data or None)
        return Mapped(child=child, device=device, sn=sn, org_id=org_id, request=request)

    def locate(self, device: DeviceInfo) -> tuple[str, str]:
        """The sn and orgId of ``device`` (a deleted child's last DeviceInfo), as :meth:`map`.

        Raises:
            MappingError: the sn cannot be made from it.
        """
        return self._sn(device), self._org_overrides.get(device.product_id or "", self._org_id)

    def _sn(self, device: DeviceInfo) -> str:
        values: dict[str, str] = {}
        for field in self._sn_fields:
            item = _lookup(device, field)
            if item is None or item == "":
                msg = f"sn: {field} is empty (sink.sn_from = {self._sn_from!r})"
                raise MappingError(msg)
            values[field] = str(item)
        return "".join(
            literal + (values[field] if field else "") for literal, field in self._sn_parts
        )
