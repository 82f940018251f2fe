#!/bin/bash
# Another user cannot reach a job's agent or directory, nor the memfds of its
# slabs and pool; the agent has the job user's rights only and enforces the
# site's caps; root-only files cannot be prefetched; the prolog does not
# follow links planted in the runtime dir and refuses an unsafe one; the
# epilog removes links planted in the job dir, never what they point at, and
# trees of any depth.
source "$(dirname "$0")/cluster.sh"

cluster_start || { fail "cluster starts"; finish; exit; }

syslog_listen || log "no syslog listener: the agent's log lines are looked for in the journal"
job=$(submit -N1 --gres=gpu:1 --aegaeon-slab=64MiB --wrap 'sleep 60')
wait_ready "$job" n1 20
dir=$(job_dir "$job" n1)
agent=$(agent_of "$job" n1)
check "agent running" test -n "$agent"

check "another user cannot list the job dir" bash -c "! setpriv --reuid=$OTHER_UID --regid=$OTHER_UID --clear-groups ls '$dir' 2>/dev/null"
check "another user cannot read the ready record" bash -c "! setpriv --reuid=$OTHER_UID --regid=$OTHER_UID --clear-groups cat '$dir/ready' 2>/dev/null"
connect='import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("refused:", e.strerror)
    sys.exit(1)
print("connected")'
out=$(as_other /usr/bin/python3 -c "$connect" "$dir/agent.sock" 2>&1)
check "another user cannot connect to the socket ($out)" grep -q "^refused: Permission denied" <<<"$out"
# Even with the directory opened up by root, the 0600 socket keeps others out.
chmod 711 "$dir"
out=$(as_other /usr/bin/python3 -c "$connect" "$dir/agent.sock" 2>&1)
check "with the dir opened, the socket mode still refuses ($out)" grep -q "^refused: Permission denied" <<<"$out"
chmod 700 "$dir"

# A socket connected by root that then becomes another user before it says
# anything: the path and mode checks are behind it, SO_PEERCRED (the
# connector's uid) is not. The agent closes it unanswered and logs why.
peer='import os, socket, struct, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
uid = int(sys.argv[2])
os.setgroups([])
os.setresgid(uid, uid, uid)
os.setresuid(uid, uid, uid)
print("pid=%d uid=%d" % (os.getpid(), os.getuid()), flush=True)
s.settimeout(10)
hello = struct.pack("<IIQ", 1, 1, os.getpid()) + b"x" * 64     # what a client says first
try:
    s.sendall(struct.pack("<IHHIIQ", 0x50474541, 1, 2, 0, len(hello), 1) + hello)
    print("reply_bytes=%d" % len(s.recv(4096)))
except OSError as e:
    print("closed:", e.strerror)'
out=$(cd / && /usr/bin/python3 -c "$peer" "$dir/agent.sock" "$OTHER_UID" 2>&1)
pid=$(sed -n 's/^pid=\([0-9]*\) .*/\1/p' <<<"$out")
check "root-connected socket handed to uid $OTHER_UID: spoke as that uid ($out)" grep -qx "pid=$pid uid=$OTHER_UID" <<<"$out"
check "... and the agent closed it without a word" grep -qE "^(reply_bytes=0|closed: (Connection reset by peer|Broken pipe))$" <<<"$out"
check "... and logged the refusal with the connector's uid and pid" \
	agent_logged "aegaeond\[$agent\]: refused a connection from uid 0 \(pid $pid\): only the job user, uid $JOB_UID, may connect"
syslog_stop
check "the agent still serves its job" kill -0 "$agent"

out=$(as_user /usr/bin/python3 -c "$connect" "$dir/agent.sock" 2>&1)
check "the job user can connect ($out)" grep -qx connected <<<"$out"

if [[ -n $agent ]]; then
	st=$(cat "/proc/$agent/status")
	check "agent: all uids are the job user's" grep -qP "^Uid:\t$JOB_UID\t$JOB_UID\t$JOB_UID\t$JOB_UID$" <<<"$st"
	check "agent: all gids are the job user's" grep -qP "^Gid:\t$JOB_GID\t$JOB_GID\t$JOB_GID\t$JOB_GID$" <<<"$st"
	check "agent: only the job user's groups" grep -qP "^Groups:\t$(id -G "$JOB_USER" | tr ' ' '\n' | sort -n | tr '\n' ' ' | sed 's/ $//')\s*$" <<<"$st"
	check "agent: no capabilities" grep -qP "^CapEff:\t0+$" <<<"$st"
	check "agent: its own session, not slurmd's" test "$(ps -o sid= -p "$agent" | tr -d ' ')" = "$agent" -o "$(ps -o sid= -p "$agent" | tr -d ' ')" != "$(ps -o sid= -p "${PIDS[2]}" | tr -d ' ')"
	check "agent: stdio on /dev/null" test "$(readlink /proc/$agent/fd/0):$(readlink /proc/$agent/fd/1):$(readlink /proc/$agent/fd/2)" = /dev/null:/dev/null:/dev/null
fi
# The pool's and the slab's memfds are the agent's descriptors: another user
# opens none of them through /proc, nor reads the agent's memory.
if [[ -n $agent ]]; then
	memfds=$(for f in /proc/"$agent"/fd/*; do [[ $(readlink "$f") == /memfd:* ]] && echo "${f##*/}"; done)
	check "agent holds the slab's and the pool's memfds (fds $(echo $memfds))" test "$(wc -w <<<"$memfds")" -ge 2
	for n in $memfds; do
		out=$(as_other cat "/proc/$agent/fd/$n" 2>&1 >/dev/null)
		check "another user cannot open the agent's memfd $n ($out)" grep -q "Permission denied" <<<"$out"
	done
	out=$(as_other ls "/proc/$agent/map_files" 2>&1)
	check "another user cannot list the agent's map_files ($out)" grep -qE "Permission denied|Operation not permitted" <<<"$out"
	out=$(as_other dd if="/proc/$agent/mem" of=/dev/null bs=4096 count=1 2>&1)
	check "another user cannot read the agent's memory ($out)" grep -q "Permission denied" <<<"$out"
fi
sl scancel "$job"
wait_job "$job" 30

# A file only root can read is refused in the client, as the user.
echo secret >"$T/root-only.bin"
chmod 600 "$T/root-only.bin"
out=$(as_user timeout 30 srun -N1 --gres=gpu:1 --aegaeon-prefetch="$T/root-only.bin" true 2>&1)
check "root-only file: refused by srun ($out)" grep -qF "$T/root-only.bin: Permission denied" <<<"$out"

# Readable at submission, root-only by the time the job starts: the agent,
# running as the user, cannot open it and the first step says so.
echo weights >"$T/turns-private.bin"
chmod 644 "$T/turns-private.bin"
job=$(submit -H -N1 --gres=gpu:1 --aegaeon-slab=64MiB --aegaeon-prefetch="$T/turns-private.bin" \
	-o private.out --wrap 'srun true; echo step_rc=$?')
chmod 600 "$T/turns-private.bin"
sl scontrol release "$job"
wait_job "$job" 60
# The batch script is the job's first task: it does not run.
check "root-only at job start: the job failed before its script ran" \
	bash -c "! grep -q step_rc '$T/work/private.out' && env -i SLURM_CONF=$T/etc/slurm.conf scontrol -o show job $job | grep -q JobState=FAILED"
check "root-only at job start: the agent's reason reached the job's output" \
	grep -qiE "aegaeon: .*$T/turns-private.bin.*permission denied" "$T/work/private.out"

# A link planted under the job's directory name is removed, not followed.
next=$(($(sl scontrol -o show job | sed -n 's/^JobId=\([0-9]*\).*/\1/p' | sort -n | tail -n 1) + 1))
mkdir "$T/target"
ln -s "$T/target" "$T/aegrun/$next.n1"
out=$(as_user timeout 60 srun -N1 -w n1 --gres=gpu:1 --aegaeon-slab=64MiB bash -c 'echo $SLURM_JOB_ID $AEGAEON_SLABS' 2>&1)
check "planted link for job $next: job ran with its own dir ($out)" test "$out" = "$next 1"
check "planted link: its target is untouched" test -z "$(ls -A "$T/target")" -a "$(stat -c %U "$T/target")" = root

# A slab in percent against the site's cap in bytes (slab_max = 1GiB here):
# srun and the prolog cannot compare them, the agent can, and refuses.
out=$(as_user timeout 60 srun -N1 -w n1 --gres=gpu:1 --aegaeon-slab=100% true 2>&1)
rc=$?
check "--aegaeon-slab=100% over slab_max 1GiB: the step fails (rc $rc)" test $rc -ne 0
check "... with the agent's reason ($out)" grep -qF "over this site's limit of 1 GiB per GPU (slab_max)" <<<"$out"
check "... and its job cleaned up" nothing_left 15

# Links planted in the job dir during the job, a deep tree, and a forged
# agent.pid naming slurmd: the epilog removes the links, not their targets,
# and kills nothing but the agent.
mkdir -p "$T/victim/sub"
echo keep >"$T/victim/file"
echo keep >"$T/victim/sub/file"
mkdir -p "$T/work/mine"
echo keep >"$T/work/mine/file"
chown -R "$JOB_USER" "$T/work/mine"
victim_state() { find "$T/victim" "$T/work/mine" -printf '%p %U %m %s\n' | sort; }
before=$(victim_state)
job=$(submit -N1 -w n1 --gres=gpu:1 --aegaeon-slab=64MiB --wrap 'sleep 60')
wait_ready "$job" n1 20
dir=$(job_dir "$job" n1)
slurmd=${PIDS[2]}   # slurmd of n1
as_user bash -c 'cd "$1" && ln -s "$2/victim" vlink && ln -s "$2/victim/file" flink && ln -s "$2/work/mine" mlink &&
	ln -s / rootlink && mkdir -p deep/1/2/3/4/5/6/7/8/9 && ln -s "$2/victim" deep/1/2/3/vlink &&
	: >deep/1/2/3/4/5/6/7/8/9/f && echo "$3" >agent.pid.new && mv -f agent.pid.new agent.pid' _ "$dir" "$T" "${slurmd:-1}"
check "links and a deep tree planted in the job dir" test -L "$dir/vlink" -a -f "$dir/deep/1/2/3/4/5/6/7/8/9/f"
sl scancel "$job"
wait_job "$job" 30
check "planted links: the job dir is gone" nothing_left 15
check "planted links: their targets are untouched" test "$(victim_state)" = "$before"
check "forged agent.pid: slurmd ($slurmd) still runs" kill -0 "${slurmd:-0}"

# A tree deeper than any path can name (13500 levels, made with relative
# mkdir and chdir) goes with the job dir. Before, the epilog removed about
# 3000 levels and left the rest, and the job's files stayed in runtime_dir.
job=$(submit -N1 -w n1 --gres=gpu:1 --aegaeon-slab=64MiB --wrap 'sleep 60')
wait_ready "$job" n1 20
dir=$(job_dir "$job" n1)
out=$(as_user /usr/bin/python3 -c 'import os, sys
os.chdir(sys.argv[1])
for i in range(13500):
    os.mkdir("d")
    os.chdir("d")
open("f", "w").close()
print("levels=%d" % (i + 1))' "$dir" 2>&1)
check "a tree 13500 levels deep made in the job dir ($out)" test "$out" = levels=13500
sl scancel "$job"
wait_job "$job" 60
check "13500 levels: the job dir is gone" nothing_left 30
check "13500 levels: the epilog removed every entry" \
	grep -qE "job $job on n1: removed $dir \(135[0-9]{2} entries\)" "$T/log/slurmd-n1.log"

# The same while a process of the user swaps a name in the job dir between a
# directory and a link to the victim, as fast as it can, through the epilog.
job=$(submit -N1 -w n1 --gres=gpu:1 --aegaeon-slab=64MiB --wrap 'sleep 60')
wait_ready "$job" n1 20
dir=$(job_dir "$job" n1)
as_user timeout 30 bash -c 'cd "$1" || exit 0
	while [[ -d $1 ]]; do
		rm -rf s 2>/dev/null; mkdir -p s/x 2>/dev/null && : >s/x/f
		rm -rf s 2>/dev/null; ln -s "$2/victim" s 2>/dev/null
	done' _ "$dir" "$T" &
racer=$!
sleep 1
sl scancel "$job"
wait_job "$job" 30
wait "$racer"
check "racing links: their targets are untouched" test "$(victim_state)" = "$before"
# The racer may keep the directory alive past the epilog; what it left is
# the user's own (no link followed), and the next prolog of that name removes
# it. Checked either way, so every run counts the same checks.
[[ -e $dir ]] && log "the racer kept $dir alive past the epilog: $(ls -A "$dir" | tr '\n' ' ')"
check "racing links: what is left holds no file from outside" \
	test -z "$([[ -e $dir ]] && find "$dir" -xdev -samefile "$T/victim/file")"
rm -rf "$dir"
check "racing links: nothing left" nothing_left 15

# A runtime dir others can write to is refused; the step says no agent runs.
# The last job's epilog runs after srun returned: it must be done before the
# dir turns unsafe, or it refuses to clean up there too.
check "planted link: that job cleaned up" nothing_left 15
chmod 777 "$T/aegrun"
out=$(as_user timeout 60 srun -N1 -w n1 --gres=gpu:1 --aegaeon-slab=64MiB true 2>&1)
check "world-writable runtime_dir: the step fails ($out)" grep -qF "aegaeon: no agent runs for job" <<<"$out"
check "world-writable runtime_dir: slurmd log says why" \
	grep -qF "runtime_dir $T/aegrun must be owned by root and writable by root only" "$T/log/slurmd-n1.log"
chmod 755 "$T/aegrun"
check "nothing left" nothing_left 10

finish
