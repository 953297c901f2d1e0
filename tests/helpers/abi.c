/* Issues the same syscalls through the x86-64, i386 (int 0x80) and x32 ABIs and prints
 * each result, so a test can check that the seccomp filter changes no result and traces
 * connect() whichever ABI it came through. Usage: abi PORT (a listener on 127.0.0.1)
 * [BASE]: with BASE, also bind+listen on 127.0.0.1:BASE (x86-64), BASE+1 (i386
 * socketcall) and BASE+2 (i386 bind 361 / listen 363). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

static long i386_syscall(long nr, long a, long b, long c) {
    long ret;
    __asm__ volatile("int $0x80" : "=a"(ret) : "a"(nr), "b"(a), "c"(b), "d"(c) : "memory");
    return ret;
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    int port = atoi(argv[1]);
    /* int 0x80 truncates pointers to 32 bits: keep its arguments below 4 GiB */
    char *low = mmap(NULL, 4096, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_32BIT, -1, 0);
    if (low == MAP_FAILED) return 3;
    struct sockaddr_in *sa = (struct sockaddr_in *)low;
    sa->sin_family = AF_INET;
    sa->sin_port = htons(port);
    sa->sin_addr.s_addr = htonl(0x7f000001);

    int s1 = socket(AF_INET, SOCK_STREAM, 0);
    int r1 = connect(s1, (struct sockaddr *)sa, sizeof *sa);
    printf("x86_64 connect fd=%d rc=%d\n", s1, r1 == 0 ? 0 : -errno);

    long p = i386_syscall(20, 0, 0, 0); /* getpid */
    printf("i386 getpid %s\n", p == getpid() ? "ok" : "differs");

    int s2 = socket(AF_INET, SOCK_STREAM, 0);
    unsigned int *args = (unsigned int *)(low + 64);
    args[0] = (unsigned int)s2;
    args[1] = (unsigned int)(unsigned long)sa;
    args[2] = sizeof *sa;
    long r2 = i386_syscall(102, 3, (long)(unsigned long)args, 0); /* socketcall(CONNECT) */
    printf("i386 socketcall-connect fd=%d rc=%ld\n", s2, r2);

    int s3 = socket(AF_INET, SOCK_STREAM, 0);
    long r3 = i386_syscall(362, s3, (long)(unsigned long)sa, sizeof *sa); /* connect */
    printf("i386 connect fd=%d rc=%ld\n", s3, r3);

    long r4 = syscall(39 | 0x40000000); /* x32 getpid */
    printf("x32 getpid %s\n", r4 == getpid() ? "ok" : (errno == ENOSYS ? "enosys" : "err"));

    int s5 = socket(AF_INET, SOCK_STREAM, 0);
    long r5 = syscall(42 | 0x40000000, s5, sa, sizeof *sa); /* x32 connect */
    printf("x32 connect fd=%d rc=%ld\n", s5, r5 == 0 ? 0L : (long)-errno);
    if (argc < 3) return 0;

    int base = atoi(argv[2]);
    printf("pid %d\n", getpid());
    sa->sin_port = htons(base);
    int b1 = socket(AF_INET, SOCK_STREAM, 0);
    int rb1 = bind(b1, (struct sockaddr *)sa, sizeof *sa);
    int rl1 = listen(b1, 7);
    printf("x86_64 bind fd=%d rc=%d listen rc=%d\n", b1, rb1, rl1);

    sa->sin_port = htons(base + 1);
    int b2 = socket(AF_INET, SOCK_STREAM, 0);
    args[0] = (unsigned int)b2;
    args[1] = (unsigned int)(unsigned long)sa;
    args[2] = sizeof *sa;
    long rb2 = i386_syscall(102, 2, (long)(unsigned long)args, 0); /* socketcall(BIND) */
    args[1] = 7;
    long rl2 = i386_syscall(102, 4, (long)(unsigned long)args, 0); /* socketcall(LISTEN) */
    printf("i386 socketcall-bind fd=%d rc=%ld listen rc=%ld\n", b2, rb2, rl2);

    sa->sin_port = htons(base + 2);
    int b3 = socket(AF_INET, SOCK_STREAM, 0);
    long rb3 = i386_syscall(361, b3, (long)(unsigned long)sa, sizeof *sa); /* bind */
    long rl3 = i386_syscall(363, b3, 7, 0); /* listen */
    printf("i386 bind fd=%d rc=%ld listen rc=%ld\n", b3, rb3, rl3);
    return 0;
}
