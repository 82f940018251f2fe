/* A gate for the GPU tests: a host function that holds a stream until the test opens it. */
#ifndef AEGAEON_TESTS_GPU_GATE_H
#define AEGAEON_TESTS_GPU_GATE_H

#include <pthread.h>

#include <aegaeon/aegaeon.h>

#include "device_internal.h"

struct gate {
	pthread_mutex_t lock;
	pthread_cond_t cv;
	int open;
};

static inline void gate_fn(void *arg)
{
	struct gate *g = arg;

	pthread_mutex_lock(&g->lock);
	while (!g->open)
		pthread_cond_wait(&g->cv, &g->lock);
	pthread_mutex_unlock(&g->lock);
}

static inline int gate_close(struct gate *g, aeg_stream_t *s)
{
	pthread_mutex_init(&g->lock, NULL);
	pthread_cond_init(&g->cv, NULL);
	g->open = 0;
	return aeg_stream_launch_host_fn(s, gate_fn, g);
}

static inline void gate_open(struct gate *g)
{
	pthread_mutex_lock(&g->lock);
	g->open = 1;
	pthread_cond_broadcast(&g->cv);
	pthread_mutex_unlock(&g->lock);
}

#endif
