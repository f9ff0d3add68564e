# local/kafka:4.1.1, a stand-in for apache/kafka:4.1.1 built from Debian packages and
# Maven Central jars (see build-base.sh, which prepares the build context:
# libs/ from kafka/pom.xml, plus the files in deploy/container/kafka/).
# Same layout and conventions as upstream where compose.yaml relies on them:
# /opt/kafka/bin/*.sh, KAFKA_* -> server.properties, CLUSTER_ID, /var/lib/kafka/data,
# user appuser (uid 1000), ports 9092/9093.
ARG DEBIAN_IMAGE=local/debian:bookworm
FROM ${DEBIAN_IMAGE}

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends openjdk-17-jre-headless \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 1000 --user-group --home-dir /home/appuser --create-home --shell /bin/bash appuser \
 && mkdir -p /opt/kafka/bin /opt/kafka/config /var/lib/kafka/data /etc/kafka/docker \
 && chown appuser:appuser /opt/kafka/config /var/lib/kafka/data

COPY libs/ /opt/kafka/libs/
COPY kafka-run-class.sh /opt/kafka/bin/
COPY run /etc/kafka/docker/run
COPY --chown=appuser:appuser server.properties log4j2.properties /opt/kafka/config/

# The scripts of the release tarball that matter here, each one line over kafka-run-class.sh.
RUN cd /opt/kafka/bin && for tool in \
      kafka-server-start:kafka.Kafka \
      kafka-storage:kafka.tools.StorageTool \
      kafka-broker-api-versions:org.apache.kafka.tools.BrokerApiVersionsCommand \
      kafka-topics:org.apache.kafka.tools.TopicCommand \
      kafka-consumer-groups:org.apache.kafka.tools.consumer.group.ConsumerGroupCommand \
      kafka-metadata-quorum:org.apache.kafka.tools.MetadataQuorumCommand \
      kafka-console-consumer:org.apache.kafka.tools.consumer.ConsoleConsumer \
      kafka-console-producer:org.apache.kafka.tools.ConsoleProducer; do \
      printf '#!/bin/bash\nexec "$(dirname "$0")/kafka-run-class.sh" %s "$@"\n' "${tool#*:}" > "${tool%%:*}.sh"; \
    done \
 && chmod 755 /opt/kafka/bin/*.sh /etc/kafka/docker/run

ENV PATH=/opt/kafka/bin:$PATH
USER appuser
WORKDIR /home/appuser
VOLUME ["/var/lib/kafka/data"]
EXPOSE 9092 9093
ENTRYPOINT ["/etc/kafka/docker/run"]
