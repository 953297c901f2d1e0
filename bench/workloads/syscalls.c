/* (a) N cheap syscalls: getppid via syscall(2), so libc cannot cache or skip it. */
#define _GNU_SOURCE
#include <sys/syscall.h>
#include <unistd.h>
#include "common.h"

int main(int argc, char **argv) {
    long long t0 = now_ns();
    long n = count_arg(argc, argv, 1000000);
    long acc = 0;
    for (long i = 0; i < n; i++)
        acc += syscall(SYS_getppid);
    report(t0);
    return acc == 0 && n > 0 ? 1 : 0;  /* use acc; getppid is never 0 under a parent */
}
