/* Timing spans: how long each set-up step of a load took, logged at debug level and kept for --timing. */
#include "config.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct aeg_span spans[AEG_SPANS_MAX];
static int nspans, dropped;

void aeg_span_end(const char *name, uint64_t start_ns)
{
	aeg_span_add(name, start_ns, aeg_now_ns());
}

void aeg_span_add(const char *name, uint64_t start_ns, uint64_t end_ns)
{
	uint64_t ns = end_ns >= start_ns ? end_ns - start_ns : 0;

	aeg_debug("span %s: %.3f ms", name, (double)ns / 1e6);
	pthread_mutex_lock(&lock);
	if (nspans < AEG_SPANS_MAX) {
		struct aeg_span *s = &spans[nspans++];

		snprintf(s->name, sizeof(s->name), "%s", name);
		s->start_ns = start_ns;
		s->ns = ns;
	} else {
		dropped++;
	}
	pthread_mutex_unlock(&lock);
}

int aeg_spans_take(struct aeg_span *out, int max, int *lost)
{
	int n;

	pthread_mutex_lock(&lock);
	n = nspans < max ? nspans : max;
	memcpy(out, spans, (size_t)n * sizeof(*out));
	if (lost != NULL)
		*lost = dropped + (nspans - n);
	nspans = 0;
	dropped = 0;
	pthread_mutex_unlock(&lock);
	return n;
}
