/* Job directory names (long node names hashed, bad ones refused), the error record as root writes it, and removal of trees of any depth. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cmocka.h>

#include <aegaeon/aegaeon.h>
#include <aegaeon/jobrec.h>

#include "internal.h"
#include "jobdir.h"
#include "testutil.h"

#define LONG65A "gpu-node-rack-01-chassis-02-blade-03-slot-04-cluster-eu-west-7-ab"
#define LONG65B "gpu-node-rack-01-chassis-02-blade-03-slot-04-cluster-eu-west-7-ac"

static char tmpdir[64];

static int setup(void **state)
{
	strcpy(tmpdir, "/tmp/aeg-jobdir-XXXXXX");
	return mkdtemp(tmpdir) ? 0 : -1;
}

static int teardown(void **state)
{
	char cmd[128];
	snprintf(cmd, sizeof(cmd), "rm -rf %s", tmpdir);
	return system(cmd);
}

/* Expected hashes from an independent FNV-1a 64 implementation. */
static void names(void **state)
{
	static const struct {
		uint32_t jobid;
		const char *node;
		const char *name;
	} good[] = {
		{ 17, "node1", "17.node1" },
		{ 4294967295u, "n.a_b-c", "4294967295.n.a_b-c" },
		{ 1, "abcdefghijklmnopqrstuvwxyz012345", "1.abcdefghijklmnopqrstuvwxyz012345" },
		{ 1, "abcdefghijklmnopqrstuvwxyz0123456", "1.abcdefghijklmno~a1d47233d209bd89" },
		{ 4294967295u, LONG65A, "4294967295.gpu-node-rack-0~ab4bfa187bf545e9" },
		{ 4294967295u, LONG65B, "4294967295.gpu-node-rack-0~ab4bf9187bf54436" },
	};
	char buf[64];

	for (size_t i = 0; i < AEG_ARRAY_SIZE(good); i++) {
		assert_int_equal(aeg_jobdir_name(buf, sizeof(buf), good[i].jobid, good[i].node), 0);
		assert_string_equal(buf, good[i].name);
	}
	/* The longest name any node gets fits the 64 bytes the plugin once had. */
	assert_true(strlen("4294967295.gpu-node-rack-0~ab4bfa187bf545e9") < 64);
}

static void bad_names(void **state)
{
	static const struct {
		const char *node;
		const char *detail;
	} bad[] = {
		{ "", "node name empty" },
		{ ".hidden", "starts with '.'" },
		{ "a/b", "character 0x2f at 1" },
		{ "a b", "character 0x20 at 1" },
		{ "n~1", "character 0x7e at 1" },
		{ "caf\xc3\xa9", "character 0xc3 at 3" },
	};
	char buf[300], huge[300];

	for (size_t i = 0; i < AEG_ARRAY_SIZE(bad); i++) {
		assert_int_equal(aeg_jobdir_name(buf, sizeof(buf), 1, bad[i].node), AEG_EINVAL);
		assert_non_null(strstr(aeg_error_detail(), bad[i].detail));
	}
	assert_int_equal(aeg_jobdir_name(buf, sizeof(buf), 1, NULL), AEG_EINVAL);
	memset(huge, 'a', 256);
	huge[256] = '\0';
	assert_int_equal(aeg_jobdir_name(buf, sizeof(buf), 1, huge), AEG_EINVAL);
	assert_non_null(strstr(aeg_error_detail(), "256 characters is longer than 255"));
	assert_int_equal(aeg_jobdir_name(buf, 8, 17, "node1"), AEG_ERANGE);
}

static void paths(void **state)
{
	char buf[4096], dir[128];

	assert_int_equal(aeg_jobdir_path(buf, sizeof(buf), "/run/aegaeon", 4294967295u, LONG65A), 0);
	assert_string_equal(buf, "/run/aegaeon/4294967295.gpu-node-rack-0~ab4bfa187bf545e9");
	/* 107 bytes: dir + '/' + 43-byte name + "/agent.sock" (11) is 107 with a 52-byte dir. */
	memset(dir, 'r', 52);
	dir[0] = '/';
	dir[52] = '\0';
	assert_int_equal(aeg_jobdir_path(buf, sizeof(buf), dir, 4294967295u, LONG65A), 0);
	assert_int_equal(strlen(buf) + strlen("/agent.sock"), 107);
	dir[52] = 'r';
	dir[53] = '\0';
	assert_int_equal(aeg_jobdir_path(buf, sizeof(buf), dir, 4294967295u, LONG65A), AEG_ERANGE);
	assert_non_null(strstr(aeg_error_detail(), "(53 bytes) is too long"));
	assert_non_null(strstr(aeg_error_detail(), "may have at most 52 bytes"));
	assert_int_equal(aeg_jobdir_path(buf, 20, "/run/aegaeon", 17, "node1"), AEG_ERANGE);
}

/* A chain of @depth directories "d" under @top, a file at the bottom; returns 0 on success. */
static int make_chain(const char *top, int depth)
{
	int fd = open(top, O_RDONLY | O_DIRECTORY), nfd;

	for (int i = 0; i < depth && fd >= 0; i++) {
		if (mkdirat(fd, "d", 0700) < 0)
			break;
		nfd = openat(fd, "d", O_RDONLY | O_DIRECTORY);
		close(fd);
		fd = nfd;
	}
	if (fd < 0)
		return -1;
	nfd = openat(fd, "f", O_WRONLY | O_CREAT | O_EXCL, 0600);
	close(fd);
	if (nfd < 0)
		return -1;
	close(nfd);
	return 0;
}

static int open_tmp(void)
{
	int fd = open(tmpdir, O_RDONLY | O_DIRECTORY);

	assert_true(fd >= 0);
	return fd;
}

static void remove_deep_tree(void **state)
{
	char top[128], victim[128], link[256];
	unsigned long removed;
	struct stat st;
	uint64_t t0;
	int fds, dfd;

	snprintf(top, sizeof(top), "%s/job", tmpdir);
	snprintf(victim, sizeof(victim), "%s/victim", tmpdir);
	assert_int_equal(mkdir(top, 0700), 0);
	assert_int_equal(mkdir(victim, 0700), 0);
	assert_int_equal(close(open(strcat(strcpy(link, victim), "/keep"), O_CREAT | O_WRONLY, 0600)), 0);
	assert_int_equal(make_chain(top, 14000), 0);
	snprintf(link, sizeof(link), "%s/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/vlink", top);
	assert_int_equal(symlink(victim, link), 0);
	/* A name the walk would pick for a directory it moves up. */
	assert_int_equal(mkdir(strcat(strcpy(link, top), "/.aegaeon-deep-0"), 0700), 0);

	dfd = open_tmp();
	fds = count_fds();
	t0 = aeg_now_ns();
	/* Time enough under valgrind too: the bound is for trees that keep growing. */
	assert_int_equal(aeg_jobdir_remove(dfd, "job", 600000, &removed), 0);
	print_message("# removed a tree 14000 levels deep in %.3f s\n", (aeg_now_ns() - t0) / 1e9);
	assert_int_equal(count_fds(), fds);
	/* top, 14000 directories, the file, the link and the planted directory */
	assert_int_equal(removed, 14004);
	assert_int_equal(lstat(top, &st), -1);
	assert_int_equal(lstat(strcat(strcpy(link, victim), "/keep"), &st), 0);
	close(dfd);
}

static void remove_runs_out_of_time(void **state)
{
	char top[128];
	unsigned long removed;
	struct stat st;
	int dfd = open_tmp(), fds = count_fds();

	snprintf(top, sizeof(top), "%s/slow", tmpdir);
	assert_int_equal(mkdir(top, 0700), 0);
	assert_int_equal(make_chain(top, 3000), 0);
	assert_int_equal(aeg_jobdir_remove(dfd, "slow", 0, &removed), AEG_ETIMEDOUT);
	assert_non_null(strstr(aeg_error_detail(), "removing slow: still not empty after 0 ms"));
	assert_int_equal(count_fds(), fds);
	assert_int_equal(lstat(top, &st), 0);
	assert_int_equal(aeg_jobdir_remove(dfd, "slow", 600000, &removed), 0);
	assert_int_equal(removed, 3002);
	assert_int_equal(lstat(top, &st), -1);
	close(dfd);
}

static void remove_links_and_missing(void **state)
{
	char path[128], victim[128];
	unsigned long removed = 99;
	struct stat st;
	int dfd = open_tmp();

	snprintf(victim, sizeof(victim), "%s/target", tmpdir);
	snprintf(path, sizeof(path), "%s/link", tmpdir);
	assert_int_equal(mkdir(victim, 0700), 0);
	assert_int_equal(symlink(victim, path), 0);
	assert_int_equal(aeg_jobdir_remove(dfd, "link", 1000, &removed), 0);
	assert_int_equal(removed, 1);
	assert_int_equal(lstat(path, &st), -1);
	assert_int_equal(stat(victim, &st), 0);
	assert_int_equal(aeg_jobdir_remove(dfd, "missing", 1000, &removed), 0);
	assert_int_equal(removed, 0);
	close(dfd);
}

/*
 * The error record as root writes it into a directory the job user owns:
 * made the user's through its descriptor, never following what the user
 * planted at its name or at the temporary name.
 */
static void error_record(void **state)
{
	char path[128], target[128], reason[64];
	uid_t uid = geteuid() == 0 ? 65534 : geteuid();
	gid_t gid = geteuid() == 0 ? 65534 : getegid();
	struct stat st;
	int dfd;

	dfd = open(tmpdir, O_RDONLY | O_DIRECTORY);
	assert_true(dfd >= 0);
	snprintf(target, sizeof(target), "%s/precious", tmpdir);
	close(open(target, O_WRONLY | O_CREAT, 0600));
	/* A link at the temporary name and one at the record's name. */
	assert_int_equal(symlinkat(target, dfd, "error.tmp"), 0);
	assert_int_equal(symlinkat(target, dfd, "error"), 0);
	assert_int_equal(aeg_jobdir_write_error(dfd, tmpdir, "slab of 40 GiB asked\nsecond line", uid, gid), 0);
	snprintf(path, sizeof(path), "%s/error", tmpdir);
	assert_int_equal(lstat(path, &st), 0);
	assert_true(S_ISREG(st.st_mode));
	assert_int_equal(st.st_uid, uid);
	assert_int_equal(st.st_gid, gid);
	assert_int_equal(st.st_mode & 07777, 0600);
	assert_int_equal(aeg_job_error_read(path, reason, sizeof(reason)), 0);
	assert_string_equal(reason, "slab of 40 GiB asked?second line");
	/* What the links named is untouched, and no temporary file is left. */
	assert_int_equal(stat(target, &st), 0);
	assert_int_equal(st.st_size, 0);
	assert_int_equal(st.st_uid, geteuid());
	assert_int_equal(faccessat(dfd, "error.tmp", F_OK, AT_SYMLINK_NOFOLLOW), -1);
	/* A directory at the name is not replaced. */
	assert_int_equal(unlinkat(dfd, "error", 0), 0);
	assert_int_equal(mkdirat(dfd, "error", 0700), 0);
	assert_int_equal(aeg_jobdir_write_error(dfd, tmpdir, "x", uid, gid), AEG_EIO);
	assert_non_null(strstr(aeg_error_detail(), "renaming"));
	assert_int_equal(faccessat(dfd, "error.tmp", F_OK, AT_SYMLINK_NOFOLLOW), -1);
	close(dfd);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(names),
		cmocka_unit_test(bad_names),
		cmocka_unit_test(paths),
		cmocka_unit_test_setup_teardown(remove_deep_tree, setup, teardown),
		cmocka_unit_test_setup_teardown(remove_runs_out_of_time, setup, teardown),
		cmocka_unit_test_setup_teardown(remove_links_and_missing, setup, teardown),
		cmocka_unit_test_setup_teardown(error_record, setup, teardown),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
