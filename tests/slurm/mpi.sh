#!/bin/bash
# A real MPI program under srun --mpi=pmix, the plugin Debian 12's Slurm
# 22.05 and Open MPI 4.1 share (Debian's Open MPI has no PMI-2 support), on
# 2 nodes x 2 ranks: each rank (examples/mpi_load, built with mpicc against
# the build tree's pkg-config file) attaches to its node's agent, loads its
# tensor-parallel slice of a sharded model directory into the slab of its
# GPU, checks every byte against the files, and MPI_Allreduce's a checksum
# that rank 0 compares with the whole model's.
source "$(dirname "$0")/cluster.sh"

MPI_LOAD=$AEG_BUILDDIR/examples/mpi_load
if [[ ! -x $MPI_LOAD ]]; then
	echo "SKIP: $TEST_NAME: $MPI_LOAD not built (configure found no mpicc: Debian's libopenmpi-dev and openmpi-bin)"
	echo "# $TEST_NAME: 0 passed, 0 failed"
	exit 0
fi
cluster_start || { fail "cluster starts"; finish; exit; }
syslog_listen || log "no syslog listener: the agent's log lines are looked for in the journal"

check "srun offers the pmix MPI plugin" grep -qx $'\tpmix' <<<"$(as_user srun --mpi=list 2>&1)"

# A Llama-like checkpoint as save_pretrained writes it: two shards and an index, BF16.
mkdir "$T/work/model"
/usr/bin/python3 - "$T/work/model" <<'PY'
import json, os, struct, sys
hidden, inter, vocab = 256, 768, 1024
names = [("model.embed_tokens.weight", [vocab, hidden])]
for l in range(2):
    p = "model.layers.%d." % l
    names += [(p + "input_layernorm.weight", [hidden])]
    names += [(p + "self_attn.%s_proj.weight" % n, [hidden, hidden]) for n in "qkvo"]
    names += [(p + "post_attention_layernorm.weight", [hidden])]
    names += [(p + "mlp.gate_proj.weight", [inter, hidden]), (p + "mlp.up_proj.weight", [inter, hidden]),
              (p + "mlp.down_proj.weight", [hidden, inter])]
names += [("model.norm.weight", [hidden]), ("lm_head.weight", [vocab, hidden])]
weights = {}
for i, part in enumerate((names[:10], names[10:])):
    shard = "model-%05d-of-00002.safetensors" % (i + 1)
    hdr, off, data = {"__metadata__": {"format": "pt"}}, 0, []
    for name, shape in part:
        n = 2
        for d in shape:
            n *= d
        hdr[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [off, off + n]}
        data.append(os.urandom(n))
        off += n
        weights[name] = shard
    h = json.dumps(hdr).encode()
    h += b" " * (-len(h) % 8)
    with open(os.path.join(sys.argv[1], shard), "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(data))
with open(os.path.join(sys.argv[1], "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weights}, f)
PY
chown -R "$JOB_USER" "$T/work/model"
data=$(($(stat -c %s "$T"/work/model/*.safetensors | paste -sd+) - $(for f in "$T"/work/model/*.safetensors; do
	od -An -t u8 -N 8 "$f"; done | awk '{s += $1 + 8} END {print s}')))

# Open MPI's shared-memory transport takes ranks of one host for one node: TCP between them,
# over loopback, where both nodes live (a machine's other interfaces may refuse connects
# under load: one run's ranks failed to connect over eth0 and Open MPI crashed). Through UCX,
# not the TCP BTL: Open MPI 4.1's TCP BTL races when two ranks connect to each other at once
# ("failed to TCP connect ... Operation now in progress", then a call through a NULL pointer:
# two CI runs of 2026-12-02 had a rank crash so, before the program printed a line).
job=$(submit -N2 --ntasks-per-node=2 --gres=gpu:2 --aegaeon-slab=64MiB --aegaeon-pinned=8MiB:1MiB -o mpi.out --wrap "
	export OMPI_MCA_pml=ucx OMPI_MCA_pml_ucx_tls=any OMPI_MCA_pml_ucx_devices=any OMPI_MCA_osc=ucx OMPI_MCA_btl=self UCX_TLS=self,tcp UCX_NET_DEVICES=lo OMPI_MCA_oob_tcp_if_include=lo
	srun --mpi=pmix $MPI_LOAD model; echo megatron rc=\$?
	srun --mpi=pmix $MPI_LOAD -p none -r '*embed_tokens.weight=1' -r '*.down_proj.weight=1' -r '*_proj.weight=0' model; echo rules rc=\$?
	srun --mpi=pmix -n3 $MPI_LOAD model; echo uneven rc=\$?
	srun --mpi=pmix -n3 $MPI_LOAD -u model; echo allowed rc=\$?
	srun --ntasks-per-node=1 $AEG_CLI status | sed \"s/^/status /\"
	touch mpi.done")
if wait_ready "$job" n1 20 && wait_ready "$job" n2 20; then
	pass "both nodes' agents became ready"
else
	fail "both nodes' agents became ready"
fi
a1=$(agent_of "$job" n1)
a2=$(agent_of "$job" n2)
wait_for 120 test -e "$T/work/mpi.done"
out=$(cat "$T/work/mpi.out")
check "the Megatron split ran on 4 ranks" grep -qx "megatron rc=0" <<<"$out"
for r in 0 1 2 3; do
	agent=$a1
	((r >= 2)) && agent=$a2
	# (what the rank said and the agent found are in the message: once in CI ranks 2 and 3 failed here)
	said=$(grep -m1 "^mpi_load: rank $r of 4: job session" <<<"$out" || echo "no such line")
	check "rank $r attached to its node's agent and loaded onto GPU $((r % 2)) (agent ${agent:-none found}: $said)" \
		grep -qx "mpi_load: rank $r of 4: job session, agent pid $agent, GPU $((r % 2)) of 2" <<<"$out"
	check "rank $r's slice is identical to the files" \
		test "$(grep -c "^mpi_load: rank $r of 4: [0-9]* bytes in 21 tensors of 2 files, identical to the files$" <<<"$out")" -eq 2
done
check "rank 0: the 4 ranks' checksum is the whole model's, twice" \
	test "$(grep -cE "^mpi_load: 4 ranks: checksum 0x[0-9a-f]{16} equals the whole model's \($data bytes of tensor data\)$" <<<"$out")" -eq 2
check "rules of dims 0 and 1 without the preset ran" grep -qx "rules rc=0" <<<"$out"
check "3 ranks fail on dims of 256 and 1024" grep -qx "uneven rc=1" <<<"$out"
check "each of them says which tensor and why" \
	test "$(grep -c "has 1024 along dim 0, not a multiple of the 3 ranks (rule \"\*embed_tokens.weight\"); with AEG_SLICE_UNEVEN each rank takes 342" <<<"$out")" -eq 3
check "with -u (AEG_SLICE_UNEVEN) 3 ranks tile the model" grep -qx "allowed rc=0" <<<"$out"
check "rank 0 of 3: the checksum is the whole model's" \
	grep -qE "^mpi_load: 3 ranks: checksum 0x[0-9a-f]{16} equals the whole model's \($data bytes of tensor data\)$" <<<"$out"
check "the agents' logs name each rank's slice" agent_logged "model-00002-of-00002.safetensors into the slab of GPU 1, [0-9]+ chunks, slice rank 3 of 4, preset megatron"
check "every rank released its slice: no load left on either node" \
	test "$(grep -c '^status ' <<<"$out")" -ge 2 -a "$(grep -cE '^status +load [0-9]+' <<<"$out")" -eq 0
wait_job "$job" 30
check "after the job: nothing left on either node" nothing_left 10
# A failure shows what the job printed, and the slurmd logs' aegaeon lines.
if ((FAILED)); then
	log "the job's output:"
	sed 's/^/#   /' <<<"$out" >&2
	grep -h aegaeon "$T"/log/slurmd-n*.log 2>/dev/null | tail -n 40 | sed 's/^/#   /' >&2
fi

finish
