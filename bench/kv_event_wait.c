/*
 * kv_event_wait: what a consumer of another process's KV swap pays per event
 * wait. A child process swaps 16 blocks out with an event per layer and
 * hands the layer handles over a pipe; this process waits once on each
 * (opening it: inside a job, after asking the job's agent) and then
 * --waits times on layer 0's opened handle, each wait timed alone.
 * Usage: kv_event_wait [--device cuda|host] [--gpu N] [--layers L] [--waits N] [--json]
 */
#include "config.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <aegaeon/aegaeon.h>

#include "internal.h"

#define MAX_LAYERS 128
#define BLOCKS 16

struct opts {
	enum aeg_device_kind kind;
	int gpu, layers, waits, json;
};

static int usage(const char *why)
{
	fprintf(stderr, "kv_event_wait: %s\nUsage: kv_event_wait [--device cuda|host] [--gpu N] [--layers L (1..%d)] "
		"[--waits N] [--json]\n", why, MAX_LAYERS);
	return 2;
}

static int parse(int argc, char **argv, struct opts *o)
{
	*o = (struct opts){ AEG_DEVICE_CUDA, 0, 32, 10000, 0 };
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;

		if (!strcmp(a, "--json")) {
			o->json = 1;
			continue;
		}
		if (!v)
			return usage("an option without its value, or an unknown option");
		i++;
		if (!strcmp(a, "--device") && aeg_device_kind_parse(v, &o->kind) == 0)
			continue;
		if (!strcmp(a, "--gpu") && (o->gpu = atoi(v)) >= 0)
			continue;
		if (!strcmp(a, "--layers") && (o->layers = atoi(v)) >= 1 && o->layers <= MAX_LAYERS)
			continue;
		if (!strcmp(a, "--waits") && (o->waits = atoi(v)) >= 1)
			continue;
		return usage("a bad option or value");
	}
	return 0;
}

/* The producer's objects, made and destroyed in order. */
struct producer {
	aeg_device_t *dev;
	aeg_stream_t *s;
	aeg_slab_t *slab;
	aeg_pool_t *pool;
	aeg_kv_t *kv;
};

static void producer_free(struct producer *pr)
{
	aeg_kv_destroy(pr->kv);
	if (pr->pool)
		aeg_pool_destroy(pr->pool);
	if (pr->slab)
		aeg_slab_destroy(pr->slab);
	if (pr->s)
		aeg_stream_destroy(pr->s);
	if (pr->dev)
		aeg_device_close(pr->dev);
}

/* A cache of --layers layers, one swap-out with an event per layer, the layer handles to @fd. */
static int produce(const struct opts *o, int fd, int done_fd)
{
	aeg_handle_t lh[MAX_LAYERS], call;
	struct aeg_kv_layers layers = { (size_t)o->layers, NULL, lh };
	uint64_t block = (uint64_t)o->layers * 2 * 4096;
	struct aeg_kv_params p = { .block_bytes = block, .layers = (uint32_t)o->layers, .parts = 2,
				   .gpu_blocks = BLOCKS, .host_buffers = BLOCKS };
	size_t bytes = (size_t)o->layers * sizeof(lh[0]);
	struct producer pr = { 0 };
	uint32_t g[BLOCKS], h[BLOCKS];
	int rc = 3;
	char c;

	for (uint32_t i = 0; i < BLOCKS; i++) {
		g[i] = i;
		h[i] = BLOCKS - 1 - i;
	}
	if (aeg_device_open(&pr.dev, o->kind) || aeg_stream_create(pr.dev, o->gpu, &pr.s) ||
	    aeg_slab_create(pr.dev, o->gpu, BLOCKS * block + (1u << 20), &pr.slab) ||
	    aeg_pool_create(pr.dev, o->gpu, block, BLOCKS * block, &pr.pool))
		goto out;
	p.slab = pr.slab;
	p.pool = pr.pool;
	if (aeg_kv_create(pr.dev, o->gpu, &p, &pr.kv) ||
	    aeg_kv_swap_out_layers(pr.kv, g, h, BLOCKS, &layers, pr.s, &call) || aeg_stream_sync(pr.s))
		goto out;
	rc = write(fd, lh, bytes) == (ssize_t)bytes && read(done_fd, &c, 1) == 1 ? 0 : 4;
out:
	if (rc == 3)
		fprintf(stderr, "kv_event_wait: producer: %s\n", aeg_error_detail());
	producer_free(&pr);
	return rc;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

static double us(uint64_t ns)
{
	return (double)ns / 1e3;
}

struct figures {
	uint64_t first_median, first_max, after_open, median, p99, max;
};

/* First waits on every layer handle (opening them), then --waits on layer 0's. */
static int consume(const struct opts *o, const aeg_handle_t *lh, struct figures *f)
{
	uint64_t *t = calloc((size_t)(o->waits > o->layers ? o->waits : o->layers), sizeof(*t)), t0;
	aeg_device_t *dev;
	int err = 0;

	if (!t || aeg_device_open(&dev, o->kind)) {
		fprintf(stderr, "kv_event_wait: %s\n", t ? aeg_error_detail() : "out of memory");
		free(t);
		return 1;
	}
	for (int l = 0; !err && l < o->layers; l++) {
		t0 = aeg_now_ns();
		err = aeg_event_wait_handle(dev, &lh[l], 60000);
		t[l] = aeg_now_ns() - t0;
	}
	qsort(t, (size_t)o->layers, sizeof(*t), cmp_u64);
	f->first_median = t[o->layers / 2];
	f->first_max = t[o->layers - 1];
	for (int i = -1; !err && i < o->waits; i++) {
		t0 = aeg_now_ns();
		err = aeg_event_wait_handle(dev, &lh[0], 60000);
		if (i < 0)
			f->after_open = aeg_now_ns() - t0;
		else
			t[i] = aeg_now_ns() - t0;
	}
	if (err)
		fprintf(stderr, "kv_event_wait: wait: %s\n", aeg_error_detail());
	qsort(t, (size_t)o->waits, sizeof(*t), cmp_u64);
	f->median = t[o->waits / 2];
	f->p99 = t[(size_t)o->waits * 99 / 100];
	f->max = t[o->waits - 1];
	free(t);
	aeg_device_close(dev);
	return err ? 1 : 0;
}

static void report(const struct opts *o, const struct figures *f)
{
	const char *backend = aeg_device_kind_name(o->kind);
	const char *sock = getenv("AEGAEON_SOCKET");
	int in_job = sock && *sock;

	if (o->json) {
		printf("{\"backend\": \"%s\", \"in_job\": %s, \"layers\": %d, \"waits\": %d, "
		       "\"first_wait_us\": {\"median\": %.2f, \"max\": %.2f}, \"first_after_open_us\": %.2f, "
		       "\"opened_wait_us\": {\"median\": %.3f, \"p99\": %.3f, \"max\": %.3f}}\n",
		       backend, in_job ? "true" : "false", o->layers, o->waits, us(f->first_median), us(f->first_max),
		       us(f->after_open), us(f->median), us(f->p99), us(f->max));
		return;
	}
	printf("KV layer events of another process, %s backend%s%s\n", backend,
	       in_job ? ", inside a job (first waits ask its agent)" : ", outside a job",
	       o->kind == AEG_DEVICE_HOST ? " (host-backend figures, not GPU ones)" : "");
	printf("  first wait on each of %d layer handles (opens it): median %.1f us, max %.1f us\n", o->layers,
	       us(f->first_median), us(f->first_max));
	printf("  first wait after the open: %.2f us\n", us(f->after_open));
	printf("  wait on an opened handle, %d waits: median %.3f us, p99 %.3f us, max %.1f us (target <= 10 us)\n",
	       o->waits, us(f->median), us(f->p99), us(f->max));
}

int main(int argc, char **argv)
{
	aeg_handle_t lh[MAX_LAYERS];
	int to_us[2], done[2], status, rc;
	size_t bytes;
	struct figures f = { 0 };
	struct opts o;
	pid_t pid;

	if ((rc = parse(argc, argv, &o)))
		return rc;
	bytes = (size_t)o.layers * sizeof(lh[0]);
	/* The child first: no device is open here yet (CUDA must not cross a fork). */
	if (pipe(to_us) || pipe(done) || (pid = fork()) < 0) {
		perror("kv_event_wait: pipe/fork");
		return 1;
	}
	if (pid == 0) {
		close(to_us[0]);
		close(done[1]);
		_exit(produce(&o, to_us[1], done[0]));
	}
	close(to_us[1]);
	close(done[0]);
	rc = read(to_us[0], lh, bytes) == (ssize_t)bytes ? consume(&o, lh, &f) : 1;
	if (write(done[1], "x", 1) != 1)
		rc = 1;
	close(done[1]);
	close(to_us[0]);
	if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status)) {
		fprintf(stderr, "kv_event_wait: the producer failed\n");
		rc = 1;
	}
	if (rc == 0)
		report(&o, &f);
	return rc;
}
