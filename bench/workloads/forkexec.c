/* (b) N times: fork, execve /bin/true in the child, waitpid in the parent. */
#define _GNU_SOURCE
#include <sys/wait.h>
#include <unistd.h>
#include "common.h"

extern char **environ;

int main(int argc, char **argv) {
    long long t0 = now_ns();
    long n = count_arg(argc, argv, 1000);
    char *const args[] = {"/bin/true", NULL};
    for (long i = 0; i < n; i++) {
        pid_t pid = fork();
        if (pid < 0)
            die("fork");
        if (pid == 0) {
            execve("/bin/true", args, environ);
            _exit(127);
        }
        int st;
        if (waitpid(pid, &st, 0) != pid)
            die("waitpid");
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
            fprintf(stderr, "workload: child status %#x\n", st);
            return 1;
        }
    }
    report(t0);
    return 0;
}
