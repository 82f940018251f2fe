/* Agent protocol frames on a socket: sent whole with a descriptor beside them, received within a deadline. */
#include "config.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "internal.h"
#include "proto.h"

int proto_frame_timeout_ms = PROTO_FRAME_TIMEOUT_MS;

int proto_send(int fd, uint16_t type, uint32_t flags, uint64_t id, const union proto_msg *msg,
	       int pass_fd, unsigned char *frame)
{
	union {
		struct cmsghdr align;
		char buf[CMSG_SPACE(sizeof(int))];
	} ctl;
	struct msghdr mh;
	struct iovec iov;
	size_t len, done = 0;
	int err;

	err = proto_encode(type, flags, id, msg, frame, &len);
	if (err)
		return err;
	while (done < len) {
		ssize_t n;

		memset(&mh, 0, sizeof(mh));
		iov.iov_base = frame + done;
		iov.iov_len = len - done;
		mh.msg_iov = &iov;
		mh.msg_iovlen = 1;
		if (pass_fd >= 0 && done == 0) {
			struct cmsghdr *cm;

			memset(&ctl, 0, sizeof(ctl));
			mh.msg_control = ctl.buf;
			mh.msg_controllen = sizeof(ctl.buf);
			cm = CMSG_FIRSTHDR(&mh);
			cm->cmsg_level = SOL_SOCKET;
			cm->cmsg_type = SCM_RIGHTS;
			cm->cmsg_len = CMSG_LEN(sizeof(int));
			memcpy(CMSG_DATA(cm), &pass_fd, sizeof(int));
		}
		n = sendmsg(fd, &mh, MSG_NOSIGNAL);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return aeg_fail(AEG_EIO, "sending %s: %s", proto_type_name(type), strerror(errno));
		done += (size_t)n;
	}
	return 0;
}

/* Close every descriptor a control message brought; keep the first in *keep when asked. */
static int take_fds(struct msghdr *mh, int *keep)
{
	int extra = 0;

	for (struct cmsghdr *cm = CMSG_FIRSTHDR(mh); cm; cm = CMSG_NXTHDR(mh, cm)) {
		size_t n;

		if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
			continue;
		n = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		for (size_t i = 0; i < n; i++) {
			int fd;

			memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
			if (keep && *keep < 0)
				*keep = fd;
			else {
				close(fd);
				extra++;
			}
		}
	}
	return extra;
}

/* Read exactly @len bytes; @deadline_ns 0 waits for the first byte without limit. */
static int read_full(int fd, unsigned char *buf, size_t len, uint64_t deadline_ns, int *got_fd,
		     int *extra_fds, int *eof_at_start)
{
	union {
		struct cmsghdr align;
		char buf[CMSG_SPACE(4 * sizeof(int))];
	} ctl;
	size_t done = 0;

	while (done < len) {
		struct msghdr mh;
		struct iovec iov;
		ssize_t n;

		if (deadline_ns) {
			uint64_t now = aeg_now_ns();
			struct pollfd pfd = { .fd = fd, .events = POLLIN };
			int ms = now >= deadline_ns ? 0 : (int)((deadline_ns - now) / 1000000) + 1;
			int rc = poll(&pfd, 1, ms);

			if (rc < 0 && errno == EINTR)
				continue;
			if (rc < 0)
				return aeg_fail(AEG_EIO, "poll: %s", strerror(errno));
			if (rc == 0)
				return aeg_fail(AEG_ETIMEDOUT, "frame incomplete after %d ms (%zu of %zu bytes)",
						proto_frame_timeout_ms, done, len);
		}
		memset(&mh, 0, sizeof(mh));
		iov.iov_base = buf + done;
		iov.iov_len = len - done;
		mh.msg_iov = &iov;
		mh.msg_iovlen = 1;
		mh.msg_control = ctl.buf;
		mh.msg_controllen = sizeof(ctl.buf);
		n = recvmsg(fd, &mh, MSG_CMSG_CLOEXEC);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return aeg_fail(errno == ECONNRESET ? AEG_ECANCELED : AEG_EIO, "receiving: %s",
					strerror(errno));
		*extra_fds += take_fds(&mh, got_fd);
		if (mh.msg_flags & MSG_CTRUNC)
			(*extra_fds)++;
		if (n == 0) {
			/* Between frames: the peer hung up, which the caller reports. */
			if (done == 0 && eof_at_start) {
				*eof_at_start = 1;
				return AEG_ECANCELED;
			}
			return aeg_fail(AEG_EPROTO, "connection closed inside a frame (%zu of %zu bytes)",
					done, len);
		}
		done += (size_t)n;
		if (!deadline_ns)
			deadline_ns = aeg_now_ns() + (uint64_t)proto_frame_timeout_ms * 1000000;
	}
	return 0;
}

int proto_recv(int fd, struct proto_header *h, union proto_msg *msg, int *recv_fd,
	       unsigned char *frame)
{
	int got_fd = -1, extra = 0, eof = 0, err;
	uint64_t deadline;

	if (recv_fd)
		*recv_fd = -1;
	err = read_full(fd, frame, PROTO_HEADER_BYTES, 0, recv_fd ? &got_fd : NULL, &extra, &eof);
	if (eof) {
		err = aeg_fail(AEG_ECANCELED, "connection closed");
		goto out;
	}
	if (err)
		goto out;
	err = proto_header_decode(frame, h);
	if (err)
		goto out;
	deadline = aeg_now_ns() + (uint64_t)proto_frame_timeout_ms * 1000000;
	err = read_full(fd, frame + PROTO_HEADER_BYTES, h->length, deadline,
			recv_fd ? &got_fd : NULL, &extra, NULL);
	if (err)
		goto out;
	if (extra) {
		err = aeg_fail(AEG_EPROTO, "%s frame carried %d unexpected descriptor%s",
			       proto_type_name(h->type), extra, extra > 1 ? "s" : "");
		goto out;
	}
	err = proto_decode(h, frame + PROTO_HEADER_BYTES, msg);
out:
	if (err) {
		if (got_fd >= 0)
			close(got_fd);
		return err;
	}
	if (recv_fd)
		*recv_fd = got_fd;
	return 0;
}
