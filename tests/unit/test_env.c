/*
 * Every environment variable the library and its programs read, given bad
 * values: each gives a clear error or a warning naming the value (shown
 * without control bytes), never a hang. aegaeon-cli and aegaeond run as
 * they would in a job (a real agent serves the rows that need one).
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>

#include <aegaeon/aegaeon.h>

#include "internal.h"
#include "testutil.h"
#include "agentutil.h"

/* A program that is still running after this has hung. */
#define HANG_MS 15000

enum prog { CLI, AGENT };

struct row {
	const char *var;
	const char *value;              /* "@name": a path of the fixture below */
	enum prog prog;
	const char *args[10];
	int rc;
	const char *says;               /* in its stderr */
};

/* Files the rows name: a FIFO, a directory, oversize and bad configurations, a held job lock. */
static struct {
	char dir[64], fifo[96], subdir[96], big[96], badkey[96], model[96], locked[96];
	char long_sock[256];
	int lock_fd;
	struct agent ag;
} fx;

static const char *value_of(const char *v)
{
	static const struct {
		const char *name;
		const char *path;
	} names[] = {
		{ "@fifo", fx.fifo }, { "@dir", fx.subdir }, { "@big", fx.big }, { "@badkey", fx.badkey },
		{ "@locked", fx.locked }, { "@longsock", fx.long_sock }, { "@model", fx.model },
	};

	for (size_t i = 0; i < AEG_ARRAY_SIZE(names); i++)
		if (strcmp(v, names[i].name) == 0)
			return names[i].path;
	return v;
}

static int setup(void **state)
{
	static const char *const opts[] = { "--slab", "16MiB", "--pinned", "4MiB:1MiB", NULL };
	FILE *f;
	char lock[128];

	strcpy(fx.dir, "/tmp/aeg-env-XXXXXX");
	assert_non_null(mkdtemp(fx.dir));
	snprintf(fx.fifo, sizeof(fx.fifo), "%s/fifo", fx.dir);
	assert_int_equal(mkfifo(fx.fifo, 0600), 0);
	snprintf(fx.subdir, sizeof(fx.subdir), "%s/sub", fx.dir);
	assert_int_equal(mkdir(fx.subdir, 0700), 0);
	snprintf(fx.big, sizeof(fx.big), "%s/big.conf", fx.dir);
	f = fopen(fx.big, "w");
	assert_non_null(f);
	for (int i = 0; i < (1 << 20) / 32 + 1; i++)
		fputs("# a comment line of 32 bytes...\n", f);
	fclose(f);
	snprintf(fx.badkey, sizeof(fx.badkey), "%s/bad.conf", fx.dir);
	f = fopen(fx.badkey, "w");
	assert_non_null(f);
	fputs("devcie = \"host\";\n", f);
	fclose(f);
	snprintf(fx.model, sizeof(fx.model), "%s/model.bin", fx.dir);
	write_file(fx.model, 1 << 20);
	snprintf(fx.locked, sizeof(fx.locked), "%s/locked", fx.dir);
	assert_int_equal(mkdir(fx.locked, 0700), 0);
	snprintf(lock, sizeof(lock), "%s/prefetch.lock", fx.locked);
	fx.lock_fd = open(lock, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
	assert_true(fx.lock_fd >= 0);
	assert_int_equal(flock(fx.lock_fd, LOCK_EX), 0);
	fx.long_sock[0] = '/';
	memset(fx.long_sock + 1, 'a', 200);
	fx.long_sock[201] = '\0';
	setenv("AEGAEON_HOST_GPUS", "1", 1);
	fx.ag.pid = -1;
	agent_start(&fx.ag, opts);
	unsetenv("AEGAEON_HOST_GPUS");
	*state = &fx;
	return 0;
}

static int teardown(void **state)
{
	char cmd[160];

	close(fx.lock_fd);
	agent_cleanup(&fx.ag);
	kill_started(state);
	snprintf(cmd, sizeof(cmd), "rm -rf %s", fx.dir);
	return system(cmd);
}

/* Run the row's program with its variable set; its exit status, its stderr in @err. */
static int run_row(const struct row *r, char *err, size_t len)
{
	const char *argv[14] = { r->prog == CLI ? AEGAEON_CLI_PATH : AEGAEOND_PATH };
	int out[2], n = 1, status;
	size_t got = 0;
	double t0 = now_ms();
	pid_t pid;

	for (int i = 0; r->args[i] != NULL; i++)
		argv[n++] = value_of(r->args[i]);
	assert_int_equal(pipe(out), 0);
	pid = fork();
	assert_true(pid >= 0);
	if (pid == 0) {
		int null = open("/dev/null", O_WRONLY);

		dup2(null, STDOUT_FILENO);
		dup2(out[1], STDERR_FILENO);
		setenv(r->var, value_of(r->value), 1);
		execv(argv[0], (char *const *)argv);
		_exit(127);
	}
	close(out[1]);
	for (;;) {
		struct pollfd p = { .fd = out[0], .events = POLLIN };
		int left = HANG_MS - (int)(now_ms() - t0);
		ssize_t k;

		if (left <= 0 || poll(&p, 1, left) == 0) {
			kill(pid, SIGKILL);
			waitpid(pid, NULL, 0);
			close(out[0]);
			fail_msg("%s=%s: still running after %d ms (hung)", r->var, r->value, HANG_MS);
		}
		k = read(out[0], err + got, len - 1 - got);
		if (k <= 0)
			break;
		got += (size_t)k;
	}
	err[got] = '\0';
	close(out[0]);
	assert_int_equal(waitpid(pid, &status, 0), pid);
	return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

static void bad_values(void **state)
{
	static const struct row rows[] = {
		{ "AEGAEON_LOG", "verbose", CLI, { "info", "--device", "host" }, 0,
		  "aegaeon: warn: AEGAEON_LOG='verbose' is not one of debug, info, warn, error; using warn" },
		{ "AEGAEON_LOG", "\x1b[31mdebug", CLI, { "info", "--device", "host" }, 0, "AEGAEON_LOG='?[31mdebug'" },
		{ "AEGAEON_LOG", "verbose", AGENT, { "--job", "1", "--runtime-dir", "/nonexistent", "--gpus", "none",
						     "--foreground" }, 1, "AEGAEON_LOG='verbose' is not one of" },
		{ "AEGAEON_LOG", "DEBUG", CLI, { "info", "--device", "host" }, 0, "aegaeon: debug: " },
		{ "AEGAEON_DEVICE", "gpu", CLI, { "info" }, 1, "device 'gpu' is not one of cuda, host" },
		{ "AEGAEON_DEVICE", "\x1b[2J", CLI, { "info" }, 1, "device '?[2J' is not one of cuda, host" },
		{ "AEGAEON_CONFIG", "/nonexistent.conf", CLI, { "info" }, 1,
		  "configuration file /nonexistent.conf (named by $AEGAEON_CONFIG): No such file or directory" },
		{ "AEGAEON_CONFIG", "@fifo", CLI, { "info" }, 1, "(named by $AEGAEON_CONFIG) is not a regular file (a FIFO)" },
		{ "AEGAEON_CONFIG", "/dev/zero", CLI, { "info" }, 1, "is not a regular file (a character device)" },
		{ "AEGAEON_CONFIG", "@dir", CLI, { "info" }, 1, "(named by $AEGAEON_CONFIG) is a directory" },
		{ "AEGAEON_CONFIG", "@big", CLI, { "info" }, 1, "is 1048608 bytes; at most 1048576" },
		{ "AEGAEON_CONFIG", "@badkey", CLI, { "info" }, 1, "bad.conf:1: key 'devcie': unknown key (did you mean 'device'?)" },
		{ "AEGAEON_PINNED_HUGEPAGES", "sometimes", CLI, { "bench", "pinned", "--device", "host", "--size", "32MiB",
								  "--repeat", "1" }, 1,
		  "AEGAEON_PINNED_HUGEPAGES='sometimes' is not auto, never or always" },
		{ "AEGAEON_TOPOLOGY_XML", "@fifo", CLI, { "info", "--device", "host" }, 0,
		  "(from $AEGAEON_TOPOLOGY_XML) is not a regular file); locality unknown" },
		{ "AEGAEON_TOPOLOGY_XML", "/nonexistent.xml", CLI, { "info", "--device", "host" }, 0,
		  "topology XML /nonexistent.xml (from $AEGAEON_TOPOLOGY_XML): No such file or directory" },
		{ "AEGAEON_HOST_GPUS", "abc", CLI, { "info", "--device", "host" }, 1,
		  "AEGAEON_HOST_GPUS=\"abc\": expected a whole number from 1 to 64" },
		{ "AEGAEON_HOST_GPUS", "0", CLI, { "info", "--device", "host" }, 1, "expected a whole number from 1 to 64" },
		{ "AEGAEON_HOST_PCI_BUS_IDS", "zz\n", CLI, { "info", "--device", "host" }, 1,
		  "AEGAEON_HOST_PCI_BUS_IDS: \"zz?\" is not a PCI bus id" },
		{ "AEGAEON_SOCKET", "run/agent.sock", CLI, { "status" }, 1,
		  "AEGAEON_SOCKET='run/agent.sock' is not an absolute path" },
		{ "AEGAEON_SOCKET", "@longsock", CLI, { "status" }, 1, "is longer than 107 bytes" },
		{ "AEGAEON_SOCKET", "/nonexistent/agent.sock", CLI, { "status" }, 1, "(the agent is not running)" },
		{ "AEGAEON_SLABS", "1x", CLI, { "status" }, 1, "AEGAEON_SLABS='1x' is not a number of slabs" },
		{ "AEGAEON_SLABS", "2", CLI, { "status" }, 1, "AEGAEON_SLABS=2 but the agent at" },
		{ "AEGAEON_SLAB0_HANDLE", "zz", CLI, { "status" }, 1, "AEGAEON_SLAB0_HANDLE does not match slab 0" },
		{ "AEGAEON_JOB_DIR", "job", CLI, { "prefetch", "@model", "--chunk", "1MiB" }, 0,
		  "AEGAEON_JOB_DIR='job' is not an absolute path of a directory; prefetching without the job's lock" },
		{ "AEGAEON_JOB_DIR", "@locked", CLI, { "prefetch", "@model", "--chunk", "1MiB" }, 0,
		  "held by another process for 5 s; prefetching without the job's lock" },
	};
	char err[8192], shown[16];

	for (size_t i = 0; i < AEG_ARRAY_SIZE(rows); i++) {
		const struct row *r = &rows[i];
		int rc;

		rc = run_row(r, err, sizeof(err));
		if (rc != r->rc || strstr(err, r->says) == NULL)
			fail_msg("row %zu, %s=%s: exit %d (expected %d), stderr:\n%s\nexpected in it: %s", i, r->var,
				 r->value, rc, r->rc, err, r->says);
		for (const char *p = err; *p; p++)
			if ((unsigned char)*p < 0x20 && *p != '\n')
				fail_msg("row %zu, %s: control byte 0x%02x in its stderr", i, r->var, (unsigned char)*p);
		/* Only the first line: the CLI's own output (info, bench) follows some. */
		print_message("%-26s %-12.12s exit %d: %.*s\n", r->var, aeg_quote(r->value, shown, sizeof(shown)), rc,
			      (int)strcspn(err, "\n"), err);
	}
}

int main(void)
{
	static const char *const inherited[] = {
		"AEGAEON_LOG", "AEGAEON_DEVICE", "AEGAEON_PINNED_HUGEPAGES", "AEGAEON_TOPOLOGY_XML",
		"AEGAEON_HOST_GPUS", "AEGAEON_HOST_PCI_BUS_IDS", "AEGAEON_SLABS", "AEGAEON_SLAB0_HANDLE",
		"AEGAEON_JOB_DIR",
	};
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(bad_values),
	};

	/* Each row sets one variable: none may come from the caller (make check sets AEGAEON_DEVICE). */
	for (size_t i = 0; i < AEG_ARRAY_SIZE(inherited); i++)
		unsetenv(inherited[i]);
	setenv("AEGAEON_CONFIG", "/dev/null", 1);
	return cmocka_run_group_tests_name("env", tests, setup, teardown);
}
