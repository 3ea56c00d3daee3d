#!/usr/bin/env bash
# A local cluster of each engine ThrottleX runs on, without Docker: Kafka as one KRaft controller and three
# brokers, Redis as one primary, two replicas and three Sentinels. For the cluster tests (tests/cluster) and
# for trying ThrottleX against replicated engines; `make demo` and most tests use services.sh (one node each).
#
#   deploy/local/cluster.sh up [kafka|redis]     install what is missing, start what is not running, wait until it answers
#   deploy/local/cluster.sh down [kafka|redis]   stop what this script started (nothing else); Sentinel state is dropped
#   deploy/local/cluster.sh status               every node, running or stopped
#   deploy/local/cluster.sh env                  the THROTTLEX_* variables that point at this cluster
#   deploy/local/cluster.sh stop NODE            stop one node (SIGTERM: a controlled shutdown)
#   deploy/local/cluster.sh kill NODE            kill one node (SIGKILL: a crash)
#   deploy/local/cluster.sh start NODE           start one node again (a Redis node rejoins as a replica of the
#                                                primary the Sentinels name)
#   deploy/local/cluster.sh pause|resume NODE    freeze a node (SIGSTOP) and let it go on (SIGCONT): a replica that
#                                                receives nothing meanwhile, say
#   NODE is controller, broker-1..3, redis-1..3 or sentinel-1..3.
#
# Settings (environment):
#   THROTTLEX_CLUSTER_CONTROLLER_PORT (19090)  the KRaft controller
#   THROTTLEX_CLUSTER_KAFKA_PORT (19091)       broker-1; broker-2 and broker-3 take the next two ports
#   THROTTLEX_CLUSTER_REDIS_PORT (16379)       redis-1, the first primary; redis-2 and redis-3 the next two
#   THROTTLEX_CLUSTER_SENTINEL_PORT (26379)    sentinel-1; sentinel-2 and sentinel-3 the next two
#   THROTTLEX_CLUSTER_DIR      data, logs and pid files (default: <checkout>/.throttlex/cluster)
#   THROTTLEX_KAFKA_LIBS, THROTTLEX_READY_TIMEOUT_S  as for services.sh
#
# The brokers are set as docs/clusters.md asks of a production cluster: Kafka's internal topics are
# replicated three times, unclean leader election is off. min.insync.replicas is left at the broker default
# (1), as on most clusters: the topics ThrottleX creates set it themselves. For tests that kill nodes and
# wait for compaction, a broker that stops heart-beating is fenced after 3 s (Kafka's default is 9 s) and the
# log cleaner looks for work every second (15 s). Sentinels call a primary down after 1 s without an answer,
# with a quorum of 2.
set -euo pipefail

controller_port=${THROTTLEX_CLUSTER_CONTROLLER_PORT:-19090}
kafka_port=${THROTTLEX_CLUSTER_KAFKA_PORT:-19091}
redis_port=${THROTTLEX_CLUSTER_REDIS_PORT:-16379}
sentinel_port=${THROTTLEX_CLUSTER_SENTINEL_PORT:-26379}
source "$(dirname "$0")/lib.sh"
state=${THROTTLEX_CLUSTER_DIR:-$root/.throttlex/cluster}
service=throttlex  # the name the Sentinels monitor the primary under
brokers=(broker-1 broker-2 broker-3)
redises=(redis-1 redis-2 redis-3)
sentinels=(sentinel-1 sentinel-2 sentinel-3)

port_of() {  # port_of NODE
  local n=${1##*-}
  case "$1" in
    controller) echo "$controller_port" ;;
    broker-[123]) echo $((kafka_port + n - 1)) ;;
    redis-[123]) echo $((redis_port + n - 1)) ;;
    sentinel-[123]) echo $((sentinel_port + n - 1)) ;;
    *) die "no node called '$1' (controller, broker-1..3, redis-1..3, sentinel-1..3)" ;;
  esac
}

kafka_properties() {  # kafka_properties NODE: the node's configuration, written at every start
  local port; port=$(port_of "$1")
  if [ "$1" = controller ]; then
    cat <<EOF
process.roles=controller
node.id=100
listeners=CONTROLLER://127.0.0.1:$port
EOF
  else
    cat <<EOF
process.roles=broker
node.id=${1##*-}
listeners=PLAINTEXT://127.0.0.1:$port
advertised.listeners=PLAINTEXT://127.0.0.1:$port
inter.broker.listener.name=PLAINTEXT
broker.heartbeat.interval.ms=500
log.cleaner.backoff.ms=1000
num.partitions=4
offsets.topic.replication.factor=3
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=3
transaction.state.log.min.isr=2
unclean.leader.election.enable=false
auto.create.topics.enable=false
group.initial.rebalance.delay.ms=0
EOF
  fi
  cat <<EOF
controller.quorum.voters=100@127.0.0.1:$controller_port
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
broker.session.timeout.ms=3000
log.dirs=$state/$1-data
EOF
}

launch_kafka() {  # launch_kafka NODE: start it in the background (no wait)
  local port; port=$(port_of "$1")
  if pid_alive "$state/$1.pid"; then say "$1 already running on 127.0.0.1:$port"; return; fi
  port_open "$port" && die "port $port ($1) is taken by another process; set THROTTLEX_CLUSTER_*_PORT"
  kafka_properties "$1" >"$state/$1.properties"
  [ -f "$state/kafka-cluster-id" ] || kafka_cluster_id >"$state/kafka-cluster-id"
  format_kafka "$state/$1.properties" "$state/$1-data" "$(cat "$state/kafka-cluster-id")"
  say "starting $1 on 127.0.0.1:$port"
  if [ "$1" = controller ]; then run_kafka "$1" 256m "$state/$1.properties"; else run_kafka "$1" 384m "$state/$1.properties"; fi
}

await_kafka() { wait_until "$1" "$state/$1.log" kafka_node_ready "$1" "$(port_of "$1")"; }

start_kafka() {
  resolve_kafka
  local started=$SECONDS node
  launch_kafka controller
  await_kafka controller
  for node in "${brokers[@]}"; do launch_kafka "$node"; done
  for node in "${brokers[@]}"; do await_kafka "$node"; done
  say "kafka cluster ready after $((SECONDS - started))s: brokers on 127.0.0.1:$kafka_port-$((kafka_port + 2))"
}

current_primary_port() {  # the primary's port as the first Sentinel that answers names it, or nothing
  local node
  for node in "${sentinels[@]}"; do
    redis-cli -p "$(port_of "$node")" sentinel get-master-addr-by-name "$service" 2>/dev/null | sed -n 2p | grep . && return
  done
  return 0
}

launch_redis() {  # launch_redis NODE [primary port]: a data node, as a replica of the primary given if any
  local port; port=$(port_of "$1")
  if pid_alive "$state/$1.pid"; then say "$1 already running on 127.0.0.1:$port"; return; fi
  port_open "$port" && die "port $port ($1) is taken by another process; set THROTTLEX_CLUSTER_REDIS_PORT"
  local replica_of=()
  if [ -n "${2:-}" ] && [ "$2" != "$port" ]; then replica_of=(--replicaof 127.0.0.1 "$2"); fi
  say "starting $1 on 127.0.0.1:$port${2:+ (primary: $2)}"
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes "${replica_of[@]}" \
    --dir "$state" --pidfile "$state/$1.pid" --logfile "$state/$1.log"
  wait_until "$1" "$state/$1.log" redis_ready "$port"
}

launch_sentinel() {  # launch_sentinel NODE: its configuration is written once; Sentinel keeps it up to date
  local port; port=$(port_of "$1")
  if pid_alive "$state/$1.pid"; then say "$1 already running on 127.0.0.1:$port"; return; fi
  port_open "$port" && die "port $port ($1) is taken by another process; set THROTTLEX_CLUSTER_SENTINEL_PORT"
  [ -f "$state/$1.conf" ] || cat >"$state/$1.conf" <<EOF
port $port
bind 127.0.0.1
dir $state
sentinel monitor $service 127.0.0.1 $redis_port 2
sentinel down-after-milliseconds $service 1000
sentinel failover-timeout $service 10000
sentinel parallel-syncs $service 1
EOF
  say "starting $1 on 127.0.0.1:$port"
  redis-server "$state/$1.conf" --sentinel --daemonize yes --pidfile "$state/$1.pid" --logfile "$state/$1.log"
  wait_until "$1" "$state/$1.log" redis_ready "$port"
}

start_redis() {
  install_redis
  local primary node
  primary=$(current_primary_port)
  primary=${primary:-$redis_port}
  for node in "${redises[@]}"; do launch_redis "$node" "$primary"; done
  for node in "${sentinels[@]}"; do launch_sentinel "$node"; done
  say "redis ready: primary on 127.0.0.1:$primary, Sentinels on 127.0.0.1:$sentinel_port-$((sentinel_port + 2)) (service '$service')"
}

start_node() {
  case "$1" in
    controller|broker-*) resolve_kafka; launch_kafka "$1"; await_kafka "$1" ;;
    redis-*) local primary; primary=$(current_primary_port); launch_redis "$1" "${primary:-$(port_of "$1")}" ;;
    sentinel-*) launch_sentinel "$1" ;;
    *) port_of "$1" >/dev/null ;;
  esac
}

stop_redis() {
  local node
  for node in "${sentinels[@]}"; do stop_one "$node"; rm -f "$state/$node.conf"; done
  for node in "${redises[@]}"; do stop_one "$node"; done
}

stop_kafka() {
  local node
  for node in "${brokers[@]}"; do stop_one "$node"; done
  stop_one controller
}

wants() { [ -z "${2:-}" ] || [ "$2" = "$1" ]; }
case "${2:-}" in ""|kafka|redis) ;; *) [[ "${1:-}" =~ ^(start|stop|kill|pause|resume)$ ]] || die "usage: $0 up|down|status|env [kafka|redis]" ;; esac

mkdir -p "$state"
case "${1:-}" in
  up)
    if wants redis "${2:-}"; then start_redis; fi
    if wants kafka "${2:-}"; then start_kafka; fi
    ;;
  down)
    if wants kafka "${2:-}"; then stop_kafka; fi
    if wants redis "${2:-}"; then stop_redis; fi
    ;;
  start) start_node "${2:?usage: $0 start NODE}" ;;
  stop) port_of "${2:?usage: $0 stop NODE}" >/dev/null; stop_one "$2" ;;
  kill) port_of "${2:?usage: $0 kill NODE}" >/dev/null; stop_one "$2" KILL ;;
  pause|resume)
    port_of "${2:?usage: $0 $1 NODE}" >/dev/null
    pid_alive "$state/$2.pid" || die "$2 is not running"
    if [ "$1" = pause ]; then kill -STOP "$(cat "$state/$2.pid")"; else kill -CONT "$(cat "$state/$2.pid")"; fi
    say "$2 ${1}d"
    ;;
  status)
    for node in controller "${brokers[@]}" "${redises[@]}" "${sentinels[@]}"; do status_one "$node" "$(port_of "$node")"; done
    ;;
  env)
    echo "export THROTTLEX_KAFKA_BOOTSTRAP=127.0.0.1:$kafka_port,127.0.0.1:$((kafka_port + 1)),127.0.0.1:$((kafka_port + 2))"
    echo "export THROTTLEX_TOPIC_REPLICATION_FACTOR=3"
    echo "export THROTTLEX_REDIS_URL=redis+sentinel://127.0.0.1:$sentinel_port,127.0.0.1:$((sentinel_port + 1)),127.0.0.1:$((sentinel_port + 2))/$service/0"
    ;;
  *) die "usage: $0 up|down|status|env [kafka|redis], or start|stop|kill|pause|resume NODE" ;;
esac
