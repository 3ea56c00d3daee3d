#!/usr/bin/env bash
# Local Kafka (KRaft, single node) and Redis for development, tests and CI, without Docker.
#
#   deploy/local/services.sh up       install what is missing, start both, wait until they answer
#   deploy/local/services.sh down     stop what this script started (nothing else)
#   deploy/local/services.sh up kafka / down kafka   (or redis) one of them only
#   deploy/local/services.sh status   show what is running
#   deploy/local/services.sh env      print the THROTTLEX_* variables that point at these services
#
# Settings (environment):
#   THROTTLEX_KAFKA_PORT (9092), THROTTLEX_KAFKA_CONTROLLER_PORT (9093), THROTTLEX_REDIS_PORT (6379)
#   THROTTLEX_KAFKA_SASL_SSL_PORT (9094): a second listener with TLS and SCRAM (SHA-256 and SHA-512) logins,
#     its certificate signed by a CA made here (<local dir>/tls/ca.pem); users are added with the Admin API
#     on the plaintext listener, as the secured-Kafka tests do
#   THROTTLEX_LOCAL_DIR   data, logs and pid files (default: <checkout>/.throttlex/local)
#   THROTTLEX_KAFKA_LIBS  where the broker jars are copied (default: ~/.cache/throttlex/kafka-<version>)
#   THROTTLEX_READY_TIMEOUT_S  how long to wait for each service (default: 60)
set -euo pipefail

kafka_port=${THROTTLEX_KAFKA_PORT:-9092}
controller_port=${THROTTLEX_KAFKA_CONTROLLER_PORT:-9093}
sasl_ssl_port=${THROTTLEX_KAFKA_SASL_SSL_PORT:-9094}
redis_port=${THROTTLEX_REDIS_PORT:-6379}
source "$(dirname "$0")/lib.sh"
state=${THROTTLEX_LOCAL_DIR:-$root/.throttlex/local}

make_tls() {  # a CA and the broker's certificate (for 127.0.0.1 and localhost), made once
  local tls="$state/tls"
  [ -f "$tls/broker-keystore.pem" ] && return
  command -v openssl >/dev/null || die "openssl is needed to make the local broker's TLS certificate"
  mkdir -p "$tls"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=ThrottleX local CA" \
    -keyout "$tls/ca-key.pem" -out "$tls/ca.pem" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" -keyout "$tls/broker-key.pem" -out "$tls/broker.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$tls/broker.ext"
  openssl x509 -req -in "$tls/broker.csr" -CA "$tls/ca.pem" -CAkey "$tls/ca-key.pem" -CAcreateserial -days 3650 \
    -extfile "$tls/broker.ext" -out "$tls/broker.pem" 2>/dev/null
  cat "$tls/broker-key.pem" "$tls/broker.pem" >"$tls/broker-keystore.pem"
}

write_kafka_config() {
  mkdir -p "$state/kafka-data"
  make_tls
  local scram='org.apache.kafka.common.security.scram.ScramLoginModule required;'
  cat >"$state/kafka.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$controller_port
listeners=PLAINTEXT://127.0.0.1:$kafka_port,CONTROLLER://127.0.0.1:$controller_port,SASL_SSL://127.0.0.1:$sasl_ssl_port
advertised.listeners=PLAINTEXT://127.0.0.1:$kafka_port,SASL_SSL://127.0.0.1:$sasl_ssl_port
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL
inter.broker.listener.name=PLAINTEXT
listener.name.sasl_ssl.ssl.keystore.type=PEM
listener.name.sasl_ssl.ssl.keystore.location=$state/tls/broker-keystore.pem
listener.name.sasl_ssl.sasl.enabled.mechanisms=SCRAM-SHA-256,SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=$scram
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=$scram
log.dirs=$state/kafka-data
num.partitions=4
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
EOF
}

start_kafka() {
  if pid_alive "$state/kafka.pid"; then say "kafka already running on 127.0.0.1:$kafka_port (pid $(cat "$state/kafka.pid"))"; return; fi
  port_open "$kafka_port" && die "port $kafka_port is taken by another process; set THROTTLEX_KAFKA_PORT"
  port_open "$sasl_ssl_port" && die "port $sasl_ssl_port is taken by another process; set THROTTLEX_KAFKA_SASL_SSL_PORT"
  resolve_kafka
  write_kafka_config
  format_kafka "$state/kafka.properties" "$state/kafka-data" "$(kafka_cluster_id)"
  say "starting kafka on 127.0.0.1:$kafka_port"
  local started=$SECONDS
  run_kafka kafka 768m "$state/kafka.properties"
  wait_until kafka "$state/kafka.log" kafka_node_ready kafka "$kafka_port"
  say "kafka ready after $((SECONDS - started))s"
}

start_redis() {
  if pid_alive "$state/redis.pid"; then say "redis already running on 127.0.0.1:$redis_port (pid $(cat "$state/redis.pid"))"; return; fi
  port_open "$redis_port" && die "port $redis_port is taken by another process; set THROTTLEX_REDIS_PORT"
  install_redis
  say "starting redis on 127.0.0.1:$redis_port"
  redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
    --dir "$state" --pidfile "$state/redis.pid" --logfile "$state/redis.log"
  wait_until redis "$state/redis.log" redis_ready "$redis_port"
  say "redis ready"
}

only=${2:-}
case "$only" in
  ""|kafka|redis) ;;
  *) echo "usage: $0 up|down [kafka|redis]" >&2; exit 2 ;;
esac
wants() { [ -z "$only" ] || [ "$only" = "$1" ]; }

case "${1:-}" in
  up)
    mkdir -p "$state"
    if wants redis; then start_redis; fi
    if wants kafka; then start_kafka; fi
    ;;
  down)
    if wants kafka; then stop_one kafka; fi
    if wants redis; then stop_one redis; fi
    ;;
  status)
    status_one kafka "$kafka_port"
    status_one redis "$redis_port"
    ;;
  env)
    echo "export THROTTLEX_KAFKA_BOOTSTRAP=127.0.0.1:$kafka_port"
    echo "# the TLS + SCRAM listener: THROTTLEX_KAFKA_SECURITY_PROTOCOL=SASL_SSL, a user you add, this CA"
    echo "# THROTTLEX_KAFKA_BOOTSTRAP=127.0.0.1:$sasl_ssl_port THROTTLEX_KAFKA_SSL_CAFILE=$state/tls/ca.pem"
    echo "export THROTTLEX_REDIS_URL=redis://127.0.0.1:$redis_port/0"
    ;;
  *)
    echo "usage: $0 up|down|status|env [kafka|redis]" >&2
    exit 2
    ;;
esac
