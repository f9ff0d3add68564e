#!/bin/bash
# kafka-run-class.sh of the local/kafka image: java with the jars in /opt/kafka/libs.
# The broker (kafka.Kafka) gets KAFKA_HEAP_OPTS (default -Xmx1G -Xms1G, as upstream) and
# KAFKA_JVM_PERFORMANCE_OPTS; the command-line tools, which the health check starts every
# few seconds, get KAFKA_TOOLS_HEAP_OPTS (default -Xmx128m) and a quick-start JIT, so
# that a health check does not reserve the broker's heap a second time.
base=$(cd "$(dirname "$0")/.." && pwd)
if [ "${1:-}" = kafka.Kafka ]; then
  heap=${KAFKA_HEAP_OPTS:--Xmx1G -Xms1G}
  perf=${KAFKA_JVM_PERFORMANCE_OPTS:--server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -XX:MaxInlineLevel=15}
else
  heap=${KAFKA_TOOLS_HEAP_OPTS:--Xmx128m}
  perf="-XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Xshare:auto"
fi
# shellcheck disable=SC2086  # the *_OPTS are word lists
exec java $heap $perf -Djava.awt.headless=true \
  ${KAFKA_LOG4J_OPTS:--Dlog4j2.configurationFile=$base/config/log4j2.properties} \
  ${KAFKA_OPTS:-} -cp "$base/libs/*" "$@"
