/* (c) N loopback TCP connects: one process listens on 127.0.0.1:0, then connect +
 * accept + close both ends, N times. SO_LINGER 0 on the client end resets instead of
 * leaving TIME_WAIT sockets behind, so the ephemeral port range never runs out. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>
#include "common.h"

int main(int argc, char **argv) {
    long long t0 = now_ns();
    long n = count_arg(argc, argv, 5000);
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (ls < 0)
        die("socket");
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = 0};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) < 0)
        die("bind");
    if (listen(ls, 128) < 0)
        die("listen");
    socklen_t alen = sizeof a;
    if (getsockname(ls, (struct sockaddr *)&a, &alen) < 0)
        die("getsockname");
    struct linger lg = {.l_onoff = 1, .l_linger = 0};
    for (long i = 0; i < n; i++) {
        int c = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (c < 0)
            die("socket");
        if (connect(c, (struct sockaddr *)&a, sizeof a) < 0)
            die("connect");
        int s = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
        if (s < 0)
            die("accept");
        setsockopt(c, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
        close(c);
        close(s);
    }
    close(ls);
    report(t0);
    return 0;
}
