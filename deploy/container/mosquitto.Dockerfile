# local/mosquitto:2, a stand-in for eclipse-mosquitto:2 from Debian's mosquitto (2.0.11):
# the same paths (/mosquitto/config/mosquitto.conf, /mosquitto/data, /mosquitto/log),
# mosquitto_sub for the health check, port 1883. Started as root, the broker drops to the
# user mosquitto itself (as upstream), who owns the data and log directories.
ARG DEBIAN_IMAGE=local/debian:bookworm
FROM ${DEBIAN_IMAGE}

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends mosquitto mosquitto-clients \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /mosquitto/config /mosquitto/data /mosquitto/log \
 && printf 'listener 1883\nallow_anonymous true\npersistence true\npersistence_location /mosquitto/data/\nlog_dest stdout\n' \
      > /mosquitto/config/mosquitto.conf \
 && chown -R mosquitto:mosquitto /mosquitto/data /mosquitto/log

VOLUME ["/mosquitto/data", "/mosquitto/log"]
EXPOSE 1883
CMD ["/usr/sbin/mosquitto", "-c", "/mosquitto/config/mosquitto.conf"]
