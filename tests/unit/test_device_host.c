/* The host device backend: env parsing, memory and its handles, streams, registration. */
#include <dirent.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>

#include <aegaeon/aegaeon.h>

#include "device_internal.h"
#include "internal.h"
#include "testutil.h"

static aeg_device_t *open_host(void)
{
	aeg_device_t *dev = NULL;

	assert_int_equal(aeg_device_open(&dev, AEG_DEVICE_HOST), 0);
	return dev;
}

static int setup_env(void **state)
{
	unsetenv("AEGAEON_HOST_GPUS");
	unsetenv("AEGAEON_HOST_PCI_BUS_IDS");
	return 0;
}

static void env_gpu_counts(void **state)
{
	static const struct {
		const char *gpus, *pci;
		int err, count;
	} cases[] = {
		{ NULL, NULL, 0, 1 },
		{ "", NULL, 0, 1 },
		{ "1", NULL, 0, 1 },
		{ "4", NULL, 0, 4 },
		{ "64", NULL, 0, 64 },
		{ "0", NULL, AEG_EINVAL, 0 },
		{ "65", NULL, AEG_EINVAL, 0 },
		{ "-1", NULL, AEG_EINVAL, 0 },
		{ "two", NULL, AEG_EINVAL, 0 },
		{ "2x", NULL, AEG_EINVAL, 0 },
		{ "99999999999999999999", NULL, AEG_EINVAL, 0 },
		{ "2", "0000:3b:00.0,0000:86:00.0", 0, 2 },
		{ "1", "3B:00.0", 0, 1 },
		{ "2", "0000:3b:00.0", AEG_EINVAL, 0 },             /* one id for two GPUs */
		{ "1", "0000:3b:00.0,0000:86:00.0", AEG_EINVAL, 0 },
		{ "2", "0000:3b:00.0,0000:3B:00.0", AEG_EINVAL, 0 }, /* twice */
		{ "1", "0000:3b:00.8", AEG_EINVAL, 0 },              /* function > 7 */
		{ "1", "0000:3b:20.0", AEG_EINVAL, 0 },              /* device > 0x1f */
		{ "1", "nonsense", AEG_EINVAL, 0 },
		{ "1", "0000:3b:00.0,", AEG_EINVAL, 0 },
		{ "1", "0000:3b:00", AEG_EINVAL, 0 },
		{ "1", "00000:3b:00.0", AEG_EINVAL, 0 },
	};

	for (size_t i = 0; i < AEG_ARRAY_SIZE(cases); i++) {
		aeg_device_t *dev = NULL;
		int count = 0, err;

		setup_env(state);
		if (cases[i].gpus != NULL)
			setenv("AEGAEON_HOST_GPUS", cases[i].gpus, 1);
		if (cases[i].pci != NULL)
			setenv("AEGAEON_HOST_PCI_BUS_IDS", cases[i].pci, 1);
		err = aeg_device_open(&dev, AEG_DEVICE_HOST);
		if (err != cases[i].err)
			fail_msg("case %zu (%s, %s): got %s (%s), expected %s", i, cases[i].gpus,
				 cases[i].pci, aeg_errname(err), aeg_error_detail(),
				 aeg_errname(cases[i].err));
		if (err < 0) {
			assert_null(dev);
			assert_non_null(strstr(aeg_error_detail(), "AEGAEON_HOST_"));
			continue;
		}
		assert_int_equal(aeg_device_count(dev, &count), 0);
		assert_int_equal(count, cases[i].count);
		assert_int_equal(aeg_device_kind(dev), AEG_DEVICE_HOST);
		aeg_device_close(dev);
	}
	setup_env(state);
}

static void open_bad_kinds(void **state)
{
	aeg_device_t *dev = NULL;
	int err;

	assert_int_equal(aeg_device_open(&dev, (enum aeg_device_kind)7), AEG_EINVAL);
	assert_int_equal(aeg_device_open(NULL, AEG_DEVICE_HOST), AEG_EINVAL);
	/* cuda on a machine without a GPU fails; it never falls back to host. */
	err = aeg_device_open(&dev, AEG_DEVICE_CUDA);
	if (err == 0) {
		assert_int_equal(aeg_device_kind(dev), AEG_DEVICE_CUDA);
		aeg_device_close(dev);
	} else {
		assert_true(err == AEG_EDEVICE || err == AEG_ENOTSUP);
		assert_null(dev);
		assert_string_not_equal(aeg_error_detail(), "");
	}
}

static void gpu_info(void **state)
{
	struct aeg_gpu_info info;
	aeg_device_t *dev;

	setenv("AEGAEON_HOST_GPUS", "2", 1);
	setenv("AEGAEON_HOST_PCI_BUS_IDS", "3b:00.0,0000:D8:1F.7", 1);
	dev = open_host();
	setup_env(state);
	assert_int_equal(aeg_device_gpu_info(dev, 1, &info), 0);
	assert_int_equal(info.index, 1);
	assert_string_equal(info.name, "host");
	assert_true(info.total_bytes > 0);
	assert_true(info.free_bytes > 0 && info.free_bytes <= info.total_bytes);
	assert_string_equal(info.pci_bus_id, "0000:d8:1f.7");
	assert_int_equal(aeg_device_gpu_info(dev, 0, &info), 0);
	assert_string_equal(info.pci_bus_id, "0000:3b:00.0");
	assert_int_equal(aeg_device_gpu_info(dev, 2, &info), AEG_ENODEV);
	assert_non_null(strstr(aeg_error_detail(), "GPU 2"));
	assert_int_equal(aeg_device_gpu_info(dev, -1, &info), AEG_ENODEV);
	aeg_device_close(dev);

	dev = open_host();
	assert_int_equal(aeg_device_gpu_info(dev, 0, &info), 0);
	assert_string_equal(info.pci_bus_id, "");
	aeg_device_close(dev);
}

static void mem_alloc_free(void **state)
{
	struct aeg_gpu_info info;
	aeg_device_t *dev = open_host();
	void *p = NULL, *q = NULL, *keep;

	assert_int_equal(aeg_mem_alloc(dev, 0, 1 << 20, &p), 0);
	assert_non_null(p);
	assert_int_equal(aeg_memset(dev, p, 0x5a, 1 << 20), 0);
	assert_int_equal(((unsigned char *)p)[12345], 0x5a);
	assert_int_equal(aeg_mem_alloc(dev, 0, 4096, &q), 0);
	assert_int_equal(aeg_memcpy(dev, q, p, 4096), 0);
	assert_int_equal(((unsigned char *)q)[4095], 0x5a);
	keep = q;

	assert_int_equal(aeg_mem_alloc(dev, 0, 0, &q), AEG_EINVAL);
	assert_int_equal(aeg_mem_alloc(dev, 1, 4096, &q), AEG_ENODEV);
	assert_int_equal(aeg_device_gpu_info(dev, 0, &info), 0);
	assert_int_equal(aeg_mem_alloc(dev, 0, info.total_bytes + 1, &q), AEG_ENOSPC);
	assert_null(q);
	assert_int_equal(aeg_mem_free(dev, 0, (char *)p + 64), AEG_EINVAL);
	assert_int_equal(aeg_mem_free(dev, 0, p), 0);
	assert_int_equal(aeg_mem_free(dev, 0, p), AEG_EINVAL);
	assert_int_equal(aeg_mem_free(dev, 0, NULL), 0);
	assert_int_equal(aeg_mem_free(dev, 0, keep), 0);
	aeg_device_close(dev);
}

static void hex_round_trip(void **state)
{
	static const struct {
		const char *hex;
		int err;
	} bad[] = {
		{ "", AEG_EINVAL },
		{ "00", AEG_EINVAL },
		{ "0000000000000000000000000000000000000000000000000000000000000000"
		  "000000000000000000000000000000000000000000000000000000000000000", AEG_EINVAL },
		{ "0000000000000000000000000000000000000000000000000000000000000000"
		  "00000000000000000000000000000000000000000000000000000000000000000", AEG_EINVAL },
		{ "0000000000000000000000000000000000000000000000000000000000000000"
		  "000000000000000000000000000000000000000000000000000000000000000g", AEG_EINVAL },
		{ "x000000000000000000000000000000000000000000000000000000000000000"
		  "0000000000000000000000000000000000000000000000000000000000000000", AEG_EINVAL },
		{ " 000000000000000000000000000000000000000000000000000000000000000"
		  "0000000000000000000000000000000000000000000000000000000000000000", AEG_EINVAL },
		/* Found by fuzz/fuzz_handle: escapes must not reach the detail (a terminal, a log). */
		{ "\x1b[31m00", AEG_EINVAL },
		{ "0\n1\r2\t3\x7f", AEG_EINVAL },
		{ "\x1b]0;title\x07" "000000000000000000000000000000000000000000000000000000"
		  "000000000000000000000000000000000000000000000000000000000000000000000000000", AEG_EINVAL },
	};
	char hex[AEG_HANDLE_HEX_LEN + 1], upper[AEG_HANDLE_HEX_LEN + 1];
	aeg_handle_t h, back;

	for (int i = 0; i < AEG_HANDLE_BYTES; i++)
		h.bytes[i] = (unsigned char)(i * 37 + 11);
	aeg_handle_to_hex(&h, hex);
	assert_int_equal(strlen(hex), AEG_HANDLE_HEX_LEN);
	assert_string_equal(strspn(hex, "0123456789abcdef") == AEG_HANDLE_HEX_LEN ? "ok" : hex, "ok");
	assert_int_equal(aeg_handle_from_hex(hex, &back), 0);
	assert_memory_equal(h.bytes, back.bytes, AEG_HANDLE_BYTES);
	for (int i = 0; i <= AEG_HANDLE_HEX_LEN; i++)
		upper[i] = (char)(hex[i] >= 'a' && hex[i] <= 'f' ? hex[i] - 32 : hex[i]);
	memset(&back, 0, sizeof(back));
	assert_int_equal(aeg_handle_from_hex(upper, &back), 0);
	assert_memory_equal(h.bytes, back.bytes, AEG_HANDLE_BYTES);

	for (size_t i = 0; i < AEG_ARRAY_SIZE(bad); i++) {
		aeg_handle_t untouched = h;

		if (aeg_handle_from_hex(bad[i].hex, &untouched) != bad[i].err)
			fail_msg("bad hex case %zu accepted", i);
		assert_string_not_equal(aeg_error_detail(), "");
		for (const char *c = aeg_error_detail(); *c; c++)
			if ((unsigned char)*c < 0x20 || *c == 0x7f)
				fail_msg("bad hex case %zu: control character in the detail '%s'", i,
					 aeg_error_detail());
		assert_memory_equal(untouched.bytes, h.bytes, AEG_HANDLE_BYTES);
	}
	assert_int_equal(aeg_handle_from_hex(NULL, &back), AEG_EINVAL);
}

/* The child opens @handle, checks the pattern 0xa5 and answers with 0x3c. */
static int child_open_and_reply(const aeg_handle_t *handle, size_t bytes)
{
	aeg_device_t *dev = NULL;
	unsigned char *p = NULL;

	if (aeg_device_open(&dev, AEG_DEVICE_HOST) < 0)
		return 10;
	if (aeg_mem_open_handle(dev, 0, handle, (void **)&p) < 0)
		return 11;
	for (size_t i = 0; i < bytes; i++)
		if (p[i] != 0xa5)
			return 12;
	memset(p, 0x3c, bytes / 2);
	if (aeg_mem_close_handle(dev, p) < 0)
		return 13;
	aeg_device_close(dev);
	return 0;
}

static void mem_ipc_across_processes(void **state)
{
	const size_t bytes = 3 << 20;
	aeg_device_t *dev = open_host();
	unsigned char *p = NULL;
	aeg_handle_t h;
	int status;
	pid_t pid;

	assert_int_equal(aeg_mem_alloc(dev, 0, bytes, (void **)&p), 0);
	memset(p, 0xa5, bytes);
	assert_int_equal(aeg_mem_export(dev, p, &h), 0);
	pid = fork();
	assert_true(pid >= 0);
	if (pid == 0)
		child_exit(child_open_and_reply(&h, bytes));
	assert_int_equal(waitpid(pid, &status, 0), pid);
	assert_true(WIFEXITED(status));
	assert_int_equal(WEXITSTATUS(status), 0);
	assert_int_equal(p[0], 0x3c);
	assert_int_equal(p[bytes / 2 - 1], 0x3c);
	assert_int_equal(p[bytes / 2], 0xa5);
	assert_int_equal(aeg_mem_free(dev, 0, p), 0);
	aeg_device_close(dev);
}

static void mem_handle_of_own_process(void **state)
{
	aeg_device_t *dev = open_host();
	void *p = NULL, *q = NULL, *r = NULL;
	aeg_handle_t h;

	assert_int_equal(aeg_mem_alloc(dev, 0, 8192, &p), 0);
	assert_int_equal(aeg_mem_export(dev, (char *)p + 16, &h), AEG_EINVAL);
	assert_int_equal(aeg_mem_export(dev, p, &h), 0);
	assert_int_equal(aeg_mem_open_handle(dev, 0, &h, &q), 0);
	assert_ptr_equal(p, q);
	assert_int_equal(aeg_mem_open_handle(dev, 0, &h, &r), 0);
	assert_ptr_equal(p, r);
	assert_int_equal(aeg_mem_close_handle(dev, q), 0);
	assert_int_equal(aeg_mem_close_handle(dev, r), 0);
	assert_int_equal(aeg_mem_close_handle(dev, r), AEG_EINVAL);
	assert_int_equal(aeg_mem_free(dev, 0, p), 0);
	aeg_device_close(dev);
}

/*
 * The fields of a host-device memory handle that the tests forge (at their
 * byte offsets; little-endian, as the handle holds them).
 */
enum { HANDLE_VERSION = 4, HANDLE_PID = 8, HANDLE_UID = 12, HANDLE_START = 16, HANDLE_FD = 24, HANDLE_SIZE = 32 };

static uint64_t handle_field(const aeg_handle_t *h, size_t at, size_t width)
{
	uint64_t v = 0;

	memcpy(&v, h->bytes + at, width);
	return v;
}

/* @good with its @width-byte field at @at made @value is refused: EBADF, nothing opened. */
static void forged_refused(aeg_device_t *dev, const aeg_handle_t *good, size_t at, size_t width, uint64_t value)
{
	aeg_handle_t h = *good;
	void *q = NULL;

	memcpy(h.bytes + at, &value, width);
	assert_int_equal(aeg_mem_open_handle(dev, 0, &h, &q), AEG_EBADF);
	assert_null(q);
}

/*
 * A child process that exports 4 KiB of host-device memory: its handle in
 * @h, and in @go the descriptor to close (or write a byte to) when the
 * child may exit. Returns the child's pid.
 */
static pid_t child_export(aeg_handle_t *h, int *go)
{
	int fds[2], wait_go[2];
	pid_t pid;

	assert_int_equal(pipe(fds), 0);
	assert_int_equal(pipe(wait_go), 0);
	pid = fork();
	assert_true(pid >= 0);
	if (pid == 0) {
		aeg_device_t *cdev = NULL;
		void *cp = NULL;
		aeg_handle_t ch;
		char c;

		close(wait_go[1]);
		if (aeg_device_open(&cdev, AEG_DEVICE_HOST) < 0 ||
		    aeg_mem_alloc(cdev, 0, 4096, &cp) < 0 || aeg_mem_export(cdev, cp, &ch) < 0)
			child_exit(1);
		if (write(fds[1], &ch, sizeof(ch)) != sizeof(ch))
			child_exit(2);
		child_exit(read(wait_go[0], &c, 1) >= 0 ? 0 : 3);     /* until the parent lets go */
	}
	close(fds[1]);
	close(wait_go[0]);
	assert_int_equal(read(fds[0], h, sizeof(*h)), sizeof(*h));
	close(fds[0]);
	*go = wait_go[1];
	return pid;
}

/* Lets the child of child_export exit and reaps it. */
static void child_finish(pid_t pid, int go)
{
	int status;

	close(go);
	assert_int_equal(waitpid(pid, &status, 0), pid);
	assert_int_equal(WEXITSTATUS(status), 0);
}

static void mem_handle_of_dead_process(void **state)
{
	aeg_device_t *dev = open_host();
	aeg_handle_t h;
	void *p = NULL;
	int go;
	pid_t pid = child_export(&h, &go);

	child_finish(pid, go);
	assert_int_equal(aeg_mem_open_handle(dev, 0, &h, &p), AEG_EBADF);
	assert_null(p);
	assert_non_null(strstr(aeg_error_detail(), "gone"));
	aeg_device_close(dev);
}

/*
 * Another process's memory open here already: a second open of a handle
 * naming it is checked as the first was (size, start time, descriptor, the
 * owner alive), not answered from the open mapping. Before, a handle that
 * claimed 1 GiB got the 4 KiB mapping, and a dead owner's opened.
 */
static void mem_handle_reopened(void **state)
{
	aeg_device_t *dev = open_host();
	aeg_handle_t good;
	void *p = NULL, *q = NULL;
	int go;
	pid_t pid = child_export(&good, &go);

	assert_int_equal(aeg_mem_open_handle(dev, 0, &good, &p), 0);
	forged_refused(dev, &good, HANDLE_SIZE, 8, 1ull << 30);
	forged_refused(dev, &good, HANDLE_START, 8, handle_field(&good, HANDLE_START, 8) + 1);
	forged_refused(dev, &good, HANDLE_FD, 4, 0);
	assert_int_equal(aeg_mem_open_handle(dev, 0, &good, &q), 0);
	assert_ptr_equal(q, p);         /* the one mapping, counted twice */
	assert_int_equal(aeg_mem_close_handle(dev, q), 0);
	q = NULL;
	/* The owner gone: its handle no longer opens, though its memory is still mapped here. */
	child_finish(pid, go);
	assert_int_equal(aeg_mem_open_handle(dev, 0, &good, &q), AEG_EBADF);
	assert_non_null(strstr(aeg_error_detail(), "gone"));
	assert_null(q);
	assert_int_equal(aeg_mem_close_handle(dev, p), 0);
	aeg_device_close(dev);
}

static void mem_handle_freed_or_reused(void **state)
{
	aeg_device_t *dev = open_host();
	aeg_handle_t h, h2;
	void *p = NULL, *q = NULL;

	assert_int_equal(aeg_mem_alloc(dev, 0, 4096, &p), 0);
	assert_int_equal(aeg_mem_export(dev, p, &h), 0);
	assert_int_equal(aeg_mem_free(dev, 0, p), 0);
	assert_int_equal(aeg_mem_open_handle(dev, 0, &h, &q), AEG_EBADF);
	/* Same size, likely the same descriptor number: the inode tells them apart. */
	assert_int_equal(aeg_mem_alloc(dev, 0, 4096, &p), 0);
	assert_int_equal(aeg_mem_export(dev, p, &h2), 0);
	assert_int_equal(aeg_mem_open_handle(dev, 0, &h, &q), AEG_EBADF);
	assert_null(q);
	assert_int_equal(aeg_mem_free(dev, 0, p), 0);
	aeg_device_close(dev);
}

static void mem_handle_forged(void **state)
{
	aeg_device_t *dev = open_host();
	aeg_handle_t good, h;
	void *p = NULL, *q = NULL;

	assert_int_equal(aeg_mem_alloc(dev, 0, 4096, &p), 0);
	assert_int_equal(aeg_mem_export(dev, p, &good), 0);

	memset(&h, 0, sizeof(h));
	assert_int_equal(aeg_mem_open_handle(dev, 0, &h, &q), AEG_EBADF);
	for (int i = 0; i < AEG_HANDLE_BYTES; i++)
		h.bytes[i] = (unsigned char)rand();
	assert_int_equal(aeg_mem_open_handle(dev, 0, &h, &q), AEG_EBADF);

	h = good;                       /* an event handle is not a memory handle */
	memcpy(h.bytes, "AEGE", 4);
	assert_int_equal(aeg_mem_open_handle(dev, 0, &h, &q), AEG_EBADF);
	forged_refused(dev, &good, HANDLE_VERSION, 4, 99);
	forged_refused(dev, &good, HANDLE_PID, 4, 1);          /* another process's (init) */
	forged_refused(dev, &good, HANDLE_UID, 4, (uint64_t)getuid() + 1);
	assert_non_null(strstr(aeg_error_detail(), "uid"));
	forged_refused(dev, &good, HANDLE_START, 8, handle_field(&good, HANDLE_START, 8) + 1);
	forged_refused(dev, &good, HANDLE_FD, 4, 0);
	forged_refused(dev, &good, HANDLE_SIZE, 8, 2 * handle_field(&good, HANDLE_SIZE, 8));
	h = good;                       /* reserved bytes */
	h.bytes[60] = 1;
	assert_int_equal(aeg_mem_open_handle(dev, 0, &h, &q), AEG_EBADF);
	assert_null(q);

	assert_int_equal(aeg_mem_free(dev, 0, p), 0);
	aeg_device_close(dev);
}

/*
 * A sync waits for the work queued before it, not for the stream to be
 * idle: here the op it waits for queues another, of 1.5 s, before it ends,
 * so the stream is never idle until then. Before, the sync woke only when
 * done caught up with queued: 1.5 s instead of 0.3.
 */
static aeg_stream_t *busy_stream;
static int busy_launch_err;

static void long_op(void *arg)
{
	usleep(1500000);
}

static void op_that_queues(void *arg)
{
	usleep(300000);
	busy_launch_err = aeg_stream_launch_host_fn(busy_stream, long_op, NULL);
}

static void stream_sync_own_work(void **state)
{
	aeg_device_t *dev = open_host();
	uint64_t t0;
	double waited;

	assert_int_equal(aeg_stream_create(dev, 0, &busy_stream), 0);
	assert_int_equal(aeg_stream_launch_host_fn(busy_stream, op_that_queues, NULL), 0);
	t0 = aeg_now_ns();
	assert_int_equal(aeg_stream_sync(busy_stream), 0);
	waited = (double)(aeg_now_ns() - t0) / 1e9;
	assert_int_equal(aeg_stream_destroy(busy_stream), 0);
	assert_int_equal(busy_launch_err, 0);
	if (waited > 1.2)
		fail_msg("aeg_stream_sync waited %.2f s: for work queued after it, not the 0.3 s queued before", waited);
	aeg_device_close(dev);
}

struct order_log {
	int seen[64];
	int count;
	const unsigned char *watch;
	unsigned char watched[64];
};

struct order_arg {
	struct order_log *log;
	int id;
};

static void log_fn(void *arg)
{
	struct order_arg *a = arg;

	a->log->watched[a->log->count] = *a->log->watch;
	a->log->seen[a->log->count++] = a->id;
}

static void stream_ordering(void **state)
{
	enum { N = 2000, SLOT = 4096 };
	aeg_device_t *dev = open_host();
	unsigned char *src, *a = NULL, *b = NULL;
	aeg_stream_t *s = NULL;

	src = malloc(N);
	assert_non_null(src);
	for (int i = 0; i < N; i++)
		src[i] = (unsigned char)(i * 7 + 1);
	assert_int_equal(aeg_mem_alloc(dev, 0, SLOT, (void **)&a), 0);
	assert_int_equal(aeg_mem_alloc(dev, 0, SLOT, (void **)&b), 0);
	assert_int_equal(aeg_stream_create(dev, 0, &s), 0);
	assert_null(aeg_stream_native(s));
	/* Each round writes a byte then copies it on: only in-order execution leaves the last. */
	for (int i = 0; i < N; i++) {
		assert_int_equal(aeg_memcpy_async(s, a, &src[i], 1), 0);
		assert_int_equal(aeg_memcpy_async(s, b + (i % SLOT), a, 1), 0);
		assert_int_equal(aeg_memcpy_async(s, b + SLOT - 1, a, 1), 0);
	}
	assert_int_equal(aeg_stream_sync(s), 0);
	assert_int_equal(b[SLOT - 1], src[N - 1]);
	for (int i = N - SLOT + 1 > 0 ? N - SLOT + 1 : 0; i < N; i++)
		if (i % SLOT != SLOT - 1)
			assert_int_equal(b[i % SLOT], src[i]);
	assert_int_equal(aeg_memcpy_async(s, NULL, src, 1), AEG_EINVAL);
	assert_int_equal(aeg_memcpy_async(s, a, src, 0), 0);
	assert_int_equal(aeg_stream_destroy(s), 0);
	assert_int_equal(aeg_stream_create(dev, 3, &s), AEG_ENODEV);
	assert_int_equal(aeg_mem_free(dev, 0, a), 0);
	assert_int_equal(aeg_mem_free(dev, 0, b), 0);
	free(src);
	aeg_device_close(dev);
}

static void host_fn_ordering(void **state)
{
	aeg_device_t *dev = open_host();
	struct order_arg args[32];
	struct order_log log = { .count = 0 };
	unsigned char cell = 0, vals[32];
	aeg_stream_t *s = NULL;

	log.watch = &cell;
	assert_int_equal(aeg_stream_create(dev, 0, &s), 0);
	for (int i = 0; i < 32; i++) {
		vals[i] = (unsigned char)(100 + i);
		args[i].log = &log;
		args[i].id = i;
		assert_int_equal(aeg_memcpy_async(s, &cell, &vals[i], 1), 0);
		assert_int_equal(aeg_stream_launch_host_fn(s, log_fn, &args[i]), 0);
	}
	assert_int_equal(aeg_stream_launch_host_fn(s, NULL, NULL), AEG_EINVAL);
	assert_int_equal(aeg_stream_sync(s), 0);
	assert_int_equal(log.count, 32);
	for (int i = 0; i < 32; i++) {
		assert_int_equal(log.seen[i], i);
		assert_int_equal(log.watched[i], 100 + i);   /* saw the copy queued before it */
	}
	assert_int_equal(aeg_stream_destroy(s), 0);
	aeg_device_close(dev);
}

static void sleep_fn(void *arg)
{
	usleep(50 * 1000);
	*(int *)arg = 1;
}

static void stream_destroy_drains(void **state)
{
	aeg_device_t *dev = open_host();
	aeg_stream_t *s = NULL;
	int slept = 0;
	char from[8] = "drained", to[8] = "";

	assert_int_equal(aeg_stream_create(dev, 0, &s), 0);
	assert_int_equal(aeg_stream_launch_host_fn(s, sleep_fn, &slept), 0);
	assert_int_equal(aeg_memcpy_async(s, to, from, sizeof(from)), 0);
	assert_int_equal(aeg_stream_destroy(s), 0);
	assert_int_equal(slept, 1);
	assert_string_equal(to, "drained");
	aeg_device_close(dev);
}

static void host_register_checks(void **state)
{
	aeg_device_t *dev = open_host();
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	char *m;

	m = mmap(NULL, 4 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	assert_true(m != MAP_FAILED);
	assert_int_equal(aeg_host_register(dev, m, 2 * page, 0), 0);
	assert_int_equal(aeg_host_register(dev, m + page, 2 * page, 0), AEG_EEXIST);
	assert_int_equal(aeg_host_register(dev, m + 2 * page, 2 * page, AEG_HOST_REGISTER_READONLY), 0);
	assert_int_equal(aeg_host_register(dev, m, 0, 0), AEG_EINVAL);
	assert_int_equal(aeg_host_register(dev, m, page, 0x80), AEG_EINVAL);
	assert_int_equal(aeg_host_unregister(dev, m + page), AEG_EINVAL);
	assert_int_equal(aeg_host_unregister(dev, m), 0);
	assert_int_equal(aeg_host_unregister(dev, m), AEG_EINVAL);
	assert_int_equal(aeg_host_unregister(dev, m + 2 * page), 0);
	assert_int_equal(munmap(m + 2 * page, 2 * page), 0);
	assert_int_equal(aeg_host_register(dev, m, 4 * page, 0), AEG_EINVAL);  /* half unmapped */
	assert_int_equal(munmap(m, 2 * page), 0);
	aeg_device_close(dev);
}

static void no_fd_leak(void **state)
{
	int before = count_fds();

	for (int round = 0; round < 3; round++) {
		aeg_device_t *dev = open_host();
		aeg_stream_t *s = NULL;
		void *p = NULL, *q = NULL, *r = NULL;
		aeg_handle_t h;
		int status;
		pid_t pid;

		assert_int_equal(aeg_mem_alloc(dev, 0, 65536, &p), 0);
		assert_int_equal(aeg_mem_alloc(dev, 0, 65536, &q), 0);
		assert_int_equal(aeg_mem_export(dev, p, &h), 0);
		assert_int_equal(aeg_mem_open_handle(dev, 0, &h, &r), 0);
		assert_int_equal(aeg_stream_create(dev, 0, &s), 0);
		assert_int_equal(aeg_memcpy_async(s, q, p, 65536), 0);
		assert_int_equal(aeg_stream_destroy(s), 0);
		pid = fork();
		if (pid == 0)
			child_exit(child_open_and_reply(&h, 0));
		assert_int_equal(waitpid(pid, &status, 0), pid);
		assert_int_equal(WEXITSTATUS(status), 0);
		assert_int_equal(aeg_mem_close_handle(dev, r), 0);
		assert_int_equal(aeg_mem_free(dev, 0, p), 0);
		/* q is left to aeg_device_close, which releases what is still held. */
		aeg_device_close(dev);
	}
	assert_int_equal(count_fds(), before);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup(env_gpu_counts, setup_env),
		cmocka_unit_test_setup(open_bad_kinds, setup_env),
		cmocka_unit_test_setup(gpu_info, setup_env),
		cmocka_unit_test_setup(mem_alloc_free, setup_env),
		cmocka_unit_test(hex_round_trip),
		cmocka_unit_test_setup(mem_ipc_across_processes, setup_env),
		cmocka_unit_test_setup(mem_handle_of_own_process, setup_env),
		cmocka_unit_test_setup(mem_handle_of_dead_process, setup_env),
		cmocka_unit_test_setup(mem_handle_reopened, setup_env),
		cmocka_unit_test_setup(mem_handle_freed_or_reused, setup_env),
		cmocka_unit_test_setup(mem_handle_forged, setup_env),
		cmocka_unit_test_setup(stream_ordering, setup_env),
		cmocka_unit_test_setup(host_fn_ordering, setup_env),
		cmocka_unit_test_setup(stream_destroy_drains, setup_env),
		cmocka_unit_test_setup(stream_sync_own_work, setup_env),
		cmocka_unit_test_setup(host_register_checks, setup_env),
		cmocka_unit_test_setup(no_fd_leak, setup_env),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
