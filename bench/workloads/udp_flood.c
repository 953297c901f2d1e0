/* UDP traffic for bench/capture_bench.py: COUNT datagrams of SIZE bytes to 127.0.0.1
 * (or to DESTS distinct loopback addresses 127.1.0.0 + i, one flow each) on a port this
 * program binds itself (so the kernel answers no ICMP and nothing else receives them), at
 * RATE packets/s (0 = as fast as it can). Bounded: stops after COUNT packets or 120 s.
 *
 * usage: udp_flood COUNT RATE SIZE [DESTS]
 * prints "<sent> <start ns> <end ns>" */
#include "common.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

static long arg(int argc, char **argv, int i, long dflt) {
    if (argc <= i)
        return dflt;
    char *end;
    long n = strtol(argv[i], &end, 10);
    if (*end || n < 0) {
        fprintf(stderr, "udp_flood: bad argument %s\n", argv[i]);
        exit(2);
    }
    return n;
}

int main(int argc, char **argv) {
    long count = count_arg(argc, argv, 100000);
    long rate = arg(argc, argv, 2, 0);
    long size = arg(argc, argv, 3, 16);
    long dests = arg(argc, argv, 4, 1);
    if (size > 1400)
        size = 1400;
    if (dests < 1)
        dests = 1;
    if (dests > 1 << 20)
        dests = 1 << 20;
    int rx = socket(AF_INET, SOCK_DGRAM, 0);
    if (rx < 0)
        die("socket");
    int small = 4096;
    setsockopt(rx, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
    struct sockaddr_in any = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_ANY)};
    if (bind(rx, (struct sockaddr *)&any, sizeof any) < 0)
        die("bind");
    socklen_t len = sizeof any;
    getsockname(rx, (struct sockaddr *)&any, &len);
    int tx = socket(AF_INET, SOCK_DGRAM, 0);
    if (tx < 0)
        die("socket");
    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = any.sin_port,
                              .sin_addr.s_addr = htonl(0x7F000001)};
    char buf[1400];
    memset(buf, 'x', sizeof buf);
    long long t0 = now_ns(), deadline = t0 + 120LL * 1000000000LL;
    long sent = 0;
    for (long i = 0; i < count; i++) {
        if (rate > 0) {
            long long due = t0 + (long long)(i * (1000000000.0 / rate));
            long long now;
            while ((now = now_ns()) < due) {
                if (due - now > 200000) {
                    struct timespec ts = {0, (due - now) / 2};
                    nanosleep(&ts, NULL);
                }
            }
        }
        if (dests > 1)
            dst.sin_addr.s_addr = htonl(0x7F010000u + (unsigned)(i % dests));
        if (sendto(tx, buf, (size_t)size, 0, (struct sockaddr *)&dst, sizeof dst) == (ssize_t)size)
            sent++;
        if ((i & 1023) == 0 && now_ns() > deadline)
            break;
    }
    printf("%ld %lld %lld\n", sent, t0, now_ns());
    fflush(stdout);
    return 0;
}
