/* The agent's connections: one thread each, serving its requests; what a connection leaves when it ends. */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "agent_internal.h"
#include "device_internal.h"
#include "internal.h"
#include "pinned_internal.h"

#define WAIT_SLICE_MS 200               /* a chunk wait looks for a stop or a gone client this often */
#define GONE_WATCH_MS 10000             /* a process still alive this long after its last connection keeps its buffers */

struct lease {
	struct lease *next;
	uint32_t slab;
	uint64_t id, bytes;
};

struct client {
	struct client *next;
	struct agent *a;
	int fd;
	pid_t pid;                      /* SO_PEERCRED: in the agent's pid namespace */
	uint64_t pid_start;             /* its start time, 0 when unknown */
	uint32_t hello_pid;             /* what it says its pid is: differs in another namespace */
	uint64_t accepted_ns;
	int hello_done;                 /* its own thread's */
	int pending;                    /* under the lock: no hello yet, counted in npending */
	int dropped;                    /* under the lock: dropped to make room for a newer one */
	int finished;                   /* its thread returned; join it */
	pthread_t thread;
	struct lease *leases;
	unsigned char *frame;
	union proto_msg *in, *out;
};

static void wake(struct agent *a)
{
	uint64_t one = 1;

	if (write(a->wake_fd, &one, sizeof(one)) < 0 && errno != EAGAIN)
		aeg_warn("waking the agent's main loop: %s", strerror(errno));
}

/* -------------------------------------------------------------- requests */

/* The client said hello, was dropped or is gone: no longer one that has not spoken. Lock held. */
static void leave_pending(struct client *c)
{
	if (c->pending) {
		c->pending = 0;
		c->a->npending--;
	}
}

static int do_hello(struct client *c, const struct proto_hello_req *q, struct proto_hello_rep *p)
{
	struct agent *a = c->a;
	int dropped;

	if (q->min_version > PROTO_VERSION || q->max_version < PROTO_VERSION_MIN)
		return aeg_fail(AEG_EPROTO, "client speaks protocol versions %u..%u, this agent %d..%d",
				q->min_version, q->max_version, PROTO_VERSION_MIN, PROTO_VERSION);
	memset(p, 0, sizeof(*p));
	p->version = q->max_version < PROTO_VERSION ? q->max_version : PROTO_VERSION;
	p->agent_pid = (uint32_t)getpid();
	p->device = (uint8_t)a->cfg->device;
	snprintf(p->job_id, sizeof(p->job_id), "%s", a->cfg->job_id);
	p->nslabs = (uint32_t)a->nslabs;
	for (int i = 0; i < a->nslabs; i++) {
		p->slabs[i].gpu = a->slabs[i].gpu;
		memcpy(p->slabs[i].pci_bus_id, a->slabs[i].pci_bus_id, sizeof(p->slabs[i].pci_bus_id));
		p->slabs[i].bytes = aeg_slab_bytes(a->slabs[i].slab);
		p->slabs[i].handle = a->slabs[i].handle;
	}
	/* The pool's sizes are known before it is made. */
	if (a->pool_state != POOL_NONE) {
		p->pool_bytes = a->pool_bytes;
		p->pool_buffer = a->pool_buffer_bytes;
	}
	pthread_mutex_lock(&a->lock);
	dropped = c->dropped;
	if (!dropped)
		leave_pending(c);
	pthread_mutex_unlock(&a->lock);
	if (dropped)
		return aeg_fail(AEG_ECANCELED, "connection dropped before its hello to make room");
	c->hello_done = 1;
	c->hello_pid = q->pid;
	aeg_debug("client pid %d (%s) speaks version %u", (int)c->pid, q->client, p->version);
	return 0;
}

static int do_lease(struct client *c, const struct proto_lease_req *q, struct proto_lease_rep *p)
{
	struct agent *a = c->a;
	struct aeg_block b;
	struct lease *l;
	uint64_t bytes = q->bytes;
	int err;

	if (q->slab >= (uint32_t)a->nslabs)
		return aeg_fail(AEG_ENODEV, "lease: slab %u, the job has %d", q->slab, a->nslabs);
	l = calloc(1, sizeof(*l));
	if (l == NULL)
		return aeg_fail(AEG_ENOMEM, "lease: out of memory");
	pthread_mutex_lock(&a->lock);
	if (bytes == 0) {
		struct aeg_slab_stats st;

		aeg_slab_stats(a->slabs[q->slab].slab, &st);
		bytes = st.largest_free_bytes;
		if (bytes == 0) {
			err = aeg_fail(AEG_ENOSPC, "lease: the slab of GPU %d is full", a->slabs[q->slab].gpu);
			goto out;
		}
	}
	err = aeg_slab_alloc(a->slabs[q->slab].slab, bytes, &b);
	if (err) {
		aeg_error_prefix("lease on GPU %d", a->slabs[q->slab].gpu);
		goto out;
	}
	l->slab = q->slab;
	l->id = b.id;
	l->bytes = b.size;
	l->next = c->leases;
	c->leases = l;
	a->slabs[q->slab].leases++;
	a->slabs[q->slab].lease_bytes += b.size;
	p->slab = q->slab;
	p->offset = b.offset;
	p->bytes = b.size;
	p->lease_id = b.id;
	l = NULL;
out:
	pthread_mutex_unlock(&a->lock);
	free(l);
	return err;
}

/* With the lock held. */
static void lease_drop(struct agent *a, struct lease *l)
{
	int err = aeg_slab_free(a->slabs[l->slab].slab, l->id);

	if (err)
		aeg_warn("freeing lease %" PRIu64 ": %s", l->id, aeg_error_detail());
	a->slabs[l->slab].leases--;
	a->slabs[l->slab].lease_bytes -= l->bytes;
	free(l);
}

static int do_lease_free(struct client *c, const struct proto_lease_free_req *q)
{
	struct agent *a = c->a;
	int err = aeg_fail(AEG_ENOENT, "lease %" PRIu64 " on slab %u is not one of this connection's",
			   q->lease_id, q->slab);

	pthread_mutex_lock(&a->lock);
	for (struct lease **pp = &c->leases; *pp; pp = &(*pp)->next) {
		struct lease *l = *pp;

		if (l->id == q->lease_id && l->slab == q->slab) {
			*pp = l->next;
			lease_drop(a, l);
			err = 0;
			break;
		}
	}
	pthread_mutex_unlock(&a->lock);
	return err;
}

static int do_status(struct client *c, const struct proto_status_req *q, struct proto_status_rep *p)
{
	struct agent *a = c->a;
	int err = 0;

	memset(p, 0, offsetof(struct proto_status_rep, loads));
	pthread_mutex_lock(&a->lock);
	p->nslabs = (uint32_t)a->nslabs;
	for (int s = 0; s < a->nslabs; s++) {
		p->slabs[s].gpu = a->slabs[s].gpu;
		aeg_slab_stats(a->slabs[s].slab, &p->slabs[s].stats);
		p->slabs[s].leases = a->slabs[s].leases;
		p->slabs[s].lease_bytes = a->slabs[s].lease_bytes;
	}
	p->pool.numa_node = -1;
	if (a->pool_state != POOL_NONE) {
		/* One still being made shows its sizes, no buffer in use yet. */
		p->has_pool = 1;
		p->pool.buffer_bytes = a->pool_buffer_bytes;
		p->pool.pool_bytes = a->pool_bytes;
		p->pool.buffers = (uint32_t)(a->pool_bytes / a->pool_buffer_bytes);
		if (a->pool != NULL)
			err = aeg_pool_stats(a->pool, &p->pool);
		if (err)
			goto out;
	}
	p->clients = (uint32_t)a->nclients;
	err = agent_load_status(a, q->first_load, p);
out:
	pthread_mutex_unlock(&a->lock);
	return err;
}

static int peer_gone(int fd)
{
	struct pollfd p = { .fd = fd, .events = POLLRDHUP };

	return poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR));
}

/*
 * Hold the reply until the chunk event is recorded: a process holding only
 * its CUDA IPC handle would see an armed event as complete. In slices, so a
 * stopping agent or a client gone does not leave this thread behind.
 */
static int do_wait_event(struct client *c, const struct proto_wait_event_req *q)
{
	struct agent *a = c->a;
	uint64_t deadline = aeg_now_ns() + (uint64_t)(q->timeout_ms > 0 ? q->timeout_ms : 0) * 1000000ull;

	for (;;) {
		int slice = WAIT_SLICE_MS, stopping, err;

		if (q->timeout_ms >= 0) {
			uint64_t now = aeg_now_ns();
			uint64_t left_ms = now >= deadline ? 0 : (deadline - now + 999999) / 1000000;

			if (left_ms < (uint64_t)slice)
				slice = (int)left_ms;
		}
		err = aeg_event_wait_recorded(a->dev, &q->event, slice);
		if (err == AEG_ENOENT)
			return aeg_fail(err, "no chunk of this job's agent has that event handle (released?)");
		if (err != AEG_ETIMEDOUT)
			return err;
		if (q->timeout_ms >= 0 && aeg_now_ns() >= deadline)
			return aeg_fail(AEG_ETIMEDOUT, "chunk event not recorded after %d ms", q->timeout_ms);
		pthread_mutex_lock(&a->lock);
		stopping = a->stopping;
		pthread_mutex_unlock(&a->lock);
		if (stopping)
			return aeg_fail(AEG_ECANCELED, "the job's agent is stopping");
		if (peer_gone(c->fd))
			return aeg_fail(AEG_ECANCELED, "client pid %d left while waiting", (int)c->pid);
	}
}

/*
 * Hold the reply until load @q->load_id has stopped (loaded, or its error),
 * in slices as a chunk wait does: one round trip for a whole load.
 */
static int do_wait_load(struct client *c, const struct proto_wait_load_req *q)
{
	struct agent *a = c->a;
	uint64_t deadline = aeg_now_ns() + (uint64_t)(q->timeout_ms > 0 ? q->timeout_ms : 0) * 1000000ull;
	struct load *l;
	int err;

	pthread_mutex_lock(&a->lock);
	l = agent_load_get(a, q->load_id);
	pthread_mutex_unlock(&a->lock);
	if (l == NULL)
		return aeg_fail(AEG_ENOENT, "no load %" PRIu64 " (released, or never made)", q->load_id);
	for (;;) {
		int slice = WAIT_SLICE_MS, stopping;

		if (q->timeout_ms >= 0) {
			uint64_t now = aeg_now_ns();
			uint64_t left_ms = now >= deadline ? 0 : (deadline - now + 999999) / 1000000;

			if (left_ms < (uint64_t)slice)
				slice = (int)left_ms;
		}
		err = aeg_load_wait(agent_load_handle(l), slice);
		if (err != AEG_ETIMEDOUT)
			break;
		if (q->timeout_ms >= 0 && aeg_now_ns() >= deadline) {
			err = aeg_fail(AEG_ETIMEDOUT, "load %" PRIu64 " not done after %d ms", q->load_id,
				       q->timeout_ms);
			break;
		}
		pthread_mutex_lock(&a->lock);
		stopping = a->stopping;
		pthread_mutex_unlock(&a->lock);
		if (stopping) {
			err = aeg_fail(AEG_ECANCELED, "the job's agent is stopping");
			break;
		}
		if (peer_gone(c->fd)) {
			err = aeg_fail(AEG_ECANCELED, "client pid %d left while waiting", (int)c->pid);
			break;
		}
	}
	pthread_mutex_lock(&a->lock);
	agent_load_put(l);
	pthread_mutex_unlock(&a->lock);
	return err;
}

/* Serve one request; fill the reply in c->out. */
static int handle(struct client *c, const struct proto_header *h, int *pass_fd)
{
	struct agent *a = c->a;
	const union proto_msg *in = c->in;
	union proto_msg *out = c->out;
	struct aeg_pool_stats ps;
	int err;

	switch (h->type) {
	case PROTO_HELLO:
		return do_hello(c, &in->hello_req, &out->hello_rep);
	case PROTO_LEASE:
		return do_lease(c, &in->lease_req, &out->lease_rep);
	case PROTO_LEASE_FREE:
		return do_lease_free(c, &in->lease_free_req);
	case PROTO_POOL_FD: {
		aeg_pool_t *pool = NULL;

		/* A step that maps the pool while it is still being made waits for it. */
		pthread_mutex_lock(&a->lock);
		err = agent_pool_wait(a, &pool);
		pthread_mutex_unlock(&a->lock);
		if (err == 0)
			err = aeg_pool_stats(pool, &ps);
		if (err)
			return err;
		out->pool_rep.pool_bytes = ps.pool_bytes;
		out->pool_rep.buffer_bytes = ps.buffer_bytes;
		*pass_fd = aeg_pool_fd(pool);
		return 0;
	}
	case PROTO_PREFETCH: {
		struct aeg_slice_rule rules[AEG_SLICE_MAX_RULES];
		struct aeg_slice view;

		pthread_mutex_lock(&a->lock);
		err = agent_load_start(a, in->prefetch_req.slab, in->prefetch_req.path, in->prefetch_req.chunk_bytes,
				       proto_slice_view(&in->prefetch_req.slice, &view, rules), &out->chunks_rep);
		pthread_mutex_unlock(&a->lock);
		return err;
	}
	case PROTO_CHUNKS:
		pthread_mutex_lock(&a->lock);
		err = agent_load_chunks(a, &in->chunks_req, &out->chunks_rep);
		pthread_mutex_unlock(&a->lock);
		return err;
	case PROTO_RELEASE:
		pthread_mutex_lock(&a->lock);
		err = agent_load_release(a, &in->release_req, &out->release_rep.released);
		pthread_mutex_unlock(&a->lock);
		return err;
	case PROTO_STATUS:
		return do_status(c, &in->status_req, &out->status_rep);
	case PROTO_SHUTDOWN:
		aeg_info("shutdown asked by client pid %d", (int)c->pid);
		return 0;
	case PROTO_WAIT_EVENT:
		return do_wait_event(c, &in->wait_event_req);
	case PROTO_WAIT_LOAD:
		return do_wait_load(c, &in->wait_load_req);
	default:
		return aeg_fail(AEG_EPROTO, "%s is not a request", proto_type_name(h->type));
	}
}

static void send_error(struct client *c, uint64_t id, int code)
{
	union proto_msg *out = c->out;

	out->error.code = code;
	snprintf(out->error.detail, sizeof(out->error.detail), "%s", aeg_error_detail());
	(void)proto_send(c->fd, PROTO_ERROR, PROTO_F_REPLY, id, out, -1, c->frame);
}

/*
 * A connection gets hello_timeout for its first byte (the rest of a frame
 * has the frame timeout): one that says nothing cannot keep a slot.
 */
static int wait_hello(struct client *c)
{
	int limit_ms = c->a->cfg->hello_timeout_ms > 0 ? c->a->cfg->hello_timeout_ms : AEG_AGENT_HELLO_TIMEOUT_MS;
	uint64_t deadline = c->accepted_ns + (uint64_t)limit_ms * 1000000ull;

	for (;;) {
		struct pollfd p = { .fd = c->fd, .events = POLLIN };
		uint64_t now = aeg_now_ns();
		int rc;

		if (now >= deadline)
			return aeg_fail(AEG_ETIMEDOUT, "no hello in %d ms (hello_timeout)", limit_ms);
		rc = poll(&p, 1, (int)((deadline - now + 999999) / 1000000));
		if (rc > 0)
			return 0;
		if (rc < 0 && errno != EINTR)
			return aeg_fail(AEG_EIO, "poll: %s", strerror(errno));
	}
}

/*
 * One pass over the watched processes (lock held): put back the buffers of
 * those that exited, forget those past their watch.
 */
static void reclaim_gone(struct agent *a)
{
	uint64_t now = aeg_now_ns();

	for (int i = 0; i < a->ngone;) {
		struct gone *g = &a->gone[i];
		int connected = 0, drop = 1;
		uint32_t n;

		for (struct client *c = a->clients; c; c = c->next)
			connected |= !c->finished && c->pid == g->pid && c->pid_start == g->start;
		if (connected) {
			/* Still attached through another connection: its buffers are in use. */
		} else if (!aeg_proc_alive(g->pid, g->start)) {
			if (aeg_pool_reclaim(a->pool, g->pid, &n))
				aeg_warn("client pid %d exited: %s", (int)g->pid, aeg_error_detail());
			else if (n > 0)
				aeg_warn("client pid %d exited holding %u pinned pool buffer%s; back in the pool",
					 (int)g->pid, n, n == 1 ? "" : "s");
		} else if (now < g->until_ns) {
			drop = 0;
		}
		if (drop)
			*g = a->gone[--a->ngone];
		else
			i++;
	}
}

/*
 * Watch process @pid (started at @start) for its exit now that one of its
 * connections closed (lock held). A process has one entry, which each of
 * its closes renews: one that reconnects many times a second (a monitor
 * polling status) must not fill the table. When the table is full anyway,
 * the exits already there are dealt with, and if none was, the live process
 * whose watch ends first makes way: it loses the rest of its grace, where a
 * step killed meanwhile and turned away would keep its buffers for the
 * job's life.
 */
static void watch_exit(struct agent *a, pid_t pid, uint64_t start)
{
	uint64_t until = aeg_now_ns() + GONE_WATCH_MS * 1000000ull;
	int oldest = 0;

	for (int i = 0; i < a->ngone; i++) {
		if (a->gone[i].pid == pid && a->gone[i].start == start) {
			a->gone[i].until_ns = until;
			return;
		}
	}
	if (a->ngone == GONE_MAX)
		reclaim_gone(a);
	if (a->ngone == GONE_MAX) {
		for (int i = 1; i < a->ngone; i++)
			if (a->gone[i].until_ns < a->gone[oldest].until_ns)
				oldest = i;
		aeg_debug("client pid %d: %d exits watched; pid %d, alive, is no longer watched",
			  (int)pid, GONE_MAX, (int)a->gone[oldest].pid);
		a->gone[oldest] = a->gone[--a->ngone];
	}
	a->gone[a->ngone++] = (struct gone){ pid, start, until };
}

static void *client_main(void *arg)
{
	struct client *c = arg;
	struct agent *a = c->a;

	for (;;) {
		struct proto_header h = { 0 };
		int pass_fd = -1, err = 0;

		if (!c->hello_done && (err = wait_hello(c)) != 0) {
			aeg_warn("client pid %d: %s; disconnecting", (int)c->pid, aeg_error_detail());
			send_error(c, 0, err);
			break;
		}
		err = proto_recv(c->fd, &h, c->in, NULL, c->frame);
		if (err == AEG_ECANCELED)
			break;
		if (!err && (h.flags & PROTO_F_REPLY))
			err = aeg_fail(AEG_EPROTO, "client sent a %s reply", proto_type_name(h.type));
		if (!err && !c->hello_done && h.type != PROTO_HELLO)
			err = aeg_fail(AEG_EPROTO, "first message is %s, not hello", proto_type_name(h.type));
		if (!err && c->hello_done && h.type == PROTO_HELLO)
			err = aeg_fail(AEG_EPROTO, "hello sent twice");
		if (err) {
			/* A peer that breaks the protocol is told why, then dropped. */
			aeg_warn("client pid %d: %s: %s; disconnecting", (int)c->pid, aeg_errname(err),
				 aeg_error_detail());
			if (err == AEG_EPROTO)
				send_error(c, h.id, err);
			break;
		}
		err = handle(c, &h, &pass_fd);
		if (err) {
			aeg_debug("client pid %d: %s: %s", (int)c->pid, proto_type_name(h.type), aeg_error_detail());
			send_error(c, h.id, err);
			if (err == AEG_EPROTO)
				break;
			continue;
		}
		if (proto_send(c->fd, h.type, PROTO_F_REPLY, h.id, c->out, pass_fd, c->frame))
			break;
		if (h.type == PROTO_SHUTDOWN) {
			pthread_mutex_lock(&a->lock);
			a->stopping = 1;
			pthread_mutex_unlock(&a->lock);
			wake(a);
		}
	}
	/* Leases die with the connection that made them. */
	pthread_mutex_lock(&a->lock);
	while (c->leases) {
		struct lease *l = c->leases;

		c->leases = l->next;
		lease_drop(a, l);
	}
	/*
	 * Pool buffers are marked with the holder's own pid: only a process of
	 * the agent's pid namespace (the pid it says is the one the kernel
	 * gave) can be matched with them.
	 */
	if (a->pool && c->hello_done && c->pid_start && c->hello_pid == (uint32_t)c->pid)
		watch_exit(a, c->pid, c->pid_start);
	shutdown(c->fd, SHUT_RDWR);
	leave_pending(c);
	c->finished = 1;
	pthread_mutex_unlock(&a->lock);
	wake(a);
	return NULL;
}

static void client_free(struct client *c)
{
	close(c->fd);
	free(c->frame);
	free(c->in);
	free(c->out);
	free(c);
}

/* Put back the pool buffers of client processes that exited since their connection closed. */
void agent_reclaim_gone(struct agent *a)
{
	pthread_mutex_lock(&a->lock);
	reclaim_gone(a);
	pthread_mutex_unlock(&a->lock);
}

/* Join the threads of clients that ended. */
void agent_reap(struct agent *a, int all)
{
	for (;;) {
		struct client *dead = NULL;

		pthread_mutex_lock(&a->lock);
		for (struct client **pp = &a->clients; *pp; pp = &(*pp)->next) {
			if ((*pp)->finished || all) {
				dead = *pp;
				*pp = dead->next;
				a->nclients--;
				a->ndropped -= dead->dropped;
				break;
			}
		}
		pthread_mutex_unlock(&a->lock);
		if (dead == NULL)
			return;
		pthread_join(dead->thread, NULL);
		client_free(dead);
	}
}

/*
 * Room for a connection from @pid (lock held). Connections that have not
 * said hello get a quarter of the slots: past that, or when every slot is
 * taken, the oldest of them makes way, so connections that never speak
 * cannot keep the job's steps out (a step says hello at once). -1 when every
 * slot is held by a client past its hello.
 */
static int make_room(struct agent *a, pid_t pid)
{
	int max = a->cfg->max_clients > 0 ? a->cfg->max_clients : AEG_AGENT_MAX_CLIENTS;
	int pending_max = max / 4 > 0 ? max / 4 : 1;
	struct client *old = NULL;

	if (a->npending < pending_max && a->nclients - a->ndropped < max)
		return 0;
	for (struct client *c = a->clients; c; c = c->next)
		if (c->pending)
			old = c;        /* the list is newest first */
	if (old == NULL)
		return -1;
	leave_pending(old);
	old->dropped = 1;
	a->ndropped++;
	shutdown(old->fd, SHUT_RDWR);
	aeg_warn("dropped the connection of pid %d, silent for %.0f ms, to make room for pid %d (at most %d "
		 "of the %d connections may be waiting for their hello)", (int)old->pid,
		 (aeg_now_ns() - old->accepted_ns) / 1e6, (int)pid, pending_max, max);
	return 0;
}

static struct client *client_new(struct agent *a, int fd, const struct ucred *cred)
{
	struct client *c = calloc(1, sizeof(*c));

	if (c == NULL || (c->frame = malloc(PROTO_MAX_FRAME)) == NULL ||
	    (c->in = malloc(sizeof(*c->in))) == NULL || (c->out = malloc(sizeof(*c->out))) == NULL) {
		if (c) {
			free(c->frame);
			free(c->in);
			free(c);
		}
		return NULL;
	}
	c->a = a;
	c->fd = fd;
	c->pid = cred->pid;
	c->accepted_ns = aeg_now_ns();
	if (aeg_proc_start_time(cred->pid, &c->pid_start))
		c->pid_start = 0;
	return c;
}

void agent_accept(struct agent *a)
{
	struct ucred cred;
	socklen_t len = sizeof(cred);
	struct client *c;
	int fd, full, err;

	fd = accept4(a->listen_fd, NULL, NULL, SOCK_CLOEXEC);
	if (fd < 0) {
		if (errno != EINTR && errno != EAGAIN && errno != ECONNABORTED)
			aeg_warn("accept: %s", strerror(errno));
		return;
	}
	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) {
		aeg_warn("SO_PEERCRED: %s; connection refused", strerror(errno));
		close(fd);
		return;
	}
	if (cred.uid != getuid()) {
		aeg_warn("refused a connection from uid %u (pid %d): only the job user, uid %u, may connect",
			 (unsigned)cred.uid, (int)cred.pid, (unsigned)getuid());
		close(fd);
		return;
	}
	c = client_new(a, fd, &cred);
	if (c == NULL) {
		aeg_warn("connection from pid %d: out of memory", (int)cred.pid);
		close(fd);
		return;
	}
	pthread_mutex_lock(&a->lock);
	full = make_room(a, cred.pid) < 0;
	err = full ? 0 : pthread_create(&c->thread, NULL, client_main, c);
	if (!full && !err) {
		c->pending = 1;
		a->npending++;
		c->next = a->clients;
		a->clients = c;
		a->nclients++;
	}
	pthread_mutex_unlock(&a->lock);
	if (full) {
		/* Told why, so the step does not take the close for the job's end. */
		int max = a->cfg->max_clients > 0 ? a->cfg->max_clients : AEG_AGENT_MAX_CLIENTS;

		aeg_warn("refused a connection from pid %d: every client slot is held by a client past its hello",
			 (int)cred.pid);
		aeg_fail(AEG_EBUSY, "all %d connections of the job's agent are in use by the job's processes; "
			 "detach a job handle (each aeg_job_attach or aeg_job_connect, and each thread waiting "
			 "for a chunk or a load, holds one) and try again", max);
		send_error(c, 0, AEG_EBUSY);
	} else if (err)
		aeg_warn("connection from pid %d: pthread_create: %s", (int)cred.pid, strerror(err));
	else
		aeg_debug("client pid %d connected", (int)cred.pid);
	if (full || err)
		client_free(c);
}

void agent_disconnect_all(struct agent *a)
{
	for (struct client *c = a->clients; c; c = c->next)
		shutdown(c->fd, SHUT_RDWR);
}
