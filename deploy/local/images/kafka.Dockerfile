# A single-node Kafka (KRaft, broker and controller) from the jars this checkout resolves from Maven Central
# (deploy/kafka/pom.xml) on Debian's OpenJDK 17, for deploy/local/compose.yml where no registry image can be
# pulled. Built by deploy/local/image.sh services; the context holds libs/, the entrypoint and log4j settings.
ARG BASE
FROM ${BASE}
RUN useradd --system --uid 10002 --home-dir /var/lib/kafka --create-home kafka
COPY libs /opt/kafka/libs
COPY kafka-entrypoint.sh kafka-log4j.properties /opt/kafka/
USER kafka
EXPOSE 9092
ENTRYPOINT ["/opt/kafka/kafka-entrypoint.sh"]
