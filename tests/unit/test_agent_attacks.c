/*
 * What a step of the job, or any process of the job user, can do against the
 * agent (host backend, no Slurm): write into the pinned pool's shared header,
 * stop in the middle of pool operations, make loads without end, hold
 * connections without a word. The agent must stay up and responsive.
 */
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
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>

#include <aegaeon/aegaeon.h>
#include <aegaeon/attach.h>
#include <aegaeon/jobrec.h>

#include "internal.h"
#include "pinned_internal.h"
#include "proto.h"
#include "testutil.h"
#include "agentutil.h"

/* 8 buffers of 1 MiB: a file under 64 MiB loads through them (the read feed). */
static const char *const pool_opts[] = { "--slab", "64MiB", "--pinned", "8MiB:1MiB", NULL };

/* Load @path (4 MiB of write_file's pattern) through the agent and compare every chunk with the file. */
static void load_and_check(aeg_job_t *job, const char *path)
{
	struct aeg_job_load *load;
	unsigned char *want;
	FILE *f = fopen(path, "r");
	struct stat st;

	assert_non_null(f);
	assert_int_equal(fstat(fileno(f), &st), 0);
	want = malloc((size_t)st.st_size);
	assert_non_null(want);
	assert_int_equal(fread(want, 1, (size_t)st.st_size, f), (size_t)st.st_size);
	fclose(f);
	assert_int_equal(aeg_job_prefetch(job, path, 0, 1 << 20, &load), 0);
	for (uint32_t i = 0; i < load->count; i++) {
		const struct aeg_job_chunk *c = &load->chunks[i];
		int err = aeg_event_wait_handle(aeg_job_device(job), &c->event, BOUND_MS);

		if (err)
			fail_msg("chunk %u of %s: %s: %s", i, path, aeg_errname(err), aeg_error_detail());
		if (memcmp(c->ptr, want + c->file_offset, c->size) != 0)
			fail_msg("chunk %u of %s differs from the file", i, path);
	}
	assert_int_equal(aeg_job_release_all(job, NULL), 0);
	aeg_job_load_free(load);
	free(want);
}

/* Status answers within the bound; the pool's counts stay within its 8 buffers. */
static void responsive(aeg_job_t *job, const char *when)
{
	struct aeg_job_status *st;
	double t0 = now_ms();
	int err = aeg_job_status(job, &st);

	if (err || now_ms() - t0 > BOUND_MS)
		fail_msg("%s: status %s after %.0f ms: %s", when, aeg_errname(err), now_ms() - t0,
			 err ? aeg_error_detail() : "");
	assert_int_equal(st->pool.buffers, 8);
	assert_int_equal(st->pool.buffer_bytes, 1 << 20);
	assert_true(st->pool.in_use <= 8);
	aeg_job_status_free(st);
}

/* SIGTERM stops the agent at once, whatever its pool holds: exit 0, socket gone. */
static void stops_cleanly(struct agent *ag)
{
	double t0 = now_ms();

	assert_int_equal(kill(ag->pid, SIGTERM), 0);
	assert_int_equal(exit_status(ag->pid, BOUND_MS), 0);
	ag->pid = -1;
	print_message("SIGTERM: agent exited 0 in %.0f ms\n", now_ms() - t0);
	assert_int_equal(access(ag->sock, F_OK), -1);
}

/* The agent with its 8 buffers, and a 4 MiB file beside its directory, @path[128]. */
static void start_with_model(struct agent *ag, char *path)
{
	agent_start(ag, pool_opts);
	snprintf(path, 128, "%s.model", ag->dir);
	write_file(path, 4 << 20);
}

typedef int (*step_fn)(aeg_job_t *job, aeg_pool_t *pool);

/* @fn in a step of its own: a child attached to the job, which exits with what @fn returns. */
static pid_t start_step(step_fn fn)
{
	pid_t pid = fork();

	assert_true(pid >= 0);
	if (pid == 0) {
		aeg_job_t *job;

		if (aeg_job_attach(&job) || aeg_job_pool(job) == NULL)
			child_exit(100);
		child_exit(fn(job, aeg_job_pool(job)));
	}
	return pid;
}

/* The same, waited for: its exit status. */
static int run_step(step_fn fn)
{
	return exit_status(start_step(fn), BOUND_MS);
}

static int forge_geometry(aeg_job_t *job, aeg_pool_t *pool)
{
	struct aeg_pool_header *h = aeg_pool_header(pool);
	struct aeg_pool_buffer b;

	if (aeg_pool_acquire(pool, 0, &b) || aeg_pool_acquire(pool, 0, &b))
		return 1;
	h->buffers = 0x7fffffff;
	h->buffer_bytes = 1ull << 40;
	h->pool_bytes = 1ull << 62;
	h->header_bytes = 4096;
	return 0;       /* exits holding two buffers, without detaching */
}

/*
 * Attack 1: a step sets the header's buffer count to 0x7fffffff and exits
 * holding buffers. The agent, putting them back, walked 0x7fffffff owner
 * marks (SEGV). Now it keeps the geometry to itself: the buffers come back,
 * later steps attach (with the agent's geometry), loads go through.
 */
static void forged_geometry_then_exit(void **state)
{
	struct agent ag = { .pid = -1 };
	struct aeg_job_status *st;
	char path[128];
	aeg_job_t *job;
	int ok = 0;

	start_with_model(&ag, path);
	assert_int_equal(run_step(forge_geometry), 0);
	assert_int_equal(aeg_job_attach(&job), 0);
	for (int i = 0; i < BOUND_MS / 10 && !ok; i++) {
		st = status_of(job);
		ok = st->pool.in_use == 0;
		aeg_job_status_free(st);
		if (!ok)
			usleep(10000);
	}
	assert_true(ok);
	assert_true(log_has(&ag, "exited holding 2 pinned pool buffers; back in the pool"));
	responsive(job, "after the forged geometry");
	load_and_check(job, path);
	aeg_job_detach(job);
	stops_cleanly(&ag);
	unlink(path);
	agent_cleanup(&ag);
}

static uint32_t forged_top;

static int push_forged(aeg_job_t *job, aeg_pool_t *pool)
{
	struct aeg_pool_header *h = aeg_pool_header(pool);

	__atomic_store_n(&h->head, (h->head & ~(uint64_t)UINT32_MAX) | forged_top, __ATOMIC_SEQ_CST);
	return 0;
}

/*
 * Attacks 2 and 3: a step puts a buffer index out of range on top of the
 * free list: 0x7ffffff0 (the agent's next read-feed load wrote out of
 * bounds: SEGV), and 8, one past the last buffer (the agent read file bytes
 * into whatever is mapped after the pool, here the job's slab, over a lease
 * of another step). Now the index is refused and logged, the list rebuilt
 * from the owner marks, and the load's bytes and the lease are intact.
 */
static void forged_index(uint32_t index)
{
	struct agent ag = { .pid = -1 };
	char path[128], what[64];
	aeg_slab_t *lease;
	struct aeg_block blk;
	unsigned char *p;
	aeg_job_t *job;

	start_with_model(&ag, path);
	assert_int_equal(aeg_job_attach(&job), 0);
	/* A lease over the whole slab's free space, filled with a mark. */
	assert_int_equal(aeg_job_slab(job, 0, 32 << 20, &lease), 0);
	assert_int_equal(aeg_slab_alloc(lease, 32 << 20, &blk), 0);
	p = blk.ptr;
	memset(p, 0x5a, 32 << 20);
	forged_top = index + 1;
	assert_int_equal(run_step(push_forged), 0);
	load_and_check(job, path);
	for (size_t i = 0; i < 32 << 20; i++)
		if (p[i] != 0x5a)
			fail_msg("lease byte %zu was overwritten (0x%02x)", i, p[i]);
	snprintf(what, sizeof(what), "its free list starts at buffer %u, and it has 8", index);
	assert_true(log_has(&ag, what));
	assert_true(log_has(&ag, "rebuilt its free list from the owner marks"));
	responsive(job, "after the forged index");
	assert_int_equal(aeg_slab_free(lease, blk.id), 0);
	assert_int_equal(aeg_job_slab_return(job, lease), 0);
	aeg_job_detach(job);
	stops_cleanly(&ag);
	unlink(path);
	agent_cleanup(&ag);
}

static void forged_index_far(void **state)
{
	forged_index(0x7ffffff0u);
}

static void forged_index_near(void **state)
{
	forged_index(8);
}

static int churn(aeg_job_t *job, aeg_pool_t *pool)
{
	struct aeg_pool_buffer b[2];

	for (;;) {
		if (aeg_pool_acquire(pool, -1, &b[0]) || aeg_pool_acquire(pool, -1, &b[1]))
			return 1;
		if (aeg_pool_release(pool, b[1].index) || aeg_pool_release(pool, b[0].index))
			return 2;
	}
}

/*
 * Attack 4: a step stopped in the middle of its pool operations (SIGSTOP,
 * a debugger). With the header's robust mutex, a step stopped holding it
 * hung status, every new connection and the agent's loads, and SIGTERM,
 * until it died. Now there is no lock: stopped 20 times at different
 * moments, the agent answers status, takes new steps and loads files
 * through the pool each time, and stops at once on SIGTERM with the step
 * still stopped.
 */
static void step_stopped_in_pool(void **state)
{
	struct agent ag = { .pid = -1 };
	char path[128];
	aeg_job_t *job;
	pid_t step;
	int status;

	start_with_model(&ag, path);
	step = start_step(churn);
	for (int round = 0; round < 20; round++) {
		double t0;

		usleep(2000 + (useconds_t)round * 300);
		assert_int_equal(kill(step, SIGSTOP), 0);
		assert_int_equal(waitpid(step, &status, WUNTRACED), step);
		t0 = now_ms();
		assert_int_equal(aeg_job_attach(&job), 0);
		responsive(job, "a step stopped in the pool");
		load_and_check(job, path);
		aeg_job_detach(job);
		if (now_ms() - t0 > BOUND_MS)
			fail_msg("round %d: %.0f ms with the step stopped", round, now_ms() - t0);
		if (round < 19)
			assert_int_equal(kill(step, SIGCONT), 0);
	}
	stops_cleanly(&ag);
	kill(step, SIGKILL);
	assert_int_equal(waitpid(step, NULL, 0), step);
	unlink(path);
	agent_cleanup(&ag);
}

static int scribble_and_stop(aeg_job_t *job, aeg_pool_t *pool)
{
	struct aeg_pool_header *h = aeg_pool_header(pool);

	/* Every byte after the geometry, links and owner marks too. */
	memset(&h->waiters, 0xff, 4096 - offsetof(struct aeg_pool_header, waiters));
	raise(SIGSTOP);
	return 0;
}

/*
 * A step writes all ones over the header (links, owner marks, counts) and
 * stops. The pool is lost to the job (every buffer marked held), but the
 * agent logs the broken list, answers status, takes new steps, serves a
 * load that needs no pool buffer (an empty file) and reports the one that
 * waits for buffers as loading, and stops at once on SIGTERM.
 */
static void header_scribbled(void **state)
{
	struct agent ag = { .pid = -1 };
	struct aeg_job_load *load, *empty;
	struct aeg_job_status *st = NULL;
	char path[128], none[128];
	aeg_job_t *job;
	pid_t step;
	int status;

	start_with_model(&ag, path);
	snprintf(none, sizeof(none), "%s.empty", ag.dir);
	write_file(none, 0);
	step = start_step(scribble_and_stop);
	assert_int_equal(waitpid(step, &status, WUNTRACED), step);
	assert_true(WIFSTOPPED(status));
	assert_int_equal(aeg_job_attach(&job), 0);
	assert_int_equal(aeg_job_prefetch(job, path, 0, 1 << 20, &load), 0);
	assert_int_equal(aeg_job_prefetch(job, none, 0, 1 << 20, &empty), 0);
	assert_int_equal(empty->count, 0);
	for (int i = 0; i < BOUND_MS / 10; i++) {
		st = status_of(job);
		if (st->loads == 2 && st->load[1].status == 0 && log_has(&ag, "rebuilt its free list"))
			break;
		aeg_job_status_free(st);
		st = NULL;
		usleep(10000);
	}
	if (st == NULL)
		fail_msg("no rebuild logged, or the empty file not loaded, in %d ms", BOUND_MS);
	assert_int_equal(st->load[0].status, AEG_EBUSY);
	assert_int_equal(st->pool.in_use, 8);
	aeg_job_status_free(st);
	aeg_job_load_free(load);
	aeg_job_load_free(empty);
	aeg_job_detach(job);
	stops_cleanly(&ag);
	kill(step, SIGKILL);
	assert_int_equal(waitpid(step, NULL, 0), step);
	unlink(path);
	unlink(none);
	agent_cleanup(&ag);
}

/* The agent with @conf (aegaeon.conf lines) as its site configuration, written beside its directory. */
static void start_with_config(struct agent *ag, const char *conf, const char *const *opts)
{
	const char *argv[16] = { "--config", NULL };
	char path[] = "/tmp/aeg-attacks-conf-XXXXXX";
	int fd = mkstemp(path), n = 2;
	static char kept[64];

	assert_true(fd >= 0);
	assert_int_equal(write(fd, conf, strlen(conf)), (ssize_t)strlen(conf));
	close(fd);
	snprintf(kept, sizeof(kept), "%s", path);
	argv[1] = kept;
	for (int i = 0; opts[i] != NULL && n < 15; i++)
		argv[n++] = opts[i];
	agent_start(ag, argv);
	unlink(kept);
}

/*
 * A load of the empty file @path; with @settle, waited for until it has
 * settled (a load in flight cannot be released by id).
 */
static int prefetch_empty(aeg_job_t *job, const char *path, int settle, uint64_t *id)
{
	struct aeg_job_load *l;
	int err = aeg_job_prefetch(job, path, 0, 1 << 20, &l);

	if (err)
		return err;
	assert_int_equal(l->count, 0);
	*id = l->load_id;
	for (int i = 0; settle && l->status == AEG_EBUSY && i < BOUND_MS; i++) {
		aeg_job_load_free(l);
		usleep(1000);
		assert_int_equal(aeg_job_chunks(job, *id, NULL, 0, &l), 0);
	}
	assert_true(!settle || l->status == 0);
	aeg_job_load_free(l);
	return 0;
}

/* Release load @id, which may still be settling. */
static void release_settled(aeg_job_t *job, uint64_t id)
{
	int err = AEG_EBUSY;

	for (int i = 0; err == AEG_EBUSY && i < BOUND_MS; i++) {
		err = aeg_job_release_load(job, id, NULL);
		if (err == AEG_EBUSY)
			usleep(1000);
	}
	if (err)
		fail_msg("release of load %llu: %s: %s", (unsigned long long)id, aeg_errname(err), aeg_error_detail());
}

/*
 * Item 6: loads were kept without limit, and one with no chunk (an empty
 * file) could not be released but all at once. Now the site's max_loads
 * caps them with a clear error, and any load is released by its id: an
 * empty one, a loaded one (its blocks freed), not one still loading.
 */
static void loads_capped_and_released(void **state)
{
	struct agent ag = { .pid = -1 };
	struct aeg_job_status *st;
	struct aeg_job_load *load;
	char path[128], empty[128];
	uint32_t bufs[8], held, released = 99;
	uint64_t ids[16], id;
	aeg_job_t *job;
	int err;

	start_with_config(&ag, "max_loads = 16;\n", pool_opts);
	snprintf(path, sizeof(path), "%s.model", ag.dir);
	write_file(path, 4 << 20);
	snprintf(empty, sizeof(empty), "%s.empty", ag.dir);
	write_file(empty, 0);
	assert_int_equal(aeg_job_attach(&job), 0);
	for (int i = 0; i < 16; i++)
		assert_int_equal(prefetch_empty(job, empty, 1, &ids[i]), 0);
	err = aeg_job_prefetch(job, path, 0, 1 << 20, &load);
	if (err != AEG_ERANGE || strstr(aeg_error_detail(), "the job has 16 loads on this node, this site's limit (max_loads)") == NULL)
		fail_msg("the 17th load: %s: %s", aeg_errname(err), aeg_error_detail());

	/* An empty load goes by its id, and makes room. */
	assert_int_equal(aeg_job_release_load(job, ids[3], &released), 0);
	assert_int_equal(released, 0);
	assert_int_equal(aeg_job_chunks(job, ids[3], NULL, 0, &load), AEG_ENOENT);
	assert_int_equal(aeg_job_release_load(job, ids[3], NULL), AEG_ENOENT);
	assert_int_equal(aeg_job_release_load(job, 0, NULL), AEG_EINVAL);

	/* One still loading (the pool held here, so its reads wait) stays; once loaded, it goes. */
	held = hog_pool(aeg_job_pool(job), bufs, 8);
	assert_int_equal(held, 8);
	assert_int_equal(aeg_job_prefetch(job, path, 0, 1 << 20, &load), 0);
	id = load->load_id;
	err = aeg_job_release_load(job, id, NULL);
	if (err != AEG_EBUSY || strstr(aeg_error_detail(), "is still loading") == NULL)
		fail_msg("release of a load in flight: %s: %s", aeg_errname(err), aeg_error_detail());
	for (uint32_t i = 0; i < held; i++)
		assert_int_equal(aeg_pool_release(aeg_job_pool(job), bufs[i]), 0);
	for (uint32_t i = 0; i < load->count; i++)
		assert_int_equal(aeg_event_wait_handle(aeg_job_device(job), &load->chunks[i].event, BOUND_MS), 0);
	aeg_job_load_free(load);
	for (int i = 0; i < BOUND_MS / 10; i++) {
		err = aeg_job_release_load(job, id, &released);
		if (err != AEG_EBUSY)
			break;
		usleep(10000);
	}
	assert_int_equal(err, 0);
	assert_int_equal(released, 4);
	st = status_of(job);
	assert_int_equal(st->loads, 15);
	assert_int_equal(st->slab[0].stats.used_bytes, 0);
	aeg_job_status_free(st);
	assert_int_equal(aeg_job_release_all(job, NULL), 0);
	aeg_job_detach(job);
	stops_cleanly(&ag);
	unlink(path);
	unlink(empty);
	agent_cleanup(&ag);
}

static long agent_rss_kib(pid_t pid)
{
	char path[64], line[256];
	long kib = -1;
	FILE *f;

	snprintf(path, sizeof(path), "/proc/%d/status", (int)pid);
	f = fopen(path, "r");
	assert_non_null(f);
	while (fgets(line, sizeof(line), f) != NULL)
		if (sscanf(line, "VmRSS: %ld kB", &kib) == 1)
			break;
	fclose(f);
	return kib;
}

static double status_ms(aeg_job_t *job, uint32_t loads)
{
	struct aeg_job_status *st;
	double t0 = now_ms();

	st = status_of(job);
	assert_int_equal(st->loads, loads);
	aeg_job_status_free(st);
	return now_ms() - t0;
}

/*
 * 8000 loads of an empty file (the review's case): status took over 60 s
 * (each page walked the list from its head, for every load before the
 * page). Now the loads are a table in id order: status answers within the
 * bound, and every load is released by id.
 */
static void status_of_many_loads(void **state)
{
	static uint64_t ids[8000];
	struct agent ag = { .pid = -1 };
	char empty[128];
	long rss0, rss1, rss2;
	double t1000 = 0, t8000, t0;
	aeg_job_t *job;

	start_with_config(&ag, "max_loads = 8000;\n", pool_opts);
	snprintf(empty, sizeof(empty), "%s.empty", ag.dir);
	write_file(empty, 0);
	assert_int_equal(aeg_job_connect(&job), 0);
	rss0 = agent_rss_kib(ag.pid);
	t0 = now_ms();
	for (int i = 0; i < 8000; i++) {
		assert_int_equal(prefetch_empty(job, empty, 0, &ids[i]), 0);
		if (i == 999)
			t1000 = status_ms(job, 1000);
	}
	print_message("8000 loads of an empty file in %.0f ms\n", now_ms() - t0);
	assert_int_equal(prefetch_empty(job, empty, 0, &ids[0]), AEG_ERANGE);
	t8000 = status_ms(job, 8000);
	rss1 = agent_rss_kib(ag.pid);
	if (t8000 > BOUND_MS)
		fail_msg("status of 8000 loads took %.0f ms", t8000);
	t0 = now_ms();
	for (int i = 0; i < 8000; i++)
		release_settled(job, ids[i]);
	print_message("released one by one in %.0f ms\n", now_ms() - t0);
	status_ms(job, 0);
	rss2 = agent_rss_kib(ag.pid);
	print_message("status: %.1f ms with 1000 loads, %.1f ms with 8000; agent RSS %ld -> %ld -> %ld KiB\n",
		      t1000, t8000, rss0, rss1, rss2);
	aeg_job_detach(job);
	stops_cleanly(&ag);
	unlink(empty);
	agent_cleanup(&ag);
}

/*
 * Item 7: 300 connections that never send a byte. Each used to hold one of
 * the agent's 256 client slots for ever, so the next step was refused. Now
 * they get a quarter of the slots, the oldest making way for newer ones, a
 * step attaches and works meanwhile, and every silent one is dropped after
 * hello_timeout (1 s here; 5 s under valgrind, where accepting 300
 * connections alone can take longer than 1 s, so that none would be made
 * room for).
 */
static void silent_connections(void **state)
{
	enum { SILENT = 300 };
	static int fds[SILENT];
	struct agent ag = { .pid = -1 };
	struct aeg_job_status *st;
	char path[128];
	aeg_job_t *job;
	double t_last, last_ms = 0;
	int base, open_left = SILENT, hello_ms = under_valgrind() ? 5000 : 1000;
	char conf[64], logged[64];

	snprintf(conf, sizeof(conf), "hello_timeout = %d;\n", hello_ms / 1000);
	snprintf(logged, sizeof(logged), "no hello in %d ms (hello_timeout); disconnecting", hello_ms);
	start_with_config(&ag, conf, pool_opts);
	snprintf(path, sizeof(path), "%s.model", ag.dir);
	write_file(path, 4 << 20);
	base = agent_fds_idle(ag.pid);
	for (int i = 0; i < SILENT; i++)
		fds[i] = connect_raw(ag.sock);
	t_last = now_ms();
	assert_int_equal(aeg_job_attach(&job), 0);
	load_and_check(job, path);
	/* Connections dropped to make room count until the agent has joined their threads: a moment. */
	for (double t0 = now_ms();; usleep(10000)) {
		uint32_t held;

		st = status_of(job);
		held = st->clients;
		aeg_job_status_free(st);
		if (held <= 256 / 4 + 1)
			break;
		if (now_ms() - t0 > BOUND_MS)
			fail_msg("%u connections held with %d silent ones (at most %d may wait for their hello)", held,
				 SILENT, 256 / 4);
	}

	/* Every silent one is dropped: the oldest at once, the last 64 after the hello timeout. */
	while (open_left > 0 && now_ms() - t_last < hello_ms + BOUND_MS) {
		for (int i = 0; i < SILENT; i++) {
			struct pollfd p = { .fd = fds[i], .events = POLLIN };

			if (fds[i] < 0 || poll(&p, 1, 0) != 1)
				continue;
			close(fds[i]);
			fds[i] = -1;
			open_left--;
			last_ms = now_ms() - t_last;
		}
		usleep(5000);
	}
	if (open_left > 0 || last_ms < 0.9 * hello_ms)
		fail_msg("%d silent connections left; the last dropped %.0f ms after the last connect", open_left,
			 last_ms);
	assert_true(log_has(&ag, "to make room for pid"));
	assert_true(log_has(&ag, logged));
	print_message("%d silent connections: a step attached and loaded meanwhile; the last dropped %.0f ms "
		      "after the last connect\n", SILENT, last_ms);
	aeg_job_detach(job);
	assert_int_equal(agent_fds_settle(ag.pid, base), base);
	stops_cleanly(&ag);
	unlink(path);
	agent_cleanup(&ag);
}

/*
 * Every one of the agent's 256 client slots held by a connection past its
 * hello (only the job's own processes can do that): the next connection
 * was closed without a word, and the step said "closed the connection (did
 * the job end?)". Now it is told: AEG_EBUSY, all 256 connections in use.
 * Once some are closed, the next step attaches.
 */
static void every_slot_past_hello(void **state)
{
	enum { SLOTS = 256 };
	static int fds[SLOTS];
	static unsigned char frame[PROTO_MAX_FRAME];
	static union proto_msg msg;
	struct agent ag = { .pid = -1 };
	aeg_job_t *job;
	int err, fd_count = count_fds();

	agent_start(&ag, pool_opts);
	for (int i = 0; i < SLOTS; i++) {
		struct proto_header h;

		fds[i] = connect_raw(ag.sock);
		memset(&msg.hello_req, 0, sizeof(msg.hello_req));
		msg.hello_req.min_version = msg.hello_req.max_version = PROTO_VERSION;
		msg.hello_req.pid = (uint32_t)getpid();
		strcpy(msg.hello_req.client, "slot holder");
		assert_int_equal(proto_send(fds[i], PROTO_HELLO, 0, 1, &msg, -1, frame), 0);
		assert_int_equal(proto_recv(fds[i], &h, &msg, NULL, frame), 0);
		assert_int_equal(h.type, PROTO_HELLO);
	}
	for (int round = 0; round < 2; round++) {
		err = aeg_job_connect(&job);
		if (err != AEG_EBUSY ||
		    strstr(aeg_error_detail(), "all 256 connections of the job's agent are in use") == NULL)
			fail_msg("connection %d: %s: %s", SLOTS + 1 + round, aeg_errname(err), aeg_error_detail());
	}
	assert_true(log_has(&ag, "every client slot is held by a client past its hello"));
	for (int i = 0; i < SLOTS; i++)
		close(fds[i]);
	for (double t0 = now_ms(); (err = aeg_job_attach(&job)) != 0; usleep(10000))
		if (now_ms() - t0 > BOUND_MS)
			fail_msg("after closing the %d: %s: %s", SLOTS, aeg_errname(err), aeg_error_detail());
	responsive(job, "after every slot was held");
	aeg_job_detach(job);
	stops_cleanly(&ag);
	agent_cleanup(&ag);
	assert_int_equal(count_fds(), fd_count);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_teardown(forged_geometry_then_exit, kill_started),
		cmocka_unit_test_teardown(forged_index_far, kill_started),
		cmocka_unit_test_teardown(forged_index_near, kill_started),
		cmocka_unit_test_teardown(step_stopped_in_pool, kill_started),
		cmocka_unit_test_teardown(header_scribbled, kill_started),
		cmocka_unit_test_teardown(loads_capped_and_released, kill_started),
		cmocka_unit_test_teardown(status_of_many_loads, kill_started),
		cmocka_unit_test_teardown(silent_connections, kill_started),
		cmocka_unit_test_teardown(every_slot_past_hello, kill_started),
	};

	setenv("AEGAEON_HOST_GPUS", "1", 1);
	unsetenv("AEGAEON_SLABS");
	return cmocka_run_group_tests_name("agent_attacks", tests, NULL, NULL);
}
