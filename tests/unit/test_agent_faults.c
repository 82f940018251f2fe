/* Faults around the agent on the host backend: agents, steps and peers killed, stalled or late. */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
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
#include <time.h>
#include <unistd.h>
#include <cmocka.h>
#include <dlfcn.h>

#include <aegaeon/aegaeon.h>
#include <aegaeon/attach.h>
#include <aegaeon/jobrec.h>
#include <aegaeon/kv.h>

#include "internal.h"
#include "proto.h"
#include "testutil.h"
#include "agentutil.h"

struct waiter {
	aeg_device_t *dev;
	aeg_handle_t handle;
	int timeout_ms;
	int result;
	double took_ms;
	char detail[256];
	pthread_t thread;
};

static void *waiter_main(void *arg)
{
	struct waiter *w = arg;
	double t0 = now_ms();

	w->result = aeg_event_wait_handle(w->dev, &w->handle, w->timeout_ms);
	w->took_ms = now_ms() - t0;
	snprintf(w->detail, sizeof(w->detail), "%s", aeg_error_detail());
	return NULL;
}

static void waiter_start(struct waiter *w, aeg_device_t *dev, const aeg_handle_t *h, int timeout_ms)
{
	*w = (struct waiter){ .dev = dev, .handle = *h, .timeout_ms = timeout_ms };
	assert_int_equal(pthread_create(&w->thread, NULL, waiter_main, w), 0);
}

/* ---------------------------------------------------------------- tests */

/*
 * The process that owns an armed event dies before recording it: a waiter
 * on its handle (no agent in between) must not wait forever.
 */
static void event_owner_killed(void **state)
{
	int pipefd[2], fds;
	aeg_device_t *dev;
	aeg_handle_t h;
	struct waiter w;
	pid_t owner;

	unsetenv("AEGAEON_SOCKET");
	assert_int_equal(aeg_device_open(&dev, AEG_DEVICE_HOST), 0);
	fds = count_fds();
	assert_int_equal(pipe(pipefd), 0);
	owner = fork();
	if (owner == 0) {
		aeg_device_t *d;
		aeg_event_t *ev;

		if (aeg_device_open(&d, AEG_DEVICE_HOST) || aeg_event_create(d, 0, &ev, &h) || aeg_event_arm(ev))
			_exit(1);
		if (write(pipefd[1], &h, sizeof(h)) != sizeof(h))
			_exit(2);
		pause();
		_exit(0);
	}
	assert_int_equal(read(pipefd[0], &h, sizeof(h)), sizeof(h));
	waiter_start(&w, dev, &h, 20000);
	usleep(200000);
	assert_int_equal(kill(owner, SIGKILL), 0);
	assert_int_equal(waitpid(owner, NULL, 0), owner);
	assert_int_equal(pthread_join(w.thread, NULL), 0);
	if (w.result != AEG_EBADF || w.took_ms > 200 + BOUND_MS)
		fail_msg("wait after the owner died: %s after %.0f ms: %s", aeg_errname(w.result), w.took_ms, w.detail);
	assert_non_null(strstr(w.detail, "exited before the event completed"));
	close(pipefd[0]);
	close(pipefd[1]);
	assert_int_equal(aeg_event_close_handle(dev, &h), 0);
	assert_int_equal(count_fds(), fds);
	aeg_device_close(dev);
}

/*
 * SIGKILL to the agent while a load is in flight (the pool held, so its
 * chunks cannot move) and threads wait on its chunks through the agent:
 * every wait returns AEG_EIO naming the agent, later calls too, the
 * client detaches cleanly, and an agent started on the same directory
 * serves a fresh job.
 */
static void agent_killed_mid_prefetch(void **state)
{
	static const char *const opts[] = { "--slab", "256MiB", "--pinned", "8MiB:1MiB", NULL };
	struct agent ag = { .pid = -1 };
	struct aeg_job_load *load;
	struct aeg_job_status *st;
	struct waiter w[4];
	char path[128];
	uint32_t bufs[16], held;
	aeg_slab_t *lease;
	aeg_job_t *job;
	int fds = count_fds(), err;

	agent_start(&ag, opts);
	snprintf(path, sizeof(path), "%s.model", ag.dir);
	write_file(path, 32 << 20);
	assert_int_equal(aeg_job_attach(&job), 0);
	assert_int_equal(aeg_job_slab(job, 0, 1 << 20, &lease), 0);
	held = hog_pool(aeg_job_pool(job), bufs, 16);
	assert_int_equal(held, 8);
	assert_int_equal(aeg_job_prefetch(job, path, 0, 1 << 20, &load), 0);
	assert_int_equal(load->count, 32);
	assert_int_equal(load->status, AEG_EBUSY);
	for (int i = 0; i < 4; i++)
		waiter_start(&w[i], aeg_job_device(job), &load->chunks[i * 8].event, -1);
	usleep(200000);

	agent_kill(&ag, SIGKILL);
	for (int i = 0; i < 4; i++) {
		assert_int_equal(pthread_join(w[i].thread, NULL), 0);
		if (w[i].result != AEG_EIO || strstr(w[i].detail, "closed the connection") == NULL)
			fail_msg("waiter %d: %s: %s", i, aeg_errname(w[i].result), w[i].detail);
		assert_true(w[i].took_ms < 200 + BOUND_MS);
	}
	/* Later calls: the connection is gone, and so is the socket's listener. */
	err = aeg_job_status(job, &st);
	assert_int_equal(err, AEG_EIO);
	assert_non_null(strstr(aeg_error_detail(), ag.sock));
	assert_int_equal(aeg_event_wait_handle(aeg_job_device(job), &load->chunks[31].event, -1), AEG_EIO);
	assert_non_null(strstr(aeg_error_detail(), "not running"));
	/* What is mapped here stays usable until detach. */
	for (uint32_t i = 0; i < held; i++)
		assert_int_equal(aeg_pool_release(aeg_job_pool(job), bufs[i]), 0);
	aeg_job_load_free(load);
	aeg_job_detach(job);
	assert_int_equal(count_fds(), fds);

	/* The dead agent's socket, pid file and ready record are still there. */
	assert_int_equal(access(ag.sock, F_OK), 0);
	agent_start(&ag, opts);
	assert_int_equal(aeg_job_attach(&job), 0);
	st = status_of(job);
	assert_int_equal(st->loads, 0);
	assert_int_equal(st->slab[0].leases, 0);
	assert_int_equal(st->slab[0].stats.used_bytes, 0);
	assert_int_equal(st->pool.in_use, 0);
	aeg_job_status_free(st);
	assert_int_equal(aeg_job_prefetch(job, path, 0, 1 << 20, &load), 0);
	for (uint32_t i = 0; i < load->count; i++)
		assert_int_equal(aeg_event_wait_handle(aeg_job_device(job), &load->chunks[i].event, 20000), 0);
	aeg_job_load_free(load);
	aeg_job_detach(job);
	unlink(path);
	agent_cleanup(&ag);
	assert_int_equal(count_fds(), fds);
}

/*
 * The same with the load running free (a file big enough that it is still
 * loading when the agent dies) and one waiter walking its chunks in order:
 * it sees every chunk it reaches complete, or an error, never a hang.
 */
static void agent_killed_mid_load(void **state)
{
	static const char *const opts[] = { "--slab", "512MiB", "--pinned", "8MiB:1MiB", NULL };
	struct agent ag = { .pid = -1 };
	struct aeg_job_load *load;
	char path[128];
	aeg_job_t *job;
	uint32_t done = 0;
	double t0;
	int fds = count_fds(), err = 0;

	agent_start(&ag, opts);
	snprintf(path, sizeof(path), "%s.model", ag.dir);
	write_file(path, 256 << 20);
	assert_int_equal(aeg_job_attach(&job), 0);
	assert_int_equal(aeg_job_prefetch(job, path, 0, 1 << 20, &load), 0);
	assert_int_equal(load->count, 256);
	assert_int_equal(aeg_event_wait_handle(aeg_job_device(job), &load->chunks[0].event, 20000), 0);
	kill(ag.pid, SIGKILL);
	t0 = now_ms();
	for (; done < load->count; done++) {
		err = aeg_event_wait_handle(aeg_job_device(job), &load->chunks[done].event, -1);
		if (err)
			break;
	}
	assert_true(now_ms() - t0 < BOUND_MS);
	print_message("agent killed after chunk 0: %u of %u chunks seen complete, then %s: %s\n", done,
		      load->count, err ? aeg_errname(err) : "none", err ? aeg_error_detail() : "");
	if (err != 0 && err != AEG_EIO && err != AEG_EBADF)
		fail_msg("chunk %u: %s: %s", done, aeg_errname(err), aeg_error_detail());
	assert_int_equal(waitpid(ag.pid, NULL, 0), ag.pid);
	ag.pid = -1;
	assert_int_equal(aeg_job_status(job, &(struct aeg_job_status *){ NULL }), AEG_EIO);
	aeg_job_load_free(load);
	aeg_job_detach(job);
	unlink(path);
	agent_cleanup(&ag);
	assert_int_equal(count_fds(), fds);
}

/*
 * A step swapping KV blocks between its lease of the job slab and the job's
 * pool when the agent is killed: its swaps are its own memory and go on;
 * its next agent call is AEG_EIO; it shuts down cleanly.
 */
static int kv_step(int ready_fd, int go_fd)
{
	struct aeg_kv_params p = { .block_bytes = 64 << 10, .host_buffers = 2 };
	uint32_t gids[16], hids[16];
	struct aeg_kv_stats ks;
	aeg_stream_t *stream;
	aeg_slab_t *lease;
	aeg_handle_t h;
	aeg_job_t *job;
	aeg_kv_t *kv;
	char c;
	int err;

	if (aeg_job_attach(&job) || aeg_job_slab(job, 0, 4 << 20, &lease))
		return 10;
	p.slab = lease;
	p.gpu_blocks = 32;
	p.pool = aeg_job_pool(job);
	if (aeg_kv_create(aeg_job_device(job), 0, &p, &kv) ||
	    aeg_stream_create(aeg_job_device(job), 0, &stream) ||
	    aeg_kv_gpu_alloc(kv, 16, gids) || aeg_kv_host_alloc(kv, 16, hids))
		return 11;
	/* Swap until told the agent is dead, then five rounds more. */
	for (int round = 0, left = -1; left != 0; round++) {
		struct pollfd pf = { .fd = go_fd, .events = POLLIN };

		for (int i = 0; i < 16; i++)
			memset(aeg_kv_gpu_ptr(kv, gids[i]), round + i, 64 << 10);
		if (aeg_kv_swap_out(kv, gids, hids, 16, stream, &h) ||
		    aeg_event_wait_handle(aeg_job_device(job), &h, 10000) || aeg_kv_release(kv, &h))
			return 12;
		for (int i = 0; i < 16; i++)
			if (((unsigned char *)aeg_kv_host_ptr(kv, hids[i]))[4096] != (unsigned char)(round + i))
				return 13;
		if (aeg_kv_swap_in(kv, hids, gids, 16, stream, &h) ||
		    aeg_event_wait_handle(aeg_job_device(job), &h, 10000) || aeg_kv_release(kv, &h))
			return 14;
		if (round == 3 && write(ready_fd, "r", 1) != 1)
			return 15;
		if (left > 0)
			left--;
		else if (left < 0 && poll(&pf, 1, 0) == 1 && read(go_fd, &c, 1) == 1)
			left = 5;
	}
	err = aeg_job_status(job, &(struct aeg_job_status *){ NULL });
	if (err != AEG_EIO || strstr(aeg_error_detail(), "closed the connection") == NULL)
		return 16;
	if (aeg_kv_stats(kv, &ks) || ks.events_live != 0)
		return 17;
	aeg_stream_destroy(stream);
	aeg_kv_destroy(kv);
	aeg_job_detach(job);
	return 0;
}

/*
 * The machine's topology (hwloc's discovery, tens of milliseconds) is not
 * on the path to ready, which every step of the job waits for: the agent
 * writes its ready record, then finds the topology for its engines, then
 * makes the pool placed by it (the log's order, at debug level). On a
 * machine of one NUMA node it finds none: there nothing needs binding.
 */
static void topology_after_ready(void **state)
{
	static const char *const opts[] = { "--slab", "64MiB", "--pinned", "8MiB:1MiB", NULL };
	struct agent ag = { .pid = -1 };
	int sole = machine_sole_node();
	char text[65536];
	const char *ready, *topo, *pool;

	setenv("AEGAEON_LOG", "debug", 1);
	agent_start(&ag, opts);         /* --pinned: returns once the pool is made */
	unsetenv("AEGAEON_LOG");
	log_read(&ag, 0, text, sizeof(text));
	ready = strstr(text, "ready record");
	topo = strstr(text, sole >= 0 ? "one NUMA node" : "topology of ");
	pool = strstr(text, "pinned pool ready");
	if (!ready || !topo || !pool || (sole >= 0 && strstr(text, "topology of ")))
		print_message("the agent's log:\n%s\n", text);
	assert_non_null(ready);
	assert_non_null(topo);
	assert_non_null(pool);
	assert_true(ready < topo);
	assert_true(topo < pool);
	if (sole >= 0)
		assert_null(strstr(text, "topology of "));
	agent_kill(&ag, SIGTERM);
	agent_cleanup(&ag);
}

/*
 * Without a job pool each engine makes its own staging ring, neither before
 * the ready record (it took a third of the agent's start on the H200) nor
 * for a job that loads nothing through its agent: once its first load has
 * started, which goes on meanwhile.
 */
static void ring_at_first_load(void **state)
{
	static const char *const opts[] = { "--slab", "64MiB", NULL };
	struct agent ag = { .pid = -1 };
	struct aeg_job_load *load;
	struct aeg_job_status *st;
	char path[128], text[65536];
	const char *begun, *ring;
	int done = 0;
	aeg_job_t *job;

	setenv("AEGAEON_LOG", "debug", 1);
	agent_start(&ag, opts);
	unsetenv("AEGAEON_LOG");
	for (int i = 0; i < BOUND_MS / 10 && !log_has(&ag, "topology after ready"); i++)
		usleep(10000);
	assert_true(log_has(&ag, "topology after ready"));
	assert_false(log_has(&ag, "staging ring"));

	snprintf(path, sizeof(path), "%s.model", ag.dir);
	write_file(path, 32 << 20);
	assert_int_equal(aeg_job_attach(&job), 0);
	assert_int_equal(aeg_job_prefetch(job, path, 0, 1 << 20, &load), 0);
	for (int i = 0; i < BOUND_MS / 10 && !(done && log_has(&ag, "staging ring")); i++) {
		st = status_of(job);
		done = st->loads == 1 && st->load[0].status == 0;
		aeg_job_status_free(st);
		usleep(10000);
	}
	assert_true(done);
	log_read(&ag, 0, text, sizeof(text));
	begun = strstr(text, "load 1: ");
	ring = strstr(text, "staging ring ready");
	if (!begun || !ring)
		print_message("the agent's log:\n%s\n", text);
	assert_non_null(begun);
	assert_non_null(ring);
	assert_true(begun < ring);
	aeg_job_load_free(load);
	aeg_job_detach(job);
	unlink(path);
	agent_kill(&ag, SIGTERM);
	agent_cleanup(&ag);
}

static void agent_killed_mid_kv_swap(void **state)
{
	static const char *const opts[] = { "--slab", "64MiB", "--pinned", "8MiB:1MiB", NULL };
	struct agent ag = { .pid = -1 };
	int ready[2], go[2];
	pid_t step;
	char c;

	agent_start(&ag, opts);
	assert_int_equal(pipe(ready), 0);
	assert_int_equal(pipe(go), 0);
	step = fork();
	if (step == 0)
		_exit(kv_step(ready[1], go[0]));
	assert_int_equal(read(ready[0], &c, 1), 1);
	agent_kill(&ag, SIGKILL);
	assert_int_equal(write(go[1], "g", 1), 1);
	assert_int_equal(exit_status(step, 2 * BOUND_MS), 0);
	close(ready[0]);
	close(ready[1]);
	close(go[0]);
	close(go[1]);
	agent_cleanup(&ag);
}

/*
 * A step SIGKILLed while it holds slab leases and pool buffers (its own
 * and its KV cache's) and waits on a chunk through the agent: the agent
 * takes the leases back at once and the buffers once the process is gone,
 * which lets the load it starved finish; another client goes on unharmed.
 */
static int greedy_step(int ready_fd)
{
	struct aeg_kv_params p = { .block_bytes = 64 << 10, .host_buffers = 2 };
	uint32_t bufs[16];
	aeg_slab_t *a, *b;
	aeg_job_t *job;
	aeg_kv_t *kv;
	struct aeg_job_load *load;
	char path[160];

	snprintf(path, sizeof(path), "%s", getenv("FAULT_MODEL"));
	if (aeg_job_attach(&job) || aeg_job_slab(job, 0, 8 << 20, &a) || aeg_job_slab(job, 0, 4 << 20, &b))
		return 20;
	p.slab = a;
	p.gpu_blocks = 8;
	p.pool = aeg_job_pool(job);
	if (aeg_kv_create(aeg_job_device(job), 0, &p, &kv))
		return 21;
	hog_pool(aeg_job_pool(job), bufs, 16);
	if (aeg_job_prefetch(job, path, 0, 1 << 20, &load))
		return 22;
	if (write(ready_fd, "r", 1) != 1)
		return 23;
	aeg_event_wait_handle(aeg_job_device(job), &load->chunks[0].event, -1);
	return 24;
}

static void step_killed_with_leases(void **state)
{
	static const char *const opts[] = { "--slab", "64MiB", "--pinned", "8MiB:1MiB", NULL };
	struct agent ag = { .pid = -1 };
	struct aeg_job_status *st;
	struct aeg_pool_buffer mine;
	struct aeg_job_load *load;
	char path[128];
	aeg_slab_t *lease;
	aeg_job_t *job;
	int ready[2], fds_before, fds = count_fds(), ok = 0;
	pid_t step;
	char c;

	agent_start(&ag, opts);
	snprintf(path, sizeof(path), "%s.model", ag.dir);
	write_file(path, 4 << 20);
	setenv("FAULT_MODEL", path, 1);
	/* The other client: a lease and a pool buffer of its own. */
	assert_int_equal(aeg_job_attach(&job), 0);
	assert_int_equal(aeg_job_slab(job, 0, 2 << 20, &lease), 0);
	assert_int_equal(aeg_pool_acquire(aeg_job_pool(job), 0, &mine), 0);
	fds_before = agent_fds(ag.pid);

	assert_int_equal(pipe(ready), 0);
	step = fork();
	if (step == 0)
		_exit(greedy_step(ready[1]));
	assert_int_equal(read(ready[0], &c, 1), 1);
	usleep(100000);
	st = status_of(job);
	assert_int_equal(st->slab[0].leases, 3);
	assert_int_equal(st->pool.in_use, 8);
	assert_int_equal(st->clients, 3);       /* this one, the step's, its chunk wait */
	assert_int_equal(st->loads, 1);
	assert_int_equal(st->load[0].status, AEG_EBUSY);
	aeg_job_status_free(st);

	assert_int_equal(kill(step, SIGKILL), 0);
	assert_int_equal(waitpid(step, NULL, 0), step);
	for (int i = 0; i < BOUND_MS / 10 && !ok; i++) {
		st = status_of(job);
		ok = st->slab[0].leases == 1 && st->slab[0].lease_bytes == 2 << 20 && st->pool.in_use == 1 &&
		     st->clients == 1 && st->loads == 1 && st->load[0].status == 0;
		if (!ok && i == BOUND_MS / 10 - 1)
			fail_msg("after the step's kill: %u leases (%llu bytes), %u buffers in use, %u clients, load %d",
				 st->slab[0].leases, (unsigned long long)st->slab[0].lease_bytes, st->pool.in_use,
				 st->clients, st->loads ? st->load[0].status : 1);
		aeg_job_status_free(st);
		if (!ok)
			usleep(10000);
	}
	assert_true(log_has(&ag, "exited holding 7 pinned pool buffers; back in the pool"));
	/* This client's lease, buffer and the finished load are all still good. */
	assert_int_equal(aeg_job_chunks(job, 0, path, 0, &load), 0);
	assert_int_equal(load->status, 0);
	aeg_job_load_free(load);
	/* Without the load's chunk events, the agent holds what it held before the step came. */
	assert_int_equal(aeg_job_release_all(job, NULL), 0);
	assert_int_equal(agent_fds_settle(ag.pid, fds_before), fds_before);
	assert_int_equal(aeg_pool_release(aeg_job_pool(job), mine.index), 0);
	assert_int_equal(aeg_job_slab_return(job, lease), 0);
	aeg_job_detach(job);
	close(ready[0]);
	close(ready[1]);
	unlink(path);
	unsetenv("FAULT_MODEL");
	agent_cleanup(&ag);
	assert_int_equal(count_fds(), fds);
}

/*
 * Peers that stall: one sends half a header and stops, one connects and
 * says nothing, one floods requests and never reads a reply. Meanwhile a
 * normal client is served within the bound; the half-header one is dropped
 * after the frame timeout, the silent one after the hello timeout (both
 * 10 s); closing the flooder gives its descriptor back;
 * SIGTERM with a peer stuck unread stops the agent at once.
 */
static void stalled_peers(void **state)
{
	static const char *const opts[] = { "--slab", "64MiB", "--pinned", "8MiB:1MiB", NULL };
	struct agent ag = { .pid = -1 };
	unsigned char frame[PROTO_MAX_FRAME], hdr[PROTO_HEADER_BYTES];
	struct proto_header h = { PROTO_MAGIC, 1, PROTO_HELLO, 0, 0, 1 };
	union proto_msg msg;
	size_t len;
	int half, silent, flood, base, sent = 0;
	double t0, dropped_ms = -1;
	struct aeg_job_load *load;
	char path[128], c;
	aeg_job_t *job;

	agent_start(&ag, opts);
	base = agent_fds_idle(ag.pid);
	snprintf(path, sizeof(path), "%s.model", ag.dir);
	write_file(path, 4 << 20);

	half = connect_raw(ag.sock);
	h.length = 40;
	proto_header_encode(&h, hdr);
	assert_int_equal(send(half, hdr, 10, MSG_NOSIGNAL), 10);
	t0 = now_ms();
	silent = connect_raw(ag.sock);

	/* The flooder says hello properly, then asks for status without ever reading. */
	flood = connect_raw(ag.sock);
	memset(&msg, 0, sizeof(msg));
	msg.hello_req.min_version = msg.hello_req.max_version = 1;
	msg.hello_req.pid = (uint32_t)getpid();
	strcpy(msg.hello_req.client, "flooder");
	assert_int_equal(proto_encode(PROTO_HELLO, 0, 1, &msg, frame, &len), 0);
	assert_int_equal(send(flood, frame, len, MSG_NOSIGNAL), (ssize_t)len);
	memset(&msg, 0, sizeof(msg));
	assert_int_equal(proto_encode(PROTO_STATUS, 0, 2, &msg, frame, &len), 0);
	assert_int_equal(fcntl(flood, F_SETFL, O_NONBLOCK), 0);
	while (send(flood, frame, len, MSG_NOSIGNAL) == (ssize_t)len)
		sent++;
	assert_true(sent > 4);

	/* A normal client meanwhile: every call well within the bound. */
	for (int round = 0; round < 3; round++) {
		double t = now_ms();

		assert_int_equal(aeg_job_attach(&job), 0);
		assert_int_equal(aeg_job_prefetch(job, path, 0, 1 << 20, &load), 0);
		for (uint32_t i = 0; i < load->count; i++)
			assert_int_equal(aeg_event_wait_handle(aeg_job_device(job), &load->chunks[i].event, BOUND_MS), 0);
		assert_int_equal(aeg_job_release_all(job, NULL), 0);
		aeg_job_load_free(load);
		aeg_job_detach(job);
		if (now_ms() - t > BOUND_MS)
			fail_msg("round %d with stalled peers took %.0f ms", round, now_ms() - t);
	}

	/* The half header is dropped after the frame timeout, the silent peer after the hello timeout. */
	for (int i = 0; i < (PROTO_FRAME_TIMEOUT_MS + BOUND_MS) / 10; i++) {
		struct pollfd p = { .fd = half, .events = POLLIN };

		if (poll(&p, 1, 10) == 1) {
			dropped_ms = now_ms() - t0;
			break;
		}
	}
	if (dropped_ms < PROTO_FRAME_TIMEOUT_MS - 100)
		fail_msg("half header: dropped after %.0f ms (frame timeout %d ms)", dropped_ms, PROTO_FRAME_TIMEOUT_MS);
	assert_int_equal(read(half, &c, 1), 0);
	assert_true(log_has(&ag, "frame incomplete after"));
	assert_true(log_has(&ag, "(10 of 24 bytes)"));
	close(half);
	{
		struct pollfd p = { .fd = silent, .events = POLLIN };
		assert_int_equal(poll(&p, 1, BOUND_MS), 1);
	}
	assert_true(log_has(&ag, "no hello in 10000 ms (hello_timeout); disconnecting"));
	close(silent);
	/* The flooder's thread is blocked sending it replies; it stays until the agent stops. */
	assert_int_equal(agent_fds_settle(ag.pid, base + 1), base + 1);
	t0 = now_ms();
	assert_int_equal(kill(ag.pid, SIGTERM), 0);
	assert_int_equal(exit_status(ag.pid, BOUND_MS), 0);
	ag.pid = -1;
	print_message("stalled peers: half header dropped after %.0f ms; %d unread status requests; "
		      "SIGTERM with the flooder stuck: exit in %.0f ms\n", dropped_ms, sent, now_ms() - t0);
	close(flood);
	assert_int_equal(access(ag.sock, F_OK), -1);
	unlink(path);
	agent_cleanup(&ag);
}

/*
 * A stale runtime directory of an agent that crashed: its socket, pid file
 * and ready record are replaced. A live agent's directory is refused with
 * its files left alone; a non-socket under the socket's name is refused.
 */
static void stale_runtime_dir(void **state)
{
	static const char *const opts[] = { "--slab", "16MiB", NULL };
	struct agent ag = { .pid = -1 }, second = { .pid = -1 };
	struct aeg_job_record rec;
	char link[160], target[160], log[4096];
	const char *argv[] = { AEGAEOND_PATH, "--job", "77", "--runtime-dir", NULL, "--device", "host",
			       "--foreground", "--gpus", "0", "--slab", "16MiB", NULL };
	int out[2];
	pid_t pid;
	ssize_t n;

	agent_start(&ag, opts);
	/* A second agent on the live one's directory. */
	argv[4] = ag.dir;
	assert_int_equal(pipe(out), 0);
	pid = fork();
	if (pid == 0) {
		dup2(out[1], STDERR_FILENO);
		execv(argv[0], (char *const *)argv);
		_exit(127);
	}
	close(out[1]);
	assert_int_equal(exit_status(pid, BOUND_MS), 1);
	n = read(out[0], log, sizeof(log) - 1);
	close(out[0]);
	assert_true(n > 0);
	log[n] = '\0';
	if (strstr(log, "another agent serves") == NULL)
		fail_msg("second agent said: %s", log);
	assert_int_equal(aeg_job_record_read(ag.ready, &rec), 0);
	assert_int_equal(rec.pid, ag.pid);
	assert_int_equal(kill(ag.pid, 0), 0);
	{
		aeg_job_t *job;
		assert_int_equal(aeg_job_connect(&job), 0);
		aeg_job_detach(job);
	}

	/* Crash it: everything stays behind; a new agent takes the place over. */
	agent_kill(&ag, SIGKILL);
	assert_int_equal(access(ag.sock, F_OK), 0);
	assert_int_equal(access(ag.ready, F_OK), 0);
	agent_start(&ag, opts);
	assert_int_equal(aeg_job_record_read(ag.ready, &rec), 0);
	assert_int_equal(rec.pid, ag.pid);
	agent_kill(&ag, SIGKILL);

	/* A link where the socket was: refused, and its target left alone. */
	snprintf(target, sizeof(target), "%s.target", ag.dir);
	write_file(target, 65536);
	snprintf(link, sizeof(link), "%s/agent.sock", ag.dir);
	assert_int_equal(unlink(link), 0);
	assert_int_equal(symlink(target, link), 0);
	second = ag;
	second.pid = fork();
	if (second.pid == 0) {
		execv(argv[0], (char *const *)argv);
		_exit(127);
	}
	assert_int_equal(exit_status(second.pid, BOUND_MS), 1);
	{
		char reason[AEG_JOB_ERROR_MAX], errpath[160];
		struct stat st;

		snprintf(errpath, sizeof(errpath), "%s/error", ag.dir);
		assert_int_equal(aeg_job_error_read(errpath, reason, sizeof(reason)), 0);
		if (strstr(reason, "exists and is not a socket") == NULL)
			fail_msg("error record: %s", reason);
		assert_int_equal(lstat(link, &st), 0);
		assert_true(S_ISLNK(st.st_mode));
		assert_int_equal(stat(target, &st), 0);
		assert_int_equal(st.st_size, 65536);
	}
	unlink(target);
	agent_cleanup(&ag);
}

/*
 * Eight steps attached and busy when the agent gets SIGTERM, and a ninth
 * that connects just then (while the agent is stopped, so its connection
 * waits in the listen queue): the ninth gets AEG_EIO at once, the eight
 * get AEG_EIO, the agent exits 0 and leaves no file of its own behind.
 */
static int busy_step(int ready_fd)
{
	struct aeg_pool_buffer b;
	aeg_slab_t *lease;
	aeg_job_t *job;
	int err;

	if (aeg_job_attach(&job) || aeg_job_slab(job, 0, 1 << 20, &lease) ||
	    aeg_pool_acquire(aeg_job_pool(job), 1000, &b))
		return 30;
	if (write(ready_fd, "r", 1) != 1)
		return 31;
	for (;;) {
		struct aeg_job_status *st;

		err = aeg_job_status(job, &st);
		if (err)
			break;
		aeg_job_status_free(st);
		usleep(1000);
	}
	if (err != AEG_EIO)
		return 32;
	aeg_pool_release(aeg_job_pool(job), b.index);
	aeg_job_detach(job);
	return 0;
}

static int late_step(int ready_fd)
{
	aeg_job_t *job = NULL;
	int err;

	if (write(ready_fd, "r", 1) != 1)
		return 40;
	err = aeg_job_attach(&job);
	if (err == 0) {
		aeg_job_detach(job);
		return 41;
	}
	if (err != AEG_EIO || strstr(aeg_error_detail(), "agent") == NULL)
		return 42;
	return 0;
}

static void nine_steps_at_shutdown(void **state)
{
	static const char *const opts[] = { "--slab", "64MiB", "--pinned", "16MiB:1MiB", NULL };
	struct agent ag = { .pid = -1 };
	pid_t steps[9];
	int ready[2], st, fds = count_fds();
	double t0;
	char c, cmd[160];

	agent_start(&ag, opts);
	assert_int_equal(pipe(ready), 0);
	for (int i = 0; i < 8; i++) {
		steps[i] = fork();
		if (steps[i] == 0)
			_exit(busy_step(ready[1]));
	}
	for (int i = 0; i < 8; i++)
		assert_int_equal(read(ready[0], &c, 1), 1);
	assert_int_equal(kill(ag.pid, SIGSTOP), 0);
	/* kill() returns before the stop takes: the agent could still accept the 9th step. */
	assert_int_equal(waitpid(ag.pid, &st, WUNTRACED), ag.pid);
	assert_true(WIFSTOPPED(st));
	steps[8] = fork();
	if (steps[8] == 0)
		_exit(late_step(ready[1]));
	assert_int_equal(read(ready[0], &c, 1), 1);
	/*
	 * Its connect is most likely queued by then, its hello unread. Either
	 * way the step must fail with the agent named: refused from the queue
	 * as the agent stops, or finding no socket after it.
	 */
	usleep(200000);
	assert_int_equal(kill(ag.pid, SIGTERM), 0);
	t0 = now_ms();
	assert_int_equal(kill(ag.pid, SIGCONT), 0);
	assert_int_equal(exit_status(ag.pid, BOUND_MS), 0);
	ag.pid = -1;
	print_message("SIGTERM with 8 steps attached and a 9th queued: agent exited in %.0f ms\n", now_ms() - t0);
	for (int i = 0; i < 9; i++) {
		int rc = exit_status(steps[i], BOUND_MS);

		if (rc != 0)
			fail_msg("step %d ended with %d", i, rc);
	}
	/* Nothing of the agent's is left in its directory. */
	snprintf(cmd, sizeof(cmd), "test -z \"$(ls -A %s)\"", ag.dir);
	assert_int_equal(system(cmd), 0);
	close(ready[0]);
	close(ready[1]);
	agent_cleanup(&ag);
	assert_int_equal(count_fds(), fds);
}

/* Pool buffers in use, as the agent counts them. */
static uint32_t pool_in_use(aeg_job_t *job)
{
	struct aeg_job_status *st = status_of(job);
	uint32_t n = st->pool.in_use;

	aeg_job_status_free(st);
	return n;
}

/* Wait (within the bound) for the pool to have @want buffers in use: 1 when it came to that. */
static int pool_in_use_becomes(aeg_job_t *job, uint32_t want)
{
	for (int i = 0; i < BOUND_MS / 10; i++) {
		if (pool_in_use(job) == want)
			return 1;
		usleep(10000);
	}
	return 0;
}

/* A step holding two pool buffers: attached (@stay_attached) or detached again, alive until killed. */
static int holding_step(int ready_fd, int stay_attached)
{
	struct aeg_pool_buffer b;
	aeg_job_t *job;

	if (aeg_job_attach(&job) || aeg_pool_acquire(aeg_job_pool(job), 1000, &b) ||
	    aeg_pool_acquire(aeg_job_pool(job), 1000, &b))
		return 50;
	if (!stay_attached)
		aeg_job_detach(job);    /* the buffers stay marked with its pid */
	if (write(ready_fd, "r", 1) != 1)
		return 51;
	for (;;)
		pause();
}

static pid_t start_holding_step(int stay_attached)
{
	int ready[2];
	pid_t pid;
	char c;

	assert_int_equal(pipe(ready), 0);
	pid = fork();
	assert_true(pid >= 0);
	if (pid == 0)
		child_exit(holding_step(ready[1], stay_attached));
	close(ready[1]);
	assert_int_equal(read(ready[0], &c, 1), 1);
	close(ready[0]);
	return pid;
}

/*
 * The agent watches a process whose connection closed for its exit, to put
 * back the pool buffers it held, in a table of 64. A process that
 * reconnects many times a second (a monitor polling status) filled it with
 * an entry per connection, and a step killed meanwhile kept its buffers for
 * good. Now a process has one entry, which its reconnects renew, so the
 * churn does not push out the watch of a step that detached and is killed
 * later; and a full table makes way for a newly closed connection: with 70
 * other live processes watched, a step killed holding buffers gets them
 * back.
 */
static void exits_watched_under_churn(void **state)
{
	enum { CHURN = 80, OTHERS = 70 };
	static const char *const opts[] = { "--slab", "16MiB", "--pinned", "8MiB:1MiB", NULL };
	struct agent ag = { .pid = -1 };
	pid_t others[OTHERS], step;
	int connected[2], hold[2], fds = count_fds();
	aeg_job_t *job;
	char c;

	agent_start(&ag, opts);
	assert_int_equal(aeg_job_connect(&job), 0);

	/* A step that detached still holding 2 buffers, then a process reconnecting 80 times. */
	step = start_holding_step(0);
	for (int i = 0; i < CHURN; i++) {
		aeg_job_t *j;

		assert_int_equal(aeg_job_connect(&j), 0);
		aeg_job_detach(j);
	}
	assert_int_equal(pool_in_use(job), 2);
	assert_int_equal(kill(step, SIGKILL), 0);
	assert_int_equal(waitpid(step, NULL, 0), step);
	if (!pool_in_use_becomes(job, 0))
		fail_msg("a detached step killed after %d reconnects of another process: %u buffers still in use",
			 CHURN, pool_in_use(job));

	/* 70 live processes that connected once each, then a step killed holding 2 buffers. */
	assert_int_equal(pipe(connected), 0);
	assert_int_equal(pipe(hold), 0);
	for (int i = 0; i < OTHERS; i++) {
		others[i] = fork();
		assert_true(others[i] >= 0);
		if (others[i] == 0) {
			aeg_job_t *j;

			close(hold[1]);
			if (aeg_job_connect(&j))
				child_exit(60);
			aeg_job_detach(j);
			if (write(connected[1], "c", 1) != 1)
				child_exit(61);
			/* Alive until the test closes its end. */
			child_exit(read(hold[0], &c, 1) == 0 ? 0 : 62);
		}
	}
	for (int i = 0; i < OTHERS; i++)
		assert_int_equal(read(connected[0], &c, 1), 1);
	step = start_holding_step(1);
	assert_int_equal(pool_in_use(job), 2);
	assert_int_equal(kill(step, SIGKILL), 0);
	assert_int_equal(waitpid(step, NULL, 0), step);
	if (!pool_in_use_becomes(job, 0))
		fail_msg("a step killed with %d other live processes watched: %u buffers still in use", OTHERS,
			 pool_in_use(job));
	assert_true(log_has(&ag, "exited holding 2 pinned pool buffers; back in the pool"));
	close(hold[1]);
	for (int i = 0; i < OTHERS; i++)
		assert_int_equal(exit_status(others[i], BOUND_MS), 0);
	close(hold[0]);
	close(connected[0]);
	close(connected[1]);
	aeg_job_detach(job);
	agent_cleanup(&ag);
	assert_int_equal(count_fds(), fds);
}

/*
 * The library waits 120 s for a reply; this test makes that 1.5 s (any
 * poll of 100 s or more), only while short_replies is set.
 */
static int short_replies;

int poll(struct pollfd *fds, nfds_t n, int timeout)
{
	static int (*real)(struct pollfd *, nfds_t, int);

	if (real == NULL)
		real = (int (*)(struct pollfd *, nfds_t, int))dlsym(RTLD_NEXT, "poll");
	if (__atomic_load_n(&short_replies, __ATOMIC_RELAXED) && timeout >= 100000)
		timeout = 1500;
	return real(fds, n, timeout);
}

/*
 * A request the agent does not answer in time (stopped here): its reply
 * comes late, and was read as the answer to the next request, and so on for
 * ever ("answered a status request (id 3) with status (id 2)"). Now the job
 * handle is out of step after the timeout, and each later request says so
 * and what to do (detach and attach again), whatever the agent sends; a new
 * handle works.
 */
static void reply_lost_then_out_of_step(void **state)
{
	static const char *const opts[] = { "--slab", "16MiB", NULL };
	struct agent ag = { .pid = -1 };
	struct aeg_job_status *st;
	aeg_job_t *job;
	char timeout[512];
	int err, status, fds = count_fds();

	agent_start(&ag, opts);
	assert_int_equal(aeg_job_connect(&job), 0);
	aeg_job_status_free(status_of(job));
	__atomic_store_n(&short_replies, 1, __ATOMIC_RELAXED);
	assert_int_equal(kill(ag.pid, SIGSTOP), 0);
	assert_int_equal(waitpid(ag.pid, &status, WUNTRACED), ag.pid);
	err = aeg_job_status(job, &st);
	__atomic_store_n(&short_replies, 0, __ATOMIC_RELAXED);
	assert_int_equal(err, AEG_ETIMEDOUT);
	snprintf(timeout, sizeof(timeout), "%s", aeg_error_detail());
	assert_int_equal(kill(ag.pid, SIGCONT), 0);
	usleep(300000);         /* the late reply is there by now */
	for (int i = 0; i < 3; i++) {
		err = aeg_job_status(job, &st);
		if (err == 0)
			aeg_job_status_free(st);
		if (err != AEG_EIO || strstr(aeg_error_detail(), "out of step") == NULL ||
		    strstr(aeg_error_detail(), "detach it and attach again") == NULL)
			fail_msg("status after the timeout: %s: %s", err ? aeg_errname(err) : "ok",
				 err ? aeg_error_detail() : "");
	}
	/* The timeout itself said so already. */
	if (strstr(timeout, "did not answer a status request") == NULL ||
	    strstr(timeout, "detach it and attach again") == NULL)
		fail_msg("timeout: %s", timeout);
	aeg_job_detach(job);
	assert_int_equal(aeg_job_connect(&job), 0);
	aeg_job_status_free(status_of(job));
	aeg_job_detach(job);
	agent_cleanup(&ag);
	assert_int_equal(count_fds(), fds);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_teardown(event_owner_killed, kill_started),
		cmocka_unit_test_teardown(agent_killed_mid_prefetch, kill_started),
		cmocka_unit_test_teardown(agent_killed_mid_load, kill_started),
		cmocka_unit_test_teardown(agent_killed_mid_kv_swap, kill_started),
		cmocka_unit_test_teardown(topology_after_ready, kill_started),
		cmocka_unit_test_teardown(ring_at_first_load, kill_started),
		cmocka_unit_test_teardown(step_killed_with_leases, kill_started),
		cmocka_unit_test_teardown(stalled_peers, kill_started),
		cmocka_unit_test_teardown(stale_runtime_dir, kill_started),
		cmocka_unit_test_teardown(nine_steps_at_shutdown, kill_started),
		cmocka_unit_test_teardown(exits_watched_under_churn, kill_started),
		cmocka_unit_test_teardown(reply_lost_then_out_of_step, kill_started),
	};

	setenv("AEGAEON_HOST_GPUS", "1", 1);
	unsetenv("AEGAEON_SLABS");
	return cmocka_run_group_tests_name("agent_faults", tests, NULL, NULL);
}
