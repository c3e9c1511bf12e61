#!/usr/bin/env bash
# Real Apache Kafka (KRaft, single node) and PostgreSQL for development and tests, no Docker needed.
#
#   scripts/services.sh start [kafka] [postgres]   start (or reuse) the services, print the addresses
#   scripts/services.sh stop  [kafka] [postgres]   stop them (idempotent)
#   scripts/services.sh status                     say what runs (exit 0 only when both answer)
#   scripts/services.sh env                        print the addresses of the running services
#   scripts/services.sh kcat                       install kcat (Debian's package) if it is missing
#
# `start` prints exactly two `export …` lines on stdout (everything else goes to stderr) and writes
# them to $STATE/env.sh, so `eval "$(scripts/services.sh start)"` or `source .services/env.sh` work.
#
# What it needs and gets by itself: Kafka's jars from Maven Central (via `mvn`; when `mvn` is missing
# a Maven distribution is fetched from Maven Central too) and Debian's `postgresql` package when no
# PostgreSQL server binaries are found. What it does not install: Java. Without Java, `start`
# (with Kafka) exits with code 3 so callers can decide to skip.
#
# Environment (all optional):
#   CDP_SERVICES_DIR            state: configs, data, logs, pid files   (default <repo>/.services)
#   CDP_CACHE                   download cache                         (default ~/.cache/cdp)
#   CDP_KAFKA_VERSION           org.apache.kafka:kafka_2.13 version    (default 3.9.2)
#   CDP_KAFKA_PORT              broker listener                        (default 19092)
#   CDP_KAFKA_CONTROLLER_PORT   KRaft controller listener              (default 19093)
#   CDP_POSTGRES_PORT           PostgreSQL                             (default 15432)
#   CDP_SERVICES_TIMEOUT        seconds to wait for each service       (default 120)
#   CDP_KAFKA_HEAP              JVM heap options                       (default -Xms256m -Xmx512m)
# A service of ours that already runs is reused on its port; otherwise the port (given or default)
# must be free, or `start` fails with a line naming it: it never moves to another port.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${CDP_SERVICES_DIR:-$REPO/.services}"
CACHE="${CDP_CACHE:-$HOME/.cache/cdp}"
KAFKA_VERSION="${CDP_KAFKA_VERSION:-3.9.2}"
SCALA_VERSION="2.13"
# Kafka 3.9 logs through slf4j 1.7 + reload4j, as its binary distribution does (same versions)
SLF4J_BINDING="org.slf4j:slf4j-reload4j:1.7.36"
RELOAD4J="ch.qos.reload4j:reload4j:1.2.25"
MAVEN_FALLBACK_VERSION="3.9.9"
TIMEOUT="${CDP_SERVICES_TIMEOUT:-120}"
KAFKA_HEAP="${CDP_KAFKA_HEAP:--Xms256m -Xmx512m}"
PYTHON="${CDP_PYTHON:-$REPO/.venv/bin/python}"

KAFKA_DIR="$STATE/kafka"
KAFKA_LIBS="$CACHE/kafka-$KAFKA_VERSION/libs"
PG_DIR="$STATE/postgres"
PORTS_FILE="$STATE/ports"
ENV_FILE="$STATE/env.sh"

log() { printf '[services] %s\n' "$*" >&2; }
die() { printf '[services] ERROR: %s\n' "$*" >&2; exit "${2:-1}"; }

# ---------------------------------------------------------------------------------------- helpers

port_in_use() { # something accepts connections on 127.0.0.1:$1
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

pick_port() { # pick_port NAME ENVVAR DEFAULT [EXCLUDED…]: echo the port, which must be free
    local name=$1 var=$2 default=$3; shift 3
    local port="${!var:-$default}"
    [[ "$port" =~ ^[0-9]+$ ]] || die "$var must be a port number, got '$port'"
    # Never another port than the one asked for: workers configured for it would be stranded.
    if port_in_use "$port" || [[ " $* " == *" $port "* ]]; then
        die "$name port $port is already in use by another process: stop that process or set $var to a free port"
    fi
    echo "$port"
}

saved_port() { # saved_port KEY: port recorded by the start that launched the running service
    if [[ -f "$PORTS_FILE" ]]; then sed -n "s/^$1=//p" "$PORTS_FILE" | tail -1; fi
}

save_port() { # save_port KEY VALUE
    mkdir -p "$STATE"
    local tmp="$PORTS_FILE.tmp"
    { [[ -f "$PORTS_FILE" ]] && grep -v "^$1=" "$PORTS_FILE" || true; echo "$1=$2"; } >"$tmp"
    mv "$tmp" "$PORTS_FILE"
}

pid_alive() { # pid_alive PIDFILE PATTERN: the pid in PIDFILE runs and its command line matches
    # -ww: a COLUMNS in the environment (parallel test runs had one) would cut the java command line
    # before its main class, and a running broker would look stopped
    local pid
    [[ -f "$1" ]] || return 1
    pid="$(cat "$1" 2>/dev/null)" || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    ps -ww -p "$pid" -o args= 2>/dev/null | grep -q -- "$2"
}

fetch_url() { # fetch_url URL FILE
    if command -v curl >/dev/null; then curl -fsSL --retry 3 -o "$2" "$1"
    elif command -v wget >/dev/null; then wget -q -O "$2" "$1"
    elif command -v python3 >/dev/null; then python3 -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' "$1" "$2"
    else die "need curl, wget or python3 to download $1"
    fi
}

as_root() { # run a command as root (we may already be root)
    if [[ $EUID -eq 0 ]]; then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else die "need root (or sudo) to run: $*"
    fi
}

# ------------------------------------------------------------------------------------------ Kafka

java_bin() {
    if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then echo "$JAVA_HOME/bin/java"
    else command -v java || true
    fi
}

require_java() {
    local java major
    java="$(java_bin)"
    if [[ -z "$java" ]]; then
        log "Java is not installed (no 'java' on PATH, no \$JAVA_HOME): cannot run Apache Kafka."
        log "Install a JDK/JRE 17 (Debian: apt-get install -y openjdk-17-jre-headless) and retry."
        exit 3
    fi
    major="$("$java" -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p' | head -1)"
    major="${major#1.}"
    if [[ -n "$major" && "$major" -lt 11 ]]; then
        log "Java $major found at $java, Kafka $KAFKA_VERSION needs Java 11 or newer (17 recommended)."
        exit 3
    fi
}

mvn_bin() {
    if command -v mvn >/dev/null; then command -v mvn; return; fi
    local home="$CACHE/apache-maven-$MAVEN_FALLBACK_VERSION"
    if [[ ! -x "$home/bin/mvn" ]]; then
        log "mvn not found: fetching Apache Maven $MAVEN_FALLBACK_VERSION from Maven Central"
        local tmp; tmp="$(mktemp -d)"
        fetch_url "https://repo1.maven.org/maven2/org/apache/maven/apache-maven/$MAVEN_FALLBACK_VERSION/apache-maven-$MAVEN_FALLBACK_VERSION-bin.tar.gz" "$tmp/maven.tgz"
        mkdir -p "$CACHE"
        tar -xzf "$tmp/maven.tgz" -C "$tmp"
        rm -rf "$home"; mv "$tmp/apache-maven-$MAVEN_FALLBACK_VERSION" "$home"; rm -rf "$tmp"
    fi
    echo "$home/bin/mvn"
}

fetch_kafka() { # the broker's jars and their runtime dependencies, once per version
    if [[ -f "$KAFKA_LIBS/.complete" ]]; then return 0; fi
    local mvn tmp t0=$SECONDS
    mvn="$(mvn_bin)"
    tmp="$(mktemp -d)"
    log "fetching org.apache.kafka:kafka_$SCALA_VERSION:$KAFKA_VERSION and its runtime dependencies from Maven Central"
    cat >"$tmp/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.cdp</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_$SCALA_VERSION</artifactId>
      <version>$KAFKA_VERSION</version>
    </dependency>
    <dependency>
      <groupId>${SLF4J_BINDING%%:*}</groupId>
      <artifactId>$(cut -d: -f2 <<<"$SLF4J_BINDING")</artifactId>
      <version>${SLF4J_BINDING##*:}</version>
    </dependency>
    <dependency>
      <groupId>${RELOAD4J%%:*}</groupId>
      <artifactId>$(cut -d: -f2 <<<"$RELOAD4J")</artifactId>
      <version>${RELOAD4J##*:}</version>
    </dependency>
  </dependencies>
</project>
EOF
    # Its own local repository inside the cache: nothing from ~/.m2 is relied upon or polluted.
    if ! (cd "$tmp" && "$mvn" -B -q -f pom.xml \
            -Dmaven.repo.local="$CACHE/m2" \
            org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies \
            -DincludeScope=runtime -DoutputDirectory="$tmp/libs" >"$tmp/mvn.log" 2>&1); then
        cat "$tmp/mvn.log" >&2
        die "Maven could not fetch Kafka $KAFKA_VERSION (see above; does this machine reach repo1.maven.org?)"
    fi
    ls "$tmp/libs"/kafka_"$SCALA_VERSION"-"$KAFKA_VERSION".jar >/dev/null 2>&1 \
        || die "Maven finished but kafka_$SCALA_VERSION-$KAFKA_VERSION.jar is missing from $tmp/libs"
    touch "$tmp/libs/.complete"
    mkdir -p "$(dirname "$KAFKA_LIBS")"
    rm -rf "$KAFKA_LIBS"; mv "$tmp/libs" "$KAFKA_LIBS"; rm -rf "$tmp"
    log "fetched $(find "$KAFKA_LIBS" -name '*.jar' | wc -l) jars into $KAFKA_LIBS in $((SECONDS - t0)) s"
}

kafka_probe() { # kafka_probe BOOTSTRAP: a real metadata request
    if "$PYTHON" -c 'import kafka' 2>/dev/null; then
        "$PYTHON" - "$1" <<'EOF' >/dev/null 2>"$STATE/probe.err"
import sys
from kafka import KafkaAdminClient
admin = KafkaAdminClient(bootstrap_servers=sys.argv[1], client_id="cdp-services-probe",
                         request_timeout_ms=5000)
try:
    admin.list_topics()
finally:
    admin.close()
EOF
    else # no project virtualenv yet: the port answers and the broker says it started
        port_in_use "${1##*:}" && grep -q 'Kafka Server started' "$KAFKA_DIR/kafka.log" 2>/dev/null
    fi
}

kafka_running() { pid_alive "$KAFKA_DIR/kafka.pid" 'kafka\.Kafka'; }

start_kafka() {
    require_java
    local port ctrl java
    if kafka_running; then
        port="$(saved_port KAFKA_PORT)"
        log "Kafka already running (pid $(cat "$KAFKA_DIR/kafka.pid")), reusing it on 127.0.0.1:$port"
        wait_for kafka "$KAFKA_DIR/kafka.pid" kafka_probe "127.0.0.1:$port" "$KAFKA_DIR/kafka.log"
        KAFKA_PORT="$port"; return 0
    fi
    fetch_kafka
    java="$(java_bin)"
    port="$(pick_port Kafka CDP_KAFKA_PORT 19092)"
    ctrl="$(pick_port "Kafka controller" CDP_KAFKA_CONTROLLER_PORT 19093 "$port")"
    mkdir -p "$KAFKA_DIR/data" "$KAFKA_DIR/logs"
    cat >"$KAFKA_DIR/server.properties" <<EOF
# written by scripts/services.sh: single-node KRaft broker+controller for development and tests
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$ctrl
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$ctrl
advertised.listeners=PLAINTEXT://127.0.0.1:$port
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
log.dirs=$KAFKA_DIR/data
num.partitions=4
default.replication.factor=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
group.initial.rebalance.delay.ms=0
# cdp creates its own topics (cdp/topics.py); auto-creation stays on for ad-hoc tools such as kcat
auto.create.topics.enable=true
delete.topic.enable=true
EOF
    cat >"$KAFKA_DIR/log4j.properties" <<EOF
log4j.rootLogger=INFO, file
log4j.appender.file=org.apache.log4j.RollingFileAppender
log4j.appender.file.File=$KAFKA_DIR/logs/server.log
log4j.appender.file.MaxFileSize=20MB
log4j.appender.file.MaxBackupIndex=3
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka=INFO
log4j.logger.org.apache.kafka=INFO
log4j.logger.state.change.logger=WARN
log4j.logger.kafka.request.logger=WARN
EOF
    local jvm=(-Dlog4j.configuration="file:$KAFKA_DIR/log4j.properties" -Dkafka.logs.dir="$KAFKA_DIR/logs"
               -Djava.awt.headless=true -cp "$KAFKA_LIBS/*")
    if [[ ! -f "$KAFKA_DIR/data/meta.properties" ]]; then
        local cluster_id
        cluster_id="$("$java" "${jvm[@]}" kafka.tools.StorageTool random-uuid 2>>"$KAFKA_DIR/kafka.log" | tail -1)"
        "$java" "${jvm[@]}" kafka.tools.StorageTool format -t "$cluster_id" -c "$KAFKA_DIR/server.properties" \
            >>"$KAFKA_DIR/kafka.log" 2>&1 || die "formatting the Kafka log dir failed, see $KAFKA_DIR/kafka.log"
    fi
    log "starting Kafka $KAFKA_VERSION on 127.0.0.1:$port (controller $ctrl), log $KAFKA_DIR/logs/server.log"
    # own session: a Ctrl-C in the caller's terminal does not take the broker down with it
    # shellcheck disable=SC2086
    setsid "$java" $KAFKA_HEAP -XX:+UseG1GC "${jvm[@]}" kafka.Kafka "$KAFKA_DIR/server.properties" \
        </dev/null >>"$KAFKA_DIR/kafka.log" 2>&1 &
    echo $! >"$KAFKA_DIR/kafka.pid"
    save_port KAFKA_PORT "$port"; save_port KAFKA_CONTROLLER_PORT "$ctrl"
    STARTED+=(kafka); echo kafka >>"$STATE/last-start"
    wait_for kafka "$KAFKA_DIR/kafka.pid" kafka_probe "127.0.0.1:$port" "$KAFKA_DIR/logs/server.log and $KAFKA_DIR/kafka.log"
    KAFKA_PORT="$port"
}

stop_kafka() {
    if ! kafka_running; then log "Kafka is not running"; rm -f "$KAFKA_DIR/kafka.pid"; return 0; fi
    local pid; pid="$(cat "$KAFKA_DIR/kafka.pid")"
    log "stopping Kafka (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then log "Kafka did not stop within 30 s: killing it"; kill -KILL "$pid" 2>/dev/null || true; fi
    rm -f "$KAFKA_DIR/kafka.pid"
}

# ------------------------------------------------------------------------------------- PostgreSQL

pg_bindir() {
    local d
    d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | while read -r b; do [[ -x "$b/postgres" ]] && echo "$b"; done | tail -1)"
    if [[ -z "$d" ]] && command -v pg_ctl >/dev/null && [[ -x "$(dirname "$(command -v pg_ctl)")/postgres" ]]; then
        d="$(dirname "$(command -v pg_ctl)")"
    fi
    echo "$d"
}

install_postgres() {
    [[ -n "$(pg_bindir)" ]] && return 0
    command -v apt-get >/dev/null || die "no PostgreSQL server found (/usr/lib/postgresql/*/bin/postgres or pg_ctl on PATH) and no apt-get to install one: install PostgreSQL 13+ and retry"
    log "PostgreSQL server not found: installing Debian's postgresql package"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2
    [[ -n "$(pg_bindir)" ]] || die "installed postgresql but found no /usr/lib/postgresql/*/bin/postgres"
}

pg_as_owner() { # PostgreSQL refuses to run as root: run its tools as the postgres OS user then
    if [[ $EUID -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_data_dir() { # where the cluster lives: under $STATE unless the postgres user cannot reach it
    if [[ -f "$PG_DIR/datadir" ]]; then cat "$PG_DIR/datadir"; return; fi
    local d="$PG_DIR/data"
    if [[ $EUID -eq 0 ]] && ! runuser -u postgres -- test -x "$PG_DIR" 2>/dev/null; then
        d="/var/tmp/cdp-postgres-$(printf '%s' "$STATE" | md5sum | cut -c1-10)/data"
        log "the postgres OS user cannot reach $PG_DIR (a parent directory is private): using $d"
    fi
    echo "$d" >"$PG_DIR/datadir"; echo "$d"
}

pg_log() { # the server log, next to the data directory
    if [[ -f "$PG_DIR/datadir" ]]; then echo "$(dirname "$(cat "$PG_DIR/datadir")")/postgres.log"; else echo "$PG_DIR/postgres.log"; fi
}

pg_ready() { # pg_ready PORT: answers a real query
    "$(pg_bindir)/psql" -X -q -h 127.0.0.1 -p "$1" -U postgres -d postgres -tAc 'select 1' 2>/dev/null | grep -qx 1
}

postgres_running() {
    local bin data; bin="$(pg_bindir)"
    [[ -n "$bin" && -f "$PG_DIR/datadir" ]] || return 1
    data="$(cat "$PG_DIR/datadir")"
    [[ -f "$data/postmaster.pid" ]] && pg_as_owner "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1
}

start_postgres() {
    install_postgres
    local bin data sock port
    bin="$(pg_bindir)"
    mkdir -p "$PG_DIR"
    if postgres_running; then
        port="$(saved_port POSTGRES_PORT)"
        log "PostgreSQL already running, reusing it on 127.0.0.1:$port"
        wait_for postgres "" pg_ready "$port" "$(pg_log)"
        POSTGRES_PORT="$port"; return 0
    fi
    data="$(pg_data_dir)"
    PG_LOG="$(dirname "$data")/postgres.log"
    # unix socket paths are limited to ~107 bytes: keep the socket dir short
    sock="$(dirname "$data")/run"
    (( ${#sock} > 80 )) && sock="/tmp/cdp-pg-$(printf '%s' "$STATE" | md5sum | cut -c1-10)"
    mkdir -p "$(dirname "$data")" "$sock"
    touch "$PG_LOG"
    if [[ $EUID -eq 0 ]]; then chown postgres: "$PG_DIR" "$(dirname "$data")" "$sock" "$PG_LOG"; fi
    if [[ ! -f "$data/PG_VERSION" ]]; then
        log "initdb $data ($("$bin/postgres" --version))"
        pg_as_owner "$bin/initdb" -D "$data" -U postgres --auth=trust --encoding=UTF8 --no-locale \
            >>"$PG_LOG" 2>&1 || die "initdb failed, see $PG_LOG"
    fi
    port="$(pick_port PostgreSQL CDP_POSTGRES_PORT 15432 "${KAFKA_PORT:-}" "$(saved_port KAFKA_CONTROLLER_PORT)")"
    log "starting PostgreSQL on 127.0.0.1:$port, log $PG_LOG"
    # a development/test server: durability traded for speed
    pg_as_owner "$bin/pg_ctl" -D "$data" -l "$PG_LOG" -w -t "$TIMEOUT" \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $sock -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
        start >/dev/null || die "PostgreSQL did not start, see $PG_LOG"
    save_port POSTGRES_PORT "$port"
    STARTED+=(postgres); echo postgres >>"$STATE/last-start"
    wait_for postgres "" pg_ready "$port" "$PG_LOG"
    "$bin/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d postgres >/dev/null <<'EOF' \
        || die "could not create the cdp role and database, see $PG_LOG"
SELECT 'CREATE ROLE cdp LOGIN CREATEDB PASSWORD ''cdp''' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'cdp')\gexec
SELECT 'CREATE DATABASE cdp OWNER cdp' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'cdp')\gexec
EOF
    POSTGRES_PORT="$port"
}

stop_postgres() {
    if ! postgres_running; then log "PostgreSQL is not running"; return 0; fi
    log "stopping PostgreSQL"
    pg_as_owner "$(pg_bindir)/pg_ctl" -D "$(cat "$PG_DIR/datadir")" -m fast -w -t 60 stop >/dev/null
}

# ------------------------------------------------------------------------------------------- kcat

install_kcat() { # the generic Kafka client the tests use to show that any client takes part
    if command -v kcat >/dev/null; then return 0; fi
    command -v apt-get >/dev/null || die "kcat is missing and there is no apt-get to install it: install kcat and retry"
    log "kcat not found: installing Debian's kcat package"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q kcat >&2 \
        || { as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
             as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q kcat >&2; }
    command -v kcat >/dev/null || die "installed kcat but it is not on PATH"
}

# ----------------------------------------------------------------------------------------- common

wait_for() { # wait_for NAME PIDFILE PROBE ARG LOGS
    local name=$1 pidfile=$2 probe=$3 arg=$4 logs=$5 deadline=$((SECONDS + TIMEOUT))
    until "$probe" "$arg"; do
        if [[ -n "$pidfile" ]] && ! pid_alive "$pidfile" .; then
            tail -n 30 "${logs%% and *}" >&2 2>/dev/null || true
            die "$name exited during start-up; see $logs"
        fi
        if (( SECONDS >= deadline )); then
            if [[ -s "$STATE/probe.err" ]]; then log "last probe error:"; tail -n 3 "$STATE/probe.err" >&2; fi
            die "$name did not answer on $arg within $TIMEOUT s; see $logs"
        fi
        sleep 1
    done
}

write_env() {
    local lines=()
    local kport pport
    kport="${KAFKA_PORT:-}"; pport="${POSTGRES_PORT:-}"
    if [[ -z "$kport" ]] && kafka_running; then kport="$(saved_port KAFKA_PORT)"; fi
    if [[ -z "$pport" ]] && postgres_running; then pport="$(saved_port POSTGRES_PORT)"; fi
    [[ -n "$kport" ]] && lines+=("export CDP_KAFKA_BOOTSTRAP=127.0.0.1:$kport")
    [[ -n "$pport" ]] && lines+=("export CDP_POSTGRES_DSN=postgresql://cdp:cdp@127.0.0.1:$pport/cdp")
    mkdir -p "$STATE"
    if ((${#lines[@]})); then printf '%s\n' "${lines[@]}" >"$ENV_FILE"; printf '%s\n' "${lines[@]}"
    else rm -f "$ENV_FILE"
    fi
}

services_from_args() {
    SERVICES=()
    local s
    for s in "$@"; do
        case "$s" in kafka|postgres) SERVICES+=("$s") ;; *) die "unknown service '$s' (kafka, postgres)" 2 ;; esac
    done
    ((${#SERVICES[@]})) || SERVICES=(kafka postgres)
}

cmd_start() {
    services_from_args "$@"
    STARTED=()
    local t0=$SECONDS s
    mkdir -p "$STATE"
    # which services this call launched (not reused), written as they start so that a failed start
    # can be cleaned up too: scripts/test.sh stops only those
    : >"$STATE/last-start"
    # Java first: without it nothing is started, and the caller gets exit code 3
    [[ " ${SERVICES[*]} " == *" kafka "* ]] && require_java
    for s in "${SERVICES[@]}"; do "start_$s"; done
    log "ready in $((SECONDS - t0)) s${STARTED[*]:+ (started: ${STARTED[*]})}; the addresses are in $ENV_FILE"
    write_env
}

cmd_stop() {
    services_from_args "$@"
    local s
    for s in "${SERVICES[@]}"; do "stop_$s"; done
    write_env >/dev/null
}

cmd_status() {
    local rc=0 port
    if kafka_running; then
        port="$(saved_port KAFKA_PORT)"
        if kafka_probe "127.0.0.1:$port"; then echo "kafka: running (pid $(cat "$KAFKA_DIR/kafka.pid")) on 127.0.0.1:$port, answering"
        else echo "kafka: running (pid $(cat "$KAFKA_DIR/kafka.pid")) on 127.0.0.1:$port, NOT answering (see $KAFKA_DIR/logs/server.log)"; rc=1; fi
    else echo "kafka: stopped"; rc=1; fi
    if postgres_running; then
        port="$(saved_port POSTGRES_PORT)"
        if pg_ready "$port"; then echo "postgres: running on 127.0.0.1:$port, answering (data $(cat "$PG_DIR/datadir"))"
        else echo "postgres: running on 127.0.0.1:$port, NOT answering (see $(pg_log))"; rc=1; fi
    else echo "postgres: stopped"; rc=1; fi
    return "$rc"
}

case "${1:-}" in
    start)  shift; cmd_start "$@" ;;
    stop)   shift; cmd_stop "$@" ;;
    status) cmd_status ;;
    env)    write_env ;;
    kcat)   install_kcat ;;
    *) echo "usage: $0 start|stop [kafka] [postgres] | status | env | kcat" >&2; exit 2 ;;
esac
