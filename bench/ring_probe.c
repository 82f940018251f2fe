/* Probe of the read feed's mechanism by piece size, outside the engine. */
/*
 * Threads read a file in the page cache with pread into slots of one
 * pinned ring and copy each slot to a device buffer as soon as it is
 * read; a slot is read into again once its copy is done. The read feed's
 * bytes cross host memory three times (the page cache read, the slot
 * written, the slot read by the copy engines) unless the slot is still
 * in the CPU's last-level cache when the copy reads it: small slots,
 * reused fast, may let the copy take them from there. This prints, per
 * piece size, how long until every byte was on the GPU, and the same
 * reads without the copies (what the CPU alone gives).
 * Usage: ring_probe FILE [--threads N] [--piece KiB[,KiB...]] [--slots N]
 *        [--repeat N] [--gpu N]
 */
#include "config.h"
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cuda_runtime.h>

#include "bench_stats.h"

#define MAX_THREADS 64
#define MAX_SLOTS 64
#define MAX_PIECES 16
#define MAX_REPEAT 64

struct probe {
	int fd;
	uint64_t size;
	uint64_t piece;
	int threads, slots, copy;
	char *ring;             /* threads * slots * piece, pinned */
	char *dev;
	atomic_uint_fast64_t next;
	atomic_int ready, go, failed;
};

struct worker {
	struct probe *pr;
	int index;
	pthread_t tid;
};

static int cuda_ok(cudaError_t e, const char *what, struct probe *pr)
{
	if (e == cudaSuccess)
		return 1;
	fprintf(stderr, "ring_probe: %s: %s\n", what, cudaGetErrorString(e));
	if (pr != NULL)
		atomic_store(&pr->failed, 1);
	return 0;
}

static int read_full(int fd, char *p, uint64_t n, uint64_t off)
{
	while (n > 0) {
		ssize_t r = pread(fd, p, n, (off_t)off);

		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0) {
			fprintf(stderr, "ring_probe: pread at %llu: %s\n", (unsigned long long)off,
				r < 0 ? strerror(errno) : "end of file");
			return 0;
		}
		p += r;
		n -= (uint64_t)r;
		off += (uint64_t)r;
	}
	return 1;
}

static void *worker_main(void *arg)
{
	struct worker *w = arg;
	struct probe *pr = w->pr;
	char *mine = pr->ring + (uint64_t)w->index * (uint64_t)pr->slots * pr->piece;
	cudaEvent_t ev[MAX_SLOTS];
	int used[MAX_SLOTS] = { 0 };
	cudaStream_t s;
	int made = 0;
	uint64_t k = 0;

	if (!cuda_ok(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate", pr)) {
		atomic_fetch_add(&pr->ready, 1);
		return NULL;
	}
	for (; made < pr->slots; made++)
		if (!cuda_ok(cudaEventCreateWithFlags(&ev[made], cudaEventDisableTiming), "cudaEventCreate", pr))
			break;
	atomic_fetch_add(&pr->ready, 1);
	while (!atomic_load(&pr->go))
		;
	while (!atomic_load(&pr->failed) && made == pr->slots) {
		uint64_t off = atomic_fetch_add(&pr->next, pr->piece);
		int slot = (int)(k++ % (uint64_t)pr->slots);
		char *p = mine + (uint64_t)slot * pr->piece;
		uint64_t n;

		if (off >= pr->size)
			break;
		n = pr->size - off < pr->piece ? pr->size - off : pr->piece;
		if (used[slot] && !cuda_ok(cudaEventSynchronize(ev[slot]), "cudaEventSynchronize", pr))
			break;
		if (!read_full(pr->fd, p, n, off)) {
			atomic_store(&pr->failed, 1);
			break;
		}
		if (!pr->copy)
			continue;
		if (!cuda_ok(cudaMemcpyAsync(pr->dev + off, p, n, cudaMemcpyHostToDevice, s), "cudaMemcpyAsync", pr) ||
		    !cuda_ok(cudaEventRecord(ev[slot], s), "cudaEventRecord", pr))
			break;
		used[slot] = 1;
	}
	cuda_ok(cudaStreamSynchronize(s), "cudaStreamSynchronize", pr);
	for (int i = 0; i < made; i++)
		cudaEventDestroy(ev[i]);
	cudaStreamDestroy(s);
	return NULL;
}

/* One run: GB/s until every byte is read (and on the GPU when copying); 0 on failure. */
static double run_once(struct probe *pr)
{
	struct worker w[MAX_THREADS];
	uint64_t t0, t1;

	atomic_store(&pr->next, 0);
	atomic_store(&pr->ready, 0);
	atomic_store(&pr->go, 0);
	for (int i = 0; i < pr->threads; i++) {
		w[i].pr = pr;
		w[i].index = i;
		if (pthread_create(&w[i].tid, NULL, worker_main, &w[i]) != 0) {
			fprintf(stderr, "ring_probe: pthread_create failed\n");
			atomic_store(&pr->failed, 1);
			atomic_fetch_add(&pr->ready, pr->threads - i);
			atomic_store(&pr->go, 1);
			for (int j = 0; j < i; j++)
				pthread_join(w[j].tid, NULL);
			return 0;
		}
	}
	while (atomic_load(&pr->ready) < pr->threads)
		usleep(1000);
	t0 = now_ns();
	atomic_store(&pr->go, 1);
	for (int i = 0; i < pr->threads; i++)
		pthread_join(w[i].tid, NULL);
	t1 = now_ns();
	return atomic_load(&pr->failed) ? 0 : (double)pr->size / (double)(t1 - t0);
}

static void usage(void)
{
	fprintf(stderr, "usage: ring_probe FILE [--threads N] [--piece KiB[,KiB...]] [--slots N] [--repeat N] [--gpu N]\n");
	exit(2);
}

static long parse_count(const char *v, long lo, long hi)
{
	char *end;
	long n;

	if (v == NULL)
		usage();
	errno = 0;
	n = strtol(v, &end, 10);
	if (errno || *end != '\0' || n < lo || n > hi) {
		fprintf(stderr, "ring_probe: '%s' is not a number in %ld..%ld\n", v, lo, hi);
		exit(2);
	}
	return n;
}

static long llc_kib(void)
{
	FILE *f = fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r");
	long kib = -1;

	if (f != NULL) {
		if (fscanf(f, "%ldK", &kib) != 1)
			kib = -1;
		fclose(f);
	}
	return kib;
}

int main(int argc, char **argv)
{
	struct probe pr = { .threads = 8, .slots = 4 };
	uint64_t pieces[MAX_PIECES] = { 1024 };
	int npieces = 1, repeat = 3, gpu = 0;
	uint64_t max_piece = 0;
	struct stat st;

	if (argc < 2 || argv[1][0] == '-')
		usage();
	for (int i = 2; i < argc; i++) {
		const char *v = i + 1 < argc ? argv[i + 1] : NULL;

		if (strcmp(argv[i], "--threads") == 0) {
			pr.threads = (int)parse_count(v, 1, MAX_THREADS);
		} else if (strcmp(argv[i], "--slots") == 0) {
			pr.slots = (int)parse_count(v, 1, MAX_SLOTS);
		} else if (strcmp(argv[i], "--repeat") == 0) {
			repeat = (int)parse_count(v, 1, MAX_REPEAT);
		} else if (strcmp(argv[i], "--gpu") == 0) {
			gpu = (int)parse_count(v, 0, 1024);
		} else if (strcmp(argv[i], "--piece") == 0) {
			char list[256], *save = NULL;

			if (v == NULL || strlen(v) >= sizeof(list))
				usage();
			strcpy(list, v);
			npieces = 0;
			for (char *t = strtok_r(list, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
				if (npieces == MAX_PIECES)
					usage();
				pieces[npieces++] = (uint64_t)parse_count(t, 4, 1L << 20);
			}
			if (npieces == 0)
				usage();
		} else {
			usage();
		}
		i++;
	}
	pr.fd = open(argv[1], O_RDONLY | O_CLOEXEC);
	if (pr.fd < 0 || fstat(pr.fd, &st) != 0 || st.st_size <= 0) {
		fprintf(stderr, "ring_probe: %s: %s\n", argv[1], pr.fd < 0 ? strerror(errno) : "empty or unreadable");
		return 1;
	}
	pr.size = (uint64_t)st.st_size;
	for (int i = 0; i < npieces; i++) {
		pieces[i] <<= 10;
		if (pieces[i] > max_piece)
			max_piece = pieces[i];
	}
	if (!cuda_ok(cudaSetDevice(gpu), "cudaSetDevice", NULL) ||
	    !cuda_ok(cudaMalloc((void **)&pr.dev, pr.size), "cudaMalloc", NULL) ||
	    !cuda_ok(cudaHostAlloc((void **)&pr.ring, (size_t)pr.threads * (size_t)pr.slots * max_piece,
				   cudaHostAllocDefault), "cudaHostAlloc", NULL))
		return 1;
	printf("# ring_probe: %s, %.2f GiB, %d threads x %d slots, last-level cache %ld KiB, medians of %d\n",
	       argv[1], (double)pr.size / (1 << 30), pr.threads, pr.slots, llc_kib(), repeat);
	printf("%-10s %-12s %-14s %-14s\n", "piece", "ring", "read GB/s", "read+copy GB/s");
	for (int i = 0; i < npieces; i++) {
		double rd[MAX_REPEAT], cp[MAX_REPEAT];

		pr.piece = pieces[i];
		for (int r = 0; r < repeat; r++) {
			pr.copy = 0;
			rd[r] = run_once(&pr);
			pr.copy = 1;
			cp[r] = run_once(&pr);
			if (rd[r] == 0 || cp[r] == 0)
				return 1;
		}
		printf("%-10llu %-12llu %-14.1f %-14.1f\n", (unsigned long long)(pr.piece >> 10),
		       (unsigned long long)(((uint64_t)pr.threads * (uint64_t)pr.slots * pr.piece) >> 10),
		       median(rd, repeat), median(cp, repeat));
		fflush(stdout);
	}
	cudaFreeHost(pr.ring);
	cudaFree(pr.dev);
	close(pr.fd);
	return 0;
}
