/* Shared helpers for the tracer-overhead workloads: argument parsing and dying loudly. */
#ifndef LW_BENCH_COMMON_H
#define LW_BENCH_COMMON_H
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

__attribute__((unused)) static void die(const char *what) {
    fprintf(stderr, "workload: %s: %s\n", what, strerror(errno));
    exit(1);
}

static long count_arg(int argc, char **argv, long dflt) {
    if (argc < 2)
        return dflt;
    char *end;
    long n = strtol(argv[1], &end, 10);
    if (*end || n < 0) {
        fprintf(stderr, "workload: bad count %s\n", argv[1]);
        exit(2);
    }
    return n;
}
/* CLOCK_REALTIME in ns, comparable with the harness's time.time_ns(). */
static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Last thing a workload does: print "<start ns> <end ns>" so the harness can split the
 * wall time into start-up, the workload itself and shutdown. */
__attribute__((unused)) static void report(long long t0) {
    long long t1 = now_ns();
    printf("%lld %lld\n", t0, t1);
    fflush(stdout);
}
#endif
