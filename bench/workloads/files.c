/* (d) N file creates in DIR: open(O_CREAT|O_WRONLY) + close + unlink. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <unistd.h>
#include "common.h"

int main(int argc, char **argv) {
    long long t0 = now_ns();
    long n = count_arg(argc, argv, 10000);
    const char *dir = argc > 2 ? argv[2] : ".";
    if (chdir(dir) < 0)
        die("chdir");
    char name[32];
    for (long i = 0; i < n; i++) {
        snprintf(name, sizeof name, "f%ld", i);
        int fd = open(name, O_CREAT | O_WRONLY | O_TRUNC | O_CLOEXEC, 0600);
        if (fd < 0)
            die("open");
        close(fd);
        if (unlink(name) < 0)
            die("unlink");
    }
    report(t0);
    return 0;
}
