#!/usr/bin/env bash
# slurm-local.sh — a throw-away one-node SLURM cluster for tests and laptops.
#
#   scripts/slurm-local.sh start [--accounting]   start munged + slurmctld + slurmd (+ slurmdbd)
#   scripts/slurm-local.sh stop [--purge]         stop them; --purge also deletes the state dir
#   scripts/slurm-local.sh status                 what runs, plus sinfo (exit 0 only if all up)
#   scripts/slurm-local.sh env                    print `export SLURM_CONF=...` for eval
#
# Everything (config, munge key and socket, spool, state, logs, pid files) lives in ONE state
# directory, so the machine's own /etc/slurm and /etc/munge are never touched and two instances
# with different directories and ports do not collide. See docs/slurm-local.md.
#
# Environment (all optional):
#   PRUNE_EVAL_SLURM_DIR            state dir                       [/tmp/prune-eval-slurm]
#   PRUNE_EVAL_SLURM_CTLD_PORT      SlurmctldPort                   [16817]
#   PRUNE_EVAL_SLURM_SLURMD_PORT    SlurmdPort                      [16818]
#   PRUNE_EVAL_SLURM_DBD_PORT       DbdPort (with --accounting)     [16819]
#   PRUNE_EVAL_SLURM_DB_PORT        MariaDB port (with --accounting)[16820]
#   PRUNE_EVAL_SLURM_PARTITION      the one partition's name        [debug]
#   PRUNE_EVAL_SLURM_MEM_MARGIN_MB  MemTotal minus this = RealMemory [1024]
#   PRUNE_EVAL_SLURM_START_TIMEOUT  seconds `start` waits for idle  [60]
#   PRUNE_EVAL_SLURM_ACCOUNTING=1   same as `start --accounting`
#
# Needs root (slurmd runs jobs as the submitting user) and the Debian packages named below.
set -euo pipefail
# The daemons live in /usr/sbin, which a non-login shell or CI may not have on PATH.
PATH="$PATH:/usr/sbin:/sbin"

STATE_DIR=${PRUNE_EVAL_SLURM_DIR:-/tmp/prune-eval-slurm}
CTLD_PORT=${PRUNE_EVAL_SLURM_CTLD_PORT:-16817}
SLURMD_PORT=${PRUNE_EVAL_SLURM_SLURMD_PORT:-16818}
DBD_PORT=${PRUNE_EVAL_SLURM_DBD_PORT:-16819}
DB_PORT=${PRUNE_EVAL_SLURM_DB_PORT:-16820}
PARTITION=${PRUNE_EVAL_SLURM_PARTITION:-debug}
MEM_MARGIN_MB=${PRUNE_EVAL_SLURM_MEM_MARGIN_MB:-1024}
START_TIMEOUT=${PRUNE_EVAL_SLURM_START_TIMEOUT:-60}
ACCOUNTING=${PRUNE_EVAL_SLURM_ACCOUNTING:-0}

# Make the state dir absolute: it ends up in slurm.conf, which the daemons read after a chdir.
case "$STATE_DIR" in /*) ;; *) STATE_DIR="$PWD/$STATE_DIR" ;; esac
STATE_DIR=${STATE_DIR%/}

ETC="$STATE_DIR/etc"          # slurm.conf, slurmdbd.conf
MUNGE_DIR="$STATE_DIR/munge"  # key + seed; munged insists on mode 0700 here
RUN="$STATE_DIR/run"          # sockets and pid files; munged insists the socket dir is 0755
LOG="$STATE_DIR/log"
SPOOL="$STATE_DIR/spool"      # slurmd spool (job scripts, stepd sockets)
CTLD_STATE="$STATE_DIR/state" # slurmctld StateSaveLocation (job ids survive restarts)
DB_DATA="$STATE_DIR/mysql"    # MariaDB datadir (only with --accounting)
MARKER="$STATE_DIR/.prune-eval-slurm"   # `--purge` deletes only directories that carry this

SLURM_CONF_FILE="$ETC/slurm.conf"
MUNGE_SOCKET="$RUN/munge.socket"
DB_SOCKET="$RUN/mysqld.sock"
CLUSTER=prune-eval-local
# NodeName must equal the short hostname: slurmd and slurmctld look themselves up by it.
NODE=$(uname -n)
NODE=${NODE%%.*}

# Daemons: munged, mariadb, slurmdbd, slurmctld, slurmd (start order). Each has a pid file in
# $RUN and the process name /proc/PID/comm shows (mariadb's is mariadbd).
pidfile() { echo "$RUN/$1.pid"; }
comm_of() {
    case "$1" in
        mariadb) echo mariadbd ;;
        *) echo "$1" ;;
    esac
}

die() { echo "slurm-local: error: $*" >&2; exit 1; }
say() { echo "slurm-local: $*"; }

# "/" (stripped to "") would put the config in /etc and the logs in /log.
[[ -n $STATE_DIR ]] || die "PRUNE_EVAL_SLURM_DIR must not be /"

usage() {
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-2}"
}

# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------
APT_BASE="apt-get update && apt-get install -y slurmctld slurmd slurm-client munge"
APT_ACCT="apt-get update && apt-get install -y slurmdbd mariadb-server"

check_packages() {
    local missing=() cmd
    for cmd in munged munge slurmctld slurmd sinfo sbatch squeue scontrol; do
        command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
    done
    if ((${#missing[@]})); then
        die "missing commands: ${missing[*]}. Install the Debian packages with:
    $APT_BASE"
    fi
    if [[ $ACCOUNTING == 1 ]]; then
        missing=()
        for cmd in slurmdbd sacct sacctmgr mariadbd mariadb-install-db mariadb; do
            command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
        done
        ((${#missing[@]} == 0)) || die "--accounting needs: ${missing[*]}. Install with:
    $APT_ACCT"
    fi
}

check_root() {
    # slurmd must be able to switch to the submitting user; SlurmUser=root keeps it simple.
    [[ $(id -u) == 0 ]] || die "must run as root (slurmd runs jobs as the submitting user)"
}

# Is something listening on 127.0.0.1:PORT?  (bash's /dev/tcp: no extra tools needed)
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# ---------------------------------------------------------------------------------------------
# Process bookkeeping (pid files only: never kill by process name)
# ---------------------------------------------------------------------------------------------
# Is PID alive? A zombie (state Z: dead, not yet reaped by init) counts as dead.
pid_alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }   # the state letter follows the ")" that closes the command name
    [[ ${stat%% *} != Z ]]
}

# Print the pid of daemon $1 if its pid file names a live process of the right name.
# Checking /proc/PID/comm guards against a stale pid file whose pid was reused.
live_pid() {
    local f pid
    f=$(pidfile "$1")
    [[ -s $f ]] || return 1
    pid=$(head -n1 "$f" | tr -dc '0-9')
    [[ -n $pid ]] && pid_alive "$pid" || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$(comm_of "$1")" ]] || return 1
    echo "$pid"
}

daemons_for_mode() {
    if [[ -f $ETC/accounting ]]; then
        echo munged mariadb slurmdbd slurmctld slurmd
    else
        echo munged slurmctld slurmd
    fi
}

# Stop the named daemons together: SIGTERM to each, wait up to GRACE seconds for all of them,
# then SIGKILL what is left. (Each takes 1-2 s to exit; one at a time would add that up.)
stop_daemons() {
    local grace=$1 name pid i alive
    shift
    local -A pids=()
    for name in "$@"; do
        if pid=$(live_pid "$name"); then
            pids[$name]=$pid
            kill -TERM "$pid" 2>/dev/null || true
        else
            rm -f "$(pidfile "$name")"
        fi
    done
    for ((i = 0; i < grace * 10; i++)); do
        alive=0
        for name in "${!pids[@]}"; do
            if pid_alive "${pids[$name]}"; then alive=1; fi
        done
        ((alive)) || break
        sleep 0.1
    done
    for name in "${!pids[@]}"; do
        pid=${pids[$name]}
        if pid_alive "$pid"; then
            say "$name (pid $pid) ignored SIGTERM for ${grace}s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.2
        fi
        rm -f "$(pidfile "$name")"
        say "stopped $name (pid $pid)"
    done
}

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------
# munged refuses a socket whose directory chain others cannot traverse (o+x), and a Unix
# socket path may not exceed 107 bytes. Say so before starting anything.
check_state_dir_path() {
    local d
    ((${#MUNGE_SOCKET} < 100)) || die "state dir path too long for a Unix socket: $STATE_DIR"
    d=$(dirname "$STATE_DIR")
    while [[ $d != / ]]; do
        if [[ -d $d ]] && (($(stat -c %a "$d" | sed 's/^.*\(.\)$/\1/') % 2 == 0)); then
            die "munged needs every parent of the state dir to be world-traversable (o+x), and $d is not; choose another PRUNE_EVAL_SLURM_DIR (e.g. under /tmp)"
        fi
        d=$(dirname "$d")
    done
}

make_dirs() {
    mkdir -p "$ETC" "$MUNGE_DIR" "$RUN" "$LOG" "$SPOOL/slurmd" "$CTLD_STATE"
    # munged refuses a key dir others can read and a socket dir others cannot traverse; the
    # state dir itself must be traversable too (default /tmp is fine: sticky bit).
    chmod 0755 "$STATE_DIR" "$RUN" "$LOG"
    chmod 0700 "$MUNGE_DIR"
    touch "$MARKER"
}

make_munge_key() {
    # Our own key: a cluster's real /etc/munge/munge.key is neither read nor replaced.
    local key="$MUNGE_DIR/munge.key"
    if [[ ! -s $key ]]; then
        dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
    fi
    chmod 0400 "$key"
}

real_memory_mb() {
    local total_kb mb
    total_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
    mb=$((total_kb / 1024 - MEM_MARGIN_MB))
    # slurmd drains a node that has less memory than configured, so err on the low side.
    ((mb >= 256)) || mb=256
    echo "$mb"
}

write_slurm_conf() {
    local cpus mem
    cpus=$(nproc)
    mem=$(real_memory_mb)
    cat >"$SLURM_CONF_FILE" <<EOF
# Written by scripts/slurm-local.sh; rewritten on every start. Do not edit by hand.
ClusterName=$CLUSTER
# Everything on loopback: no DNS needed and nothing leaves the machine.
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
# Our own munged, not the system one at /run/munge (AuthInfo is read by daemons and clients).
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
# No cgroups (no systemd here, maybe a container): track job processes by parent pid.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without this a job with no --mem would take all the node's memory and run alone.
DefMemPerCPU=$((mem / cpus))
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
# Finished jobs stay visible to 'scontrol show job' / 'squeue -t all' for 1 h: without
# accounting this is the only record of how a job ended (see docs/slurm-local.md, catch 2).
MinJobAge=3600
# Fast turnaround for tests.
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
StateSaveLocation=$CTLD_STATE
SlurmdSpoolDir=$SPOOL/slurmd
SlurmctldPidFile=$(pidfile slurmctld)
SlurmdPidFile=$(pidfile slurmd)
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
EOF
    if [[ $ACCOUNTING == 1 ]]; then
        cat >>"$SLURM_CONF_FILE" <<EOF
# Accounting through our own slurmdbd + MariaDB, so that sacct works.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# Names the munge socket for talking to slurmdbd: the AuthInfo socket above is NOT used for
# that connection, and without this sacct/sacctmgr/slurmctld try /run/munge/munge.socket.2.
AccountingStoragePass=$MUNGE_SOCKET
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
EOF
    else
        cat >>"$SLURM_CONF_FILE" <<EOF
# No accounting: sacct answers with an error (see docs/slurm-local.md, catch 1).
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
EOF
    fi
    cat >>"$SLURM_CONF_FILE" <<EOF
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

write_slurmdbd_conf() {
    # slurmdbd refuses a config readable by others.
    install -m 0600 /dev/null "$ETC/slurmdbd.conf"
    cat >"$ETC/slurmdbd.conf" <<EOF
# Written by scripts/slurm-local.sh --accounting.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$(pidfile slurmdbd)
LogFile=$LOG/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
}

# ---------------------------------------------------------------------------------------------
# Starting the daemons
# ---------------------------------------------------------------------------------------------
start_munged() {
    # A stale socket from a killed munged makes the new one refuse to start.
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    munged --socket="$MUNGE_SOCKET" \
        --key-file="$MUNGE_DIR/munge.key" \
        --pid-file="$(pidfile munged)" \
        --log-file="$LOG/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed" ||
        fail_start "munged did not start"
    munge -n -S "$MUNGE_SOCKET" | unmunge -S "$MUNGE_SOCKET" >/dev/null ||
        fail_start "munged started but a credential round trip failed"
}

start_mariadb() {
    local i
    if [[ ! -d $DB_DATA/mysql ]]; then
        say "initialising MariaDB in $DB_DATA (first --accounting start only)"
        mariadb-install-db --no-defaults --user=root --datadir="$DB_DATA" \
            --auth-root-authentication-method=socket --skip-test-db \
            >"$LOG/mariadb-install.log" 2>&1 ||
            fail_start "mariadb-install-db failed (see $LOG/mariadb-install.log)"
    fi
    # --no-defaults: ignore /etc/mysql so a system MariaDB's settings and port do not leak in.
    mariadbd --no-defaults --user=root --datadir="$DB_DATA" \
        --socket="$DB_SOCKET" --pid-file="$(pidfile mariadb)" \
        --bind-address=127.0.0.1 --port="$DB_PORT" \
        --log-error="$LOG/mariadb.log" \
        --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 --skip-name-resolve \
        </dev/null >/dev/null 2>&1 &
    disown
    for ((i = 0; i < 300; i++)); do
        mariadb --no-defaults -S "$DB_SOCKET" -u root -e 'SELECT 1' >/dev/null 2>&1 && break
        sleep 0.1
    done
    ((i < 300)) || fail_start "MariaDB did not answer within 30 s"
    mariadb --no-defaults -S "$DB_SOCKET" -u root <<'SQL' || fail_start "could not create the slurm DB user"
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
SQL
}

start_slurmdbd() {
    local i
    # slurmdbd has no config-file option: it reads slurmdbd.conf beside $SLURM_CONF.
    slurmdbd || fail_start "slurmdbd did not start"
    for ((i = 0; i < 300; i++)); do
        port_in_use "$DBD_PORT" && return 0
        sleep 0.1
    done
    fail_start "slurmdbd did not listen on port $DBD_PORT within 30 s"
}

register_cluster() {
    # The cluster and a default account must exist in the DB, or sacct shows nothing.
    if ! sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null || fail_start "sacctmgr add cluster failed"
    fi
}

# Wait until sinfo shows our node idle; any failure prints the logs and exits non-zero.
wait_for_idle() {
    local deadline=$((SECONDS + START_TIMEOUT)) state=""
    while ((SECONDS < deadline)); do
        state=$(SLURM_CONF="$SLURM_CONF_FILE" timeout 10 sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n1) || true
        case "$state" in
            idle | mixed | allocated) return 0 ;;
            drain* | inval* | down | fail*)
                # ReturnToService=2 should have brought it back; an INVAL node is misconfigured.
                fail_start "node $NODE is '$state': $(SLURM_CONF="$SLURM_CONF_FILE" scontrol show node "$NODE" 2>/dev/null | grep -o 'Reason=.*')"
                ;;
        esac
        for d in $(daemons_for_mode); do
            live_pid "$d" >/dev/null || fail_start "$d exited during start-up"
        done
        sleep 0.5
    done
    fail_start "node $NODE not idle after ${START_TIMEOUT}s (last sinfo state: '${state:-none}')"
}

show_logs() {
    local f
    for f in "$LOG"/munged.log "$LOG"/mariadb.log "$LOG"/slurmdbd.log "$LOG"/slurmctld.log "$LOG"/slurmd.log; do
        [[ -s $f ]] || continue
        echo "----- tail of $f -----" >&2
        tail -n 25 "$f" >&2
    done
}

fail_start() {
    echo "slurm-local: error: $*" >&2
    show_logs
    echo "slurm-local: stopping what did start ('$0 status' / '$0 stop')" >&2
    do_stop >/dev/null 2>&1 || true
    exit 1
}

# ---------------------------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------------------------
all_running() {
    local d
    [[ -f $SLURM_CONF_FILE ]] || return 1
    for d in $(daemons_for_mode); do
        live_pid "$d" >/dev/null || return 1
    done
}

any_running() {
    local d
    for d in munged mariadb slurmdbd slurmctld slurmd; do
        live_pid "$d" >/dev/null && return 0
    done
    return 1
}

do_start() {
    local t0=$SECONDS p
    check_root
    check_packages
    if all_running; then
        if [[ $ACCOUNTING == 1 && ! -f $ETC/accounting ]]; then
            die "already running WITHOUT accounting in $STATE_DIR; run '$0 stop' first"
        fi
        say "already running in $STATE_DIR (accounting $([[ -f $ETC/accounting ]] && echo on || echo off))"
        wait_for_idle
        return 0
    fi
    if any_running; then
        say "partly running in $STATE_DIR; stopping the rest before a clean start"
        do_stop
    fi
    local ports=("$CTLD_PORT" "$SLURMD_PORT")
    [[ $ACCOUNTING == 1 ]] && ports+=("$DBD_PORT" "$DB_PORT")
    for p in "${ports[@]}"; do
        port_in_use "$p" && die "port $p on 127.0.0.1 is already in use (another cluster?). Choose others with PRUNE_EVAL_SLURM_CTLD_PORT / _SLURMD_PORT / _DBD_PORT / _DB_PORT"
    done

    check_state_dir_path
    make_dirs
    make_munge_key
    write_slurm_conf
    # Logs of the previous run would confuse a failure report.
    : >"$LOG/slurmctld.log"
    : >"$LOG/slurmd.log"
    # Remember the mode so that stop/status know which daemons belong to this instance.
    if [[ $ACCOUNTING == 1 ]]; then
        mkdir -p "$DB_DATA"
        touch "$ETC/accounting"
        write_slurmdbd_conf
    else
        rm -f "$ETC/accounting"
    fi
    export SLURM_CONF="$SLURM_CONF_FILE"

    start_munged
    if [[ $ACCOUNTING == 1 ]]; then
        start_mariadb
        start_slurmdbd
        register_cluster
    fi
    # -i: ignore unreadable state files from a previous (e.g. SIGKILLed) run instead of failing.
    slurmctld -i || fail_start "slurmctld did not start"
    # -N: the node name we configured, even if the hostname has a domain part.
    slurmd -N "$NODE" || fail_start "slurmd did not start"
    wait_for_idle
    say "up in $((SECONDS - t0))s: node $NODE ($(nproc) CPUs, $(real_memory_mb) MB), partition $PARTITION, accounting $([[ $ACCOUNTING == 1 ]] && echo on || echo off)"
    say "use it with: eval \"\$($0 env)\""
}

cancel_all_jobs() {
    # A running job's slurmstepd outlives slurmd; cancel jobs while the controller still runs.
    local i
    live_pid slurmctld >/dev/null || return 0
    [[ -n $(timeout 10 squeue -h -o %i 2>/dev/null) ]] || return 0
    say "cancelling remaining jobs"
    # %F = the array's base job id (the plain id for other jobs): cancels every task of it.
    timeout 10 squeue -h -o %F 2>/dev/null | sort -u | xargs -r timeout 10 scancel --quiet 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
        [[ -z $(timeout 10 squeue -h -o %i -t PD,R,CG,S 2>/dev/null) ]] && return 0
        sleep 0.1
    done
    say "some jobs are still ending after 15 s; stopping the daemons anyway"
}

do_stop() {
    local purge=${1:-0}
    export SLURM_CONF="$SLURM_CONF_FILE"
    if any_running; then
        if [[ -f $SLURM_CONF_FILE ]]; then cancel_all_jobs; fi
    else
        say "nothing running in $STATE_DIR"
    fi
    # Order matters only where one daemon talks to another while shutting down: slurmctld
    # flushes job records to slurmdbd, slurmdbd to MariaDB; all of them need munged.
    stop_daemons 15 slurmd slurmctld
    stop_daemons 15 slurmdbd
    stop_daemons 30 mariadb munged
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    if [[ $purge == 1 ]]; then
        if [[ -f $MARKER ]]; then
            rm -rf -- "$STATE_DIR"
            say "purged $STATE_DIR"
        elif [[ -e $STATE_DIR ]]; then
            die "not purging $STATE_DIR: it lacks $(basename "$MARKER"), so it may not be ours"
        fi
    fi
}

do_status() {
    local d pid rc=0
    echo "state dir: $STATE_DIR"
    echo "SLURM_CONF=$SLURM_CONF_FILE"
    for d in $(daemons_for_mode); do
        if pid=$(live_pid "$d"); then
            printf '  %-10s running (pid %s)\n' "$d" "$pid"
        else
            printf '  %-10s not running\n' "$d"
            rc=3
        fi
    done
    if ((rc == 0)); then
        SLURM_CONF="$SLURM_CONF_FILE" timeout 10 sinfo -N -o '%N %P %T %c %m' || rc=3
    fi
    return "$rc"
}

do_env() {
    # Only SLURM_CONF is needed: the munge socket is named in slurm.conf (AuthInfo).
    echo "export SLURM_CONF=$SLURM_CONF_FILE"
    echo "export PRUNE_EVAL_SLURM_DIR=$STATE_DIR"
}

main() {
    local cmd=${1:-}
    (($#)) && shift
    case "$cmd" in
        start)
            while (($#)); do
                case "$1" in
                    --accounting) ACCOUNTING=1 ;;
                    *) die "unknown option for start: $1" ;;
                esac
                shift
            done
            do_start
            ;;
        stop)
            local purge=0
            while (($#)); do
                case "$1" in
                    --purge) purge=1 ;;
                    *) die "unknown option for stop: $1" ;;
                esac
                shift
            done
            do_stop "$purge"
            ;;
        status) do_status ;;
        env) do_env ;;
        -h | --help | help) usage 0 ;;
        *) usage 2 ;;
    esac
}

main "$@"
