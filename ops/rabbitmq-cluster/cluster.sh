#!/bin/sh
# A three-node RabbitMQ cluster on loopback ports, from the installed Debian rabbitmq-server.
#
#   cluster.sh start  [--base-port N] [--prefix P] [--dir D]
#   cluster.sh status [--prefix P] [--dir D]
#   cluster.sh stop   [--prefix P] [--dir D]
#   cluster.sh start-node I [--prefix P] [--dir D]
#
# Node i (1..3) is P<i>@localhost with AMQP on N+i-1, management on N+10+i-1 and Erlang
# distribution on N+20+i-1 (epmd on 4369 is shared with any other node; that is how the nodes
# and rabbitmqctl find each other). Everything of a cluster lives in D (default
# /tmp/rabbitmq-cluster-P): each node's config, database, logs and pid file, and cluster.env,
# which `status`, `stop` and `start-node` read. A different prefix gives a cluster of its own, so
# concurrent runs do not clash. `stop` stops the nodes, kills what is left of them and removes D.
# `start-node I` starts node I again after it was stopped or killed (a rolling restart, a crash):
# it keeps its data directory, so it rejoins the cluster by itself.
#
# Run as root: the nodes run as the `rabbitmq` user, so they share its Erlang cookie
# (/var/lib/rabbitmq/.erlang.cookie) with Debian's rabbitmqctl, which switches to that user
# when started by root.
set -eu

SERVER=/usr/lib/rabbitmq/bin/rabbitmq-server
NODES="1 2 3"
command=${1:-}
[ $# -gt 0 ] && shift
node_index=
if [ "$command" = start-node ]; then node_index=${1:-}; [ $# -gt 0 ] && shift; fi
base_port=5680
prefix=chat
dir=

while [ $# -gt 0 ]; do
    case $1 in
        --base-port) base_port=$2; shift 2 ;;
        --prefix) prefix=$2; shift 2 ;;
        --dir) dir=$2; shift 2 ;;
        *) echo "cluster.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
[ -n "$dir" ] || dir=/tmp/rabbitmq-cluster-$prefix

fail() { echo "cluster.sh: $*" >&2; exit 1; }

node_name() { echo "${prefix}$1@localhost"; }
amqp_port() { echo $((base_port + $1 - 1)); }
management_port() { echo $((base_port + 10 + $1 - 1)); }
dist_port() { echo $((base_port + 20 + $1 - 1)); }

ctl() {  # ctl NODE ARGS...: rabbitmqctl against one node, quiet, bounded
    node=$1; shift
    timeout 120 rabbitmqctl -q -n "$node" "$@"
}

node_running() { ctl "$(node_name "$1")" ping >/dev/null 2>&1; }

load_state() {
    [ -f "$dir/cluster.env" ] || fail "no cluster in $dir (start one with 'cluster.sh start')"
    # shellcheck disable=SC1091
    . "$dir/cluster.env"
}

start_node() {
    i=$1
    node_dir=$dir/node$i
    mkdir -p "$node_dir/mnesia" "$node_dir/log"
    # The package's /etc/rabbitmq/rabbitmq.conf listens on 5672; each node has a file of its own.
    cat > "$node_dir/rabbitmq.conf" <<EOF
listeners.tcp.default = 127.0.0.1:$(amqp_port "$i")
management.tcp.ip = 127.0.0.1
management.tcp.port = $(management_port "$i")
# A node cut off from the others stops serving until it sees a majority again, then rejoins:
# with three nodes at most one side of a partition has two, so there is never a second cluster
# accepting writes. The default (ignore) keeps both sides running and leaves the cluster split
# after the partition heals, until an operator restarts the nodes of one side.
cluster_partition_handling = pause_minority
EOF
    echo "[rabbitmq_management]." > "$node_dir/enabled_plugins"
    chown -R rabbitmq:rabbitmq "$node_dir"
    # RABBITMQ_CONF_ENV_FILE points nowhere: /etc/rabbitmq/rabbitmq-env.conf names the package's
    # own node, and its loopback-only distribution is passed here instead.
    su rabbitmq -s /bin/sh -c "env \
        RABBITMQ_CONF_ENV_FILE=$node_dir/no-rabbitmq-env.conf \
        RABBITMQ_NODENAME=$(node_name "$i") \
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
        RABBITMQ_NODE_PORT=$(amqp_port "$i") \
        RABBITMQ_DIST_PORT=$(dist_port "$i") \
        RABBITMQ_MNESIA_BASE=$node_dir/mnesia \
        RABBITMQ_LOG_BASE=$node_dir/log \
        RABBITMQ_PID_FILE=$node_dir/pid \
        RABBITMQ_CONFIG_FILE=$node_dir/rabbitmq.conf \
        RABBITMQ_ENABLED_PLUGINS_FILE=$node_dir/enabled_plugins \
        ERL_EPMD_ADDRESS=127.0.0.1 \
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS='-kernel inet_dist_use_interface {127,0,0,1}' \
        $SERVER -detached" >> "$node_dir/log/start.out" 2>&1
}

wait_for_node() {  # until the node has booted; it registers with epmd a few seconds after -detached
    deadline=$(($(date +%s) + 120))
    until ctl "$(node_name "$1")" await_startup >/dev/null 2>&1; do
        [ "$(date +%s)" -lt "$deadline" ] || fail "node $(node_name "$1") did not start; see $dir/node$1/log"
        sleep 1
    done
}

cmd_start() {
    [ "$(id -u)" = 0 ] || fail "run as root (the nodes run as the rabbitmq user through su)"
    [ -x "$SERVER" ] || fail "$SERVER is missing: apt-get install rabbitmq-server"
    if [ -f "$dir/cluster.env" ]; then fail "a cluster already uses $dir; stop it first"; fi
    mkdir -p "$dir"
    chmod 755 "$dir"
    printf 'prefix=%s\nbase_port=%s\n' "$prefix" "$base_port" > "$dir/cluster.env"
    for i in $NODES; do start_node "$i"; done
    for i in $NODES; do wait_for_node "$i"; done
    first=$(node_name 1)
    for i in 2 3; do
        node=$(node_name "$i")
        # The CLI logs harmless errors about tables of the node it just stopped; keep them in its log.
        { ctl "$node" stop_app && ctl "$node" join_cluster "$first" && ctl "$node" start_app; } \
            >> "$dir/node$i/log/start.out" 2>&1 || fail "$node did not join $first; see $dir/node$i/log"
    done
    cmd_status
}

cmd_start_node() {
    [ "$(id -u)" = 0 ] || fail "run as root (the nodes run as the rabbitmq user through su)"
    load_state
    case $node_index in 1|2|3) ;; *) fail "start-node takes a node number, 1 to 3" ;; esac
    if node_running "$node_index"; then fail "$(node_name "$node_index") is running already"; fi
    start_node "$node_index"
    wait_for_node "$node_index"
}

cmd_status() {
    load_state
    printf '%-28s %-6s %-11s %-6s %s\n' node amqp management dist state
    for i in $NODES; do
        if node_running "$i"; then state=running; else state=stopped; fi
        printf '%-28s %-6s %-11s %-6s %s\n' "$(node_name "$i")" "$(amqp_port "$i")" \
            "$(management_port "$i")" "$(dist_port "$i")" "$state"
    done
}

cmd_stop() {
    load_state
    for i in $NODES; do
        ctl "$(node_name "$i")" stop >/dev/null 2>&1 || true
    done
    # Whatever did not stop in time (a hung node, a node killed mid-test that left children).
    for i in $NODES; do
        pid_file=$dir/node$i/pid
        if [ -f "$pid_file" ]; then kill -9 "$(cat "$pid_file")" 2>/dev/null || true; fi
    done
    rm -rf "$dir"
}

case $command in
    start) cmd_start ;;
    status) cmd_status ;;
    stop) cmd_stop ;;
    start-node) cmd_start_node ;;
    *) echo "usage: cluster.sh start|status|stop|start-node I [--base-port N] [--prefix P] [--dir D]" >&2; exit 2 ;;
esac
