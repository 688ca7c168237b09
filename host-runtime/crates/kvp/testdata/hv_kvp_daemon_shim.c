/* LD_PRELOAD shim for running Debian's hv_kvp_daemon without Hyper-V (tests and `hvisd bench kvp`):
 * its open("/dev/vmbus/hv_kvp") becomes a connect to the SOCK_SEQPACKET socket named by
 * HVISD_SHIM_SOCKET, and /var/lib/hyperv paths are rewritten into HVISD_SHIM_POOL_DIR.
 * Nothing else of the daemon changes. Build: cc -shared -fPIC -O1 -o shim.so shim.c -ldl */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

static const char *map(const char *path, char *buf, size_t n) {
    const char *dir = getenv("HVISD_SHIM_POOL_DIR");
    const char *prefix = "/var/lib/hyperv";
    size_t l = strlen(prefix);
    if (dir && strncmp(path, prefix, l) == 0 && (path[l] == 0 || path[l] == '/')) {
        snprintf(buf, n, "%s%s", dir, path + l);
        return buf;
    }
    return path;
}

int open(const char *path, int flags, ...) {
    static int (*real)(const char *, int, ...);
    mode_t mode = 0;
    char buf[4096];
    if (flags & O_CREAT) {
        va_list ap;
        va_start(ap, flags);
        mode = va_arg(ap, int);
        va_end(ap);
    }
    if (strcmp(path, "/dev/vmbus/hv_kvp") == 0) {
        struct sockaddr_un a;
        int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
        memset(&a, 0, sizeof a);
        a.sun_family = AF_UNIX;
        strncpy(a.sun_path, getenv("HVISD_SHIM_SOCKET"), sizeof a.sun_path - 1);
        if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
            close(fd);
            return -1;
        }
        return fd;
    }
    if (!real) real = dlsym(RTLD_NEXT, "open");
    return real(map(path, buf, sizeof buf), flags, mode);
}

FILE *fopen(const char *path, const char *m) {
    static FILE *(*real)(const char *, const char *);
    char buf[4096];
    if (!real) real = dlsym(RTLD_NEXT, "fopen");
    return real(map(path, buf, sizeof buf), m);
}

int access(const char *path, int m) {
    static int (*real)(const char *, int);
    char buf[4096];
    if (!real) real = dlsym(RTLD_NEXT, "access");
    return real(map(path, buf, sizeof buf), m);
}

int mkdir(const char *path, mode_t m) {
    static int (*real)(const char *, mode_t);
    char buf[4096];
    if (!real) real = dlsym(RTLD_NEXT, "mkdir");
    return real(map(path, buf, sizeof buf), m);
}
