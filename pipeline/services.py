"""Drive the local brokers through the deploy/local scripts (tests and the demo use this)."""

from __future__ import annotations

import subprocess
from pathlib import Path

__all__ = ["LOCAL_DIR", "services"]

LOCAL_DIR = Path(__file__).resolve().parent.parent / "deploy" / "local"


def services(action: str) -> None:
    """Run ``deploy/local/services.sh ACTION`` (``up``, ``down`` or ``status``).

    Raises:
        FileNotFoundError: when the package runs outside the project checkout.
        subprocess.CalledProcessError: when the script fails.
    """
    script = LOCAL_DIR / "services.sh"
    if not script.exists():
        msg = f"{script} not found: the local services need the project checkout"
        raise FileNotFoundError(msg)
    subprocess.run([str(script), action], check=True)  # noqa: S603
