/* Helpers the unit tests share. */
#ifndef AEGAEON_TESTUTIL_H
#define AEGAEON_TESTUTIL_H

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>

/*
 * count_fds - descriptors open in this process (the listing's own one
 * included, the same in every call), for "nothing leaked" checks.
 */
static inline int count_fds(void)
{
	DIR *d = opendir("/proc/self/fd");
	struct dirent *e;
	int n = 0;

	if (d == NULL) {
		perror("count_fds: /proc/self/fd");
		abort();        /* a leak check that cannot count must not pass */
	}
	while ((e = readdir(d)) != NULL)
		n += e->d_name[0] != '.';
	closedir(d);
	return n;
}

#endif
