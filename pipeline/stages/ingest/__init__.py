"""Ingest stage: MQTT ``$oc/devices/+/sys/events/down`` -> Kafka, losing nothing.

Each message is acknowledged to the MQTT broker only after Kafka has acknowledged its
record (``acks=all``), in the order the messages arrived ([MQTT-4.6.0-2]). Until then
the broker keeps it in our persistent session, so a crash at any point means
redelivery, never loss; redeliveries are removed downstream by the router's
(gateway, event_id) de-duplication. No message can stop the stage: each one lands, or
goes to the DLQ with the reason.

- :mod:`.worker`: which sessions to hold, the Kafka producer, landing each message;
- :mod:`.session`: one MQTT session (connect, subscribe, receive, in-order
  acknowledgements, reconnect, retire).
"""

from pipeline.stages.ingest.worker import Ingest, sessions_for

__all__ = ["Ingest", "sessions_for"]
