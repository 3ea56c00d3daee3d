# Shell functions shared by services.sh (one node of each engine) and cluster.sh (three Kafka brokers,
# Redis with Sentinel). Sourced, not run. The sourcing script sets `state` (its data, logs and pid files)
# before calling anything here.

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
pom="$root/deploy/kafka/pom.xml"
kafka_version=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$pom")
libs=${THROTTLEX_KAFKA_LIBS:-$HOME/.cache/throttlex/kafka-$kafka_version}
ready_timeout_s=${THROTTLEX_READY_TIMEOUT_S:-60}

say() { printf '[%s] %s\n' "$(basename "$0" .sh)" "$*"; }
die() { printf '[%s] error: %s\n' "$(basename "$0" .sh)" "$*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else die "need root to run: $*  (install it by hand, or run this script as root)"
  fi
}

install_redis() {
  command -v redis-server >/dev/null && return
  say "installing redis-server with apt"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
}

resolve_kafka() {  # the broker's jars from Maven Central, once, into $libs
  if [ -f "$libs/.complete" ]; then return; fi
  command -v mvn >/dev/null || die "Maven (mvn) is needed to fetch the Kafka broker: apt-get install maven"
  command -v java >/dev/null || die "Java 17+ is needed to run the Kafka broker: apt-get install openjdk-17-jre-headless"
  say "resolving Apache Kafka $kafka_version from Maven Central into $libs"
  mkdir -p "$libs"
  mvn -B -f "$pom" dependency:copy-dependencies -DoutputDirectory="$libs" >"$state/maven.log" 2>&1 \
    || { tail -n 40 "$state/maven.log" >&2; die "Maven could not resolve the Kafka broker (full log: $state/maven.log)"; }
  touch "$libs/.complete"
}

format_kafka() {  # format_kafka <properties> <data dir> <cluster id>: KRaft storage, once per data dir
  [ -f "$2/meta.properties" ] && return
  java -cp "$libs/*" -Dlog4j.configuration="file:$here/kafka-log4j.properties" kafka.tools.StorageTool \
    format -t "$3" -c "$1" >"$2.format.log" 2>&1 || { cat "$2.format.log" >&2; die "formatting KRaft storage in $2 failed"; }
}

kafka_cluster_id() { java -cp "$libs/*" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n 1; }

run_kafka() {  # run_kafka <name> <heap> <properties>: start a broker or controller JVM in the background
  nohup java -Xms128m "-Xmx$2" -XX:+UseG1GC -Djava.awt.headless=true \
    -Dlog4j.configuration="file:$here/kafka-log4j.properties" \
    -cp "$libs/*" kafka.Kafka "$3" >"$state/$1.log" 2>&1 &
  echo $! >"$state/$1.pid"
}

wait_until() {  # wait_until <what> <log file> <command...>
  local what=$1 log=$2; shift 2
  local deadline=$((SECONDS + ready_timeout_s))
  until "$@"; do
    if [ $SECONDS -ge $deadline ]; then
      printf '[%s] error: %s did not become ready within %ss; last lines of %s:\n' "$(basename "$0" .sh)" "$what" "$ready_timeout_s" "$log" >&2
      tail -n 30 "$log" >&2 || true
      exit 1
    fi
    sleep 0.5
  done
}

kafka_node_ready() {  # kafka_node_ready <name> <port>: started and listening
  pid_alive "$state/$1.pid" || { tail -n 30 "$state/$1.log" >&2; die "$1 exited during start-up (log: $state/$1.log)"; }
  port_open "$2" && grep -q "Kafka Server started" "$state/$1.log"
}

redis_ready() { redis-cli -p "$1" ping 2>/dev/null | grep -q PONG; }

stop_one() {  # stop_one <name> [signal]: stop the process of $state/<name>.pid and wait until it is gone
  local pidfile="$state/$1.pid"
  if ! pid_alive "$pidfile"; then rm -f "$pidfile"; say "$1 not running"; return; fi
  local pid; pid=$(cat "$pidfile")
  kill "-${2:-TERM}" "$pid"
  for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -0 "$pid" 2>/dev/null && { say "$1 did not stop in 30s, killing"; kill -9 "$pid"; }
  rm -f "$pidfile"
  say "$1 stopped"
}

status_one() {  # status_one <name> <port>
  if pid_alive "$state/$1.pid"; then say "$1 running (pid $(cat "$state/$1.pid"), 127.0.0.1:$2)"; else say "$1 stopped"; fi
}
