/* hello-arch: says which architecture it was built for and which it runs on. */
#include <stdio.h>
#include <sys/utsname.h>

#if defined(__aarch64__)
#define BUILT_FOR "aarch64"
#elif defined(__x86_64__)
#define BUILT_FOR "x86_64"
#else
#error "hello-arch is built for x86_64 or aarch64"
#endif

int main(void)
{
    struct utsname u;

    if (uname(&u) != 0) {
        perror("uname");
        return 1;
    }
    printf("hello-arch built for %s, running on %s\n", BUILT_FOR, u.machine);
    return 0;
}
