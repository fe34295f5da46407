#!/usr/bin/env bash
# A real two-node Ganeti 3.0 cluster on this host, its "kvm" hypervisor
# switched to kvm-agent, driven with gnt-* commands through Ganeti's own
# daemons. Each step is checked in the agents, in QEMU (through the agents'
# operator QMP sockets) and in Ganeti's own view.
#
# Both nodes live in network, mount and UTS namespaces of their own, joined
# by a bridge in a third network namespace. Each node has its own sshd,
# kvm-agent and Ganeti daemons, and private copies of the directories they
# write (bind mounts inside the node's mount namespace), so the host's files
# stay as they are. Everything is torn down on exit, whatever happens.
#
# On the host, the script installs Ganeti from apt if it is missing (and
# leaves it), installs the given kvm-agent package (purged again at the end
# if it wasn't installed before) and diverts Ganeti's hypervisor registry to
# the package's hook for the run, as integrations/ganeti/README.md says.
#
# Usage: cluster.sh --binary PATH/kvm-agent --deb PATH/kvm-agent_*.deb --guest GUEST_DIR
#   --binary  the agent the nodes run
#   --deb     the package to install (the hypervisor class, the client, and
#             the kvm-agent on PATH that `gnt-instance console` runs)
#   --guest   a directory with vmlinuz and initrd.gz (scripts/build-test-guest)
#   --logs    copy the agents' and Ganeti's logs to this directory at the end
# Needs root. Exits non-zero if any check fails.
set -euo pipefail

usage() { sed -n '18,24s/^# \{0,1\}//p' "$0"; }

binary='' deb='' guest='' logs_out=''
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=${2:?}; shift 2 ;;
    --deb) deb=${2:?}; shift 2 ;;
    --guest) guest=${2:?}; shift 2 ;;
    --logs) logs_out=${2:?}; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
[ -n "$binary" ] && [ -n "$deb" ] && [ -n "$guest" ] || { usage >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "cluster.sh: needs root" >&2; exit 2; }
binary=$(realpath -e "$binary")
deb=$(realpath -e "$deb")
guest=$(realpath -e "$guest")
[ -x "$binary" ] || { echo "cluster.sh: $binary is not executable" >&2; exit 2; }
for f in vmlinuz initrd.gz; do
  [ -f "$guest/$f" ] || { echo "cluster.sh: $guest/$f is missing" >&2; exit 2; }
done

# One run at a time: the names and places below are fixed, and a run
# starts by clearing them. Whatever runs in the nodes gets the lock's fd
# closed (9<&-), or a daemon left behind would hold it.
exec 9<"$0"
if ! flock -n 9; then
  echo "cluster.sh: waiting for another run to finish" >&2
  flock -w 900 9 || { echo "cluster.sh: another run is still going" >&2; exit 2; }
fi

# Ganeti's daemons inherit the environment they are started from: give them
# a plain one, whatever the caller's PATH or KVM_AGENT_* variables say.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
clean_env=(env -i "PATH=$PATH" HOME=/root LANG=C.UTF-8 "TERM=${TERM:-dumb}")
python=/usr/bin/python3

# A fixed place, so that a run finds what a killed one left behind.
work=/var/tmp/kvm-agent-ganeti-cluster
prefix=kagnt
ns_bridge=$prefix-br
declare -A ns=([1]=$prefix-node1 [2]=$prefix-node2)
subnet=192.168.77
declare -A ip=([1]=$subnet.1 [2]=$subnet.2)
cluster_ip=$subnet.100
domain=gnt.test
declare -A fqdn=([1]=node1.$domain [2]=node2.$domain)
cluster_name=cluster.$domain
# The bridge inside each node: it holds the node's address, and the
# instances' taps join it.
bridge=gnt0
hv_init=/usr/share/ganeti/3.0/ganeti/hypervisor/__init__.py
declare -A anchor=()

start_time=$SECONDS
step_name='preparing'
checks=0
failure=''
cluster_up=false

log() { printf '[%4ds] %s\n' $((SECONDS - start_time)) "$*"; }
step() { step_name=$*; log "== $*"; }
fail() { failure=$*; exit 1; }
ok() { checks=$((checks + 1)); log "   ok: $*"; }
# expect WHAT ACTUAL WANTED
expect() {
  if [ "$2" != "$3" ]; then
    fail "$1: got '$2', wanted '$3'"
  fi
  ok "$1 ($2)"
}

# Runs a command inside node N's namespaces.
on() {
  local n=$1
  shift
  nsenter -t "${anchor[$n]}" -n -m -u -- "${clean_env[@]}" "$@" 9<&-
}

# Runs a gnt-* command on node1, the master; its output is kept for the
# failure report. Fails the step if the command fails.
gnt() {
  local rc=0
  echo "$*" >"$work/last-command"
  printf '$ %s\n' "$*" >>"$work/gnt.log"
  timeout 300 nsenter -t "${anchor[1]}" -n -m -u -- "${clean_env[@]}" "$@" \
    </dev/null >"$work/gnt.out" 2>&1 9<&- || rc=$?
  cat "$work/gnt.out" >>"$work/gnt.log"
  [ "$rc" -eq 0 ] || fail "\`$*\` exited with status $rc"
}

# The agent on node N, as a client: JSON out.
agent() {
  local n=$1
  shift
  on "$n" "$binary" -o json "$@"
}

# Evaluates a Python expression over the JSON on stdin, bound to j.
jq_py() {
  "$python" -c '
import json, sys
j = json.load(sys.stdin)
r = eval(sys.argv[1])
print(r if isinstance(r, str) else json.dumps(r))' "$1"
}

# The agent's record of NAME on node N as JSON, or null.
record() {
  agent "$1" instance list | jq_py "next((i for i in j if i['name'] == '$2'), None)"
}

# A field of an instance in Ganeti's view (--units=m: memory in MiB).
gnt_field() {
  on 1 gnt-instance list --no-headers --units=m -o "$2" "$1" </dev/null | sed 's/[[:space:]]*$//'
}

# NAME's QEMU through the operator QMP socket on node N.
qmp() {
  local n=$1
  shift
  on "$n" "$python" "$work/bin/qmp.py" "$@"
}

# The guest's shell through `gnt-instance console` in a pty: sends SEND
# until the output matches REGEX, then detaches. Prints the match's group.
console() {
  local name=$1 send=$2 regex=$3 timeout=${4:-30} rc=0
  echo "gnt-instance console $name (sending '$send' until /$regex/, ${timeout}s)" >"$work/last-command"
  on 1 "$python" "$work/bin/console.py" --send "$send" --expect "$regex" \
    --timeout "$timeout" --log "$work/gnt.out" -- gnt-instance console "$name" </dev/null || rc=$?
  cat "$work/gnt.out" >>"$work/gnt.log"
  return "$rc"
}

netns_inode() { stat -L -c %i "/run/netns/$1"; }
pid_netns_inode() { stat -L -c %i "/proc/$1/ns/net" 2>/dev/null || echo none; }

# Checks that NAME runs on node N and only there: in the agent, as a QEMU
# in that node's network namespace, in QMP, and in Ganeti. Sets qemu_pid.
# WANT is the agent's state, QEMU_WANT QEMU's own (WANT by default).
expect_running_on() {
  local name=$1 n=$2 want=${3:-running} qemu_want=${4:-${3:-running}} other rec
  other=$((3 - n))
  rec=$(record "$n" "$name")
  [ "$rec" != null ] || fail "the agent on node$n has no record of $name"
  expect "$name's state in node$n's agent" "$(jq_py "j['state']" <<<"$rec")" "$want"
  qemu_pid=$(jq_py "j['pid']" <<<"$rec")
  [ "$qemu_pid" -gt 0 ] || fail "the agent on node$n gives $name no QEMU pid"
  tr '\0' ' ' 2>/dev/null <"/proc/$qemu_pid/cmdline" | grep -q "qemu-system.* -name guest=$name," ||
    fail "pid $qemu_pid is not $name's QEMU"
  expect "$name's QEMU (pid $qemu_pid) is in node$n's network namespace" \
    "$(pid_netns_inode "$qemu_pid")" "$(netns_inode "${ns[$n]}")"
  expect "QEMU's own status of $name (query-status)" \
    "$(qmp "$n" "$name" query-status | jq_py "j['status']")" "$qemu_want"
  expect "no QEMU for $name in node$other's agent" \
    "$(record "$other" "$name" | jq_py "0 if j is None else j['pid']")" 0
  expect "Ganeti's view of $name (status, oper_state, pnode)" \
    "$(gnt_field "$name" status,oper_state,pnode)" "running Y ${fqdn[$n]}"
}

# Checks that QEMU PID of NAME has ended.
expect_gone() {
  if tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline" | grep -q "qemu-system.* -name guest=$2,"; then
    fail "$2's QEMU pid $1 still runs"
  fi
  ok "$2's QEMU pid $1 has ended"
}

# Checks that neither agent keeps a record of NAME.
expect_no_record() {
  local name=$1 n
  for n in 1 2; do
    expect "the agent on node$n has no record of $name" "$(record "$n" "$name")" null
  done
}

# Devices of NAME as the agent has them: "kind slot qemu-id detail" lines.
agent_devices() {
  agent "$1" instance info "$2" |
    jq_py "'\n'.join(sorted('%s 0x%x %s %s' % (d['kind'], d['pci_slot'], d['qemu_id'], d['detail']) for d in j['devices']))"
}

# The same from QEMU: the PCI slots of devices with an id, and the NICs' MACs.
qemu_devices() {
  qmp "$1" "$2" layout
}

# ------------------------------------------------------------------ teardown

# Host changes are recorded before they are made, and undone at the end
# (or by the next run if this one was killed).
record_change() { echo "$*" >>"$work/host-changes"; }

kill_pids() {
  local signal=$1
  shift
  [ $# -gt 0 ] && kill "-$signal" "$@" 2>/dev/null
  return 0
}

# Stops every process of node namespace NS: the agent, its QEMUs, Ganeti's
# daemons and the sshd by their pidfiles in the node's private directories,
# then anything else still in the namespace (ssh sessions, helpers).
stop_node() {
  local n=$1 netns=${ns[$1]} dir=$work/node$1 inode pid pids=() tries
  ip netns list | grep -qw "^$netns" || return 0
  inode=$(netns_inode "$netns")
  for f in "$dir/agent.pid" "$dir"/var-lib-kvm-agent/run/*/pid "$dir"/run-ganeti/*.pid \
    "$dir/run-sshd/sshd.pid"; do
    [ -f "$f" ] || continue
    pid=$(tr -dc 0-9 <"$f")
    # Only processes of this node: a pidfile may be stale.
    [ -n "$pid" ] && [ "$(pid_netns_inode "$pid")" = "$inode" ] && pids+=("$pid")
  done
  kill_pids TERM "${pids[@]}"
  for tries in 1 2 3 4 5 6 7 8 9 10; do
    pids=($(ip netns pids "$netns"))
    [ ${#pids[@]} -eq 0 ] && break
    [ "$tries" -eq 5 ] && kill_pids TERM "${pids[@]}"
    [ "$tries" -eq 8 ] && kill_pids KILL "${pids[@]}"
    sleep 0.5
  done
}

teardown() {
  local n mnt parent change
  set +e
  if $cluster_up && [ -n "${anchor[1]:-}" ] && kill -0 "${anchor[1]}" 2>/dev/null; then
    for name in $(timeout 60 nsenter -t "${anchor[1]}" -n -m -u -- "${clean_env[@]}" \
      gnt-instance list --no-headers -o name 2>/dev/null </dev/null); do
      log "removing instance $name"
      timeout 60 nsenter -t "${anchor[1]}" -n -m -u -- "${clean_env[@]}" \
        gnt-instance remove -f --shutdown-timeout=0 "$name" </dev/null >/dev/null 2>&1 9<&-
    done
  fi
  if [ -n "$logs_out" ] && [ -d "$work" ]; then
    mkdir -p "$logs_out"
    for n in 1 2; do
      [ -d "$work/node$n" ] || continue
      mkdir -p "$logs_out/node$n"
      cp -r "$work/node$n/agent.log" "$work/node$n/anchor.log" "$work/node$n/log-ganeti" \
        "$logs_out/node$n/" 2>/dev/null
    done
    cp "$work/gnt.log" "$logs_out/" 2>/dev/null
  fi
  for n in 1 2; do stop_node "$n"; done
  for netns in "${ns[1]}" "${ns[2]}" "$ns_bridge"; do
    ip netns list | grep -qw "^$netns" && ip netns del "$netns"
  done
  # The agents' cgroups, emptied with their QEMUs.
  while read -r _ mnt type _; do
    case "$type" in cgroup | cgroup2) ;; *) continue ;; esac
    for parent in "${ns[1]}" "${ns[2]}"; do
      [ -d "$mnt/$parent" ] && find "$mnt/$parent" -depth -type d -exec rmdir {} + 2>/dev/null
    done
  done </proc/self/mounts
  if [ -f "$work/host-changes" ]; then
    tac "$work/host-changes" | while read -r change arg; do
      case "$change" in
        dir) rmdir "$arg" 2>/dev/null ;;
        divert)
          if dpkg-divert --list "$hv_init" | grep -q .; then
            rm -f "$hv_init"
            dpkg-divert --quiet --remove --rename "$hv_init"
          fi
          ;;
        package)
          [ -x /etc/init.d/kvm-agent ] && /etc/init.d/kvm-agent stop >/dev/null 2>&1
          DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq kvm-agent >/dev/null 2>&1
          ;;
        policy-rc.d) rm -f /usr/sbin/policy-rc.d ;;
      esac
    done
  fi
  rm -rf "$work"
}

report_failure() {
  local n
  echo
  echo "FAILED at step: $step_name"
  [ -n "$failure" ] && echo "  $failure"
  if [ -f "$work/last-command" ] && [ -f "$work/gnt.out" ]; then
    echo "--- last command: $(cat "$work/last-command")"
    tail -n 40 "$work/gnt.out" | sed 's/^/  | /'
  fi
  for n in 1 2; do
    if [ -f "$work/node$n/agent.log" ]; then
      echo "--- node$n agent log (tail)"
      tail -n 25 "$work/node$n/agent.log" | cut -c1-400 | sed 's/^/  | /'
    fi
    if [ -f "$work/node$n/log-ganeti/node-daemon.log" ]; then
      echo "--- node$n Ganeti node daemon log (tail)"
      grep -v ' DEBUG ' "$work/node$n/log-ganeti/node-daemon.log" | tail -n 15 | sed 's/^/  | /'
    fi
  done
  if [ -f "$work/node1/log-ganeti/jobs.log" ]; then
    echo "--- node1 Ganeti jobs log (tail)"
    tail -n 10 "$work/node1/log-ganeti/jobs.log" | sed 's/^/  | /'
  fi
}

on_exit() {
  local status=$?
  trap - EXIT INT TERM
  set +e
  if [ "$status" -ne 0 ]; then
    report_failure
  fi
  log "tearing down"
  teardown
  if [ "$status" -eq 0 ]; then
    log "PASSED: $checks checks in $((SECONDS - start_time))s"
  else
    log "FAILED: $step_name (after $checks passed checks, $((SECONDS - start_time))s)"
  fi
  exit "$status"
}

# ---------------------------------------------------------------- the host

step "clean up what an earlier run left"
# In a subshell: teardown turns errexit off.
(teardown)
mkdir -m 0755 -p "$work"
: >"$work/gnt.log"
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step "install Ganeti and the kvm-agent package"
# Packages must not start services on the host (sshd, the agent, Ganeti).
if [ ! -e /usr/sbin/policy-rc.d ]; then
  record_change policy-rc.d
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
  chmod 0755 /usr/sbin/policy-rc.d
fi
export DEBIAN_FRONTEND=noninteractive
if ! dpkg-query -W -f='${Status}' ganeti 2>/dev/null | grep -q 'ok installed'; then
  log "installing ganeti from apt"
  apt-get update -qq
  apt-get install -y -qq ganeti >"$work/apt.log" 2>&1 9<&- || { cat "$work/apt.log"; fail "apt-get install ganeti"; }
fi
host_agent_was_running=false
[ -x /etc/init.d/kvm-agent ] && /etc/init.d/kvm-agent status >/dev/null 2>&1 && host_agent_was_running=true
dpkg-query -W -f='${Status}' kvm-agent 2>/dev/null | grep -q 'ok installed' || record_change package
# --reinstall: the package under test replaces one of the same version.
apt-get install -y -qq --reinstall "$deb" >"$work/apt.log" 2>&1 9<&- || { cat "$work/apt.log"; fail "apt-get install $deb"; }
if ! $host_agent_was_running && /etc/init.d/kvm-agent status >/dev/null 2>&1; then
  /etc/init.d/kvm-agent stop >/dev/null
fi
if grep -qx policy-rc.d "$work/host-changes" 2>/dev/null; then
  rm -f /usr/sbin/policy-rc.d
  sed -i '/^policy-rc.d$/d' "$work/host-changes"
fi
expect "the host's own kvm-agent is not running" \
  "$(/etc/init.d/kvm-agent status >/dev/null 2>&1 && echo running || echo stopped)" \
  "$($host_agent_was_running && echo running || echo stopped)"

step "switch Ganeti's kvm hypervisor to kvm-agent (dpkg-divert)"
if dpkg-divert --list "$hv_init" | grep -q .; then
  fail "$hv_init is already diverted; this host's Ganeti is switched already"
fi
record_change divert
dpkg-divert --quiet --add --rename --divert "$hv_init.distrib" "$hv_init"
install -m 0644 /usr/share/kvm-agent/ganeti/hypervisor_init.py "$hv_init"
expect "Ganeti's kvm class" "$(cd / && "$python" -c '
import sys
sys.path.insert(0, "/usr/share/ganeti/3.0")
from ganeti import constants, hypervisor
print(hypervisor.GetHypervisorClass(constants.HT_KVM).__name__)')" KvmAgentHypervisor

# Mount points for the nodes' private directories.
for d in /etc/ganeti /var/lib/ganeti /var/log/ganeti /run/ganeti /root/.ssh /etc/ssh \
  /var/lib/kvm-agent /etc/kvm-agent /run/kvm-agent-ganeti /run/sshd; do
  if [ ! -d "$d" ]; then
    record_change dir "$d"
    mkdir -p "$d"
  fi
done

# ------------------------------------------------------------------- helpers

mkdir -p "$work/bin"
cat >"$work/bin/qmp.py" <<'EOF'
"""Talks to an instance's QEMU through the agent's operator QMP socket.

qmp.py NAME COMMAND [ARGUMENTS-JSON]: prints the command's return as JSON.
qmp.py NAME layout: the PCI slot, id and MAC of each device with an id.
"""
import json
import socket
import sys

name, command = sys.argv[1], sys.argv[2]
sock = socket.socket(socket.AF_UNIX)
sock.settimeout(20)
sock.connect("/var/lib/kvm-agent/run/%s/qmp-operator.sock" % name)
stream = sock.makefile("rb")


def execute(cmd, arguments=None):
    message = {"execute": cmd}
    if arguments:
        message["arguments"] = arguments
    sock.sendall(json.dumps(message).encode() + b"\n")
    while True:
        reply = json.loads(stream.readline())
        if "error" in reply:
            sys.exit("%s: %s" % (cmd, reply["error"]))
        if "return" in reply:
            return reply["return"]


json.loads(stream.readline())
execute("qmp_capabilities")
if command == "layout":
    macs = {f["name"]: f["main-mac"] for f in execute("query-rx-filter")}
    lines = []
    for bus in execute("query-pci"):
        for device in bus["devices"]:
            qdev = device.get("qdev_id", "")
            if qdev:
                lines.append("0x%x %s %s" % (device["slot"], qdev, macs.get(qdev, "-")))
    print("\n".join(sorted(lines)))
else:
    arguments = json.loads(sys.argv[3]) if len(sys.argv) > 3 else None
    print(json.dumps(execute(command, arguments)))
EOF
cat >"$work/bin/console.py" <<'EOF'
"""Runs an interactive console command in a pty: sends a line to the guest's
shell until the output matches a pattern, then detaches with Ctrl-]. Prints
the pattern's first group; fails if it never matched or the command failed."""
import argparse
import os
import pty
import re
import select
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--send", required=True)
parser.add_argument("--expect", required=True)
parser.add_argument("--timeout", type=float, default=30)
parser.add_argument("--log", required=True)
parser.add_argument("command", nargs="+")
args = parser.parse_args()

pid, fd = pty.fork()
if pid == 0:
    os.execvp(args.command[0], args.command)
output = b""
pattern = re.compile(args.expect.encode())


def pump(seconds, until=None):
    """Reads for up to SECONDS; False once the command has gone."""
    global output
    end = time.time() + seconds
    while time.time() < end:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                data = os.read(fd, 4096)
            except OSError:
                return False
            if not data:
                return False
            output += data
            if until is not None and until.search(output):
                return True
    return True


match = None
deadline = time.time() + args.timeout
alive = pump(1.5)
while alive and match is None and time.time() < deadline:
    start = len(output)
    os.write(fd, b"\r" + args.send.encode() + b"\r")
    alive = pump(min(3, max(0.1, deadline - time.time())), pattern)
    match = pattern.search(output, start)
if alive:
    os.write(fd, b"\x1d")
# The command should end once detached; it gets 10 seconds.
status = None
end = time.time() + 10
while status is None:
    pump(0.2)
    done, code = os.waitpid(pid, os.WNOHANG)
    if done:
        status = code
    elif time.time() > end:
        os.kill(pid, 9)
        status = os.waitpid(pid, 0)[1] or -1
with open(args.log, "w") as log:
    log.write(output.decode(errors="replace"))
    log.write("\n[console exit status %d]\n" % status)
if match is None or status != 0:
    sys.exit(1)
print(match.group(1).decode() if pattern.groups else match.group(0).decode())
EOF
cat >"$work/bin/node-boot.sh" <<'EOF'
#!/bin/sh
# The first process of a node: runs in the node's network namespace and in
# fresh mount and UTS namespaces, makes the node's private mounts, then
# becomes its sshd. Usage: node-boot.sh NODE_DIR HOSTNAME
set -eu
dir=$1
hostname "$2"
# A sysfs of the node's network namespace (Ganeti looks its bridges up
# there), keeping the host's cgroup mounts, which the agent needs.
mount --rbind /sys/fs/cgroup "$dir/cgroup"
mount -t sysfs sysfs /sys
mount --move "$dir/cgroup" /sys/fs/cgroup
while read -r source target; do
  mount --bind "$dir/$source" "$target"
done <<MOUNTS
etc-ganeti /etc/ganeti
var-lib-ganeti /var/lib/ganeti
run-ganeti /run/ganeti
log-ganeti /var/log/ganeti
hosts /etc/hosts
root-ssh /root/.ssh
etc-ssh /etc/ssh
run-sshd /run/sshd
var-lib-kvm-agent /var/lib/kvm-agent
etc-kvm-agent /etc/kvm-agent
run-kvm-agent-ganeti /run/kvm-agent-ganeti
file-storage $(dirname "$dir")/file-storage
MOUNTS
exec /usr/sbin/sshd -D -e -f /etc/ssh/sshd_config
EOF

# ------------------------------------------------------------------ network

step "create the nodes' network namespaces and the bridge between them"
ip netns add "$ns_bridge"
ip -n "$ns_bridge" link set lo up
ip -n "$ns_bridge" link add br0 type bridge
ip -n "$ns_bridge" link set br0 up
for n in 1 2; do
  ip netns add "${ns[$n]}"
  ip -n "$ns_bridge" link add "node$n" type veth peer name eth0 netns "${ns[$n]}"
  ip -n "$ns_bridge" link set "node$n" master br0 up
  ip -n "${ns[$n]}" link set lo up
  ip -n "${ns[$n]}" link add "$bridge" type bridge
  # A fixed MAC: a bridge otherwise takes its ports' lowest, and changes it
  # as instances' taps come and go.
  ip -n "${ns[$n]}" link set "$bridge" address "02:00:00:77:00:0$n"
  ip -n "${ns[$n]}" link set eth0 master "$bridge" up
  ip -n "${ns[$n]}" link set "$bridge" up
  ip -n "${ns[$n]}" addr add "${ip[$n]}/24" dev "$bridge"
done

# -------------------------------------------------------------------- nodes

step "prepare the nodes' private directories, keys and certificates"
mkdir -p "$work/guest" "$work/file-storage" "$work/ca"
cp "$guest/vmlinuz" "$guest/initrd.gz" "$work/guest/"
# One ssh host key for the cluster: Ganeti checks every node against the
# key it recorded at init (HostKeyAlias=cluster name), as its own ssh setup
# would have distributed it.
ssh-keygen -q -t rsa -b 2048 -N '' -C "$cluster_name" -f "$work/ssh_host_rsa_key"
"$binary" tls init-ca --dir "$work/ca" --days 2 >/dev/null
for n in 1 2; do
  d=$work/node$n
  mkdir -p "$d"/{var-lib-ganeti,run-ganeti,log-ganeti,var-lib-kvm-agent,run-kvm-agent-ganeti,file-storage,cgroup}
  install -d -m 0755 "$d/run-sshd"
  install -d -m 0700 "$d/root-ssh"
  cp -a /etc/ganeti "$d/etc-ganeti"
  echo "$work/file-storage" >"$d/etc-ganeti/file-storage-paths"
  cat >"$d/hosts" <<EOF
127.0.0.1 localhost
${ip[1]} ${fqdn[1]} node1
${ip[2]} ${fqdn[2]} node2
$cluster_ip $cluster_name cluster
EOF
  ssh-keygen -q -t ed25519 -N '' -C "root@${fqdn[$n]}" -f "$d/root-ssh/id_ed25519"
  # sshd: the host's client settings, the cluster's host key, our config.
  mkdir -p "$d/etc-ssh"
  for f in ssh_config ssh_config.d moduli; do
    [ -e "/etc/ssh/$f" ] && cp -a "/etc/ssh/$f" "$d/etc-ssh/"
  done
  install -m 0600 "$work/ssh_host_rsa_key" "$d/etc-ssh/ssh_host_rsa_key"
  install -m 0644 "$work/ssh_host_rsa_key.pub" "$d/etc-ssh/ssh_host_rsa_key.pub"
  cat >"$d/etc-ssh/sshd_config" <<EOF
ListenAddress ${ip[$n]}
HostKey /etc/ssh/ssh_host_rsa_key
PidFile /run/sshd/sshd.pid
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
# No PAM: key logins don't need it, and its session modules (pam_loginuid)
# may be refused inside namespaces.
UsePAM no
AcceptEnv LANG LC_*
Subsystem sftp internal-sftp
EOF
  # The agent: its TLS, its settings, and the class's.
  "$binary" tls issue "${fqdn[$n]}" --dir "$work/ca" --ip "${ip[$n]}" --dns "${fqdn[$n]}" \
    --days 2 >/dev/null
  install -d -m 0755 "$d/etc-kvm-agent" "$d/etc-kvm-agent/tls"
  cp "$work/ca/ca.pem" "$work/ca/${fqdn[$n]}.pem" "$work/ca/${fqdn[$n]}-key.pem" "$d/etc-kvm-agent/tls/"
  cat >"$d/etc-kvm-agent/config.toml" <<EOF
state_dir = "/var/lib/kvm-agent"
confinement = "strict"
listen = "tcp://${ip[$n]}:7070"

[tls]
cert = "/etc/kvm-agent/tls/${fqdn[$n]}.pem"
key = "/etc/kvm-agent/tls/${fqdn[$n]}-key.pem"
ca = "/etc/kvm-agent/tls/ca.pem"

[qmp]
operator_socket = true

[stop]
# The test guest ignores ACPI power-off: don't wait long for it.
powerdown_timeout_ms = 5000

[cgroups]
parent = "${ns[$n]}"

[qemu_user]
# Apart from each other's, so the two agents never pick the same uid.
uid_pool = "$((71100 + 100 * n))-$((71199 + 100 * n))"

[migration]
address = "${ip[$n]}"
EOF
  cat >"$d/etc-kvm-agent/ganeti.toml" <<'EOF'
peer = "https://{target}:7070"
EOF
done
for n in 1 2; do
  cat "$work"/node*/root-ssh/id_ed25519.pub >"$work/node$n/root-ssh/authorized_keys"
  echo "${fqdn[1]},${ip[1]},${fqdn[2]},${ip[2]},$cluster_name,$cluster_ip $(cut -d' ' -f1,2 "$work/ssh_host_rsa_key.pub")" \
    >"$work/node$n/root-ssh/known_hosts"
  chmod 0600 "$work/node$n/root-ssh/"*
done

step "start the nodes (sshd as each node's first process)"
# Not `ip netns exec`: it remounts /sys for the network namespace and drops
# the cgroup mounts below it, which the agent needs. node-boot.sh makes
# that sysfs itself and keeps them.
for n in 1 2; do
  setsid unshare --mount --uts --propagation private -- \
    nsenter --net="/run/netns/${ns[$n]}" -- "${clean_env[@]}" \
    /bin/sh "$work/bin/node-boot.sh" "$work/node$n" "${fqdn[$n]}" \
    </dev/null >>"$work/node$n/anchor.log" 2>&1 9<&- &
done
for n in 1 2; do
  for _ in $(seq 50); do
    [ -s "$work/node$n/run-sshd/sshd.pid" ] && break
    sleep 0.2
  done
  [ -s "$work/node$n/run-sshd/sshd.pid" ] || { cat "$work/node$n/anchor.log"; fail "node$n's sshd did not start"; }
  anchor[$n]=$(tr -dc 0-9 <"$work/node$n/run-sshd/sshd.pid")
  expect "node$n's sshd is in its network namespace" \
    "$(pid_netns_inode "${anchor[$n]}")" "$(netns_inode "${ns[$n]}")"
  expect "node$n's hostname" "$(on "$n" hostname -f)" "${fqdn[$n]}"
done
for n in 1 2; do
  other=$((3 - n))
  expect "root ssh from node$n to node$other" \
    "$(on "$n" ssh -oBatchMode=yes -oConnectTimeout=10 "root@${fqdn[$other]}" hostname 2>&1)" "${fqdn[$other]}"
done

step "start the agents"
for n in 1 2; do
  setsid nsenter -t "${anchor[$n]}" -n -m -u -- "${clean_env[@]}" \
    "$binary" serve --config /etc/kvm-agent/config.toml \
    </dev/null >>"$work/node$n/agent.log" 2>&1 9<&- &
  echo $! >"$work/node$n/agent.pid"
done
for n in 1 2; do
  for _ in $(seq 100); do
    agent "$n" node info >/dev/null 2>&1 && break
    kill -0 "$(cat "$work/node$n/agent.pid")" 2>/dev/null || break
    sleep 0.2
  done
  expect "node$n's agent answers, from its node" \
    "$(agent "$n" node info 2>&1 | jq_py "j['hostname']")" "${fqdn[$n]}"
done
# What a migration does: one agent calls the other over mutual TLS.
expect "node1's agent reaches node2's over TLS" \
  "$(on 1 "$binary" --agent "https://${ip[2]}:7070" --tls-cert "/etc/kvm-agent/tls/${fqdn[1]}.pem" \
    --tls-key "/etc/kvm-agent/tls/${fqdn[1]}-key.pem" --tls-ca /etc/kvm-agent/tls/ca.pem \
    -o json node info 2>&1 | jq_py "j['hostname']")" "${fqdn[2]}"

# ------------------------------------------------------------------- Ganeti

step "gnt-cluster init on node1"
cluster_up=true
# --no-etc-hosts: the nodes' /etc/hosts are bind mounts, which Ganeti's
# atomic rewrite can't replace. The lower specs allow ballooning below
# 128M and small file disks.
gnt gnt-cluster init --enabled-hypervisors=kvm --enabled-disk-templates=file,diskless \
  --no-ssh-init --no-etc-hosts --master-netdev="$bridge" \
  --nic-parameters="mode=bridged,link=$bridge" --file-storage-dir="$work/file-storage" \
  --specs-mem-size=min=64 --specs-disk-size=min=32 "$cluster_name"
gnt gnt-cluster modify -H "kvm:kernel_path=$work/guest/vmlinuz,initrd_path=$work/guest/initrd.gz,kernel_args=quiet panic=-1,kvm_flag=disabled,migration_bandwidth=256"
gnt gnt-cluster getmaster
expect "the master" "$(cat "$work/gnt.out")" "${fqdn[1]}"
# Ganeti brings the address up in the background, after a ping that
# nobody has it.
for _ in $(seq 40); do
  ip -n "${ns[1]}" -o -4 addr show dev "$bridge" | grep -q " $cluster_ip/" && break
  sleep 0.5
done
expect "the cluster address is on node1's $bridge" \
  "$(ip -n "${ns[1]}" -o -4 addr show dev "$bridge" | grep -c " $cluster_ip/")" 1
noded=$(tr -dc 0-9 <"$work/node1/run-ganeti/ganeti-noded.pid")
expect "node1's ganeti-noded (pidfile in its private /run/ganeti) is in its namespace" \
  "$(pid_netns_inode "$noded")" "$(netns_inode "${ns[1]}")"

step "gnt-node add node2"
gnt gnt-node add "${fqdn[2]}"
gnt gnt-node list --no-headers -o name
expect "Ganeti's nodes" "$(sort "$work/gnt.out" | tr '\n' ' ')" "${fqdn[1]} ${fqdn[2]} "
noded=$(tr -dc 0-9 <"$work/node2/run-ganeti/ganeti-noded.pid")
expect "node2's ganeti-noded (started over ssh) is in node2's namespace" \
  "$(pid_netns_inode "$noded")" "$(netns_inode "${ns[2]}")"
gnt gnt-node list --no-headers -o name,mtotal "${fqdn[2]}"
[[ "$(cat "$work/gnt.out")" =~ ^${fqdn[2]}\ +[0-9.]+[MGT]$ ]] ||
  fail "node2's memory is unknown to Ganeti: $(cat "$work/gnt.out")"
ok "Ganeti reads node2's figures through its class"

# ---------------------------------------------------------------- instances

inst=web1
step "add and start a diskless instance on node1"
gnt gnt-instance add -t diskless --no-install --no-name-check --no-ip-check \
  -o debootstrap+default -B maxmem=128M,minmem=96M -n "${fqdn[1]}" "$inst"
gnt gnt-instance start "$inst"
expect_running_on "$inst" 1
expect "QEMU runs under TCG" "$(agent 1 instance info "$inst" | jq_py "j['accelerator']")" tcg

step "the guest boots (its shell answers on gnt-instance console)"
expect "the guest's shell, through gnt-instance console" \
  "$(console "$inst" 'echo PROBE-$((6*7))' 'PROBE-(42)' 120)" 42

step "hot-add a NIC (gnt-instance modify --hotplug --net add)"
gnt gnt-instance modify --hotplug --net "add:link=$bridge" "$inst"
grep -q 'hotplug:done' "$work/gnt.out" || fail "Ganeti did not hotplug the NIC"
nic_uuid=$(gnt_field "$inst" nic.uuid/1)
nic_mac=$(gnt_field "$inst" nic.mac/1)
nic=$(agent 1 instance info "$inst" | jq_py "next(d for d in j['devices'] if d['uuid'] == '$nic_uuid')")
expect "the agent's new NIC has Ganeti's MAC" "$(jq_py "j['detail']" <<<"$nic")" "$nic_mac"
nic_id=$(jq_py "j['qemu_id']" <<<"$nic")
nic_slot=$(jq_py "'0x%x' % j['pci_slot']" <<<"$nic")
expect "QEMU has the NIC at the agent's slot (query-pci, query-rx-filter)" \
  "$(qemu_devices 1 "$inst" | grep -c "^$nic_slot $nic_id $nic_mac$")" 1
expect "its tap is on node1's $bridge" \
  "$(ip -n "${ns[1]}" -br link show master "$bridge" | grep -c "^$(jq_py "j['tap']" <<<"$nic") ")" 1

step "hot-remove the NIC (gnt-instance modify --hotplug --net 1:remove)"
gnt gnt-instance modify --hotplug --net 1:remove "$inst"
grep -q 'hotplug:done' "$work/gnt.out" || fail "Ganeti did not hot-remove the NIC"
expect "the agent no longer has the NIC" \
  "$(agent 1 instance info "$inst" | jq_py "len([d for d in j['devices'] if d['uuid'] == '$nic_uuid'])")" 0
# Captured first, so that a QMP failure fails the step rather than count 0.
qemu_layout=$(qemu_devices 1 "$inst")
expect "QEMU no longer has it (query-pci)" "$(grep -c " $nic_id " <<<"$qemu_layout" || true)" 0
expect "Ganeti's NICs" "$(gnt_field "$inst" nic.count)" 1

step "balloon the guest to 100M (gnt-instance modify -m 100M)"
gnt gnt-instance modify -m 100M "$inst"
for _ in $(seq 60); do
  [ "$(agent 1 instance info "$inst" | jq_py "j['balloon_mib']")" = 100 ] && break
  sleep 0.5
done
expect "the agent's balloon_mib" "$(agent 1 instance info "$inst" | jq_py "j['balloon_mib']")" 100
expect "QEMU's balloon (query-balloon)" "$(qmp 1 "$inst" query-balloon | jq_py "j['actual'] >> 20")" 100
expect "Ganeti's oper_ram" "$(gnt_field "$inst" oper_ram)" 100

step "soft reboot (gnt-instance reboot --type=soft)"
before=$(record 1 "$inst")
gnt gnt-instance reboot --type=soft "$inst"
expect_running_on "$inst" 1
[ "$qemu_pid" != "$(jq_py "j['pid']" <<<"$before")" ] || fail "the reboot kept QEMU pid $qemu_pid"
ok "a new QEMU (pid $qemu_pid)"
expect "the runtime generation after a soft reboot" \
  "$(record 1 "$inst" | jq_py "j['runtime_generation']")" "$(jq_py "j['runtime_generation']" <<<"$before")"

step "stop, then start paused; the console lets it run"
gnt gnt-instance stop --timeout=5 "$inst"
expect_no_record "$inst"
expect "Ganeti's status" "$(gnt_field "$inst" status,oper_state)" "ADMIN_down N"
gnt gnt-instance start --paused "$inst"
# prelaunch: the guest hasn't run an instruction yet (-S).
expect_running_on "$inst" 1 paused prelaunch
expect "the guest's shell once the console is attached" \
  "$(console "$inst" 'echo PROBE-$((6*7))' 'PROBE-(42)' 120)" 42
expect_running_on "$inst" 1

step "live migration node1 -> node2 (gnt-instance migrate)"
gnt gnt-instance modify --hotplug --net "add:link=$bridge" "$inst"
grep -q 'hotplug:done' "$work/gnt.out" || fail "Ganeti did not hotplug the NIC"
layout=$(agent_devices 1 "$inst")
qemu_layout=$(qemu_devices 1 "$inst")
expect "NICs before the migration" "$(grep -c '^nic ' <<<"$layout")" 2
uptime=$(console "$inst" 'echo UP=$(cut -d. -f1 /proc/uptime)=' 'UP=([0-9]+)=')
source_pid=$(record 1 "$inst" | jq_py "j['pid']")
gnt gnt-instance migrate -f -n "${fqdn[2]}" "$inst"
expect_running_on "$inst" 2
expect_gone "$source_pid" "$inst"
expect "the agent on node1 has no record of $inst" "$(record 1 "$inst")" null
expect "the agent's devices after the migration (slots, ids, MACs)" "$(agent_devices 2 "$inst")" "$layout"
expect "QEMU's devices after the migration (slots, ids, MACs)" "$(qemu_devices 2 "$inst")" "$qemu_layout"
after=$(console "$inst" 'echo UP=$(cut -d. -f1 /proc/uptime)=' 'UP=([0-9]+)=')
[ "$after" -ge "$uptime" ] || fail "the guest's uptime went from ${uptime}s to ${after}s: it restarted"
ok "the same guest runs on (uptime ${uptime}s -> ${after}s)"

step "live migration back node2 -> node1"
source_pid=$qemu_pid
gnt gnt-instance migrate -f -n "${fqdn[1]}" "$inst"
expect_running_on "$inst" 1
expect_gone "$source_pid" "$inst"
expect "the agent on node2 has no record of $inst" "$(record 2 "$inst")" null
expect "the agent's devices after the migration back" "$(agent_devices 1 "$inst")" "$layout"
expect "QEMU's devices after the migration back" "$(qemu_devices 1 "$inst")" "$qemu_layout"

step "failover node1 -> node2 (gnt-instance failover)"
source_pid=$qemu_pid
gnt gnt-instance failover -f --shutdown-timeout=5 -n "${fqdn[2]}" "$inst"
expect_running_on "$inst" 2
expect_gone "$source_pid" "$inst"
expect "the agent on node1 has no record of $inst" "$(record 1 "$inst")" null
# A failover starts a new QEMU, which lays its devices out afresh; the
# NICs keep their ids and MACs.
expect "the agent's NICs after the failover (ids, MACs)" \
  "$(agent_devices 2 "$inst" | cut -d' ' -f1,3-)" "$(cut -d' ' -f1,3- <<<"$layout")"

step "rename (gnt-instance rename)"
gnt gnt-instance stop --timeout=5 "$inst"
expect_no_record "$inst"
renamed=web2
gnt gnt-instance rename --force --no-name-check --no-ip-check "$inst" "$renamed"
gnt gnt-instance start "$renamed"
expect_running_on "$renamed" 2
expect_no_record "$inst"

step "remove (gnt-instance remove)"
gnt gnt-instance remove -f --shutdown-timeout=5 "$renamed"
expect_no_record "$renamed"
for n in 1 2; do
  expect "the agent on node$n has no instances" "$(agent "$n" instance list | jq_py 'len(j)')" 0
  expect "no QEMU in node$n's namespace" \
    "$(for p in $(ip netns pids "${ns[$n]}"); do cat "/proc/$p/comm" 2>/dev/null; done | grep -c '^qemu' || true)" 0
done

# ------------------------------------------------------------ a file disk

disk_inst=db1
step "a file-disk instance with a hot-added disk"
gnt gnt-instance add -t file --disk 0:size=64M --no-install --no-name-check --no-ip-check \
  -o debootstrap+default -B memory=128M -n "${fqdn[1]}" "$disk_inst"
gnt gnt-instance start "$disk_inst"
expect_running_on "$disk_inst" 1
gnt gnt-instance modify --hotplug --disk add:size=64M "$disk_inst"
grep -q 'hotplug:done' "$work/gnt.out" || fail "Ganeti did not hotplug the disk"
disk_uuid=$(gnt_field "$disk_inst" disk.uuid/1)
disk=$(agent 1 instance info "$disk_inst" | jq_py "next(d for d in j['devices'] if d['uuid'] == '$disk_uuid')")
expect "the agent's new disk is Ganeti's second disk" "$(jq_py "j['detail']" <<<"$disk")" \
  "/var/run/ganeti/instance-disks/$disk_inst:1"
expect "QEMU's block devices (query-block)" \
  "$(qmp 1 "$disk_inst" query-block | jq_py "' '.join(sorted(b['qdev'].split('/')[3] for b in j if b.get('inserted')))")" \
  "$(agent 1 instance info "$disk_inst" | jq_py "' '.join(sorted(d['qemu_id'] for d in j['devices'] if d['kind'] == 'disk'))")"
expect "QEMU's disks" "$(qmp 1 "$disk_inst" query-block | jq_py "len([b for b in j if b.get('inserted')])")" 2
gnt gnt-instance remove -f --shutdown-timeout=5 "$disk_inst"
expect_no_record "$disk_inst"
expect "Ganeti removed the disk files" "$(ls -A "$work/node1/file-storage")" ""
