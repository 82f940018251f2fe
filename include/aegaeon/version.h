/* aegaeon version: the release this header belongs to, and the library's at run time. */
#ifndef AEGAEON_VERSION_H
#define AEGAEON_VERSION_H

#define AEGAEON_VERSION_MAJOR 0
#define AEGAEON_VERSION_MINOR 1
#define AEGAEON_VERSION_PATCH 0

#ifdef __cplusplus
extern "C" {
#endif

/* aeg_version - the library's version as text ("0.1.0"), static. Thread-safe. */
const char *aeg_version(void);

#ifdef __cplusplus
}
#endif
#endif
