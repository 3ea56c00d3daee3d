#!/bin/sh
# Format the KRaft storage once, then run the broker in the foreground (exec: it gets the container's SIGTERM).
# KAFKA_ADVERTISED_HOST: the name clients reach this broker by (default: the container's host name).
set -eu
data=/var/lib/kafka/data
advertised=${KAFKA_ADVERTISED_HOST:-$(hostname)}
cat >/var/lib/kafka/server.properties <<PROPERTIES
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@localhost:9093
listeners=PLAINTEXT://0.0.0.0:9092,CONTROLLER://localhost:9093
advertised.listeners=PLAINTEXT://$advertised:9092
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$data
num.partitions=4
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
PROPERTIES
storage() { java -cp '/opt/kafka/libs/*' -Dlog4j.configuration=file:/opt/kafka/kafka-log4j.properties kafka.tools.StorageTool "$@"; }
if [ ! -f "$data/meta.properties" ]; then
  storage format -t "$(storage random-uuid | tail -n 1)" -c /var/lib/kafka/server.properties >/dev/null
fi
exec java -Xms128m -Xmx${KAFKA_HEAP:-512m} -XX:+UseG1GC -Djava.awt.headless=true \
  -Dlog4j.configuration=file:/opt/kafka/kafka-log4j.properties -cp '/opt/kafka/libs/*' kafka.Kafka /var/lib/kafka/server.properties
