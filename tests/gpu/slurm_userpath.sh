# What a user waits for in a real Slurm job: sourced by slurm_e2e.sh --userpath
# once its cluster runs (it uses that file's helpers and variables). Figures,
# each a median of $repeat jobs:
#   job_plain_srun[_hp]_s, job_start_overhead[_hp]_s    srun true, plain and with
#       --aegaeon-slab=$slab --aegaeon-pinned=$pinned_plain
#   up_submit_to_ready[_hp]_s, up_step_start[_hp]_s, up_step_load[_hp]_s
#       a job with --aegaeon-slab=$slab_up --aegaeon-pinned=$pinned_up
#       --aegaeon-prefetch=A: submit -> every tensor of A a torch tensor in the
#       first step, submit -> that step's start, and its load after its CUDA context
#   plain_submit_to_ready_s, plain_step_start_s, plain_step_load_s,
#   plain_step_from_start_s    the same job without aegaeon, load_file(A)
#   new_step_views_s, new_step_context_s, new_step_from_start_s
#       a later step's first use: its CUDA context, then aegaeon_native
#       imported, attached, the slab opened and every tensor of A a view
#   prefetch_agent_page_cache_GBps    aegaeon-cli prefetch A --reload in the job
# The _hp figures are taken with 2 MiB huge pages reserved for the pool (not
# with --no-hugepages or --host; alone with --hugepages-only, the plain job's
# figures then with them too).

up_stamp() { # FILE NAME: the epoch seconds of a step's "# stamp: NAME" line
	awk -v k="$2" '$1 == "#" && $2 == "stamp:" && $3 == k { v = $4 } END { print v }' "$1" 2>/dev/null
}

up_hugepages() { # N: vm.nr_hugepages to N (what the kernel gives), noted with how many are free
	echo "$1" >/proc/sys/vm/nr_hugepages
	note "vm.nr_hugepages $(cat /proc/sys/vm/nr_hugepages), $(awk '/^HugePages_Free/ { print $2 }' /proc/meminfo) free"
}

up_scripts() {
	cat >"$W/up-aegaeon.sh" <<-'JOB'
		#!/bin/bash
		# The first step uses A as the job prefetched it; a later step finds it resident;
		# then A is loaded again through the job's agent from the page cache.
		set -u
		srun -n1 python3 "$PYF" ready "$A" >"$W/$TAG-ready.out" 2>&1; echo "ready_rc $?"
		srun -n1 python3 "$PYF" first-use "$A" >"$W/$TAG-first.out" 2>&1; echo "first_rc $?"
		aegaeon-cli prefetch "$A" --reload --verify --json >"$W/$TAG-reload.json"; echo "reload_rc $?"
	JOB
	cat >"$W/up-plain.sh" <<-'JOB'
		#!/bin/bash
		set -u
		srun -n1 python3 "$PYF" plain-ready "$A" >"$W/$TAG-ready.out" 2>&1; echo "ready_rc $?"
	JOB
	chmod 755 "$W/up-aegaeon.sh" "$W/up-plain.sh"
}

up_job() { # TAG SCRIPT [sbatch options...]: one job, run to its end; sets up_submit
	local tag=$1 script=$2 job state
	shift 2
	up_submit=$(date +%s.%N)
	job=$(as_user "${JOB_ENV[@]}" W="$W" A="$A" PYF="$PYF" TAG="$tag" sbatch --parsable -N1 --gres=gpu:1 \
		-o "$W/$tag.out" "$@" "$W/$script" 2>&1)
	[[ $job =~ ^[0-9]+$ ]] || { fail "$tag: sbatch: $job"; return 1; }
	wait_job "$job" 300 || { fail "$tag: job $job still in the queue after 300 s"; return 1; }
	state=$(sl scontrol -o show job "$job" | grep -o 'JobState=[A-Z_]* .*ExitCode=[0-9:]*' | awk '{ print $1, $NF }')
	check "$tag: job $job completed ($state)" test "$state" = "JobState=COMPLETED ExitCode=0:0"
}

up_first_step() { # TAG PREFIX [STEP]: the job's first step (STEP, default ready), timed from submit;
	# appends to the arrays PREFIX_ready, _start, _load and _from_start
	local f=$W/$1-ready.out s c r
	steps "$1-ready" "${3:-ready}"
	s=$(up_stamp "$f" start) c=$(up_stamp "$f" context) r=$(up_stamp "$f" ready)
	[[ -n $s && -n $c && -n $r ]] || { fail "$1: the first step printed no time stamps"; return 1; }
	eval "$2_ready+=($(calc "$r - $up_submit")) $2_start+=($(calc "$s - $up_submit")) $2_load+=($(calc "$r - $c"))"
	eval "$2_from_start+=($(calc "$r - $(up_stamp "$f" torch)"))"
}

up_later() { # TAG: the new step's first use and the load through the agent
	local f=$W/$1-first.out t c r
	steps "$1-first" first-use
	t=$(up_stamp "$f" torch) c=$(up_stamp "$f" context) r=$(up_stamp "$f" ready)
	if [[ -n $t && -n $c && -n $r ]]; then
		new_views+=("$(calc "$r - $c")") new_context+=("$(calc "$c - $t")") new_from_start+=("$(calc "$r - $t")")
	else
		fail "$1: the new step printed no time stamps"
	fi
	if "$python" -c 'import json, sys; d = json.load(open(sys.argv[1])); sys.exit(not d["verified"]["identical"])' \
		"$W/$1-reload.json" 2>/dev/null; then
		reload+=("$("$python" -c 'import json, sys; print("%.4g" % json.load(open(sys.argv[1]))["gbps"])' "$W/$1-reload.json")")
		pass "$1: A loaded again through the job's agent, verified against the file (${reload[-1]} GB/s)"
	else
		fail "$1: aegaeon-cli prefetch A --reload --verify: $(head -c 300 "$W/$1-reload.json" 2>/dev/null)"
	fi
}

up_figures() { # SUFFIX PREFIX: medians of PREFIX_ready, _start, _load as up_*SUFFIX figures
	local -n rd=$2_ready st=$2_start ld=$2_load
	((${#rd[@]})) || return 0
	note "$2: submit -> ready ${rd[*]} s; submit -> step start ${st[*]} s; load after the context ${ld[*]} s"
	figure "up_submit_to_ready$1_s" "$(median "${rd[@]}")" s
	figure "up_step_start$1_s" "$(median "${st[@]}")" s
	figure "up_step_load$1_s" "$(median "${ld[@]}")" s
}

# The medians of what the jobs measured: called by slurm_e2e.sh's finish, also
# when a signal stopped the run early.
finish_figures() {
	up_figures "" nohp
	up_figures _hp hp
	if ((${#plain_ready[@]})); then
		note "plain: submit -> ready ${plain_ready[*]} s; submit -> step start ${plain_start[*]} s"
		figure plain_submit_to_ready_s "$(median "${plain_ready[@]}")" s
		figure plain_step_start_s "$(median "${plain_start[@]}")" s
		figure plain_step_load_s "$(median "${plain_load[@]}")" s
		figure plain_step_from_start_s "$(median "${plain_from_start[@]}")" s
	fi
	if ((${#new_views[@]})); then
		note "new step: views ${new_views[*]} s after a context of ${new_context[*]} s"
		figure new_step_views_s "$(median "${new_views[@]}")" s
		figure new_step_context_s "$(median "${new_context[@]}")" s
		figure new_step_from_start_s "$(median "${new_from_start[@]}")" s
	fi
	((${#reload[@]})) && figure prefetch_agent_page_cache_GBps "$(median "${reload[@]}")" GB/s
	return 0
}

plain_ready=() plain_start=() plain_load=() plain_from_start=()
nohp_ready=() nohp_start=() nohp_load=() nohp_from_start=()
hp_ready=() hp_start=() hp_load=() hp_from_start=()
new_views=() new_context=() new_from_start=() reload=()

userpath_run() {
	local modes=(nohp) mode sfx i
	((hugepages)) && modes+=(hp)
	((hugepages_only)) && modes=(hp)
	up_scripts
	for mode in "${modes[@]}"; do
		sfx=
		if [[ $mode == hp ]]; then
			sfx=_hp
			up_hugepages $((pinned_up_bytes / (2 << 20) + 2))
		elif ((!host)); then
			up_hugepages 0
		fi
		start_overhead "$sfx"
		for ((i = 1; i <= repeat; i++)); do
			# The plain job's baseline in the first mode run.
			if [[ $mode == "${modes[0]}" ]] && up_job "plain$i" up-plain.sh; then
				up_first_step "plain$i" plain plain-ready
			fi
			if up_job "$mode$i" up-aegaeon.sh --aegaeon-slab="$slab_up" --aegaeon-pinned="$pinned_up" \
				--aegaeon-prefetch="$A"; then
				up_first_step "$mode$i" "$mode" && up_later "$mode$i"
			fi
		done
	done
	check "no agent process and no runtime dir after the jobs" nothing_left 30
	gpu_check "GPU memory back to what it was before the jobs"
}
