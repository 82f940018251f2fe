/* The agent end to end on the host backend: aegaeond as a child, clients in other processes. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <pwd.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>

#include <aegaeon/aegaeon.h>
#include <aegaeon/attach.h>
#include <aegaeon/jobrec.h>

#include "attach_internal.h"
#include "internal.h"
#include "proto.h"
#include "testutil.h"

static char dir[64], sock[128], ready[128], errfile[128], pidfile[128];
static pid_t agent = -1;

/* Start aegaeond on a fresh runtime directory with @argv after the common options. */
static pid_t spawn(const char *const *extra)
{
	const char *argv[32] = { AEGAEOND_PATH, "--job", "42", "--runtime-dir", dir, "--device", "host",
				 "--foreground" };
	int n = 8;
	pid_t pid;

	for (int i = 0; extra[i]; i++)
		argv[n++] = extra[i];
	argv[n] = NULL;
	pid = fork();
	assert_true(pid >= 0);
	if (pid == 0) {
		execv(argv[0], (char *const *)argv);
		child_exit(127);
	}
	return pid;
}

/* Wait for ready or error: 1 ready, 0 error. */
static int wait_start(void)
{
	for (int i = 0; i < 2000; i++) {
		if (access(ready, F_OK) == 0)
			return 1;
		if (access(errfile, F_OK) == 0)
			return 0;
		usleep(10000);
	}
	fail_msg("agent wrote neither %s nor %s in 20 s", ready, errfile);
	return -1;
}

static int run_status(pid_t pid)
{
	int status;

	assert_int_equal(waitpid(pid, &status, 0), pid);
	return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

static int setup(void **state)
{
	static const char *const opts[] = { "--gpus", "0", "--slab", "64MiB", "--pinned", "8MiB:1MiB", NULL };

	strcpy(dir, "/tmp/aeg-agent-XXXXXX");
	if (mkdtemp(dir) == NULL)
		return -1;
	snprintf(sock, sizeof(sock), "%s/agent.sock", dir);
	snprintf(ready, sizeof(ready), "%s/ready", dir);
	snprintf(errfile, sizeof(errfile), "%s/error", dir);
	snprintf(pidfile, sizeof(pidfile), "%s/agent.pid", dir);
	setenv("AEGAEON_HOST_GPUS", "1", 1);
	unsetenv("AEGAEON_SLABS");
	agent = spawn(opts);
	if (wait_start() != 1)
		return -1;
	setenv("AEGAEON_SOCKET", sock, 1);
	return 0;
}

static int teardown(void **state)
{
	char cmd[128];

	if (agent > 0) {
		kill(agent, SIGKILL);
		waitpid(agent, NULL, 0);
	}
	snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
	return system(cmd);
}

static void ready_record(void **state)
{
	struct aeg_job_record rec;
	struct stat st;

	assert_int_equal(aeg_job_record_read(ready, &rec), 0);
	assert_int_equal(rec.pid, agent);
	assert_string_equal(rec.socket, sock);
	assert_int_equal(rec.device, AEG_DEVICE_HOST);
	assert_int_equal(rec.gpu_count, 1);
	assert_int_equal(rec.slabs[0].bytes, 64 << 20);
	assert_int_equal(rec.pinned_bytes, 8 << 20);
	assert_int_equal(rec.pinned_buffer, 1 << 20);
	assert_int_equal(stat(sock, &st), 0);
	assert_true(S_ISSOCK(st.st_mode));
	assert_int_equal(st.st_mode & 0777, 0600);
	assert_int_equal(stat(ready, &st), 0);
	assert_int_equal(st.st_mode & 0777, 0600);
	assert_int_equal(access(pidfile, F_OK), 0);
}

static void not_in_a_job(void **state)
{
	aeg_job_t *job = NULL;

	unsetenv("AEGAEON_SOCKET");
	assert_int_equal(aeg_job_attach(&job), AEG_ENOENT);
	assert_non_null(strstr(aeg_error_detail(), "not inside an aegaeon job"));
	assert_null(job);
	setenv("AEGAEON_SOCKET", "/nonexistent/agent.sock", 1);
	assert_int_equal(aeg_job_attach(&job), AEG_EIO);
	assert_non_null(strstr(aeg_error_detail(), "not running"));
	setenv("AEGAEON_SOCKET", sock, 1);
}

#define PATTERN_BYTES 4096

/* Child 1: lease, write into the slab and a pool buffer, tell where, wait to be told to go. */
static int writer(int out, int in)
{
	struct aeg_pool_buffer buf;
	struct aeg_block b;
	aeg_slab_t *slab;
	aeg_job_t *job;
	uint64_t msg[3];
	char go;

	if (aeg_job_attach(&job) || aeg_job_slab(job, 0, 1 << 20, &slab) ||
	    aeg_slab_alloc(slab, PATTERN_BYTES, &b) || aeg_pool_acquire(aeg_job_pool(job), 0, &buf))
		return 10;
	memset(b.ptr, 0x5a, PATTERN_BYTES);
	memset(buf.ptr, 0xa5, PATTERN_BYTES);
	{
		struct aeg_job_slab_desc d;
		aeg_job_slab_describe(job, 0, &d);
		msg[0] = (uint64_t)((char *)b.ptr - (char *)d.base);
	}
	msg[1] = buf.index;
	msg[2] = aeg_slab_bytes(slab);
	if (write(out, msg, sizeof(msg)) != sizeof(msg) || read(in, &go, 1) != 1)
		return 11;
	aeg_pool_release(aeg_job_pool(job), buf.index);
	aeg_job_detach(job);
	return 0;
}

/* Child 2: see child 1's bytes in the job slab and in the pool. */
static int reader(uint64_t offset, uint32_t index)
{
	struct aeg_job_slab_desc d;
	aeg_job_t *job;
	const unsigned char *p;

	if (aeg_job_attach(&job) || aeg_job_slab_describe(job, 0, &d) || d.base == NULL)
		return 20;
	p = (const unsigned char *)d.base + offset;
	for (int i = 0; i < PATTERN_BYTES; i++)
		if (p[i] != 0x5a)
			return 21;
	p = aeg_pool_buffer_ptr(aeg_job_pool(job), index);
	for (int i = 0; i < PATTERN_BYTES; i++)
		if (p[i] != 0xa5)
			return 22;
	aeg_job_detach(job);
	return 0;
}

static struct aeg_job_status *status_now(void)
{
	struct aeg_job_status *st;
	aeg_job_t *job;

	assert_int_equal(aeg_job_connect(&job), 0);
	assert_int_equal(aeg_job_status(job, &st), 0);
	aeg_job_detach(job);
	return st;
}

/*
 * The status once the agent has @clients connections (this one included):
 * a process that exited is dropped when the agent's thread for it sees the
 * end of its connection, a moment later.
 */
static struct aeg_job_status *status_with_clients(uint32_t clients)
{
	for (int i = 0; i < 1000; i++) {
		struct aeg_job_status *st = status_now();

		if (st->clients == clients)
			return st;
		aeg_job_status_free(st);
		usleep(10000);
	}
	fail_msg("the agent did not come to %u connections in 10 s", clients);
	return NULL;
}

static void two_processes_share_slab_and_pool(void **state)
{
	int to_parent[2], to_child[2], fds = count_fds();
	uint64_t msg[3];
	struct aeg_job_status *st;
	pid_t w, r;

	assert_int_equal(pipe(to_parent), 0);
	assert_int_equal(pipe(to_child), 0);
	w = fork();
	if (w == 0)
		child_exit(writer(to_parent[1], to_child[0]));
	assert_int_equal(read(to_parent[0], msg, sizeof(msg)), sizeof(msg));
	assert_int_equal(msg[2], 1 << 20);

	r = fork();
	if (r == 0)
		child_exit(reader(msg[0], (uint32_t)msg[1]));
	assert_int_equal(run_status(r), 0);

	st = status_with_clients(2);    /* the writer and this status */
	assert_int_equal(st->slabs, 1);
	assert_int_equal(st->slab[0].leases, 1);
	assert_int_equal(st->slab[0].lease_bytes, 1 << 20);
	assert_true(st->has_pool);
	assert_int_equal(st->pool.in_use, 1);
	aeg_job_status_free(st);

	assert_int_equal(write(to_child[1], "g", 1), 1);
	assert_int_equal(run_status(w), 0);
	/* Its lease went with its connection. */
	for (int i = 0; i < 500; i++) {
		st = status_now();
		int leases = (int)st->slab[0].leases;
		uint64_t used = st->slab[0].stats.used_bytes;
		aeg_job_status_free(st);
		if (leases == 0 && used == 0)
			break;
		assert_true(i < 499);
		usleep(10000);
	}
	close(to_parent[0]);
	close(to_parent[1]);
	close(to_child[0]);
	close(to_child[1]);
	assert_int_equal(count_fds(), fds);
}

static void leases_in_this_process(void **state)
{
	aeg_slab_t *a, *b;
	struct aeg_block blk;
	aeg_job_t *job;
	struct aeg_job_status *st;
	int fds = count_fds();

	assert_int_equal(aeg_job_attach(&job), 0);
	assert_int_equal(aeg_job_slab(job, 0, 32 << 20, &a), 0);
	assert_int_equal(aeg_job_slab(job, 0, 64 << 20, &b), AEG_ENOSPC);
	assert_non_null(strstr(aeg_error_detail(), "lease"));
	assert_int_equal(aeg_job_slab(job, 0, 0, &b), 0);      /* the rest */
	assert_int_equal(aeg_slab_bytes(b), 32 << 20);
	assert_int_equal(aeg_job_slab(job, 1, 4096, &b), AEG_ENODEV);
	assert_int_equal(aeg_slab_alloc(a, 1000, &blk), 0);
	assert_int_equal(aeg_slab_free(a, blk.id), 0);
	assert_int_equal(aeg_job_slab_return(job, a), 0);
	assert_int_equal(aeg_job_slab_return(job, a), AEG_EINVAL);
	assert_int_equal(aeg_job_status(job, &st), 0);
	assert_int_equal(st->slab[0].leases, 1);
	aeg_job_status_free(st);
	aeg_job_detach(job);
	assert_int_equal(count_fds(), fds);
}

static void prefetch_chunks_release(void **state)
{
	char path[160];
	unsigned char *data;
	struct aeg_job_load *load, *again;
	struct aeg_job_status *st;
	aeg_job_t *job;
	size_t n = 3 << 20;
	FILE *f;
	int fds = count_fds();

	snprintf(path, sizeof(path), "%s/model.bin", dir);
	data = malloc(n);
	for (size_t i = 0; i < n; i++)
		data[i] = (unsigned char)(i * 7 + (i >> 12));
	f = fopen(path, "w");
	assert_int_equal(fwrite(data, 1, n, f), n);
	fclose(f);

	assert_int_equal(aeg_job_attach(&job), 0);
	assert_int_equal(aeg_job_prefetch(job, path, 0, 1 << 20, &load), 0);
	assert_true(load->count >= 3);
	for (uint32_t i = 0; i < load->count; i++) {
		int err = aeg_event_wait_handle(aeg_job_device(job), &load->chunks[i].event, 10000);
		if (err)
			fail_msg("chunk %u: %s: %s", i, aeg_errname(err), aeg_error_detail());
		assert_memory_equal(load->chunks[i].ptr, data + load->chunks[i].file_offset, load->chunks[i].size);
	}
	/* A later step finds it by path; the load settles just after its last event. */
	for (int tries = 0;; tries++) {
		assert_int_equal(aeg_job_chunks(job, 0, path, 0, &again), 0);
		assert_int_equal(again->load_id, load->load_id);
		assert_int_equal(again->count, load->count);
		if (again->status != AEG_EBUSY || tries == 1000)
			break;
		aeg_job_load_free(again);
		usleep(10000);
	}
	assert_int_equal(again->status, 0);
	assert_int_equal(again->done_bytes, n);
	aeg_job_load_free(again);
	assert_int_equal(aeg_job_status(job, &st), 0);
	assert_int_equal(st->loads, 1);
	assert_string_equal(st->load[0].path, path);
	aeg_job_status_free(st);

	/* Unknown ids release nothing. */
	uint64_t bogus = 999999;
	assert_int_equal(aeg_job_release(job, 0, &bogus, 1, NULL), AEG_ENOENT);
	uint64_t *ids = calloc(load->count, sizeof(*ids));
	for (uint32_t i = 0; i < load->count; i++)
		ids[i] = load->chunks[i].slab_id;
	uint32_t released = 0;
	/*
	 * Some chunks released: the load holds only the rest (done_bytes), and
	 * is found by its id, never by path, where a step would take it for the file.
	 */
	assert_int_equal(aeg_job_release(job, 0, ids, 2, &released), 0);
	assert_int_equal(released, 2);
	assert_int_equal(aeg_job_chunks(job, 0, path, 0, &again), AEG_ENOENT);
	assert_non_null(strstr(aeg_error_detail(), "were released"));
	assert_int_equal(aeg_job_chunks(job, load->load_id, NULL, 0, &again), 0);
	assert_int_equal(again->status, 0);
	assert_int_equal(again->count, load->count - 2);
	assert_int_equal(again->file_bytes, n);
	assert_int_equal(again->done_bytes, n - load->chunks[0].size - load->chunks[1].size);
	aeg_job_load_free(again);
	assert_int_equal(aeg_job_status(job, &st), 0);
	assert_int_equal(st->load[0].done_bytes, n - load->chunks[0].size - load->chunks[1].size);
	aeg_job_status_free(st);
	assert_int_equal(aeg_job_release(job, 0, ids + 2, load->count - 2, &released), 0);
	assert_true(released > 0);
	assert_int_equal(aeg_job_chunks(job, 0, path, 0, &again), AEG_ENOENT);
	assert_int_equal(aeg_job_chunks(job, load->load_id, NULL, 0, &again), AEG_ENOENT);

	/* A missing file, a directory. */
	assert_int_equal(aeg_job_prefetch(job, "/nonexistent/file", 0, 1 << 20, &again), AEG_ENOENT);
	assert_int_equal(aeg_job_release_all(job, &released), 0);
	assert_int_equal(aeg_job_status(job, &st), 0);
	assert_int_equal(st->loads, 0);
	assert_int_equal(st->slab[0].stats.used_bytes, 0);
	aeg_job_status_free(st);
	free(ids);
	aeg_job_load_free(load);
	aeg_job_detach(job);
	free(data);
	unlink(path);
	assert_int_equal(count_fds(), fds);
}

struct chunk_waiter {
	aeg_device_t *dev;
	const aeg_handle_t *handle;
	int result;
	pthread_t thread;
};

static void *chunk_wait_main(void *arg)
{
	struct chunk_waiter *w = arg;

	w->result = aeg_event_wait_handle(w->dev, w->handle, 10000);
	return NULL;
}

static void write_file(const char *path, const unsigned char *data, size_t n)
{
	FILE *f = fopen(path, "w");

	assert_non_null(f);
	assert_int_equal(fwrite(data, 1, n, f), n);
	assert_int_equal(fclose(f), 0);
}

/* Wait (at most 10 s) until the agent has @want connections: threads waiting through it hold one each. */
static void wait_clients(aeg_job_t *job, uint32_t want)
{
	for (int i = 0; i < 1000; i++) {
		struct aeg_job_status *st;
		uint32_t have;

		assert_int_equal(aeg_job_status(job, &st), 0);
		have = st->clients;
		aeg_job_status_free(st);
		if (have >= want)
			return;
		usleep(10000);
	}
	fail_msg("the agent has fewer than %u connections after 10 s", want);
}

/*
 * Take every buffer of the job's pool, waiting (at most 10 s each) for those
 * a load that just ended still gives back: the agent's pread feed then
 * cannot move a byte.
 */
static uint32_t hog_pool(aeg_pool_t *pool, uint32_t *bufs, uint32_t cap)
{
	struct aeg_pool_buffer b;
	struct aeg_pool_stats ps;
	uint32_t n = 0;

	assert_int_equal(aeg_pool_stats(pool, &ps), 0);
	assert_true(ps.buffers <= cap);
	while (n < ps.buffers && aeg_pool_acquire(pool, 10000, &b) == 0)
		bufs[n++] = b.index;
	if (n < ps.buffers)
		fail_msg("took %u of the pool's %u buffers in 10 s", n, ps.buffers);
	return n;
}

/*
 * Chunk handles are handed out before their copies are queued: a process
 * holding only a handle waits through the agent until the chunk's event is
 * recorded, and sees a cancelled load's chunks fail.
 */
static void wait_chunks_through_agent(void **state)
{
	char path[160], path2[160];
	size_t n = 3 << 20;
	unsigned char *data = malloc(n);
	struct aeg_job_load *load, *load2;
	struct chunk_waiter w[8];
	aeg_event_t *mine;
	aeg_handle_t mine_h;
	uint32_t bufs[64], held, released;
	aeg_device_t *dev, *own;
	aeg_job_t *job;
	int fds = count_fds();

	for (size_t i = 0; i < n; i++)
		data[i] = (unsigned char)(i * 13 + (i >> 10));
	snprintf(path, sizeof(path), "%s/held.bin", dir);
	snprintf(path2, sizeof(path2), "%s/cancelled.bin", dir);
	write_file(path, data, n);
	write_file(path2, data, n);
	assert_int_equal(aeg_job_attach(&job), 0);
	dev = aeg_job_device(job);
	assert_non_null(aeg_job_pool(job));
	held = hog_pool(aeg_job_pool(job), bufs, 64);
	assert_true(held > 0);

	assert_int_equal(aeg_job_prefetch(job, path, 0, 1 << 20, &load), 0);
	assert_int_equal(load->count, 3);
	assert_int_equal(load->status, AEG_EBUSY);
	assert_int_equal(aeg_agent_wait_event(sock, &load->chunks[0].event, 100), AEG_ETIMEDOUT);
	assert_non_null(strstr(aeg_error_detail(), "not recorded"));
	assert_int_equal(aeg_event_wait_handle(dev, &load->chunks[2].event, 100), AEG_ETIMEDOUT);
	/* A handle the agent does not know: its owner (here, this process) answers. */
	assert_int_equal(aeg_event_create(dev, 0, &mine, &mine_h), 0);
	assert_int_equal(aeg_agent_wait_event(sock, &mine_h, 100), AEG_ENOENT);
	assert_int_equal(aeg_event_wait_handle(dev, &mine_h, 100), 0);
	assert_int_equal(aeg_event_destroy(mine), 0);

	for (uint32_t i = 0; i < load->count; i++) {
		w[i] = (struct chunk_waiter){ .dev = dev, .handle = &load->chunks[i].event };
		assert_int_equal(pthread_create(&w[i].thread, NULL, chunk_wait_main, &w[i]), 0);
	}
	usleep(50000);
	for (uint32_t i = 0; i < held; i++)
		assert_int_equal(aeg_pool_release(aeg_job_pool(job), bufs[i]), 0);
	for (uint32_t i = 0; i < load->count; i++) {
		assert_int_equal(pthread_join(w[i].thread, NULL), 0);
		if (w[i].result)
			fail_msg("chunk %u: %s: %s", i, aeg_errname(w[i].result), aeg_error_detail());
		assert_memory_equal(load->chunks[i].ptr, data + load->chunks[i].file_offset,
				    load->chunks[i].size);
	}
	assert_int_equal(aeg_agent_wait_event(sock, &load->chunks[1].event, 0), 0);

	/* Cancelled while its chunks wait: every waiter gets AEG_ECANCELED. */
	held = hog_pool(aeg_job_pool(job), bufs, 64);
	assert_int_equal(aeg_job_prefetch(job, path2, 0, 1 << 20, &load2), 0);
	assert_int_equal(load2->count, 3);
	for (uint32_t i = 0; i < load2->count; i++) {
		w[i] = (struct chunk_waiter){ .dev = dev, .handle = &load2->chunks[i].event };
		assert_int_equal(pthread_create(&w[i].thread, NULL, chunk_wait_main, &w[i]), 0);
	}
	/* The waiters are at the agent before the release (those that come later are told the same). */
	wait_clients(job, 1 + load2->count);
	assert_int_equal(aeg_job_release_all(job, &released), 0);
	assert_true(released >= 2);
	for (uint32_t i = 0; i < load2->count; i++) {
		assert_int_equal(pthread_join(w[i].thread, NULL), 0);
		assert_int_equal(w[i].result, AEG_ECANCELED);
	}
	/*
	 * Released after it was cancelled: a wait that comes only now is told
	 * so, not that the handle is unknown (which would send it to open a
	 * handle that is gone). A released chunk of a load that completed is
	 * unknown to the agent.
	 */
	assert_int_equal(aeg_agent_wait_event(sock, &load2->chunks[0].event, 100), AEG_ECANCELED);
	assert_non_null(strstr(aeg_error_detail(), "released"));
	assert_int_equal(aeg_event_wait_handle(dev, &load2->chunks[1].event, 100), AEG_ECANCELED);
	/* A device the job did not open has no agent to ask: the backend says the handle is gone. */
	assert_int_equal(aeg_device_open(&own, AEG_DEVICE_HOST), 0);
	assert_int_equal(aeg_event_wait_handle(own, &load2->chunks[1].event, 100), AEG_EBADF);
	aeg_device_close(own);
	for (uint32_t i = 0; i < held; i++)
		assert_int_equal(aeg_pool_release(aeg_job_pool(job), bufs[i]), 0);

	aeg_job_load_free(load);
	aeg_job_load_free(load2);
	aeg_job_detach(job);
	free(data);
	unlink(path);
	unlink(path2);
	assert_int_equal(count_fds(), fds);
}

static int agent_fds(void)
{
	char path[64];
	struct dirent *e;
	DIR *d;
	int n = 0;

	snprintf(path, sizeof(path), "/proc/%d/fd", (int)agent);
	d = opendir(path);
	assert_non_null(d);
	while ((e = readdir(d)) != NULL)
		n += e->d_name[0] != '.';
	closedir(d);
	return n;
}

/*
 * The agent's own descriptors: the fewest of a few looks 2 ms apart. Its
 * watch for exited clients opens /proc files for a moment, so one look can
 * count one of those.
 */
static int agent_fds_steady(void)
{
	int n = agent_fds();

	for (int i = 0; i < 5; i++) {
		int m;

		usleep(2000);
		m = agent_fds();
		if (m < n)
			n = m;
	}
	return n;
}

/* A frame of @type as the library would send it, then altered by the row. */
static size_t good_frame(uint16_t type, uint32_t flags, const union proto_msg *m, unsigned char *out)
{
	size_t len;

	assert_int_equal(proto_encode(type, flags, 7, m, out, &len), 0);
	return len;
}

enum bad_kind {
	RAW_HEADER,             /* a header of the row's fields, @send bytes of it and the 0xee after */
	GARBAGE,                /* @send bytes of 0xee */
	HELLO_VERSIONS,         /* a well-formed hello asking for versions 5..9 */
	HELLO_TRAILING,         /* a hello with 8 bytes more than it holds */
	HELLO_TWICE,
	HELLO_WITH_FD,          /* a hello carrying a descriptor */
	ERROR_FROM_CLIENT,      /* a well-formed error reply, sent by a client */
	NOTHING,                /* connect and close */
};

/*
 * Peers that break the protocol, one connection each: the agent answers
 * an AEG_EPROTO error frame saying why (or, for a peer that said nothing,
 * nothing), closes the connection, serves on, and keeps no descriptor.
 */
static void malformed_clients(void **state)
{
	static const struct {
		const char *name;
		enum bad_kind kind;
		uint32_t magic;
		uint16_t version, type;
		uint32_t flags, length;
		size_t send;
		const char *detail;     /* in the error frame; NULL: closed without a word */
	} cases[] = {
		{ "garbage", GARBAGE, 0, 0, 0, 0, 0, 64, "bad magic 0xeeeeeeee" },
		{ "bad magic", RAW_HEADER, 0x12345678, 1, PROTO_HELLO, 0, 0, 24, "bad magic 0x12345678" },
		{ "type 0", RAW_HEADER, PROTO_MAGIC, 1, 0, 0, 0, 24, "unknown message type 0" },
		{ "unknown type", RAW_HEADER, PROTO_MAGIC, 1, 77, 0, 0, 24, "unknown message type 77" },
		{ "unknown flag", RAW_HEADER, PROTO_MAGIC, 1, PROTO_HELLO, 0x80, 0, 24, "unknown flags 0x80" },
		{ "status of version 2", RAW_HEADER, PROTO_MAGIC, 2, PROTO_STATUS, 0, 4, 28,
		  "status frame of protocol version 2, this side speaks 1" },
		{ "hello of version 9", RAW_HEADER, PROTO_MAGIC, 9, PROTO_HELLO, 0, 0, 24,
		  "hello frame of protocol version 9" },
		{ "oversize length", RAW_HEADER, PROTO_MAGIC, 1, PROTO_HELLO, 0, 1u << 30, 24,
		  "hello frame of 1073741824 bytes, at most 65512" },
		{ "one byte over the cap", RAW_HEADER, PROTO_MAGIC, 1, PROTO_HELLO, 0, PROTO_MAX_PAYLOAD + 1, 24,
		  "hello frame of 65513 bytes, at most 65512" },
		{ "truncated payload", RAW_HEADER, PROTO_MAGIC, 1, PROTO_HELLO, 0, 100, 40,
		  "connection closed inside a frame (16 of 100 bytes)" },
		{ "half a header", RAW_HEADER, PROTO_MAGIC, 1, PROTO_HELLO, 0, 0, 10,
		  "connection closed inside a frame (10 of 24 bytes)" },
		{ "empty hello", RAW_HEADER, PROTO_MAGIC, 1, PROTO_HELLO, 0, 0, 24, "hello request truncated" },
		{ "status before hello", RAW_HEADER, PROTO_MAGIC, 1, PROTO_STATUS, 0, 4, 28,
		  "first message is status, not hello" },
		{ "hello for versions 5..9", HELLO_VERSIONS, 0, 0, 0, 0, 0, 0, "client speaks protocol versions 5..9" },
		{ "hello with trailing bytes", HELLO_TRAILING, 0, 0, 0, 0, 0, 0, "8 bytes after its end" },
		{ "hello twice", HELLO_TWICE, 0, 0, 0, 0, 0, 0, "hello sent twice" },
		{ "hello carrying a descriptor", HELLO_WITH_FD, 0, 0, 0, 0, 0, 0, "carried 1 unexpected descriptor" },
		{ "error reply from a client", ERROR_FROM_CLIENT, 0, 0, 0, 0, 0, 0, "client sent a error reply" },
		{ "connect and close", NOTHING, 0, 0, 0, 0, 0, 0, NULL },
	};
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	static unsigned char buf[4 * PROTO_MAX_FRAME], frame[PROTO_MAX_FRAME];
	union proto_msg msg;
	int base = agent_fds();

	strcpy(sa.sun_path, sock);
	for (size_t i = 0; i < AEG_ARRAY_SIZE(cases); i++) {
		struct proto_header h = { cases[i].magic, cases[i].version, cases[i].type, cases[i].flags,
					  cases[i].length, 7 };
		int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		size_t len = 0, got = 0, pos = 0;
		struct proto_header last = { 0 };
		int frames = 0;

		assert_int_equal(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
		memset(&msg, 0, sizeof(msg));
		msg.hello_req.min_version = 1;
		msg.hello_req.max_version = 1;
		strcpy(msg.hello_req.client, "malformed");
		memset(buf, 0xee, PROTO_MAX_FRAME);
		switch (cases[i].kind) {
		case RAW_HEADER:
			proto_header_encode(&h, buf);
			len = cases[i].send;
			break;
		case GARBAGE:
			len = cases[i].send;
			break;
		case HELLO_VERSIONS:
			msg.hello_req.min_version = 5;
			msg.hello_req.max_version = 9;
			len = good_frame(PROTO_HELLO, 0, &msg, buf);
			break;
		case HELLO_TRAILING:
			len = good_frame(PROTO_HELLO, 0, &msg, buf) + 8;
			assert_int_equal(proto_header_decode(buf, &h), 0);
			h.length += 8;
			proto_header_encode(&h, buf);
			break;
		case HELLO_TWICE:
			len = good_frame(PROTO_HELLO, 0, &msg, buf);
			memcpy(buf + len, buf, len);
			len *= 2;
			break;
		case HELLO_WITH_FD:
			len = good_frame(PROTO_HELLO, 0, &msg, frame);
			assert_int_equal(proto_send(fd, PROTO_HELLO, 0, 7, &msg, STDIN_FILENO, frame), 0);
			len = 0;
			break;
		case ERROR_FROM_CLIENT:
			msg.error.code = AEG_EIO;
			strcpy(msg.error.detail, "not a request");
			len = good_frame(PROTO_ERROR, PROTO_F_REPLY, &msg, buf);
			break;
		case NOTHING:
			break;
		}
		if (len)
			assert_int_equal(send(fd, buf, len, MSG_NOSIGNAL), (ssize_t)len);
		shutdown(fd, SHUT_WR);
		/* Everything the agent says until it closes, within a bound. */
		for (;;) {
			struct pollfd p = { .fd = fd, .events = POLLIN };
			ssize_t n;

			if (poll(&p, 1, 5000) != 1)
				fail_msg("case %s: the agent neither answered nor closed in 5 s", cases[i].name);
			n = read(fd, buf + got, sizeof(buf) - got);
			/* Closed with our bytes unread: a reset, after what it had sent. */
			if (n < 0 && errno == ECONNRESET)
				break;
			if (n < 0)
				fail_msg("case %s: read: %s", cases[i].name, strerror(errno));
			if (n == 0)
				break;
			got += (size_t)n;
		}
		close(fd);
		while (pos + PROTO_HEADER_BYTES <= got) {
			assert_int_equal(proto_header_decode(buf + pos, &last), 0);
			assert_true(pos + PROTO_HEADER_BYTES + last.length <= got);
			assert_int_equal(proto_decode(&last, buf + pos + PROTO_HEADER_BYTES, &msg), 0);
			pos += PROTO_HEADER_BYTES + last.length;
			frames++;
		}
		assert_int_equal(pos, got);
		if (cases[i].detail == NULL) {
			if (frames != 0)
				fail_msg("case %s: %d frames, expected none", cases[i].name, frames);
			continue;
		}
		if (frames == 0 || last.type != PROTO_ERROR || msg.error.code != AEG_EPROTO ||
		    strstr(msg.error.detail, cases[i].detail) == NULL)
			fail_msg("case %s: last of %d frames is %s (%s: %s); expected AEG_EPROTO '%s'", cases[i].name,
				 frames, proto_type_name(last.type), last.type == PROTO_ERROR ? aeg_errname(msg.error.code) : "-",
				 last.type == PROTO_ERROR ? msg.error.detail : "-", cases[i].detail);
		assert_int_equal(frames, cases[i].kind == HELLO_TWICE ? 2 : 1);
	}
	/* Still serving, with no descriptor of those peers left. */
	struct aeg_job_status *st = status_now();
	assert_int_equal(st->slabs, 1);
	aeg_job_status_free(st);
	assert_int_equal(kill(agent, 0), 0);
	/* Connections of earlier tests may still be closing: no more than before, not exactly as many. */
	int have = agent_fds_steady();

	for (int i = 0; i < 500 && have > base; i++) {
		usleep(10000);
		have = agent_fds_steady();
	}
	if (have > base)
		fail_msg("the agent holds %d descriptors, %d before the malformed peers", have, base);
}

static void other_uid_refused(void **state)
{
	struct passwd *pw = getpwnam("nobody");
	pid_t pid;

	if (geteuid() != 0 || pw == NULL) {
		print_message("skipped: needs root and a 'nobody' user to run a client as another uid\n");
		skip();
	}
	/* Open the path to everyone for a moment, so only SO_PEERCRED stands in the way. */
	assert_int_equal(chmod(dir, 0711), 0);
	assert_int_equal(chmod(sock, 0666), 0);
	pid = fork();
	if (pid == 0) {
		aeg_job_t *job;
		int err;

		if (setresgid(pw->pw_gid, pw->pw_gid, pw->pw_gid) || setresuid(pw->pw_uid, pw->pw_uid, pw->pw_uid))
			child_exit(30);
		err = aeg_job_connect(&job);
		child_exit(err == AEG_EIO ? 0 : 31);
	}
	assert_int_equal(run_status(pid), 0);
	assert_int_equal(chmod(sock, 0600), 0);
	assert_int_equal(chmod(dir, 0700), 0);
	/* And through the 0700 directory it cannot even reach the socket. */
	pid = fork();
	if (pid == 0) {
		aeg_job_t *job;

		if (setresgid(pw->pw_gid, pw->pw_gid, pw->pw_gid) || setresuid(pw->pw_uid, pw->pw_uid, pw->pw_uid))
			child_exit(30);
		child_exit(aeg_job_connect(&job) == AEG_EACCES ? 0 : 32);
	}
	assert_int_equal(run_status(pid), 0);
}

/*
 * Another user reaches none of the agent's memory: not the pool's or a
 * slab's memfd through /proc/<agent>/fd or map_files, and not through a
 * real or forged handle. The test's agent runs as root, the other user is
 * nobody: the same kernel check stands between two job users.
 */
static void other_uid_cannot_open_agent_memory(void **state)
{
	struct passwd *pw = getpwnam("nobody");
	struct aeg_job_record rec;
	char path[64], link[256];
	int memfd[32], n = 0;
	struct dirent *e;
	aeg_device_t *dev;
	void *ptr;
	DIR *d;
	pid_t pid;

	if (geteuid() != 0 || pw == NULL) {
		print_message("skipped: needs root and a 'nobody' user to act as another uid\n");
		skip();
	}
	snprintf(path, sizeof(path), "/proc/%d/fd", (int)agent);
	assert_non_null(d = opendir(path));
	while ((e = readdir(d)) != NULL && n < 32) {
		char fdpath[320];
		ssize_t len;

		if (e->d_name[0] == '.')
			continue;
		snprintf(fdpath, sizeof(fdpath), "%s/%s", path, e->d_name);
		len = readlink(fdpath, link, sizeof(link) - 1);
		if (len > 0 && (link[len] = '\0', strncmp(link, "/memfd:", 7) == 0))
			memfd[n++] = atoi(e->d_name);
	}
	closedir(d);
	assert_true(n >= 2);            /* the slab's and the pool's at least */

	/* The record's handle is good: the agent's user opens it. */
	assert_int_equal(aeg_job_record_read(ready, &rec), 0);
	assert_int_equal(aeg_device_open(&dev, AEG_DEVICE_HOST), 0);
	assert_int_equal(aeg_mem_open_handle(dev, 0, &rec.slabs[0].handle, &ptr), 0);
	assert_int_equal(aeg_mem_close_handle(dev, ptr), 0);
	aeg_device_close(dev);

	pid = fork();
	if (pid == 0) {
		unsigned char *h = rec.slabs[0].handle.bytes;
		uint32_t owner, uid = (uint32_t)pw->pw_uid;
		int rc = 0;

		if (setgroups(0, NULL) || setresgid(pw->pw_gid, pw->pw_gid, pw->pw_gid) ||
		    setresuid(pw->pw_uid, pw->pw_uid, pw->pw_uid))
			_exit(30);
		for (int i = 0; i < n; i++) {
			char fdpath[64];
			int fd;

			snprintf(fdpath, sizeof(fdpath), "/proc/%d/fd/%d", (int)agent, memfd[i]);
			fd = open(fdpath, O_RDWR);
			if (fd >= 0 || errno != EACCES) {
				fprintf(stderr, "open %s as uid %u: %s\n", fdpath, uid, fd >= 0 ? "opened" : strerror(errno));
				rc = 31;
			}
			fd = open(fdpath, O_RDONLY);
			if (fd >= 0 || errno != EACCES) {
				fprintf(stderr, "open %s read-only as uid %u: %s\n", fdpath, uid,
					fd >= 0 ? "opened" : strerror(errno));
				rc = 32;
			}
		}
		snprintf(path, sizeof(path), "/proc/%d/map_files", (int)agent);
		d = opendir(path);
		if (d != NULL || (errno != EACCES && errno != EPERM)) {
			fprintf(stderr, "opendir %s as uid %u: %s\n", path, uid, d ? "opened" : strerror(errno));
			rc = 33;
		}
		snprintf(path, sizeof(path), "/proc/%d/mem", (int)agent);
		if (open(path, O_RDONLY) >= 0) {
			fprintf(stderr, "open %s as uid %u worked\n", path, uid);
			rc = 34;
		}
		if (aeg_device_open(&dev, AEG_DEVICE_HOST))
			_exit(35);
		/* As it is: it names its owner's uid. */
		if (aeg_mem_open_handle(dev, 0, &rec.slabs[0].handle, &ptr) != AEG_EBADF ||
		    strstr(aeg_error_detail(), "belongs to uid 0; only processes of the same user") == NULL) {
			fprintf(stderr, "real handle as uid %u: %s\n", uid, aeg_error_detail());
			rc = 36;
		}
		/* Forged to name this uid: the kernel still refuses the agent's descriptor. */
		memcpy(&owner, h + 8, sizeof(owner));
		if (owner != (uint32_t)agent)
			_exit(37);              /* the handle's layout changed: fix this test */
		memcpy(h + 12, &uid, sizeof(uid));
		if (aeg_mem_open_handle(dev, 0, &rec.slabs[0].handle, &ptr) != AEG_EBADF ||
		    strstr(aeg_error_detail(), "is not this user's") == NULL ||
		    strstr(aeg_error_detail(), "Permission denied") == NULL) {
			fprintf(stderr, "forged handle as uid %u: %s\n", uid, aeg_error_detail());
			rc = 38;
		}
		aeg_device_close(dev);
		_exit(rc);
	}
	assert_int_equal(run_status(pid), 0);
}

/* One request on a raw connection (after its hello): the reply's type and error code. */
static int raw_call(int fd, uint16_t type, union proto_msg *msg, unsigned char *frame)
{
	struct proto_header h;
	static uint64_t id = 100;

	assert_int_equal(proto_send(fd, type, 0, ++id, msg, -1, frame), 0);
	assert_int_equal(proto_recv(fd, &h, msg, NULL, frame), 0);
	assert_int_equal(h.id, id);
	return h.type == PROTO_ERROR ? msg->error.code : 0;
}

/*
 * Sizes from a client are the agent's to refuse, whatever the library
 * would have checked: frames that ask for more than the job's slab, or for
 * chunk tables past the agent's bound.
 */
static void protocol_sizes_over_caps(void **state)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	unsigned char *frame = malloc(PROTO_MAX_FRAME);
	union proto_msg *msg = malloc(sizeof(*msg));
	static const struct {
		uint64_t bytes;
		uint32_t slab;
		int err;
		const char *detail;
	} leases[] = {
		{ (64 << 20) + 1, 0, AEG_ENOSPC, "lease on GPU 0" },
		{ 1ull << 40, 0, AEG_ENOSPC, "lease on GPU 0" },
		{ UINT64_MAX, 0, AEG_ENOSPC, "lease on GPU 0" },
		{ UINT64_MAX - 255, 0, AEG_ENOSPC, "lease on GPU 0" },
		{ 4096, 1, AEG_ENODEV, "lease: slab 1, the job has 1" },
		{ 4096, AEG_JOB_MAX_GPUS - 1, AEG_ENODEV, "the job has 1" },
	};
	static const struct {
		uint64_t chunk;
		int err;
		const char *detail;
	} prefetches[] = {
		{ UINT64_MAX, AEG_EINVAL, "" },
		{ (64 << 20) + 1, AEG_EINVAL, "" },
		{ 1, AEG_EINVAL, "use larger chunks" },
		{ 1 << 20, AEG_ENOSPC, "" },            /* 96 MiB into a 64 MiB slab */
	};
	char big[160];
	struct aeg_job_status *st;
	int fd, f;

	snprintf(big, sizeof(big), "%s/big.bin", dir);
	f = open(big, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	assert_true(f >= 0);
	assert_int_equal(ftruncate(f, 96 << 20), 0);        /* sparse */
	close(f);

	strcpy(sa.sun_path, sock);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	assert_int_equal(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
	memset(msg, 0, sizeof(*msg));
	msg->hello_req.min_version = msg->hello_req.max_version = PROTO_VERSION;
	msg->hello_req.pid = (uint32_t)getpid();
	strcpy(msg->hello_req.client, "raw");
	assert_int_equal(raw_call(fd, PROTO_HELLO, msg, frame), 0);

	for (size_t i = 0; i < AEG_ARRAY_SIZE(leases); i++) {
		memset(msg, 0, sizeof(*msg));
		msg->lease_req.slab = leases[i].slab;
		msg->lease_req.bytes = leases[i].bytes;
		if (raw_call(fd, PROTO_LEASE, msg, frame) != leases[i].err ||
		    strstr(msg->error.detail, leases[i].detail) == NULL)
			fail_msg("lease %zu (%" PRIu64 " bytes of slab %u): %s", i, leases[i].bytes, leases[i].slab,
				 msg->error.detail);
	}
	for (size_t i = 0; i < AEG_ARRAY_SIZE(prefetches); i++) {
		memset(msg, 0, sizeof(*msg));
		msg->prefetch_req.chunk_bytes = prefetches[i].chunk;
		strcpy(msg->prefetch_req.path, big);
		if (raw_call(fd, PROTO_PREFETCH, msg, frame) != prefetches[i].err ||
		    strstr(msg->error.detail, prefetches[i].detail) == NULL)
			fail_msg("prefetch %zu (chunks of %" PRIu64 "): %s", i, prefetches[i].chunk, msg->error.detail);
	}
	close(fd);
	free(frame);
	free(msg);
	unlink(big);

	/* Nothing was taken, and the agent serves on. */
	st = status_now();
	assert_int_equal(st->slab[0].stats.used_bytes, 0);
	assert_int_equal(st->slab[0].leases, 0);
	assert_int_equal(st->loads, 0);
	aeg_job_status_free(st);
}

static void sigterm_cleans_up(void **state)
{
	assert_int_equal(kill(agent, SIGTERM), 0);
	assert_int_equal(run_status(agent), 0);
	agent = -1;
	assert_int_equal(access(sock, F_OK), -1);
	assert_int_equal(access(ready, F_OK), -1);
	assert_int_equal(access(pidfile, F_OK), -1);
	assert_int_equal(access(dir, F_OK), 0);        /* the directory is the plugin's */
}

static void error_records(void **state)
{
	static const char *const huge[] = { "--gpus", "0,1", "--slab", "1000TiB", NULL };
	static const char *const pct[] = { "--gpus", "0", "--slab", "1000%", NULL };
	static const char *const bad_gpus[] = { "--gpus", "0,0", "--slab", "1GiB", NULL };
	char reason[AEG_JOB_ERROR_MAX], conf[160];
	const char *const all[] = { "--gpus", "0", "--slab", "100%", "--config", conf, NULL };
	FILE *f;
	pid_t pid;

	setenv("AEGAEON_HOST_GPUS", "2", 1);
	pid = spawn(huge);
	assert_int_equal(run_status(pid), 1);
	assert_int_equal(aeg_job_error_read(errfile, reason, sizeof(reason)), 0);
	if (strstr(reason, "GPU 0: slab of 1000 TiB asked is over this site's limit") == NULL)
		fail_msg("error record: '%s'", reason);
	/* Within a site cap of all the memory, still more than is free. */
	snprintf(conf, sizeof(conf), "%s/site.conf", dir);
	f = fopen(conf, "w");
	assert_non_null(f);
	fputs("slab_max = \"100%\";\n", f);
	fclose(f);
	pid = spawn(all);
	assert_int_equal(run_status(pid), 1);
	assert_int_equal(aeg_job_error_read(errfile, reason, sizeof(reason)), 0);
	if (strstr(reason, "GPU 0: slab of") == NULL || strstr(reason, "free") == NULL)
		fail_msg("error record: '%s'", reason);
	unlink(conf);
	assert_int_equal(access(ready, F_OK), -1);
	assert_int_equal(access(pidfile, F_OK), -1);
	assert_int_equal(access(sock, F_OK), -1);

	pid = spawn(pct);
	assert_int_equal(run_status(pid), 2);
	assert_int_equal(aeg_job_error_read(errfile, reason, sizeof(reason)), 0);
	if (strstr(reason, "--slab") == NULL || strstr(reason, "1000%") == NULL)
		fail_msg("error record: '%s'", reason);

	pid = spawn(bad_gpus);
	assert_int_equal(run_status(pid), 2);
	assert_int_equal(aeg_job_error_read(errfile, reason, sizeof(reason)), 0);
	assert_non_null(strstr(reason, "listed twice"));
	setenv("AEGAEON_HOST_GPUS", "1", 1);
}

/*
 * The site's caps hold in the agent too: a slab in bytes against a cap in
 * percent (or the reverse) is only comparable once the GPU's size is known,
 * so srun and the prolog let it through and the agent refuses it.
 */
static void site_caps_in_agent(void **state)
{
	static const struct {
		const char *conf, *slab, *pinned;
		const char *reason;
	} cases[] = {
		{ "slab_max = \"32MiB\";\nslab_default = \"16MiB\";\n", "64MiB", "0",
		  "GPU 0: slab of 64 MiB asked is over this site's limit of 32 MiB per GPU (slab_max)" },
		{ "slab_max = \"1GiB\";\nslab_default = \"16MiB\";\n", "100%", "0",
		  "over this site's limit of 1 GiB per GPU (slab_max)" },
		{ "slab_max = \"1%\";\nslab_default = \"1MiB\";\n", "100%", "0", "(slab_max = 1% of the GPU's " },
		{ "pinned_max = \"4MiB\";\npinned_default = \"4MiB\";\npinned_buffer = \"1MiB\";\n", "16MiB",
		  "8MiB:1MiB", "pinned pool of 8 MiB asked is over this site's limit of 4 MiB (pinned_max)" },
	};
	char conf[160], reason[AEG_JOB_ERROR_MAX];

	snprintf(conf, sizeof(conf), "%s/site.conf", dir);
	for (size_t i = 0; i < AEG_ARRAY_SIZE(cases); i++) {
		const char *const argv[] = { "--gpus", "0", "--slab", cases[i].slab, "--pinned", cases[i].pinned,
					     "--config", conf, NULL };
		FILE *f = fopen(conf, "w");

		assert_non_null(f);
		fputs(cases[i].conf, f);
		fclose(f);
		assert_int_equal(run_status(spawn(argv)), 1);
		assert_int_equal(aeg_job_error_read(errfile, reason, sizeof(reason)), 0);
		if (strstr(reason, cases[i].reason) == NULL)
			fail_msg("case %zu: error record '%s', expected '%s'", i, reason, cases[i].reason);
		assert_int_equal(access(ready, F_OK), -1);
	}
	/* Within the caps it starts. */
	{
		const char *const argv[] = { "--gpus", "0", "--slab", "16MiB", "--pinned", "4MiB:1MiB", "--config",
					     conf, NULL };
		pid_t pid;

		unlink(errfile);        /* the last case's, which wait_start would take for this one's */
		pid = spawn(argv);

		assert_int_equal(wait_start(), 1);
		assert_int_equal(kill(pid, SIGTERM), 0);
		assert_int_equal(run_status(pid), 0);
	}
	unlink(conf);
}

/*
 * --pinned and --prefetch follow the rules of --aegaeon-pinned and
 * --aegaeon-prefetch, which the plugin forwards: a bad value is a usage
 * error with its reason in the error record, before anything is made.
 */
static void options_by_the_job_rules(void **state)
{
	static const struct {
		const char *opt, *value, *reason;
	} cases[] = {
		{ "--pinned", "8MiB:1000", "buffer size must be a non-zero multiple of 4 KiB" },
		{ "--pinned", "8MiB:16MiB", "buffer size 16 MiB is larger than the pool" },
		{ "--pinned", "50%", "cannot be a percentage" },
		{ "--pinned", "0:1MiB", "a pool of 0 bytes (no pool) takes no buffer size" },
		{ "--prefetch", "model.safetensors", "'model.safetensors' is not an absolute path" },
		{ "--prefetch", "/a.bin,,/b.bin", "empty file name in the list" },
	};
	char reason[AEG_JOB_ERROR_MAX];

	for (size_t i = 0; i < AEG_ARRAY_SIZE(cases); i++) {
		const char *const argv[] = { "--gpus", "0", "--slab", "16MiB", cases[i].opt, cases[i].value, NULL };

		unlink(errfile);
		assert_int_equal(run_status(spawn(argv)), 2);
		assert_int_equal(aeg_job_error_read(errfile, reason, sizeof(reason)), 0);
		if (strstr(reason, cases[i].opt) != reason || strstr(reason, cases[i].reason) == NULL)
			fail_msg("%s %s: error record '%s', expected '%s'", cases[i].opt, cases[i].value, reason,
				 cases[i].reason);
		assert_int_equal(access(ready, F_OK), -1);
	}
}

/* aegaeond run as @argv (argv[0] as given, the program AEGAEOND_PATH): its exit status, its stderr into @out. */
static int run_usage(const char *const *argv, char *out, size_t size)
{
	int pipefd[2], status;
	ssize_t n, got = 0;
	pid_t pid;

	assert_int_equal(pipe(pipefd), 0);
	pid = fork();
	assert_true(pid >= 0);
	if (pid == 0) {
		dup2(pipefd[1], STDERR_FILENO);
		dup2(pipefd[1], STDOUT_FILENO);
		execv(AEGAEOND_PATH, (char *const *)argv);
		child_exit(127);
	}
	close(pipefd[1]);
	while (got < (ssize_t)size - 1 && (n = read(pipefd[0], out + got, size - 1 - (size_t)got)) > 0)
		got += n;
	out[got] = '\0';
	close(pipefd[0]);
	assert_int_equal(waitpid(pid, &status, 0), pid);
	return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

/*
 * Usage errors name the option as given: a short option by its letter
 * (argv gave "option '--'" for "-x", and read past "a" for "-xy" run as
 * "a"), a long one by its name. A --runtime-dir that the agent would not
 * run in (not a 0700 directory of its uid) gets no error record either.
 */
static void usage_and_version(void **state)
{
	static const struct {
		const char *argv[6];
		const char *message;
	} cases[] = {
		{ { "aegaeond", "-x" }, "aegaeond: unknown option '-x' (aegaeond has long options only)\n" },
		{ { "a", "-xy" }, "aegaeond: unknown option '-x' (aegaeond has long options only)\n" },
		{ { "a", "--foreground", "-jy" }, "aegaeond: unknown option '-j' (aegaeond has long options only)\n" },
		{ { "aegaeond", "--frobnicate" }, "aegaeond: unknown option '--frobnicate'\n" },
		{ { "aegaeond", "--frobnicate=1" }, "aegaeond: unknown option '--frobnicate'\n" },
		{ { "aegaeond", "--job" }, "aegaeond: option '--job' needs a value\n" },
		{ { "aegaeond", "--foreground=yes" }, "aegaeond: option '--foreground' takes no value\n" },
	};
	static const char *const help[] = { "--help", NULL };
	char out[8192], open_dir[64], errpath[96];
	const char *argv[] = { "aegaeond", "--job", "42", "--runtime-dir", open_dir, "-x", NULL };

	assert_int_equal(run_status(spawn(help)), 0);
	for (size_t i = 0; i < AEG_ARRAY_SIZE(cases); i++) {
		assert_int_equal(run_usage(cases[i].argv, out, sizeof(out)), 2);
		if (strncmp(out, cases[i].message, strlen(cases[i].message)) != 0)
			fail_msg("case %zu: said '%.200s', expected '%s'", i, out, cases[i].message);
	}
	/* Bad options with a runtime directory of mode 0755: no record written into it. */
	strcpy(open_dir, "/tmp/aeg-agent-open-XXXXXX");
	assert_non_null(mkdtemp(open_dir));
	assert_int_equal(chmod(open_dir, 0755), 0);
	snprintf(errpath, sizeof(errpath), "%s/error", open_dir);
	assert_int_equal(run_usage(argv, out, sizeof(out)), 2);
	assert_int_equal(access(errpath, F_OK), -1);
	if (strstr(out, "no error record written") == NULL || strstr(out, "mode 0755") == NULL)
		fail_msg("said '%s'", out);
	/* The same directory made 0700: the record is written. */
	assert_int_equal(chmod(open_dir, 0700), 0);
	assert_int_equal(run_usage(argv, out, sizeof(out)), 2);
	assert_int_equal(access(errpath, F_OK), 0);
	assert_int_equal(unlink(errpath), 0);
	assert_int_equal(rmdir(open_dir), 0);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(ready_record),
		cmocka_unit_test(not_in_a_job),
		cmocka_unit_test(two_processes_share_slab_and_pool),
		cmocka_unit_test(leases_in_this_process),
		cmocka_unit_test(prefetch_chunks_release),
		cmocka_unit_test(wait_chunks_through_agent),
		cmocka_unit_test(malformed_clients),
		cmocka_unit_test(other_uid_refused),
		cmocka_unit_test(other_uid_cannot_open_agent_memory),
		cmocka_unit_test(protocol_sizes_over_caps),
		cmocka_unit_test(sigterm_cleans_up),
		cmocka_unit_test(error_records),
		cmocka_unit_test(site_caps_in_agent),
		cmocka_unit_test(options_by_the_job_rules),
		cmocka_unit_test(usage_and_version),
	};
	return cmocka_run_group_tests_name("agent", tests, setup, teardown);
}
