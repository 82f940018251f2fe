/*
 * submit_probe: do copy submissions wait while another thread registers
 * host memory? The mixed feed's read half queues a cudaMemcpyAsync and a
 * cudaLaunchHostFunc per ring buffer while one worker registers pieces of
 * the mapped file; if the driver holds the submissions behind each
 * cudaHostRegister, the read half only moves in the gaps between them.
 *
 * Three phases, each printed as it ends:
 *   copies alone        a thread copies BUFFER-sized pieces of a pinned
 *                       buffer to the GPU, at most DEPTH queued, as the
 *                       ring's buffers go (copy + host function each);
 *   registration alone  a thread registers SIZE of populated memory in
 *                       PIECE-sized registrations (unregistered after,
 *                       untimed);
 *   both                the two at once, the copies stopping when the
 *                       registrations are done.
 * For the copies: GB/s and how long the calls took to return (p50 / p99 /
 * max); for the registrations: GB/s and per-registration time.
 *
 * --copy-registered also copies each registered piece to the GPU once
 * registered, as the registration feed does; --gate makes the registering
 * thread wait before each registration while a submission is under way.
 *
 * Usage: submit_probe [--size GiB] [--piece MiB] [--buffer MiB] [--depth N]
 *                     [--repeat N] [--gpu N] [--gate] [--copy-registered]
 * Defaults: 4 GiB, 64 MiB pieces, 8 MiB buffers, 16 queued, 3 repeats.
 * Output is line-buffered and a phase that has not ended after 60 s is
 * reported by name before the probe exits 3.
 */
#include "config.h"
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <cuda_runtime.h>

#include "bench_stats.h"

#define MAX_DEPTH 64
#define MAX_CALLS (1u << 20)
#define PHASE_LIMIT_S 60

static const char *volatile phase = "setup";

static void on_alarm(int sig)
{
	char msg[160];
	int n;

	(void)sig;
	n = snprintf(msg, sizeof(msg), "submit_probe: phase '%s' still running after %d s\n", phase,
		     PHASE_LIMIT_S);
	if (n > 0 && write(STDOUT_FILENO, msg, (size_t)n) < 0)
		_exit(4);
	_exit(3);
}

static void phase_start(const char *name)
{
	phase = name;
	alarm(PHASE_LIMIT_S);
}

static void cuda_check(cudaError_t e, const char *what)
{
	if (e != cudaSuccess) {
		printf("submit_probe: %s: %s\n", what, cudaGetErrorString(e));
		exit(1);
	}
}

/*
 * --gate: a remedy tried (not in the engine: it did not move the engine's
 * feeds). A thread about to submit says so; the registering thread waits
 * before each registration until no submission is under way, so the
 * submissions take the driver between registrations instead of after all
 * of them.
 */
struct gate {
	int on;
	pthread_mutex_t lock;
	pthread_cond_t idle;
	int submitting;
};

static struct gate gate = { .lock = PTHREAD_MUTEX_INITIALIZER, .idle = PTHREAD_COND_INITIALIZER };

static void gate_submit_begin(void)
{
	if (!gate.on)
		return;
	pthread_mutex_lock(&gate.lock);
	gate.submitting++;
	pthread_mutex_unlock(&gate.lock);
}

static void gate_submit_end(void)
{
	if (!gate.on)
		return;
	pthread_mutex_lock(&gate.lock);
	if (--gate.submitting == 0)
		pthread_cond_broadcast(&gate.idle);
	pthread_mutex_unlock(&gate.lock);
}

static void gate_register_wait(void)
{
	if (!gate.on)
		return;
	pthread_mutex_lock(&gate.lock);
	while (gate.submitting > 0)
		pthread_cond_wait(&gate.idle, &gate.lock);
	pthread_mutex_unlock(&gate.lock);
}

/* The ring's side: pinned pieces copied to the GPU, a host function after each. */
struct copier {
	char *host, *dev;
	uint64_t buffer;
	int depth;
	cudaStream_t s;
	cudaEvent_t done[MAX_DEPTH];
	atomic_int stop;
	atomic_uint_fast64_t landed;    /* pieces whose host function ran */
	uint64_t bytes, ns;
	uint32_t calls;
	double *copy_us, *fn_us;        /* MAX_CALLS each */
	pthread_t tid;
};

static void CUDART_CB piece_landed(void *arg)
{
	struct copier *c = arg;

	atomic_fetch_add(&c->landed, 1);
}

static void *copier_main(void *arg)
{
	struct copier *c = arg;
	uint64_t t0 = now_ns();

	c->bytes = 0;
	c->calls = 0;
	for (uint32_t i = 0; !atomic_load(&c->stop) && c->calls < MAX_CALLS; i++) {
		uint32_t k = i % (uint32_t)c->depth;
		uint64_t t1, t2, t3;

		if (i >= (uint32_t)c->depth)
			cuda_check(cudaEventSynchronize(c->done[k]), "cudaEventSynchronize");
		gate_submit_begin();
		t1 = now_ns();
		cuda_check(cudaMemcpyAsync(c->dev + k * c->buffer, c->host + k * c->buffer, c->buffer,
					   cudaMemcpyHostToDevice, c->s), "cudaMemcpyAsync");
		t2 = now_ns();
		cuda_check(cudaLaunchHostFunc(c->s, piece_landed, c), "cudaLaunchHostFunc");
		t3 = now_ns();
		cuda_check(cudaEventRecord(c->done[k], c->s), "cudaEventRecord");
		gate_submit_end();
		c->copy_us[c->calls] = (double)(t2 - t1) / 1e3;
		c->fn_us[c->calls] = (double)(t3 - t2) / 1e3;
		c->calls++;
		c->bytes += c->buffer;
	}
	cuda_check(cudaStreamSynchronize(c->s), "cudaStreamSynchronize");
	c->ns = now_ns() - t0;
	return NULL;
}

static void copier_start(struct copier *c)
{
	atomic_store(&c->stop, 0);
	if (pthread_create(&c->tid, NULL, copier_main, c) != 0) {
		printf("submit_probe: pthread_create failed\n");
		exit(1);
	}
}

static void copier_stop(struct copier *c)
{
	atomic_store(&c->stop, 1);
	pthread_join(c->tid, NULL);
}

static void copier_report(const char *what, struct copier *c)
{
	if (c->calls == 0 || c->ns == 0) {
		printf("  %-20s copies: none made\n", what);
		return;
	}
	qsort(c->copy_us, c->calls, sizeof(double), cmp_double);
	qsort(c->fn_us, c->calls, sizeof(double), cmp_double);
	printf("  %-20s copies %5.1f GB/s; cudaMemcpyAsync %.1f / %.1f / %.1f us, cudaLaunchHostFunc %.1f / %.1f / %.1f us (p50 / p99 / max of %u)\n",
	       what, (double)c->bytes / (double)c->ns, c->copy_us[c->calls / 2],
	       c->copy_us[(uint64_t)c->calls * 99 / 100], c->copy_us[c->calls - 1], c->fn_us[c->calls / 2],
	       c->fn_us[(uint64_t)c->calls * 99 / 100], c->fn_us[c->calls - 1], c->calls);
}

/* The registering worker's side. */
struct registrar {
	char *mem;
	char *dev;                      /* --copy-registered: each piece copied here once registered */
	cudaStream_t s;
	uint64_t size, piece;
	uint64_t ns;
	double *reg_ms;                 /* one per piece */
};

static void registrar_run(struct registrar *r)
{
	uint64_t t0 = now_ns();
	uint32_t n = 0;

	for (uint64_t off = 0; off < r->size; off += r->piece, n++) {
		uint64_t t;

		gate_register_wait();
		t = now_ns();
		cuda_check(cudaHostRegister(r->mem + off, r->piece, cudaHostRegisterReadOnly), "cudaHostRegister");
		r->reg_ms[n] = (double)(now_ns() - t) / 1e6;
		if (r->dev != NULL)
			cuda_check(cudaMemcpyAsync(r->dev + off, r->mem + off, r->piece, cudaMemcpyHostToDevice, r->s),
				   "cudaMemcpyAsync of a registered piece");
	}
	if (r->dev != NULL)
		cuda_check(cudaStreamSynchronize(r->s), "cudaStreamSynchronize");
	r->ns = now_ns() - t0;
}

static void registrar_undo(struct registrar *r)
{
	for (uint64_t off = 0; off < r->size; off += r->piece)
		cuda_check(cudaHostUnregister(r->mem + off), "cudaHostUnregister");
}

static void registrar_report(const char *what, struct registrar *r)
{
	uint32_t n = (uint32_t)(r->size / r->piece);

	qsort(r->reg_ms, n, sizeof(double), cmp_double);
	printf("  %-20s registration%s %5.1f GB/s; each %.2f / %.2f ms (p50 / max of %u)\n", what,
	       r->dev != NULL ? " and copy" : "", (double)r->size / (double)r->ns, r->reg_ms[n / 2], r->reg_ms[n - 1], n);
}

static void usage(void)
{
	printf("usage: submit_probe [--size GiB] [--piece MiB] [--buffer MiB] [--depth N] [--repeat N] [--gpu N]\n"
	       "                    [--gate] [--copy-registered]\n");
	exit(2);
}

static long arg_long(const char *v, long lo, long hi)
{
	char *end;
	long x = strtol(v, &end, 10);

	if (*v == '\0' || *end != '\0' || x < lo || x > hi) {
		printf("submit_probe: '%s': expected %ld..%ld\n", v, lo, hi);
		exit(2);
	}
	return x;
}

int main(int argc, char **argv)
{
	struct copier c = { .buffer = 8ull << 20, .depth = 16 };
	struct registrar r = { .size = 4ull << 30, .piece = 64ull << 20 };
	int repeat = 3, gpu = 0, copy_registered = 0;

	setvbuf(stdout, NULL, _IOLBF, 0);
	signal(SIGALRM, on_alarm);
	for (int i = 1; i < argc; i++) {
		const char *v = i + 1 < argc ? argv[i + 1] : NULL;

		if (!strcmp(argv[i], "--gate")) {
			gate.on = 1;
			continue;
		}
		if (!strcmp(argv[i], "--copy-registered")) {
			copy_registered = 1;
			continue;
		}
		if (v == NULL)
			usage();
		if (!strcmp(argv[i], "--size"))
			r.size = (uint64_t)arg_long(v, 1, 64) << 30;
		else if (!strcmp(argv[i], "--piece"))
			r.piece = (uint64_t)arg_long(v, 1, 1024) << 20;
		else if (!strcmp(argv[i], "--buffer"))
			c.buffer = (uint64_t)arg_long(v, 1, 256) << 20;
		else if (!strcmp(argv[i], "--depth"))
			c.depth = (int)arg_long(v, 1, MAX_DEPTH);
		else if (!strcmp(argv[i], "--repeat"))
			repeat = (int)arg_long(v, 1, 100);
		else if (!strcmp(argv[i], "--gpu"))
			gpu = (int)arg_long(v, 0, 64);
		else
			usage();
		i++;
	}
	if (r.size % r.piece != 0) {
		printf("submit_probe: --size must be a multiple of --piece\n");
		return 2;
	}

	phase_start("setup");
	cuda_check(cudaSetDevice(gpu), "cudaSetDevice");
	cuda_check(cudaFree(NULL), "making the CUDA context");
	cuda_check(cudaHostAlloc((void **)&c.host, (size_t)c.depth * c.buffer, 0), "cudaHostAlloc");
	cuda_check(cudaMalloc((void **)&c.dev, (size_t)c.depth * c.buffer), "cudaMalloc");
	cuda_check(cudaStreamCreateWithFlags(&c.s, cudaStreamNonBlocking), "cudaStreamCreate");
	for (int k = 0; k < c.depth; k++)
		cuda_check(cudaEventCreateWithFlags(&c.done[k], cudaEventDisableTiming), "cudaEventCreate");
	memset(c.host, 1, (size_t)c.depth * c.buffer);
	if (copy_registered) {
		cuda_check(cudaMalloc((void **)&r.dev, r.size), "cudaMalloc of the registered pieces' copies");
		cuda_check(cudaStreamCreateWithFlags(&r.s, cudaStreamNonBlocking), "cudaStreamCreate");
	}
	c.copy_us = malloc(MAX_CALLS * sizeof(double));
	c.fn_us = malloc(MAX_CALLS * sizeof(double));
	r.reg_ms = malloc((size_t)(r.size / r.piece) * sizeof(double));
	r.mem = mmap(NULL, r.size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (c.copy_us == NULL || c.fn_us == NULL || r.reg_ms == NULL || r.mem == MAP_FAILED) {
		printf("submit_probe: out of memory\n");
		return 1;
	}
	memset(r.mem, 2, r.size);       /* every page its own, as a mapped file's are */
	printf("submit_probe: %llu MiB registered in %llu MiB pieces%s; copies of %llu MiB, %d queued; %s\n",
	       (unsigned long long)(r.size >> 20), (unsigned long long)(r.piece >> 20),
	       copy_registered ? ", each copied once registered" : "", (unsigned long long)(c.buffer >> 20),
	       c.depth, gate.on ? "registrations wait for submissions (--gate)" : "no gate");

	for (int rep = 0; rep < repeat; rep++) {
		uint64_t alone_ns;

		printf("round %d\n", rep + 1);
		phase_start("registration alone");
		registrar_run(&r);
		registrar_undo(&r);
		alone_ns = r.ns;
		registrar_report("registration alone", &r);

		phase_start("copies alone");
		copier_start(&c);
		usleep((useconds_t)(alone_ns / 1000));
		copier_stop(&c);
		copier_report("copies alone", &c);

		phase_start("both");
		copier_start(&c);
		registrar_run(&r);
		copier_stop(&c);
		registrar_undo(&r);
		registrar_report("both", &r);
		copier_report("both", &c);
	}
	alarm(0);
	printf("submit_probe: done (%llu host functions ran)\n", (unsigned long long)atomic_load(&c.landed));
	return 0;
}
