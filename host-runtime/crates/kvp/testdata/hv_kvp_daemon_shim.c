/* LD_PRELOAD shim for running Debian's hv_kvp_daemon without Hyper-V (the differential test and
 * `hvisd bench kvp`): its open("/dev/vmbus/hv_kvp") becomes a connect to the SOCK_SEQPACKET socket
 * named by HVISD_SHIM_SOCKET, /var/lib/hyperv paths are rewritten into HVISD_SHIM_POOL_DIR and
 * /sys/class/net into HVISD_SHIM_NET_DIR (when set), and system() (only SET_IP_INFO calls it, to run
 * hv_set_ifconfig) records the command in $HVISD_SHIM_POOL_DIR/system-calls and runs nothing.
 * Nothing else of the daemon changes. Build: cc -shared -fPIC -O1 -o shim.so shim.c -ldl */
#define _GNU_SOURCE
#include <dirent.h>
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

static const char *map_one(const char *path, const char *prefix, const char *env, char *buf,
                           size_t n) {
    const char *dir = getenv(env);
    size_t l = strlen(prefix);
    if (dir && strncmp(path, prefix, l) == 0 && (path[l] == 0 || path[l] == '/')) {
        snprintf(buf, n, "%s%s", dir, path + l);
        return buf;
    }
    return NULL;
}

static const char *map(const char *path, char *buf, size_t n) {
    const char *m = map_one(path, "/var/lib/hyperv", "HVISD_SHIM_POOL_DIR", buf, n);
    if (!m) m = map_one(path, "/sys/class/net", "HVISD_SHIM_NET_DIR", buf, n);
    return m ? m : path;
}

DIR *opendir(const char *path) {
    static DIR *(*real)(const char *);
    char buf[4096];
    if (!real) real = dlsym(RTLD_NEXT, "opendir");
    return real(map(path, buf, sizeof buf));
}

/* Only kvp_set_ip_info calls system() (to run hv_set_ifconfig): record it, run nothing. */
int system(const char *cmd) {
    char path[4096];
    FILE *f;
    snprintf(path, sizeof path, "%s/system-calls", getenv("HVISD_SHIM_POOL_DIR"));
    f = fopen(path, "a");
    if (f) {
        fprintf(f, "%s\n", cmd);
        fclose(f);
    }
    return 0;
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
