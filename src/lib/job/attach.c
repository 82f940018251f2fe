/* A job step's side of the agent: connect, map the job's slabs and pool, lease, prefetch, status. */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <aegaeon/version.h>
#include <aegaeon/attach.h>

#include "attach_internal.h"
#include "device_internal.h"
#include "internal.h"
#include "pinned_internal.h"
#include "proto.h"
#include "slice_plan.h"

#define REPLY_TIMEOUT_MS 120000         /* an agent that says nothing this long is stuck */

struct job_lease {
	struct job_lease *next;
	aeg_slab_t *slab;
	uint32_t index;
	uint64_t lease_id;
};

struct aeg_job {
	int fd;
	aeg_device_t *dev;
	struct proto_hello_rep hello;
	struct aeg_job_slab_desc slabs[AEG_JOB_MAX_GPUS];
	aeg_pool_t *pool;
	pthread_mutex_t lock;           /* one request at a time; guards leases */
	uint64_t next_id;
	struct job_lease *leases;
	unsigned char *frame;
	union proto_msg *msg;
	char socket[AEG_JOB_SOCKET_MAX + 4];    /* for messages: aeg_quote of the path, whole */
	char sock_path[AEG_JOB_SOCKET_MAX];     /* the path itself */
	uint16_t lost_type;             /* a request of this type went unanswered: out of step (0: none) */
	int pool_wanted;                /* attached (not connect-only) to a job with a pool */
	struct aeg_job *next_job;       /* on the list of attached jobs */
	struct aeg_job *idle_waiter;    /* a wait connection kept for the next wait */
	int listed;
};

static void jobs_add(aeg_job_t *job);
static aeg_job_t *jobs_remove(aeg_job_t *job);
static void conn_free(aeg_job_t *c);
static int wait_recorded_by_agent(void *ctx, const aeg_handle_t *handle, int timeout_ms);

/*
 * An error frame of id 0 is the agent's word on the connection itself, sent
 * just before it closes it (every slot taken, no hello in time): the answer
 * to whatever was asked. Lock held.
 */
static int closed_by_agent(aeg_job_t *job)
{
	return aeg_fail(job->msg->error.code, "the agent at %s closed the connection: %s", job->socket,
			job->msg->error.detail);
}

/* A send found the connection closed: the agent's reason if it left one, else @err. Lock held. */
static int send_failed(aeg_job_t *job, int err)
{
	struct pollfd p = { .fd = job->fd, .events = POLLIN };
	struct proto_header h;
	char why[256];

	snprintf(why, sizeof(why), "%s", aeg_error_detail());
	if (poll(&p, 1, 0) == 1 && proto_recv(job->fd, &h, job->msg, NULL, job->frame) == 0 &&
	    h.type == PROTO_ERROR && h.id == 0)
		return closed_by_agent(job);
	return aeg_fail(err, "the agent at %s closed the connection (did the job end?): %s", job->socket, why);
}

/*
 * Send @type with job->msg as payload, wait at most @reply_ms (< 0: no
 * limit) for its reply into job->msg. Lock held.
 *
 * A reply that did not come in time may still come, and would be read as
 * the answer to the next request: the connection is out of step for good.
 * It is not replaced behind the caller's back: the agent frees a
 * connection's leases when it closes, and this process still maps them. It
 * stays open until detach, and every later call says to attach again.
 */
static int call_timed(aeg_job_t *job, uint16_t type, int *recv_fd, int reply_ms)
{
	struct proto_header h;
	struct pollfd p = { .fd = job->fd, .events = POLLIN };
	uint64_t id;
	int err, rc;

	if (job->lost_type != 0)
		return aeg_fail(AEG_EIO, "this job handle is out of step with the agent at %s since a %s request "
				"went unanswered; detach it and attach again (aeg_job_detach, aeg_job_attach)",
				job->socket, proto_type_name(job->lost_type));
	id = ++job->next_id;
	err = proto_send(job->fd, type, 0, id, job->msg, -1, job->frame);
	if (err == AEG_EIO)
		return send_failed(job, err);
	if (err) {
		aeg_error_prefix("agent at %s", job->socket);
		return err;
	}
	do
		rc = poll(&p, 1, reply_ms);
	while (rc < 0 && errno == EINTR);
	if (rc == 0) {
		/* A wait connection is dropped after this (waiter_put); a job's own stays with its job. */
		job->lost_type = type;
		return aeg_fail(AEG_ETIMEDOUT, "the agent at %s did not answer a %s request in %d s%s", job->socket,
				proto_type_name(type), reply_ms / 1000,
				job->listed ? "; this job handle is out of step: detach it and attach again" : "");
	}
	err = proto_recv(job->fd, &h, job->msg, recv_fd, job->frame);
	if (err == AEG_ECANCELED)
		return aeg_fail(AEG_EIO, "the agent at %s closed the connection (did the job end?)", job->socket);
	if (err) {
		aeg_error_prefix("agent at %s", job->socket);
		return err;
	}
	if ((h.flags & PROTO_F_REPLY) && h.type == PROTO_ERROR && h.id == 0)
		return closed_by_agent(job);
	if (!(h.flags & PROTO_F_REPLY) || h.id != id || (h.type != type && h.type != PROTO_ERROR)) {
		if (recv_fd && *recv_fd >= 0)
			close(*recv_fd);
		return aeg_fail(AEG_EPROTO, "agent answered a %s request (id %" PRIu64 ") with %s (id %" PRIu64 ")",
				proto_type_name(type), id, proto_type_name(h.type), h.id);
	}
	if (h.type == PROTO_ERROR)
		return aeg_fail(job->msg->error.code, "%s", job->msg->error.detail);
	return 0;
}

static int call(aeg_job_t *job, uint16_t type, int *recv_fd)
{
	return call_timed(job, type, recv_fd, REPLY_TIMEOUT_MS);
}

/* The local ordinal of the agent's slab @s: same PCI bus id, or same ordinal when none is known. */
static int local_gpu(aeg_device_t *dev, const struct proto_slab *s)
{
	int count;

	if (aeg_device_count(dev, &count))
		return -1;
	for (int g = 0; g < count; g++) {
		char id[AEG_PCI_BUS_ID_LEN];

		if (aeg_device_pci_bus_id(dev, g, id))
			continue;
		if (s->pci_bus_id[0] && strcasecmp(id, s->pci_bus_id) == 0)
			return g;
	}
	if (s->pci_bus_id[0] == '\0' && s->gpu < count)
		return s->gpu;
	return -1;
}

/* Stale environment (a step of another job, a restarted agent) is refused, not used. */
static int check_env(const aeg_job_t *job)
{
	const char *v = getenv("AEGAEON_SLABS");
	char name[40], q[64], *end;
	unsigned long n;

	if (v) {
		errno = 0;
		n = strtoul(v, &end, 10);
		if (v[0] < '0' || v[0] > '9' || *end != '\0' || errno != 0)
			return aeg_fail(AEG_EINVAL, "AEGAEON_SLABS='%s' is not a number of slabs",
					aeg_quote(v, q, sizeof(q)));
		if (n != job->hello.nslabs)
			return aeg_fail(AEG_EPROTO, "AEGAEON_SLABS=%lu but the agent at %s has %u slabs",
					n, job->socket, job->hello.nslabs);
	}
	for (uint32_t i = 0; i < job->hello.nslabs; i++) {
		aeg_handle_t h;

		snprintf(name, sizeof(name), "AEGAEON_SLAB%u_HANDLE", i);
		v = getenv(name);
		if (v == NULL)
			continue;
		if (aeg_handle_from_hex(v, &h) || memcmp(&h, &job->hello.slabs[i].handle, sizeof(h)))
			return aeg_fail(AEG_EPROTO, "%s does not match slab %u of the agent at %s "
					"(environment from another job?)", name, i, job->socket);
	}
	return 0;
}

static int connect_agent(aeg_job_t *job, const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	char q[160];

	if (path == NULL || *path == '\0')
		return aeg_fail(AEG_ENOENT, "not inside an aegaeon job (AEGAEON_SOCKET is not set; "
				"run under srun/sbatch with --aegaeon-slab or --aegaeon-pinned)");
	/* The plugin sets an absolute path; anything else would name a socket under the working directory. */
	if (path[0] != '/')
		return aeg_fail(AEG_EINVAL, "AEGAEON_SOCKET='%s' is not an absolute path (the job's agent.sock)",
				aeg_quote(path, q, sizeof(q)));
	if (strlen(path) >= sizeof(sa.sun_path))
		return aeg_fail(AEG_EINVAL, "AEGAEON_SOCKET='%s' is longer than %zu bytes",
				aeg_quote(path, q, sizeof(q)), sizeof(sa.sun_path) - 1);
	/* Kept for messages only: as it may be shown. */
	aeg_quote(path, job->socket, sizeof(job->socket));
	snprintf(job->sock_path, sizeof(job->sock_path), "%s", path);
	memcpy(sa.sun_path, path, strlen(path) + 1);
	job->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (job->fd < 0)
		return aeg_fail(AEG_EIO, "socket: %s", strerror(errno));
	if (connect(job->fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		int e = errno;
		return aeg_fail(e == EACCES || e == EPERM ? AEG_EACCES : AEG_EIO,
				"connecting to the job's agent at %s: %s%s", job->socket, strerror(e),
				e == ECONNREFUSED || e == ENOENT ? " (the agent is not running)" : "");
	}
	return 0;
}

static int hello(aeg_job_t *job)
{
	struct proto_hello_req *q = &job->msg->hello_req;
	int err;

	memset(q, 0, sizeof(*q));
	q->min_version = PROTO_VERSION_MIN;
	q->max_version = PROTO_VERSION;
	q->pid = (uint32_t)getpid();
	snprintf(q->client, sizeof(q->client), "libaegaeon %s", aeg_version());
	err = call(job, PROTO_HELLO, NULL);
	if (err)
		return err;
	job->hello = job->msg->hello_rep;
	return check_env(job);
}

static int map_memory(aeg_job_t *job)
{
	int err;

	for (uint32_t i = 0; i < job->hello.nslabs; i++) {
		struct aeg_job_slab_desc *d = &job->slabs[i];

		if (d->gpu < 0) {
			aeg_debug("job slab %u (GPU %s) is not visible to this process", i, d->pci_bus_id);
			continue;
		}
		err = aeg_mem_open_handle(job->dev, d->gpu, &job->hello.slabs[i].handle, &d->base);
		if (err) {
			d->base = NULL;
			aeg_error_prefix("opening job slab %u (agent GPU %d)", i, d->agent_gpu);
			return err;
		}
	}
	/* The pool is mapped at its first use: the agent may still be making it. */
	job->pool_wanted = job->hello.pool_bytes != 0;
	return 0;
}

/* Map the job's pool (the agent answers once it is made); lock held. */
static int map_pool(aeg_job_t *job)
{
	aeg_pool_t *pool = NULL;
	uint64_t t = aeg_now_ns();
	int fd = -1, err;

	err = call(job, PROTO_POOL_FD, &fd);
	if (err)
		return err;
	if (fd < 0)
		return aeg_fail(AEG_EPROTO, "the agent's pool reply carried no descriptor");
	/* The agent's word on the geometry, not the header's: any step can write that. */
	err = aeg_pool_attach_known(job->dev, fd, job->hello.pool_buffer, job->hello.pool_bytes, &pool);
	close(fd);
	if (err) {
		aeg_error_prefix("mapping the job's pinned pool");
		return err;
	}
	__atomic_store_n(&job->pool, pool, __ATOMIC_RELEASE);
	aeg_span_end("job pool map", t);
	return 0;
}

static int open_job(aeg_job_t **jobp, int map)
{
	aeg_job_t *job;
	int err;

	if (jobp == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_job_attach: NULL argument");
	*jobp = NULL;
	job = calloc(1, sizeof(*job));
	if (job == NULL)
		return aeg_fail(AEG_ENOMEM, "job: out of memory");
	job->fd = -1;
	pthread_mutex_init(&job->lock, NULL);
	job->frame = malloc(PROTO_MAX_FRAME);
	job->msg = malloc(sizeof(*job->msg));
	if (job->frame == NULL || job->msg == NULL) {
		err = aeg_fail(AEG_ENOMEM, "job: out of memory");
		goto fail;
	}
	err = connect_agent(job, getenv("AEGAEON_SOCKET"));
	if (err)
		goto fail;
	err = hello(job);
	if (err)
		goto fail;
	err = aeg_device_open(&job->dev, (enum aeg_device_kind)job->hello.device);
	if (err) {
		aeg_error_prefix("the job's %s device", aeg_device_kind_name(job->hello.device));
		goto fail;
	}
	aeg_device_set_event_resolver(job->dev, wait_recorded_by_agent, job);
	for (uint32_t i = 0; i < job->hello.nslabs; i++) {
		struct aeg_job_slab_desc *d = &job->slabs[i];

		d->agent_gpu = job->hello.slabs[i].gpu;
		d->gpu = local_gpu(job->dev, &job->hello.slabs[i]);
		memcpy(d->pci_bus_id, job->hello.slabs[i].pci_bus_id, sizeof(d->pci_bus_id));
		d->bytes = job->hello.slabs[i].bytes;
	}
	if (map) {
		err = map_memory(job);
		if (err)
			goto fail;
	}
	jobs_add(job);
	job->listed = 1;
	*jobp = job;
	return 0;
fail:
	aeg_job_detach(job);
	return err;
}

/*
 * Waits hold their connection's reply for as long as they wait, so they go
 * on connections of their own, never the job's. A job keeps one idle wait
 * connection and reuses it, so a wait costs one round trip, not a connect
 * and a hello; event waits (aeg_agent_wait_event) find it through the list
 * of jobs attached in this process. A child of fork() has no job attached.
 */
static pthread_mutex_t jobs_lock = PTHREAD_MUTEX_INITIALIZER;
static aeg_job_t *jobs;                 /* attached in this process, guarded by jobs_lock */
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void conn_free(aeg_job_t *c)
{
	if (c->fd >= 0)
		close(c->fd);
	free(c->frame);
	free(c->msg);
	pthread_mutex_destroy(&c->lock);
	free(c);
}

static void atfork_prepare(void) { pthread_mutex_lock(&jobs_lock); }
static void atfork_parent(void) { pthread_mutex_unlock(&jobs_lock); }
static void atfork_child(void)
{
	jobs = NULL;            /* the parent's, not to be used here */
	pthread_mutex_unlock(&jobs_lock);
}

static void register_atfork(void)
{
	pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}

static void jobs_add(aeg_job_t *job)
{
	pthread_once(&atfork_once, register_atfork);
	pthread_mutex_lock(&jobs_lock);
	job->next_job = jobs;
	jobs = job;
	pthread_mutex_unlock(&jobs_lock);
}

/* Forget @job and return its idle wait connection (the caller closes it). */
static aeg_job_t *jobs_remove(aeg_job_t *job)
{
	aeg_job_t *idle;

	pthread_mutex_lock(&jobs_lock);
	for (aeg_job_t **pp = &jobs; *pp; pp = &(*pp)->next_job) {
		if (*pp == job) {
			*pp = job->next_job;
			break;
		}
	}
	idle = job->idle_waiter;
	job->idle_waiter = NULL;
	pthread_mutex_unlock(&jobs_lock);
	return idle;
}

/* The attached job served at @socket_path, or NULL; jobs_lock held. */
static aeg_job_t *job_at(const char *socket_path)
{
	for (aeg_job_t *j = jobs; j; j = j->next_job)
		if (strcmp(j->sock_path, socket_path) == 0)
			return j;
	return NULL;
}

/* A connection to @socket_path that has said hello: an attached job's idle one, or a new one. */
static int waiter_get(const char *socket_path, aeg_job_t **out)
{
	aeg_job_t *c = NULL, *job;
	int err;

	pthread_mutex_lock(&jobs_lock);
	job = socket_path ? job_at(socket_path) : NULL;
	if (job != NULL) {
		c = job->idle_waiter;
		job->idle_waiter = NULL;
	}
	pthread_mutex_unlock(&jobs_lock);
	if (c != NULL) {
		*out = c;
		return 0;
	}
	c = calloc(1, sizeof(*c));
	if (c == NULL)
		return aeg_fail(AEG_ENOMEM, "job: out of memory");
	c->fd = -1;
	pthread_mutex_init(&c->lock, NULL);
	c->frame = malloc(PROTO_MAX_FRAME);
	c->msg = malloc(sizeof(*c->msg));
	if (c->frame == NULL || c->msg == NULL)
		err = aeg_fail(AEG_ENOMEM, "job: out of memory");
	else
		err = connect_agent(c, socket_path);
	if (err == 0)
		err = hello(c);
	if (err) {
		conn_free(c);
		return err;
	}
	*out = c;
	return 0;
}

/* Keep @c as its job's idle wait connection when its exchange ended cleanly (@err is the agent's answer). */
static void waiter_put(aeg_job_t *c, int err)
{
	int clean = c->lost_type == 0 && err != AEG_EIO && err != AEG_EPROTO && err != AEG_ENOMEM;
	aeg_job_t *job;

	pthread_mutex_lock(&jobs_lock);
	job = clean ? job_at(c->sock_path) : NULL;
	if (job != NULL && job->idle_waiter == NULL) {
		job->idle_waiter = c;
		c = NULL;
	}
	pthread_mutex_unlock(&jobs_lock);
	if (c != NULL)
		conn_free(c);
}

/* A wait request on a wait connection: the reply may take @timeout_ms (< 0: no limit) and more. */
static int wait_call(const char *socket_path, uint16_t type, const union proto_msg *req, int timeout_ms)
{
	aeg_job_t *c = NULL;
	int err;

	err = waiter_get(socket_path, &c);
	if (err)
		return err;
	/* The request's own member: the union is tens of KiB, most of it chunk pages. */
	if (type == PROTO_WAIT_EVENT)
		c->msg->wait_event_req = req->wait_event_req;
	else
		c->msg->wait_load_req = req->wait_load_req;
	err = call_timed(c, type, NULL, timeout_ms < 0 || timeout_ms > INT_MAX - REPLY_TIMEOUT_MS ? -1 :
			 timeout_ms + REPLY_TIMEOUT_MS);
	waiter_put(c, err);
	return err;
}

int aeg_agent_wait_event(const char *socket_path, const aeg_handle_t *handle, int timeout_ms)
{
	union proto_msg req;

	memset(&req.wait_event_req, 0, sizeof(req.wait_event_req));
	req.wait_event_req.event = *handle;
	req.wait_event_req.timeout_ms = timeout_ms < 0 ? -1 : timeout_ms;
	return wait_call(socket_path, PROTO_WAIT_EVENT, &req, timeout_ms);
}

/*
 * The job device's event resolver: the agent knows its chunks' events, armed
 * before their copies are queued, which a CUDA IPC handle cannot show.
 */
static int wait_recorded_by_agent(void *ctx, const aeg_handle_t *handle, int timeout_ms)
{
	const aeg_job_t *job = ctx;

	return aeg_agent_wait_event(job->sock_path, handle, timeout_ms);
}

AEG_EXPORT int aeg_job_wait(aeg_job_t *job, uint64_t load_id, int timeout_ms)
{
	union proto_msg req;

	if (job == NULL || load_id == 0)
		return aeg_fail(AEG_EINVAL, "aeg_job_wait: %s", job ? "load id 0" : "NULL job");
	memset(&req.wait_load_req, 0, sizeof(req.wait_load_req));
	req.wait_load_req.load_id = load_id;
	req.wait_load_req.timeout_ms = timeout_ms < 0 ? -1 : timeout_ms;
	return wait_call(job->sock_path, PROTO_WAIT_LOAD, &req, timeout_ms);
}

AEG_EXPORT int aeg_job_attach(aeg_job_t **job)
{
	return open_job(job, 1);
}

AEG_EXPORT int aeg_job_connect(aeg_job_t **job)
{
	return open_job(job, 0);
}

AEG_EXPORT void aeg_job_detach(aeg_job_t *job)
{
	if (job == NULL)
		return;
	if (job->listed) {
		aeg_job_t *idle = jobs_remove(job);

		if (idle != NULL)
			conn_free(idle);
	}
	while (job->leases) {
		struct job_lease *l = job->leases;

		job->leases = l->next;
		aeg_slab_destroy(l->slab);
		free(l);
	}
	if (job->pool)
		aeg_pool_destroy(job->pool);
	for (int i = 0; i < AEG_JOB_MAX_GPUS; i++)
		if (job->slabs[i].base)
			aeg_mem_close_handle(job->dev, job->slabs[i].base);
	/* Closing the connection ends its leases in the agent. */
	if (job->fd >= 0)
		close(job->fd);
	if (job->dev)
		aeg_device_close(job->dev);
	pthread_mutex_destroy(&job->lock);
	free(job->frame);
	free(job->msg);
	free(job);
}

AEG_EXPORT aeg_device_t *aeg_job_device(aeg_job_t *job)
{
	return job ? job->dev : NULL;
}

AEG_EXPORT int aeg_job_get_info(aeg_job_t *job, struct aeg_job_info *info)
{
	if (job == NULL || info == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_job_get_info: NULL argument");
	memset(info, 0, sizeof(*info));
	snprintf(info->job_id, sizeof(info->job_id), "%s", job->hello.job_id);
	info->agent_pid = (long)job->hello.agent_pid;
	info->device = (enum aeg_device_kind)job->hello.device;
	info->slabs = (int)job->hello.nslabs;
	info->pinned_bytes = job->hello.pool_bytes;
	info->pinned_buffer = job->hello.pool_buffer;
	return 0;
}

static int check_index(const aeg_job_t *job, int index)
{
	if (index < 0 || (uint32_t)index >= job->hello.nslabs)
		return aeg_fail(AEG_ENODEV, "job slab %d does not exist: the job has %u", index, job->hello.nslabs);
	return 0;
}

AEG_EXPORT int aeg_job_slab_describe(aeg_job_t *job, int index, struct aeg_job_slab_desc *desc)
{
	if (job == NULL || desc == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_job_slab_describe: NULL argument");
	if (check_index(job, index))
		return AEG_ENODEV;
	*desc = job->slabs[index];
	return 0;
}

AEG_EXPORT aeg_pool_t *aeg_job_pool(aeg_job_t *job)
{
	aeg_pool_t *pool;

	if (job == NULL)
		return NULL;
	pool = __atomic_load_n(&job->pool, __ATOMIC_ACQUIRE);
	if (pool != NULL || !job->pool_wanted)
		return pool;
	pthread_mutex_lock(&job->lock);
	if (job->pool == NULL && map_pool(job) != 0)
		aeg_debug("the job's pool: %s", aeg_error_detail());
	pool = job->pool;
	pthread_mutex_unlock(&job->lock);
	return pool;
}

AEG_EXPORT int aeg_job_slab(aeg_job_t *job, int index, uint64_t bytes, aeg_slab_t **slab)
{
	struct aeg_job_slab_desc *d;
	struct proto_lease_rep rep;
	struct job_lease *l;
	int err;

	if (job == NULL || slab == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_job_slab: NULL argument");
	if (check_index(job, index))
		return AEG_ENODEV;
	d = &job->slabs[index];
	if (d->base == NULL)
		return aeg_fail(AEG_ENODEV, "job slab %d (GPU %s, agent GPU %d) is not %s in this process",
				index, d->pci_bus_id[0] ? d->pci_bus_id : "?", d->agent_gpu,
				d->gpu < 0 ? "visible" : "mapped (aeg_job_connect)");
	l = calloc(1, sizeof(*l));
	if (l == NULL)
		return aeg_fail(AEG_ENOMEM, "lease: out of memory");
	pthread_mutex_lock(&job->lock);
	job->msg->lease_req.slab = (uint32_t)index;
	job->msg->lease_req.bytes = bytes;
	err = call(job, PROTO_LEASE, NULL);
	if (err)
		goto out;
	rep = job->msg->lease_rep;
	if (rep.slab != (uint32_t)index || rep.offset > d->bytes || rep.bytes > d->bytes - rep.offset) {
		err = aeg_fail(AEG_EPROTO, "agent leased %" PRIu64 " bytes at %" PRIu64 " of a %" PRIu64 "-byte slab",
			       rep.bytes, rep.offset, d->bytes);
		goto out;
	}
	err = aeg_slab_wrap(job->dev, d->gpu, (char *)d->base + rep.offset, rep.bytes, &l->slab);
	if (err) {
		/* Give the lease straight back; the connection keeps no orphan. */
		job->msg->lease_free_req.slab = (uint32_t)index;
		job->msg->lease_free_req.lease_id = rep.lease_id;
		(void)call(job, PROTO_LEASE_FREE, NULL);
		goto out;
	}
	l->index = (uint32_t)index;
	l->lease_id = rep.lease_id;
	l->next = job->leases;
	job->leases = l;
	*slab = l->slab;
	l = NULL;
out:
	pthread_mutex_unlock(&job->lock);
	free(l);
	return err;
}

AEG_EXPORT int aeg_job_slab_return(aeg_job_t *job, aeg_slab_t *slab)
{
	struct job_lease *l = NULL;
	int err;

	if (job == NULL || slab == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_job_slab_return: NULL argument");
	pthread_mutex_lock(&job->lock);
	for (struct job_lease **pp = &job->leases; *pp; pp = &(*pp)->next) {
		if ((*pp)->slab == slab) {
			l = *pp;
			*pp = l->next;
			break;
		}
	}
	if (l == NULL) {
		pthread_mutex_unlock(&job->lock);
		return aeg_fail(AEG_EINVAL, "slab %p did not come from aeg_job_slab on this job", (void *)slab);
	}
	aeg_slab_destroy(l->slab);
	job->msg->lease_free_req.slab = l->index;
	job->msg->lease_free_req.lease_id = l->lease_id;
	err = call(job, PROTO_LEASE_FREE, NULL);
	pthread_mutex_unlock(&job->lock);
	free(l);
	return err;
}

/* Gather every page of a chunk list; the first page is in job->msg. Lock held. */
static int collect(aeg_job_t *job, struct aeg_job_load **out)
{
	struct proto_chunks_rep *rep = &job->msg->chunks_rep;
	struct aeg_job_load *load;
	const struct aeg_job_slab_desc *d;
	uint64_t load_id = rep->load_id;
	uint32_t total = rep->total;
	int err = 0;

	if (rep->slab >= job->hello.nslabs)
		return aeg_fail(AEG_EPROTO, "agent sent chunks of slab %u; the job has %u", rep->slab,
				job->hello.nslabs);
	d = &job->slabs[rep->slab];
	load = calloc(1, sizeof(*load));
	if (load == NULL || (load->chunks = calloc(total ? total : 1, sizeof(*load->chunks))) == NULL) {
		free(load);
		return aeg_fail(AEG_ENOMEM, "chunk list of %u chunks: out of memory", total);
	}
	load->load_id = load_id;
	load->slab = (int)rep->slab;
	load->status = rep->status;
	if (rep->detail[0] != '\0' && (load->detail = strdup(rep->detail)) == NULL) {
		aeg_job_load_free(load);
		return aeg_fail(AEG_ENOMEM, "chunk list: out of memory");
	}
	if (rep->slice.present) {
		struct aeg_slice_rule rules[AEG_SLICE_MAX_RULES];
		struct aeg_slice view;

		err = slice_dup(proto_slice_view(&rep->slice, &view, rules), &load->slice);
		if (err) {
			aeg_job_load_free(load);
			return err;
		}
	}
	load->file_bytes = rep->file_bytes;
	load->done_bytes = rep->done_bytes;
	for (;;) {
		if (rep->load_id != load_id || rep->first != load->count || rep->total != total) {
			err = aeg_fail(AEG_EPROTO, "chunk list of load %" PRIu64 " changed while read (page %u of %u)",
				       load_id, rep->first, rep->total);
			break;
		}
		for (uint32_t i = 0; i < rep->count; i++) {
			struct aeg_job_chunk *c = &load->chunks[load->count++];
			const struct proto_chunk *pc = &rep->chunks[i];

			if (pc->offset > d->bytes || pc->size > d->bytes - pc->offset) {
				err = aeg_fail(AEG_EPROTO, "chunk at %" PRIu64 "+%" PRIu64 " outside a %" PRIu64 "-byte slab",
					       pc->offset, pc->size, d->bytes);
				goto out;
			}
			c->ptr = d->base ? (char *)d->base + pc->offset : NULL;
			c->offset = pc->offset;
			c->size = pc->size;
			c->file_offset = pc->file_offset;
			c->slab_id = pc->slab_id;
			c->event = pc->event;
		}
		if (load->count == total)
			break;
		if (rep->count == 0) {
			err = aeg_fail(AEG_EPROTO, "empty chunk page %u of %u", rep->first, total);
			break;
		}
		memset(&job->msg->chunks_req, 0, sizeof(job->msg->chunks_req));
		job->msg->chunks_req.load_id = load_id;
		job->msg->chunks_req.slab = (uint32_t)load->slab;
		job->msg->chunks_req.first = load->count;
		err = call(job, PROTO_CHUNKS, NULL);
		if (err)
			break;
	}
out:
	if (err) {
		aeg_job_load_free(load);
		return err;
	}
	*out = load;
	return 0;
}

static int absolute(const char *path, char out[PROTO_PATH_MAX])
{
	char cwd[PATH_MAX];

	if (path == NULL || *path == '\0')
		return aeg_fail(AEG_EINVAL, "empty path");
	if (path[0] == '/') {
		if (strlen(path) >= PROTO_PATH_MAX)
			return aeg_fail(AEG_EINVAL, "path of %zu bytes, at most %d", strlen(path), PROTO_PATH_MAX - 1);
		strcpy(out, path);
		return 0;
	}
	/* The agent's working directory is not ours. */
	if (getcwd(cwd, sizeof(cwd)) == NULL)
		return aeg_fail(AEG_EIO, "getcwd: %s", strerror(errno));
	if (snprintf(out, PROTO_PATH_MAX, "%s/%s", cwd, path) >= PROTO_PATH_MAX)
		return aeg_fail(AEG_EINVAL, "path %s/%s too long", cwd, path);
	return 0;
}

AEG_EXPORT int aeg_job_prefetch(aeg_job_t *job, const char *path, int index, uint64_t chunk_bytes,
				struct aeg_job_load **load)
{
	return aeg_job_prefetch_slice(job, path, index, chunk_bytes, NULL, load);
}

AEG_EXPORT int aeg_job_prefetch_slice(aeg_job_t *job, const char *path, int index, uint64_t chunk_bytes,
				      const struct aeg_slice *slice, struct aeg_job_load **load)
{
	int err;

	if (job == NULL || load == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_job_prefetch: NULL argument");
	if (check_index(job, index))
		return AEG_ENODEV;
	if (slice != NULL && aeg_slice_check(slice))
		return AEG_EINVAL;
	pthread_mutex_lock(&job->lock);
	memset(&job->msg->prefetch_req, 0, offsetof(struct proto_prefetch_req, slice));
	err = absolute(path, job->msg->prefetch_req.path);
	if (err)
		goto out;
	job->msg->prefetch_req.slab = (uint32_t)index;
	job->msg->prefetch_req.chunk_bytes = chunk_bytes;
	proto_slice_set(&job->msg->prefetch_req.slice, slice);
	err = call(job, PROTO_PREFETCH, NULL);
	if (!err)
		err = collect(job, load);
out:
	pthread_mutex_unlock(&job->lock);
	return err;
}

/* The chunks of load @load_id, or of the newest load of @path in slab @index with @slice (NULL: whole). */
static int chunks(aeg_job_t *job, uint64_t load_id, const char *path, int index, const struct aeg_slice *slice,
		  struct aeg_job_load **load)
{
	int err = 0;

	if (job == NULL || load == NULL || (load_id == 0 && path == NULL))
		return aeg_fail(AEG_EINVAL, "aeg_job_chunks: a load id or a path is needed");
	if (load_id == 0 && check_index(job, index))
		return AEG_ENODEV;
	pthread_mutex_lock(&job->lock);
	memset(&job->msg->chunks_req, 0, offsetof(struct proto_chunks_req, slice));
	job->msg->chunks_req.load_id = load_id;
	job->msg->chunks_req.slab = load_id ? 0 : (uint32_t)index;
	if (load_id == 0)
		err = absolute(path, job->msg->chunks_req.path);
	proto_slice_set(&job->msg->chunks_req.slice, slice);
	if (!err)
		err = call(job, PROTO_CHUNKS, NULL);
	if (!err)
		err = collect(job, load);
	pthread_mutex_unlock(&job->lock);
	return err;
}

AEG_EXPORT int aeg_job_chunks(aeg_job_t *job, uint64_t load_id, const char *path, int index,
			      struct aeg_job_load **load)
{
	return chunks(job, load_id, path, index, NULL, load);
}

AEG_EXPORT int aeg_job_chunks_slice(aeg_job_t *job, const char *path, int index, const struct aeg_slice *slice,
				    struct aeg_job_load **load)
{
	if (path == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_job_chunks_slice: NULL path");
	if (slice != NULL && aeg_slice_check(slice))
		return AEG_EINVAL;
	return chunks(job, 0, path, index, slice, load);
}

AEG_EXPORT void aeg_job_load_free(struct aeg_job_load *load)
{
	if (load == NULL)
		return;
	free(load->chunks);
	free(load->detail);
	slice_free(load->slice);
	free(load);
}

AEG_EXPORT int aeg_job_release(aeg_job_t *job, int index, const uint64_t *ids, size_t count,
			       uint32_t *released)
{
	int err;

	if (job == NULL || (ids == NULL && count))
		return aeg_fail(AEG_EINVAL, "aeg_job_release: NULL argument");
	if (count == 0 || count > PROTO_RELEASE_MAX)
		return aeg_fail(AEG_EINVAL, "release of %zu ids: 1 to %d at a time", count, PROTO_RELEASE_MAX);
	if (check_index(job, index))
		return AEG_ENODEV;
	pthread_mutex_lock(&job->lock);
	job->msg->release_req.flags = 0;
	job->msg->release_req.count = (uint32_t)count;
	for (size_t i = 0; i < count; i++) {
		job->msg->release_req.ids[i].slab = (uint32_t)index;
		job->msg->release_req.ids[i].slab_id = ids[i];
	}
	err = call(job, PROTO_RELEASE, NULL);
	if (!err && released)
		*released = job->msg->release_rep.released;
	pthread_mutex_unlock(&job->lock);
	return err;
}

/* A release of everything or of one load: no ids. */
static int release_whole(aeg_job_t *job, uint32_t flags, uint64_t load_id, uint32_t *released)
{
	int err;

	pthread_mutex_lock(&job->lock);
	job->msg->release_req.flags = flags;
	job->msg->release_req.count = 0;
	job->msg->release_req.load_id = load_id;
	err = call(job, PROTO_RELEASE, NULL);
	if (!err && released)
		*released = job->msg->release_rep.released;
	pthread_mutex_unlock(&job->lock);
	return err;
}

AEG_EXPORT int aeg_job_release_load(aeg_job_t *job, uint64_t load_id, uint32_t *released)
{
	if (job == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_job_release_load: NULL argument");
	if (load_id == 0)
		return aeg_fail(AEG_EINVAL, "release of load 0: load ids start at 1");
	return release_whole(job, PROTO_RELEASE_LOAD, load_id, released);
}

AEG_EXPORT int aeg_job_release_all(aeg_job_t *job, uint32_t *released)
{
	if (job == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_job_release_all: NULL argument");
	return release_whole(job, PROTO_RELEASE_ALL, 0, released);
}

AEG_EXPORT int aeg_job_status(aeg_job_t *job, struct aeg_job_status **out)
{
	struct proto_status_rep *rep = &job->msg->status_rep;
	struct aeg_job_status *st;
	uint32_t got = 0;
	int err;

	if (job == NULL || out == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_job_status: NULL argument");
	st = calloc(1, sizeof(*st));
	if (st == NULL)
		return aeg_fail(AEG_ENOMEM, "status: out of memory");
	pthread_mutex_lock(&job->lock);
	for (;;) {
		job->msg->status_req.first_load = got;
		err = call(job, PROTO_STATUS, NULL);
		if (err)
			break;
		if (got == 0) {
			st->slabs = (int)rep->nslabs;
			for (uint32_t i = 0; i < rep->nslabs; i++) {
				st->slab[i].agent_gpu = rep->slabs[i].gpu;
				st->slab[i].stats = rep->slabs[i].stats;
				st->slab[i].leases = rep->slabs[i].leases;
				st->slab[i].lease_bytes = rep->slabs[i].lease_bytes;
			}
			st->has_pool = rep->has_pool;
			st->pool = rep->pool;
			st->clients = rep->clients;
			st->loads = rep->loads_total;
			st->load = calloc(st->loads ? st->loads : 1, sizeof(*st->load));
			if (st->load == NULL) {
				err = aeg_fail(AEG_ENOMEM, "status of %u loads: out of memory", st->loads);
				break;
			}
		}
		/* Loads that came or went between pages end the list where it is. */
		if (rep->first != got || rep->loads_total != st->loads) {
			st->loads = got;
			break;
		}
		for (uint32_t i = 0; i < rep->count; i++) {
			struct aeg_job_load_status *l = &st->load[got++];

			l->load_id = rep->loads[i].load_id;
			l->slab = (int)rep->loads[i].slab;
			l->status = rep->loads[i].status;
			l->file_bytes = rep->loads[i].file_bytes;
			l->done_bytes = rep->loads[i].done_bytes;
			l->chunks = rep->loads[i].chunks;
			snprintf(l->path, sizeof(l->path), "%s", rep->loads[i].path);
			l->slice_rank = rep->loads[i].slice.rank;
			l->slice_world = rep->loads[i].slice.world;
			l->slice_preset = (enum aeg_slice_preset)rep->loads[i].slice.preset;
			l->slice_flags = rep->loads[i].slice.flags;
			l->slice_rules = rep->loads[i].slice.nrules;
		}
		if (got >= st->loads || rep->count == 0) {
			st->loads = got;
			break;
		}
	}
	pthread_mutex_unlock(&job->lock);
	if (err) {
		aeg_job_status_free(st);
		return err;
	}
	*out = st;
	return 0;
}

AEG_EXPORT void aeg_job_status_free(struct aeg_job_status *status)
{
	if (status == NULL)
		return;
	free(status->load);
	free(status);
}

AEG_EXPORT int aeg_job_shutdown(aeg_job_t *job)
{
	int err;

	if (job == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_job_shutdown: NULL argument");
	pthread_mutex_lock(&job->lock);
	err = call(job, PROTO_SHUTDOWN, NULL);
	pthread_mutex_unlock(&job->lock);
	return err;
}
