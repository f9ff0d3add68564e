"""The DPS emulator: EnOS DPS and its API gateway, as documented, over real HTTP.

EnOS cannot be reached from tests or demos, so the sink is exercised against this. It
implements the gateway's access token and request signature checks (reference/
protocols.md B2), DPS V2.5 Allocate and Get with their documented error codes (B1), and
admin endpoints under ``/_emulator/`` to register devices, read the log of allocate
calls and inject faults (latency, errors, throttling, outage).

- :mod:`.state`: what it knows (devices, tokens, calls, faults), no HTTP;
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
