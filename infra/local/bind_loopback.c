/*
 * bind_loopback.c: LD_PRELOAD shim that keeps wildcard listeners on loopback.
 *
 * Why: LocalStack's kinesis-mock (Node.js) binds its plain and TLS ports on
 * 0.0.0.0 and has no host setting. The local stack must bind 127.0.0.1 only,
 * so orders_cdc/local/stack.py compiles this file and sets LD_PRELOAD for the
 * LocalStack process; its children (node, npm) inherit the variable.
 *
 * Rules:
 *   - AF_INET  0.0.0.0  -> 127.0.0.1
 *   - AF_INET6 ::       -> ::1 on an IPv6-only socket; on a dual-stack socket
 *     -> ::ffff:127.0.0.1, because "localhost" resolves to 127.0.0.1 here and
 *     a dual-stack socket is meant to accept IPv4 clients.
 *   - Only TCP sockets, and UDP sockets bound to a fixed port. A UDP bind to
 *     port 0 is a client picking its source port (resolvers do this); moving
 *     it to loopback would break its traffic to the outside.
 *   - Everything else goes to the real bind() unchanged.
 *
 * Build: gcc -shared -fPIC -O2 -o bind_loopback.so bind_loopback.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

static bind_fn real_bind_fn(void) {
    /* A benign race: every thread stores the same pointer. */
    static bind_fn real;
    if (!real) real = (bind_fn)dlsym(RTLD_NEXT, "bind");
    return real;
}

/* Should a wildcard bind of this socket be moved to loopback? */
static int should_rewrite(int fd, in_port_t port) {
    int type = 0;
    socklen_t len = sizeof type;
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0) return 0;
    if (type == SOCK_STREAM) return 1;
    if (type == SOCK_DGRAM) return port != 0;
    return 0;
}

int bind(int fd, const struct sockaddr *addr, socklen_t addrlen) {
    bind_fn real = real_bind_fn();
    if (!real) {
        errno = ENOSYS;
        return -1;
    }
    if (addr && addr->sa_family == AF_INET && addrlen >= sizeof(struct sockaddr_in)) {
        struct sockaddr_in in4;
        memcpy(&in4, addr, sizeof in4);
        if (in4.sin_addr.s_addr == htonl(INADDR_ANY) && should_rewrite(fd, in4.sin_port)) {
            in4.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            return real(fd, (const struct sockaddr *)&in4, sizeof in4);
        }
    } else if (addr && addr->sa_family == AF_INET6 && addrlen >= sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 in6;
        memcpy(&in6, addr, sizeof in6);
        if (IN6_IS_ADDR_UNSPECIFIED(&in6.sin6_addr) && should_rewrite(fd, in6.sin6_port)) {
            int v6only = 0;
            socklen_t len = sizeof v6only;
            if (getsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, &len) != 0) v6only = 1;
            if (v6only) {
                in6.sin6_addr = in6addr_loopback;
            } else {
                static const unsigned char mapped[16] = {0, 0, 0, 0, 0, 0, 0, 0,
                                                         0, 0, 0xff, 0xff, 127, 0, 0, 1};
                memcpy(&in6.sin6_addr, mapped, sizeof mapped);
            }
            return real(fd, (const struct sockaddr *)&in6, sizeof in6);
        }
    }
    return real(fd, addr, addrlen);
}
