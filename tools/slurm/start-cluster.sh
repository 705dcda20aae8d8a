#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for the tests marked `slurm` (tests/test_slurm.py) and
# for trying `densenet reproduce --launcher slurm` without a cluster. Debian's packages, run as root:
#
#   tools/slurm/start-cluster.sh install   apt-get install slurm-wlm slurmdbd munge mariadb-server
#   tools/slurm/start-cluster.sh start     configure (once) and start munged, MariaDB, slurmdbd,
#                                          slurmctld and slurmd; reuses the daemons already running;
#                                          prints STARTED=1 (0: reused) and SLURM_CONF=FILE (export it
#                                          to use the cluster)
#   tools/slurm/start-cluster.sh stop      cancel the cluster's jobs, stop the daemons it started
#   tools/slurm/start-cluster.sh status    which daemons run; sinfo
#
# One node (this machine's hostname, all its cores, RealMemory 95% of MemTotal), one partition
# (`debug`), cgroup-free plugins (proctrack/linuxproc, task/none: containers often lack cgroups),
# select/cons_tres with cores as the resource, JobRequeue=1, and accounting through slurmdbd and a
# MariaDB of its own (submitit follows its jobs with `sacct`, which needs it). Everything lives in the
# state directory ($DENSENET_SLURM_DIR, default /tmp/densenet-slurm): keys, configuration (template:
# tools/slurm/slurm.conf.in), database, spool, logs (log/), pid files. Nothing in /etc is changed and the
# ports are free ones picked on the first start, so a system munge/MariaDB/SLURM is left alone.
# `start` exits with status 3 and one line on stderr where the cluster cannot run here (not root,
# packages missing, a daemon that does not come up): the tests skip with that line.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
DIR="${DENSENET_SLURM_DIR:-/tmp/densenet-slurm}"
CONF="$DIR/slurm.conf"
export SLURM_CONF="$CONF"
PACKAGES=(slurm-wlm slurmdbd munge mariadb-server)
SBIN=/usr/sbin  # Debian installs the daemons there; root's PATH may not have it in a container
export PATH="$PATH:$SBIN"

cannot() { echo "the SLURM test cluster cannot start here: $*" >&2; exit 3; }
say() { echo "start-cluster.sh: $*" >&2; }
alive() { [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_for() {  # wait_for SECONDS WHAT COMMAND...: poll COMMAND every 0.5 s
    local end=$((SECONDS + $1)) what="$2"
    shift 2
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= end)); then cannot "$what did not come up within the time allowed (logs: $DIR/log)"; fi
        sleep 0.5
    done
}

install() {
    [[ $(id -u) == 0 ]] || { echo "install needs root (apt-get)" >&2; exit 1; }
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
    dpkg-query -W -f '${Package} ${Version}\n' slurm-wlm slurmdbd munge mariadb-server
}

configure() {  # the first start: ports, keys, configuration files
    mkdir -p "$DIR"/{munge,log,state,spool,mysql-run}
    chmod 755 "$DIR"
    chmod 711 "$DIR/munge"  # the socket's directory: clients (any user) reach it, cannot list it
    if [[ ! -s "$DIR/ports" ]]; then
        echo "CTLD_PORT=$(free_port) SLURMD_PORT=$(free_port) DBD_PORT=$(free_port) DB_PORT=$(free_port)" >"$DIR/ports"
    fi
    # shellcheck disable=SC1091
    source <(tr ' ' '\n' <"$DIR/ports")
    [[ -s "$DIR/munge/munge.key" ]] || mungekey --create --keyfile="$DIR/munge/munge.key"
    chmod 600 "$DIR/munge/munge.key"
    local host cpus mem
    host="$(hostname -s)"
    cpus="$(nproc)"
    mem=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.95)}' /proc/meminfo)
    sed -e "s|@DIR@|$DIR|g" -e "s|@HOST@|$host|g" -e "s|@CPUS@|$cpus|g" -e "s|@MEM_MB@|$mem|g" \
        -e "s|@CTLD_PORT@|$CTLD_PORT|g" -e "s|@SLURMD_PORT@|$SLURMD_PORT|g" -e "s|@DBD_PORT@|$DBD_PORT|g" \
        "$HERE/slurm.conf.in" >"$CONF.new"
    mv "$CONF.new" "$CONF"
    (umask 077 && cat >"$DIR/slurmdbd.conf" <<EOF
# written by tools/slurm/start-cluster.sh
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DIR/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=densenet-test
StorageLoc=slurm_acct_db
EOF
    )
}

start_munge() {
    alive "$DIR/munge/munged.pid" && return
    munged --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/munge/munged.pid" --seed-file="$DIR/munge/munged.seed" \
        --log-file="$DIR/log/munged.log" 9>&- || cannot "munged failed to start (see $DIR/log/munged.log)"
    wait_for 20 munged bash -c "munge -n -S '$DIR/munge/munge.socket' | unmunge -S '$DIR/munge/munge.socket'"
}

sql() { mariadb --no-defaults --socket="$DIR/mysql-run/mysqld.sock" -u root "$@"; }

start_mariadb() {
    alive "$DIR/mysql-run/mysqld.pid" && return
    if [[ ! -d "$DIR/mysql/mysql" ]]; then
        mariadb-install-db --no-defaults --datadir="$DIR/mysql" --user=root --auth-root-authentication-method=normal \
            --skip-test-db >"$DIR/log/mariadb-install.log" 2>&1 || cannot "mariadb-install-db failed ($DIR/log)"
    fi
    setsid mariadbd --no-defaults --datadir="$DIR/mysql" --socket="$DIR/mysql-run/mysqld.sock" --port="$DB_PORT" \
        --bind-address=127.0.0.1 --user=root --pid-file="$DIR/mysql-run/mysqld.pid" \
        --log-error="$DIR/log/mariadb.log" --innodb-buffer-pool-size=32M --innodb-lock-wait-timeout=900 \
        --skip-name-resolve </dev/null >/dev/null 2>&1 9>&- &
    wait_for 60 MariaDB sql -e "SELECT 1"
    sql -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'densenet-test';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
}

start_slurm() {
    if ! alive "$DIR/slurmdbd.pid"; then
        slurmdbd 9>&- || cannot "slurmdbd failed to start ($DIR/log/slurmdbd.log)"
        wait_for 60 slurmdbd sacctmgr -n list cluster
    fi
    if ! sacctmgr -n -P list cluster format=cluster | grep -qx densenet-test; then
        sacctmgr -i add cluster densenet-test >/dev/null
    fi
    if ! alive "$DIR/slurmctld.pid"; then
        slurmctld -f "$CONF" 9>&- || cannot "slurmctld failed to start ($DIR/log/slurmctld.log)"
        wait_for 30 slurmctld scontrol ping
    fi
    if ! alive "$DIR/slurmd.pid"; then
        mkdir -p "$DIR/spool/$(hostname -s)"
        slurmd -f "$CONF" 9>&- || cannot "slurmd failed to start ($DIR/log/slurmd.log)"
    fi
    local host
    host="$(hostname -s)"
    # a node left down or drained by an earlier run comes back
    if sinfo -h -n "$host" -o %T | grep -Eq 'down|drain'; then
        scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
    fi
    wait_for 60 "slurmd (node $host idle)" bash -c "sinfo -h -n '$host' -o %T | grep -Eq '^(idle|mixed|allocated)'"
}

start() {
    [[ $(id -u) == 0 ]] || cannot "not root (the daemons run as root here; run the tests as root)"
    local b
    for b in munged mungekey mariadbd mariadb-install-db slurmdbd slurmctld slurmd sbatch sacct sacctmgr; do
        command -v "$b" >/dev/null ||
            cannot "$b is not installed (tools/slurm/start-cluster.sh install: apt-get install ${PACKAGES[*]})"
    done
    mkdir -p "$DIR"
    exec 9>"$DIR/.start.lock"
    flock 9  # two starts at once (pytest-xdist workers): the second waits and reuses the first's daemons
    local started=1
    alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid" && started=0
    configure
    start_munge
    start_mariadb
    start_slurm
    say "SLURM $(sinfo --version | cut -d' ' -f2) cluster up: node $(hostname -s), $(nproc) CPUs;" \
        "state and logs in $DIR"
    echo "STARTED=$started"  # 0: it was running already (reused)
    echo "SLURM_CONF=$CONF"
}

stop() {
    [[ -d "$DIR" ]] || return 0
    if alive "$DIR/slurmctld.pid"; then  # the cluster's own jobs end with it
        scancel --partition=debug >/dev/null 2>&1 || true
        local end=$((SECONDS + 20))
        while [[ -n "$(squeue -h -o %i 2>/dev/null)" ]] && ((SECONDS < end)); do sleep 0.5; done
    fi
    local f pid end
    for f in slurmd.pid slurmctld.pid slurmdbd.pid mysql-run/mysqld.pid munge/munged.pid; do
        alive "$DIR/$f" || continue
        pid="$(cat "$DIR/$f")"
        kill -TERM "$pid" 2>/dev/null || true
        end=$((SECONDS + 20))
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < end)); do sleep 0.2; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    done
    say "stopped (state and logs kept in $DIR)"
}

status() {
    local f
    for f in munge/munged.pid mysql-run/mysqld.pid slurmdbd.pid slurmctld.pid slurmd.pid; do
        if alive "$DIR/$f"; then echo "$(basename "$f" .pid): running, pid $(cat "$DIR/$f")"
        else echo "$(basename "$f" .pid): not running"; fi
    done
    [[ -f "$CONF" ]] && alive "$DIR/slurmctld.pid" && sinfo
    echo "SLURM_CONF=$CONF"
}

case "${1:-start}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 install|start|stop|status" \
            "(state directory: \$DENSENET_SLURM_DIR, default /tmp/densenet-slurm)" >&2
       exit 2 ;;
esac
