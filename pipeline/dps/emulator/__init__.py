"""The DPS emulator: EnOS DPS and its API gateway, as documented, over real HTTP.

EnOS cannot be reached from tests or demos, so the sink is exercised against this. It
implements the gateway's access token and request signature checks (reference/
protocols.md B2), the DPS V2.5 device operations below with their documented request
and answer shapes and error codes (B1), and admin endpoints under ``/_emulator/`` to
register devices, read the log of every DPS call and inject faults (latency, errors,
throttling, outage, connection cuts).

What the V2.5 pages say (support.enos-iot.com/docs/dps-api/en/2.4.4/v2.5/<page>.html,
EnOS 2.4 CU2). Every answer is ``{code, msg, requestId, data}``, code 0 meaning OK; all
operations share ``/dps-service/v2.5/pvs/device`` with a required ``orgId`` query
parameter and pick the operation with ``action``:

- Allocate DPS Device (allocate_dps_device): ``POST ?action=allocate``, body ``sn`` and
  optional ``deviceData``; ``data`` the PvsDevice. Errors 35400 orgId/sn blank, 35404
  registration or master-data group missing, 35601 sn unknown.
- Get DPS Device (get_dps_device): ``GET ?action=get&orgId=&sn=``, no body; ``data``
  the PvsDevice, whatever its state (the page's sample is ``init``, not allocated,
  with ``reprovisioning`` true). Errors 35400 orgId blank, 35601 sn unknown.
- Search DPS Device (search_dps_device): ``POST ?action=search``, body ``expression``
  (required; FQL over sn ``= IN LIKE``, groupId, regionId, productKey, status ``= IN``,
  batchOrder and createTime ``= != < <= > >= IN``, ``deviceData.*``) and optional
  ``pagination`` (Pagination Request Struct: ``pageNo`` from 1, ``pageSize``, optional
  ``sorters``): 10 records a page by default, at most 1,000, newest ``createTime``
  first. ``data`` the page's PvsDevices. The page lists no error codes; its English
  text gives no ``orgId`` parameter, the Chinese one a required one (sent and required
  here). The answer's paging fields are not shown: the emulator answers
  ``pagination: {pageNo, pageSize, totalSize}`` as other EnOS search APIs do, and the
  client does not depend on ``totalSize``.
- Reset Device Allocation Status (reset_device_allocation_status; formerly
  ``reprovision``): ``POST ?action=resetAllocationStatus``, body ``groupId`` and
  ``sns`` ("All SNs for batch operations must belong to the same registration
  group"); ``data`` the sns that were reset. Errors 35404 group or sn not found, 35603
  the service account has no DPS role, 99400 ``groupId`` missing.
- Delete DPS Device (delete_dps_device): ``POST ?action=delete``, body ``groupId`` and
  ``snList`` (which "should belong to" that group); ``data`` the sns "successfully
  deleted and do not exist" (deleting twice lists them twice). No error codes listed.

No page gives a batch limit for reset or delete, nor a rate limit; only search's page
size is bounded (1,000). Where a page is silent the emulator makes the choices listed in
:mod:`.app` and :mod:`.search`.

- :mod:`.state`: what it knows (devices, groups, tokens, calls, faults), no HTTP;
- :mod:`.search`: the subset of FQL Search DPS Device understands here, sorting;
- :mod:`.app`: the aiohttp application, with fault injection and authentication as
  middlewares and the admin API as a sub-application;
- :mod:`.serve`: running it on a port.

Only the operator tools and the command line import this package (an import-linter
contract in pyproject.toml holds it); the workers never do.
"""

from pipeline.dps.emulator.app import build_app
from pipeline.dps.emulator.serve import RunningEmulator, serve, start_emulator
from pipeline.dps.emulator.state import (
    DEMO_GROUP,
    CallRecord,
    DeviceSpec,
    EmulatedDevice,
    EmulatorState,
    Faults,
    load_devices,
)

__all__ = [
    "DEMO_GROUP",
    "CallRecord",
    "DeviceSpec",
    "EmulatedDevice",
    "EmulatorState",
    "Faults",
    "RunningEmulator",
    "build_app",
    "load_devices",
    "serve",
    "start_emulator",
]
