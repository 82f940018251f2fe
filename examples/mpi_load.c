/*
 * mpi_load: every rank of an MPI job loads its tensor-parallel slice of a
 * model through its node's aegaeon agent, checks each byte against the
 * model's files, and adds a checksum of what it holds to the others'; rank
 * 0 compares the sum with the checksum of the whole model read from disk.
 * Every byte of a split tensor is on exactly one rank, and each tensor
 * loaded whole is counted on one rank, so the sums agree only if the
 * slices tile the model.
 *
 *   srun --mpi=pmix -N2 --ntasks-per-node=2 --gres=gpu:2 --aegaeon-slab=1GiB \
 *       mpi_load [-p PRESET] [-r PATTERN=DIM]... [-u] [-c CHUNK] MODEL
 *
 * MODEL is a directory of safetensors shards (with or without an index), an
 * index, or one file. Ranks on a node use its GPUs in turn. Build with
 *   mpicc $(pkg-config --cflags aegaeon) mpi_load.c $(pkg-config --libs aegaeon)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <mpi.h>

#include <aegaeon/aegaeon.h>

#define MAX_RULES 16
#define WAIT_MS 120000

struct opts {
	struct aeg_slice slice;
	struct aeg_slice_rule rules[MAX_RULES];
	uint64_t chunk_bytes;
	const char *model;
};

/* A checksum of byte @v at offset @off of file @file: the sum over a set of bytes says which bytes, and where. */
static uint64_t byte_sum(uint32_t file, uint64_t off, unsigned char v)
{
	uint64_t x = ((uint64_t)file << 48) ^ off;

	x += 0x9e3779b97f4a7c15ull;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return (x ^ (x >> 31)) * (uint64_t)(v + 1u);
}

static int usage(int rank)
{
	if (rank == 0)
		fprintf(stderr, "usage: mpi_load [-p none|megatron] [-r PATTERN=DIM]... [-u] [-c CHUNK_BYTES] MODEL\n");
	return 2;
}

static int parse(int argc, char **argv, int rank, int world, struct opts *o)
{
	int c;

	memset(o, 0, sizeof(*o));
	o->slice = (struct aeg_slice){ .rank = rank, .world = world, .preset = AEG_SLICE_PRESET_MEGATRON,
				       .rules = o->rules };
	while ((c = getopt(argc, argv, "p:r:uc:")) != -1) {
		char *eq;

		switch (c) {
		case 'p':
			if (aeg_slice_preset_parse(optarg, &o->slice.preset) != 0)
				return usage(rank);
			break;
		case 'r':
			eq = strrchr(optarg, '=');
			if (eq == NULL || o->slice.nrules == MAX_RULES)
				return usage(rank);
			*eq = '\0';
			o->rules[o->slice.nrules].pattern = optarg;
			o->rules[o->slice.nrules++].dim = atoi(eq + 1);
			break;
		case 'u':
			o->slice.flags |= AEG_SLICE_UNEVEN;
			break;
		case 'c':
			o->chunk_bytes = strtoull(optarg, NULL, 0);
			break;
		default:
			return usage(rank);
		}
	}
	if (optind != argc - 1)
		return usage(rank);
	o->model = argv[optind];
	return 0;
}

/* The file's bytes [off, off + n) into @buf. */
static int read_at(int fd, void *buf, uint64_t n, uint64_t off)
{
	uint64_t done = 0;

	while (done < n) {
		ssize_t r = pread(fd, (char *)buf + done, n - done, (off_t)(off + done));

		if (r <= 0)
			return -1;
		done += (uint64_t)r;
	}
	return 0;
}

/*
 * Compare rank's part of tensor @t (copied back from the GPU into @host)
 * with the file, row by row, and add its checksum to *@sum. A part is
 * rows (the indices before slice_dim) of a run of slice_dim indices; the
 * file holds each row's run at the part's file_offset plus a row pitch.
 */
static int check_tensor(int fd, uint32_t file, const struct aeg_tensor *t, const unsigned char *host,
			unsigned char *row, uint64_t *sum)
{
	uint64_t elems = 1, rows = 1, run, pitch;

	for (int d = 0; d < t->ndim; d++)
		elems *= t->shape[d];
	if (t->size == 0 || elems == 0)
		return 0;
	run = t->size;
	pitch = t->size;
	if (t->slice_dim >= 0) {
		for (int d = 0; d < t->slice_dim; d++)
			rows *= t->shape[d];
		run = t->size / rows;
		pitch = run / t->shape[t->slice_dim] * t->slice_extent;
	}
	for (uint64_t r = 0; r < rows; r++) {
		uint64_t at = t->file_offset + r * pitch;

		if (read_at(fd, row, run, at) != 0 || memcmp(row, host + r * run, run) != 0) {
			fprintf(stderr, "mpi_load: %s: row %" PRIu64 " (file bytes %" PRIu64 "..%" PRIu64 ") differs from the file\n",
				t->name, r, at, at + run);
			return -1;
		}
		for (uint64_t i = 0; i < run; i++)
			*sum += byte_sum(file, at + i, row[i]);
	}
	return 0;
}

/* Check every tensor this rank holds; tensors loaded whole count on one rank each. */
static int check_model(aeg_session_t *s, aeg_model_t *m, int rank, int world, uint64_t *sum, uint64_t *bytes)
{
	const struct aeg_tensor *t = aeg_model_tensors(m, NULL);
	uint32_t n, open_file = UINT32_MAX;
	unsigned char *host = NULL, *row = NULL;
	int fd = -1, err = 0;

	aeg_model_tensors(m, &n);
	for (uint32_t i = 0; i < n && err == 0; i++) {
		uint64_t partial = 0;

		if (t[i].file != open_file) {
			if (fd >= 0)
				close(fd);
			open_file = t[i].file;
			fd = open(aeg_model_file(m, open_file), O_RDONLY | O_CLOEXEC);
			if (fd < 0) {
				perror(aeg_model_file(m, open_file));
				err = -1;
				break;
			}
		}
		free(host);
		free(row);
		host = malloc(t[i].size + 1);
		row = malloc(t[i].size + 1);
		if (host == NULL || row == NULL ||
		    aeg_memcpy(aeg_session_device(s), host, t[i].device_ptr, t[i].size) != 0) {
			fprintf(stderr, "mpi_load: %s: copying %" PRIu64 " bytes back: %s\n", t[i].name, t[i].size,
				aeg_error_detail());
			err = -1;
			break;
		}
		err = check_tensor(fd, t[i].file, &t[i], host, row, &partial);
		if (t[i].slice_dim >= 0 || i % (uint32_t)world == (uint32_t)rank)
			*sum += partial;
		*bytes += t[i].size;
	}
	free(host);
	free(row);
	if (fd >= 0)
		close(fd);
	return err;
}

/* Rank 0: the checksum of every byte of tensor data in the model's files (after each header). */
static int whole_sum(aeg_model_t *m, uint64_t *sum, uint64_t *bytes)
{
	static unsigned char buf[1 << 20];

	for (uint32_t f = 0; f < aeg_model_file_count(m); f++) {
		int fd = open(aeg_model_file(m, f), O_RDONLY | O_CLOEXEC);
		unsigned char len[8];
		uint64_t hdr = 0, off;
		struct stat st;

		if (fd < 0 || fstat(fd, &st) != 0 || read_at(fd, len, 8, 0) != 0) {
			perror(aeg_model_file(m, f));
			return -1;
		}
		for (int i = 0; i < 8; i++)
			hdr |= (uint64_t)len[i] << (8 * i);
		for (off = 8 + hdr; off < (uint64_t)st.st_size;) {
			uint64_t n = (uint64_t)st.st_size - off < sizeof(buf) ? (uint64_t)st.st_size - off : sizeof(buf);

			if (read_at(fd, buf, n, off) != 0) {
				close(fd);
				return -1;
			}
			for (uint64_t i = 0; i < n; i++)
				*sum += byte_sum(f, off + i, buf[i]);
			off += n;
			*bytes += n;
		}
		close(fd);
	}
	return 0;
}

/* Load, wait and check this rank's slice: 0, or -1 with the reason printed. */
static int load_slice(const struct opts *o, int gpu_index, aeg_session_t **sp, aeg_model_t **mp, uint64_t *sum,
		      uint64_t *bytes)
{
	struct aeg_load_request req = { .path = o->model, .chunk_bytes = o->chunk_bytes, .slice = &o->slice };
	struct aeg_job_info info = { .agent_pid = 0 };
	aeg_session_t *s;
	int err, gpus;

	/* Outside a job the staging ring is faulted in while the session opens the device. */
	err = aeg_session_warm_up(NULL);
	if (err == 0)
		err = aeg_session_open(NULL, &s);
	if (err) {
		fprintf(stderr, "mpi_load: rank %d: %s: %s\n", o->slice.rank, aeg_strerror(err), aeg_error_detail());
		return -1;
	}
	*sp = s;
	gpus = aeg_session_gpu_count(s);
	req.gpu = gpus > 0 ? gpu_index % gpus : 0;
	err = aeg_session_load(s, &req, mp);
	if (err == 0)
		err = aeg_model_wait(*mp, WAIT_MS);
	if (err) {
		fprintf(stderr, "mpi_load: rank %d: %s: %s: %s\n", o->slice.rank, o->model, aeg_strerror(err),
			aeg_error_detail());
		return -1;
	}
	if (aeg_session_job(s) != NULL)
		aeg_job_get_info(aeg_session_job(s), &info);
	printf("mpi_load: rank %d of %d: %s session, agent pid %ld, GPU %d of %d\n", o->slice.rank, o->slice.world,
	       aeg_session_mode_name(aeg_session_mode(s)), info.agent_pid, req.gpu, gpus);
	return check_model(s, *mp, o->slice.rank, o->slice.world, sum, bytes);
}

int main(int argc, char **argv)
{
	int rank, world, local, bad = 0, any_bad = 0;
	uint64_t sum = 0, bytes = 0, total = 0, want = 0, whole_bytes = 0;
	aeg_session_t *s = NULL;
	aeg_model_t *m = NULL;
	MPI_Comm node;
	struct opts o;

	MPI_Init(&argc, &argv);
	MPI_Comm_rank(MPI_COMM_WORLD, &rank);
	MPI_Comm_size(MPI_COMM_WORLD, &world);
	MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node);
	MPI_Comm_rank(node, &local);
	if (parse(argc, argv, rank, world, &o) != 0) {
		MPI_Finalize();
		return 2;
	}
	bad = load_slice(&o, local, &s, &m, &sum, &bytes) != 0;
	if (!bad) {
		uint32_t tensors;

		aeg_model_tensors(m, &tensors);
		printf("mpi_load: rank %d of %d: %" PRIu64 " bytes in %" PRIu32 " tensors of %" PRIu32 " files, identical to the files\n",
		       rank, world, bytes, tensors, aeg_model_file_count(m));
	}
	if (rank == 0 && !bad && whole_sum(m, &want, &whole_bytes) != 0)
		bad = 1;
	MPI_Allreduce(&sum, &total, 1, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD);
	MPI_Allreduce(&bad, &any_bad, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
	if (rank == 0 && !any_bad) {
		if (total == want)
			printf("mpi_load: %d ranks: checksum 0x%016" PRIx64 " equals the whole model's (%" PRIu64 " bytes of tensor data)\n",
			       world, total, whole_bytes);
		else
			printf("mpi_load: %d ranks: checksum 0x%016" PRIx64 " differs from the whole model's 0x%016" PRIx64 "\n",
			       world, total, want);
		any_bad = total != want;
	}
	MPI_Bcast(&any_bad, 1, MPI_INT, 0, MPI_COMM_WORLD);
	if (m != NULL && aeg_model_release(m) != 0)
		fprintf(stderr, "mpi_load: rank %d: release: %s\n", rank, aeg_error_detail());
	aeg_session_close(s);
	MPI_Comm_free(&node);
	MPI_Finalize();
	return any_bad ? 1 : 0;
}
