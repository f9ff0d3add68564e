"""The typed edges over the client libraries: Kafka, MQTT, TLS and asyncio helpers."""
