/*
 * 2 MiB huge pages for the tests that make hugetlb pools (the unit tests on
 * the host backend, the GPU tests on cuda): how many are free, and taking
 * some into vm.nr_hugepages for a test (root only) and giving them back.
 */
#ifndef AEGAEON_TESTS_HUGEPAGES_H
#define AEGAEON_TESTS_HUGEPAGES_H

#include <errno.h>
#include <stdio.h>
#include <string.h>

#define HUGE_SYSFS "/sys/kernel/mm/hugepages/hugepages-2048kB"
#define NR_HUGEPAGES "/proc/sys/vm/nr_hugepages"

/* The number in @path, -1 when it cannot be read. */
static inline long read_long(const char *path)
{
	FILE *f = fopen(path, "re");
	long v = -1;

	if (f == NULL)
		return -1;
	if (fscanf(f, "%ld", &v) != 1)
		v = -1;
	fclose(f);
	return v;
}

/* 0, or the errno of writing @v to @path. */
static inline int write_long(const char *path, long v)
{
	FILE *f = fopen(path, "we");
	int err = 0;

	if (f == NULL)
		return errno;
	if (fprintf(f, "%ld\n", v) < 0)
		err = errno;
	if (fclose(f) != 0 && err == 0)
		err = errno;
	return err;
}

/* 2 MiB huge pages free for a new mapping; -1 when the kernel has none. */
static inline long huge_avail(void)
{
	long free_pages = read_long(HUGE_SYSFS "/free_hugepages"), resv = read_long(HUGE_SYSFS "/resv_hugepages");

	return free_pages < 0 || resv < 0 ? -1 : free_pages - resv;
}

/* Take back @added pages that reserve_huge added, even after a failed test. */
static inline void release_huge(long added)
{
	long nr = read_long(NR_HUGEPAGES);

	if (added > 0 && nr >= 0)
		write_long(NR_HUGEPAGES, nr > added ? nr - added : 0);
}

/*
 * Have @want huge pages free, adding to vm.nr_hugepages when there are fewer
 * (root only); @least of them are enough when the kernel finds no more.
 * Returns how many were added (release_huge gives them back), or -1 with
 * @why said (nothing left added).
 */
static inline long reserve_huge(long want, long least, char *why, size_t len)
{
	long nr = read_long(NR_HUGEPAGES), avail = huge_avail(), added;
	int err;

	if (nr < 0 || avail < 0) {
		snprintf(why, len, "this kernel offers no 2 MiB huge pages");
		return -1;
	}
	if (avail >= want)
		return 0;
	err = write_long(NR_HUGEPAGES, nr + want - avail);
	if (err != 0) {
		snprintf(why, len, "cannot reserve %ld huge pages (writing %s: %s)", want - avail, NR_HUGEPAGES,
			 strerror(err));
		return -1;
	}
	added = read_long(NR_HUGEPAGES) - nr;
	if (huge_avail() < least) {
		snprintf(why, len, "the kernel had %ld free huge pages after %ld more were asked for", huge_avail(),
			 want - avail);
		release_huge(added);
		return -1;
	}
	return added;
}

#endif
