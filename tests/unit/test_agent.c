/* The agent end to end on the host backend: aegaeond as a child, clients in other processes. */
#include <errno.h>
#include <fcntl.h>
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
#include <aegaeon/job.h>

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

	st = status_now();
	assert_int_equal(st->slabs, 1);
	assert_int_equal(st->slab[0].leases, 1);
	assert_int_equal(st->slab[0].lease_bytes, 1 << 20);
	assert_true(st->has_pool);
	assert_int_equal(st->pool.in_use, 1);
	assert_int_equal(st->clients, 2);       /* the writer and this status */
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
	assert_int_equal(aeg_job_release(job, 0, ids, load->count, &released), 0);
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

/* Take every buffer of the job's pool: the agent's pread feed then cannot move a byte. */
static uint32_t hog_pool(aeg_pool_t *pool, uint32_t *bufs, uint32_t cap)
{
	struct aeg_pool_buffer b;
	uint32_t n = 0;

	while (n < cap && aeg_pool_acquire(pool, 0, &b) == 0)
		bufs[n++] = b.index;
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
	aeg_device_t *dev;
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
	usleep(50000);
	assert_int_equal(aeg_job_release_all(job, &released), 0);
	assert_true(released >= 2);
	for (uint32_t i = 0; i < load2->count; i++) {
		assert_int_equal(pthread_join(w[i].thread, NULL), 0);
		assert_int_equal(w[i].result, AEG_ECANCELED);
	}
	/* Released: the agent no longer knows the handle. */
	assert_int_equal(aeg_agent_wait_event(sock, &load2->chunks[0].event, 100), AEG_ENOENT);
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

/* Raw frames from a plain socket: each is refused, the connection closed, the agent serves on. */
static void malformed_clients(void **state)
{
	static const struct {
		const char *name;
		uint32_t magic;
		uint16_t version, type;
		uint32_t length;
		size_t send;            /* bytes of header+payload actually sent */
	} cases[] = {
		{ "bad magic", 0x12345678, 1, PROTO_HELLO, 0, 24 },
		{ "wrong version", PROTO_MAGIC, 1, PROTO_STATUS, 0, 24 },      /* no hello first */
		{ "unknown type", PROTO_MAGIC, 1, 77, 0, 24 },
		{ "oversize", PROTO_MAGIC, 1, PROTO_HELLO, 1u << 30, 24 },
		{ "truncated", PROTO_MAGIC, 1, PROTO_HELLO, 100, 40 },
		{ "empty hello", PROTO_MAGIC, 1, PROTO_HELLO, 0, 24 },
		{ "half header", PROTO_MAGIC, 1, PROTO_HELLO, 0, 10 },
		{ "version 9 hello", PROTO_MAGIC, 9, PROTO_HELLO, 0, 24 },
	};
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	unsigned char buf[256];

	strcpy(sa.sun_path, sock);
	for (size_t i = 0; i < AEG_ARRAY_SIZE(cases); i++) {
		struct proto_header h = { cases[i].magic, cases[i].version, cases[i].type, 0,
					  cases[i].length, 7 };
		int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		ssize_t got, total = 0;

		assert_int_equal(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
		memset(buf, 0xee, sizeof(buf));
		proto_header_encode(&h, buf);
		assert_int_equal(send(fd, buf, cases[i].send, MSG_NOSIGNAL), (ssize_t)cases[i].send);
		shutdown(fd, SHUT_WR);
		/* The agent closes its end (after an error frame, when it could parse enough). */
		while ((got = read(fd, buf, sizeof(buf))) > 0)
			total += got;
		if (got < 0)
			fail_msg("case %s: read: %s", cases[i].name, strerror(errno));
		close(fd);
		(void)total;
	}
	/* Still serving. */
	struct aeg_job_status *st = status_now();
	assert_int_equal(st->slabs, 1);
	aeg_job_status_free(st);
	assert_int_equal(kill(agent, 0), 0);
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
	char reason[AEG_JOB_ERROR_MAX];
	pid_t pid;

	setenv("AEGAEON_HOST_GPUS", "2", 1);
	pid = spawn(huge);
	assert_int_equal(run_status(pid), 1);
	assert_int_equal(aeg_job_error_read(errfile, reason, sizeof(reason)), 0);
	if (strstr(reason, "GPU 0: slab of 1000 TiB asked") == NULL || strstr(reason, "free") == NULL)
		fail_msg("error record: '%s'", reason);
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

static void usage_and_version(void **state)
{
	static const char *const help[] = { "--help", NULL };
	static const char *const unknown[] = { "--frobnicate", NULL };
	pid_t pid;

	pid = spawn(help);
	assert_int_equal(run_status(pid), 0);
	pid = spawn(unknown);
	assert_int_equal(run_status(pid), 2);
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
		cmocka_unit_test(sigterm_cleans_up),
		cmocka_unit_test(error_records),
		cmocka_unit_test(usage_and_version),
	};
	return cmocka_run_group_tests_name("agent", tests, setup, teardown);
}
