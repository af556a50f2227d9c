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
 *   - AF_INET6 ::ffff:0.0.0.0 (the IPv4 wildcard, mapped) -> ::ffff:127.0.0.1.
 *   - listen() on a TCP socket never bound: the kernel would bind it to the
 *     wildcard on an ephemeral port; it is bound to loopback, port 0, first.
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
typedef int (*listen_fn)(int, int);

static bind_fn real_bind_fn(void) {
    /* A benign race: every thread stores the same pointer. */
    static bind_fn real;
    if (!real) real = (bind_fn)dlsym(RTLD_NEXT, "bind");
    return real;
}

static listen_fn real_listen_fn(void) {
    static listen_fn real;
    if (!real) real = (listen_fn)dlsym(RTLD_NEXT, "listen");
    return real;
}

static const unsigned char mapped_loopback[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1};
static const unsigned char mapped_any[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 0};

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
        int any = IN6_IS_ADDR_UNSPECIFIED(&in6.sin6_addr);
        int mapped_wildcard = memcmp(&in6.sin6_addr, mapped_any, sizeof mapped_any) == 0;
        if ((any || mapped_wildcard) && should_rewrite(fd, in6.sin6_port)) {
            int v6only = 0;
            socklen_t len = sizeof v6only;
            if (getsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, &len) != 0) v6only = 1;
            if (any && v6only) {
                in6.sin6_addr = in6addr_loopback;
            } else {
                memcpy(&in6.sin6_addr, mapped_loopback, sizeof mapped_loopback);
            }
            return real(fd, (const struct sockaddr *)&in6, sizeof in6);
        }
    }
    return real(fd, addr, addrlen);
}

/* A TCP socket that listens unbound: bind it to loopback (port 0) before the kernel binds
 * it to the wildcard. Unbound: getsockname gives the wildcard address and port 0. */
int listen(int fd, int backlog) {
    listen_fn real = real_listen_fn();
    bind_fn real_bind = real_bind_fn();
    if (!real || !real_bind) {
        errno = ENOSYS;
        return -1;
    }
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    int type = 0;
    socklen_t tlen = sizeof type;
    if (getsockname(fd, (struct sockaddr *)&ss, &len) == 0 &&
        getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &tlen) == 0 && type == SOCK_STREAM) {
        if (ss.ss_family == AF_INET) {
            struct sockaddr_in *in4 = (struct sockaddr_in *)&ss;
            if (in4->sin_port == 0 && in4->sin_addr.s_addr == htonl(INADDR_ANY)) {
                in4->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
                if (real_bind(fd, (struct sockaddr *)in4, sizeof *in4) != 0) return -1;
            }
        } else if (ss.ss_family == AF_INET6) {
            struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&ss;
            if (in6->sin6_port == 0 && IN6_IS_ADDR_UNSPECIFIED(&in6->sin6_addr)) {
                int v6only = 0;
                socklen_t vlen = sizeof v6only;
                if (getsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, &vlen) != 0) v6only = 1;
                if (v6only) in6->sin6_addr = in6addr_loopback;
                else memcpy(&in6->sin6_addr, mapped_loopback, sizeof mapped_loopback);
                if (real_bind(fd, (struct sockaddr *)in6, sizeof *in6) != 0) return -1;
            }
        }
    }
    return real(fd, backlog);
}
