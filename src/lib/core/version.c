/* The library's version string. */
#include "config.h"

#include <aegaeon/version.h>

#include "internal.h"

AEG_EXPORT const char *aeg_version(void)
{
	return PACKAGE_VERSION;
}
