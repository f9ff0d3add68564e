"""Readiness probe used by the deploy/local scripts: a real client call, not an open port."""

import asyncio
import sys

from aiokafka.admin import AIOKafkaAdminClient


async def kafka(bootstrap: str, timeout: float) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000))
    async with asyncio.timeout(timeout):
        await admin.start()
        try:
            await admin.describe_cluster()
            await admin.list_topics()
        finally:
            await admin.close()


def main() -> int:
    _, service, address, timeout = sys.argv
    try:
        if service == "kafka":
            asyncio.run(kafka(address, float(timeout)))
    except Exception:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
