/* LD_PRELOAD shim for the hook tests: makes nftables' netlink fail for a Python process
 * while the `nft` it spawns keeps working, which no capability or namespace can do (both
 * talk to the same kernel through the same kind of socket).
 *
 *   SG_NETLINK=deny  socket(AF_NETLINK, ..., NETLINK_NETFILTER) fails with EACCES, as an
 *                    LSM or seccomp policy would make it
 *   SG_NETLINK=mute  the kernel's answers on such a socket are read and thrown away: the
 *                    caller waits for answers that never come
 *   SG_NETLINK=deny-after-N  the first N such sockets work, every later one is denied as
 *                    with deny: a change goes through and the one meant to undo it does not
 *
 * Only processes whose name starts with "python" are affected.
 * Build: gcc -shared -fPIC -o netlink_shim.so netlink_shim.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <linux/netlink.h>

static int muted[4096];
static int opened;

static const char *mode(void) {
    const char *value = getenv("SG_NETLINK");
    if (!value || strncmp(program_invocation_short_name, "python", 6) != 0)
        return "";
    return value;
}

int socket(int domain, int type, int protocol) {
    static int (*real)(int, int, int);
    if (!real)
        real = (int (*)(int, int, int))dlsym(RTLD_NEXT, "socket");
    int nftables = domain == AF_NETLINK && protocol == NETLINK_NETFILTER;
    if (nftables && (strcmp(mode(), "deny") == 0 ||
                     (strncmp(mode(), "deny-after-", 11) == 0 && opened++ >= atoi(mode() + 11)))) {
        errno = EACCES;
        return -1;
    }
    int fd = real(domain, type, protocol);
    if (fd >= 0 && fd < 4096)
        muted[fd] = nftables && strcmp(mode(), "mute") == 0;
    return fd;
}

ssize_t recvmsg(int fd, struct msghdr *msg, int flags) {
    static ssize_t (*real)(int, struct msghdr *, int);
    if (!real)
        real = (ssize_t (*)(int, struct msghdr *, int))dlsym(RTLD_NEXT, "recvmsg");
    ssize_t got = real(fd, msg, flags);
    if (got >= 0 && fd >= 0 && fd < 4096 && muted[fd]) {
        errno = EAGAIN; /* Python's socket with a timeout polls again, until its deadline */
        return -1;
    }
    return got;
}
