/*
 * vmlease-agent: the guest side of the vmlease command channel.
 *
 * Serves the host over virtio-serial ports: runs commands with
 * stdin/stdout/stderr and exit status, and copies files in and out. Each
 * port takes one host connection at a time and is served by a process of
 * its own: "org.vmlease.agent" is the owning session's, and
 * "org.vmlease.visit" (where the machine has it) other processes'
 * (`vmlease exec`, connectors), so neither waits for the other. Built statically by
 * `vmlease image build tiny`; the host side lives in
 * vmlease/backends/guest/_agent.py.
 *
 * Wire format, both directions: frames of
 *     u8 type | u32 length (big-endian) | length bytes of payload
 *
 * host -> guest                       guest -> host
 *   HELLO  nonce                        HELLO  nonce "vmlease-agent N"
 *   EXEC   argv/env/cwd (see below)     STDOUT bytes, STDERR bytes
 *   STDIN  bytes (empty = end of input) EXIT   i32 code | u8 signaled | message
 *   KILL   u32 signal
 *   PUT    u32 mode | path              OK / ERR message
 *   DATA   bytes (empty = end of file)  DATA   bytes (empty = end of file)
 *   GET    path                         ERR message (instead of DATA)
 *   SYNC                                OK
 *   SETTIME u64 seconds | u32 nanoseconds  OK / ERR message
 *           [| seed bytes]
 *   WAKE   u64 seconds | u32 nanoseconds  OK / ERR message
 *          | u32 n | n seed bytes
 *          | u32 n | n bytes of hostname
 *          | a line for the console
 *   NET    u32 n | n x (u32 index | 6 bytes MAC   OK / ERR message
 *                | 4 bytes IPv4 | u8 prefix)
 *          | u32 m | m x (u32 n | n bytes of tag
 *                | u32 n | n bytes of lines)
 *
 * SETTIME follows a snapshot restore or a start from a saved state: the
 * guest's clock and its random generator are both where the snapshot left
 * them. Seed bytes, when given, are credited to the kernel's entropy pool
 * and the generator is reseeded at once, so /dev/urandom does not repeat
 * what it gave after the snapshot.
 *
 * WAKE (protocol 3) is all a guest started from a saved state is told, in
 * one exchange and without starting a process: SETTIME's clock and seed, its
 * new hostname, and a line written to /dev/console saying so.
 *
 * NET (protocol 4) sets a VM's interfaces on its private networks and the
 * names it knows them by, also without starting a process. Interface `index`
 * is the index-th Ethernet interface, by ifindex, other than the user-mode one
 * (QEMU's default MAC); it gets the MAC given, then the address (0.0.0.0:
 * none), and is brought up. The host makes a MAC from its address, so no
 * other VM's ARP cache can hold another MAC for it, and nothing is announced.
 * Each tag's block of lines replaces the one of that tag in /etc/hosts, between
 * "# vmlease network TAG" and "# vmlease network TAG end", or is appended to
 * the file when it has none.
 *
 * EXEC payload: u32 argc, argc x (u32 len, bytes), u32 envc,
 * envc x (u32 len, "KEY=VALUE"), u32 cwd length, cwd bytes.
 *
 * A HELLO at any time aborts whatever was in progress (the running command
 * is killed, a partial upload is removed) and is answered with the same
 * nonce: a new host connection finds the start of the stream by searching
 * for its nonce, so bytes left from an earlier connection cannot confuse it.
 *
 * While no host is connected the port reads end-of-file and polls as
 * hung-up, so the agent then checks back every 20 ms.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <linux/random.h>
#include <net/if.h>
#include <net/if_arp.h>
#include <netinet/in.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define AGENT_VERSION "4"
#define PORT_NAME "org.vmlease.agent"
#define VISITOR_PORT_NAME "org.vmlease.visit"
#define MAX_FRAME (1u << 20)
#define CHUNK (64u * 1024u)
#define STDIN_HIGH_WATER (1u << 20)

enum {
    T_HELLO = 1, T_EXEC = 2, T_STDIN = 3, T_STDOUT = 4, T_STDERR = 5,
    T_EXIT = 6, T_KILL = 7, T_PUT = 8, T_DATA = 9, T_GET = 10, T_OK = 11,
    T_ERR = 12, T_SYNC = 13, T_SETTIME = 14, T_WAKE = 15, T_NET = 16,
};

static const char *DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

static int port = -1;

/* Input buffer for frames from the host. */
static unsigned char *inbuf;
static size_t inlen, incap;

/* The running command, if any. */
static struct {
    pid_t pid;
    int pidfd;
    int in, out, err;      /* pipe ends; -1 when closed */
    unsigned char *stdin_buf;
    size_t stdin_len;
    int stdin_eof;         /* host sent the empty STDIN frame */
    int exited;
    int status;
} job = { .pid = -1, .pidfd = -1, .in = -1, .out = -1, .err = -1 };

/* An upload in progress, if any. */
static struct {
    int fd;                /* -1 when none */
    int failed;            /* errno of the first failure, 0 if none */
    mode_t mode;
    char *path, *tmp;
} put = { .fd = -1 };

static void die(const char *what) {
    fprintf(stderr, "vmlease-agent: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void sleep_ms(long ms) {
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    nanosleep(&ts, NULL);
}

static void put32(unsigned char *p, uint32_t v) {
    p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}

static uint32_t get32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* Write a whole frame. The port accepts at most 32 KiB per write and blocks
 * while no host is connected, which is what we want: output is never lost
 * while a host is attached, and a new host resynchronises with HELLO. */
static void send_frame(int type, const void *data, size_t len) {
    unsigned char hdr[5];
    hdr[0] = (unsigned char)type;
    put32(hdr + 1, (uint32_t)len);
    struct iovec iov[2] = { { hdr, 5 }, { (void *)data, len } };
    int n = 2;
    struct iovec *v = iov;
    while (n > 0) {
        ssize_t w = writev(port, v, n);
        if (w < 0) {
            if (errno == EINTR || errno == EAGAIN) { sleep_ms(1); continue; }
            die("write to port");
        }
        while (n > 0 && (size_t)w >= v->iov_len) { w -= (ssize_t)v->iov_len; v++; n--; }
        if (n > 0) { v->iov_base = (char *)v->iov_base + w; v->iov_len -= (size_t)w; }
    }
}

static void send_error(const char *fmt, const char *arg, int err) {
    char msg[4096];
    int n = snprintf(msg, sizeof msg, fmt, arg, strerror(err));
    send_frame(T_ERR, msg, n < 0 ? 0 : (size_t)n);
}

static void send_exit(int code, int signaled, const char *message) {
    size_t mlen = message ? strlen(message) : 0;
    unsigned char *p = malloc(5 + mlen);
    if (!p) die("malloc");
    put32(p, (uint32_t)code);
    p[4] = (unsigned char)signaled;
    if (mlen) memcpy(p + 5, message, mlen);
    send_frame(T_EXIT, p, 5 + mlen);
    free(p);
}

static void close_fd(int *fd) {
    if (*fd >= 0) { close(*fd); *fd = -1; }
}

static void abort_put(void) {
    if (put.fd >= 0) { close(put.fd); unlink(put.tmp); }
    put.fd = -1;
    put.failed = 0;
    free(put.path); free(put.tmp);
    put.path = put.tmp = NULL;
}

static void finish_job(void) {
    close_fd(&job.in); close_fd(&job.out); close_fd(&job.err); close_fd(&job.pidfd);
    free(job.stdin_buf);
    job.stdin_buf = NULL;
    job.stdin_len = 0;
    job.pid = -1;
}

static void kill_job(void) {
    if (job.pid < 0) return;
    kill(-job.pid, SIGKILL);
    kill(job.pid, SIGKILL);
    waitpid(job.pid, NULL, 0);
    finish_job();
}

/* Find argv0 on the PATH of the command's own environment. */
static char *resolve(const char *argv0, char *const envp[], int *err) {
    if (strchr(argv0, '/')) return strdup(argv0);
    const char *path = DEFAULT_PATH;
    for (char *const *e = envp; *e; e++)
        if (strncmp(*e, "PATH=", 5) == 0) path = *e + 5;
    *err = ENOENT;
    const char *p = path;
    while (*p) {
        const char *end = strchr(p, ':');
        size_t dlen = end ? (size_t)(end - p) : strlen(p);
        char *cand = malloc(dlen + strlen(argv0) + 2);
        if (!cand) die("malloc");
        memcpy(cand, p, dlen);
        cand[dlen] = '/';
        strcpy(cand + dlen + 1, argv0);
        struct stat st;
        if (stat(cand, &st) == 0 && S_ISREG(st.st_mode)) {
            if (access(cand, X_OK) == 0) return cand;
            *err = EACCES;
        }
        free(cand);
        if (!end) break;
        p = end + 1;
    }
    return NULL;
}

/* Parse the EXEC payload into NULL-terminated arrays; returns 0 on success. */
static int parse_exec(const unsigned char *p, size_t len, char ***argv, char ***envp, char **cwd) {
    const unsigned char *end = p + len;
    char **lists[2] = { NULL, NULL };
    for (int l = 0; l < 2; l++) {
        if (end - p < 4) return -1;
        uint32_t n = get32(p); p += 4;
        if (n > 65536) return -1;
        lists[l] = calloc(n + 1, sizeof(char *));
        if (!lists[l]) die("calloc");
        for (uint32_t i = 0; i < n; i++) {
            if (end - p < 4) return -1;
            uint32_t s = get32(p); p += 4;
            if ((size_t)(end - p) < s) return -1;
            lists[l][i] = strndup((const char *)p, s);
            p += s;
        }
    }
    if (end - p < 4) return -1;
    uint32_t s = get32(p); p += 4;
    if ((size_t)(end - p) < s) return -1;
    *cwd = s ? strndup((const char *)p, s) : NULL;
    *argv = lists[0];
    *envp = lists[1];
    return (*argv)[0] ? 0 : -1;
}

static void free_list(char **l) {
    if (!l) return;
    for (char **x = l; *x; x++) free(*x);
    free(l);
}

static void start_job(const unsigned char *payload, size_t len) {
    char **argv = NULL, **envp = NULL, *cwd = NULL;
    if (parse_exec(payload, len, &argv, &envp, &cwd) != 0) {
        send_exit(126, 0, "vmlease-agent: malformed command request");
        goto out;
    }
    int err = 0;
    char *file = resolve(argv[0], envp, &err);
    if (!file) {
        char msg[4200];
        snprintf(msg, sizeof msg, "vmlease-agent: %s: %s\n", argv[0],
                 err == ENOENT ? "command not found" : strerror(err));
        send_exit(err == ENOENT ? 127 : 126, 0, msg);
        goto out;
    }
    int pin[2], pout[2], perr[2];
    if (pipe2(pin, O_CLOEXEC) || pipe2(pout, O_CLOEXEC) || pipe2(perr, O_CLOEXEC)) die("pipe");
    posix_spawn_file_actions_t fa;
    posix_spawnattr_t at;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, pin[0], 0);
    posix_spawn_file_actions_adddup2(&fa, pout[1], 1);
    posix_spawn_file_actions_adddup2(&fa, perr[1], 2);
    if (cwd) posix_spawn_file_actions_addchdir_np(&fa, cwd);
    posix_spawnattr_init(&at);
    sigset_t none;
    sigemptyset(&none);
    posix_spawnattr_setsigmask(&at, &none);
    sigset_t deflt;
    sigfillset(&deflt);
    posix_spawnattr_setsigdefault(&at, &deflt);
    posix_spawnattr_setflags(&at, POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
    pid_t pid;
    int rc = posix_spawn(&pid, file, &fa, &at, argv, envp);
    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&at);
    close(pin[0]); close(pout[1]); close(perr[1]);
    if (rc != 0) {
        close(pin[1]); close(pout[0]); close(perr[0]);
        char msg[4200];
        snprintf(msg, sizeof msg, "vmlease-agent: %s: %s\n", cwd && rc == ENOENT ? cwd : argv[0], strerror(rc));
        send_exit(rc == ENOENT ? 127 : 126, 0, msg);
        free(file);
        goto out;
    }
    free(file);
    job.pid = pid;
    job.pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    if (job.pidfd < 0) die("pidfd_open");
    job.in = pin[1];
    job.out = pout[0];
    job.err = perr[0];
    fcntl(job.in, F_SETFL, O_NONBLOCK);
    job.stdin_eof = 0;
    job.exited = 0;
out:
    free_list(argv); free_list(envp); free(cwd);
}

static void send_file(const unsigned char *path, size_t len) {
    char *p = strndup((const char *)path, len);
    int fd = open(p, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0) { send_error("cannot read %s: %s", p, errno); goto out; }
    if (fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)) { send_error("cannot read %s: %s", p, EISDIR); goto out; }
    static unsigned char buf[CHUNK];
    for (;;) {
        ssize_t r = read(fd, buf, sizeof buf);
        if (r < 0) {
            if (errno == EINTR) continue;
            /* DATA frames may already be out: the host takes ERR as the end. */
            send_error("cannot read %s: %s", p, errno);
            goto out;
        }
        send_frame(T_DATA, buf, (size_t)r);
        if (r == 0) break;
    }
out:
    if (fd >= 0) close(fd);
    free(p);
}

static void begin_put(const unsigned char *payload, size_t len) {
    abort_put();
    if (len < 4) { put.failed = EINVAL; put.path = strdup("?"); return; }
    put.mode = get32(payload) & 07777;
    put.path = strndup((const char *)payload + 4, len - 4);
    put.tmp = malloc(strlen(put.path) + 32);
    if (!put.path || !put.tmp) die("malloc");
    sprintf(put.tmp, "%s.vmlease-part", put.path);
    struct stat st;
    if (stat(put.path, &st) == 0 && S_ISDIR(st.st_mode)) { put.failed = EISDIR; return; }
    put.fd = open(put.tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (put.fd < 0) put.failed = errno;
}

static void put_data(const unsigned char *data, size_t len) {
    if (len == 0) {  /* end of file */
        if (!put.failed && put.fd >= 0) {
            if (fchmod(put.fd, put.mode) != 0) put.failed = errno;
            if (close(put.fd) != 0 && !put.failed) put.failed = errno;
            put.fd = -1;
            if (!put.failed && rename(put.tmp, put.path) != 0) put.failed = errno;
            if (put.failed) unlink(put.tmp);
        }
        if (put.failed) send_error("cannot write %s: %s", put.path ? put.path : "?", put.failed);
        else send_frame(T_OK, NULL, 0);
        abort_put();
        return;
    }
    while (!put.failed && len > 0) {
        ssize_t w = write(put.fd, data, len);
        if (w < 0) {
            if (errno == EINTR) continue;
            put.failed = errno;
            break;
        }
        data += w; len -= (size_t)w;
    }
}

static void reset_all(void) {
    kill_job();
    abort_put();
}

/* Credit seed bytes to the entropy pool and reseed the generator now. */
static int reseed(const unsigned char *seed, size_t len) {
    struct { int entropy_count; int buf_size; unsigned char buf[64]; } add;
    if (len > sizeof add.buf) len = sizeof add.buf;
    add.entropy_count = (int)(len * 8);
    add.buf_size = (int)len;
    memcpy(add.buf, seed, len);
    int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    int rc = ioctl(fd, RNDADDENTROPY, &add);
    if (rc == 0) rc = ioctl(fd, RNDRESEEDCRNG);
    int saved = errno;
    close(fd);
    errno = saved;
    return rc;
}

/* Set the clock from 12 bytes (u64 seconds | u32 nanoseconds); 0 or -1 and errno. */
static int set_clock(const unsigned char *p) {
    struct timespec ts;
    ts.tv_sec = (time_t)(((uint64_t)get32(p) << 32) | get32(p + 4));
    ts.tv_nsec = (long)get32(p + 8);
    return clock_settime(CLOCK_REALTIME, &ts);
}

/* WAKE: clock, seed, hostname, console line (see the top of this file). */
static void wake(const unsigned char *p, size_t len) {
    if (len < 16) { send_error("%s: %s", "wake", EINVAL); return; }
    size_t seed_len = get32(p + 12);
    if (seed_len > len - 16 || len - 16 - seed_len < 4) { send_error("%s: %s", "wake", EINVAL); return; }
    const unsigned char *seed = p + 16;
    const unsigned char *q = seed + seed_len;
    size_t name_len = get32(q);
    size_t rest = len - 16 - seed_len - 4;
    if (name_len > rest) { send_error("%s: %s", "wake", EINVAL); return; }
    const unsigned char *name = q + 4;
    if (set_clock(p) != 0) { send_error("%s: %s", "settime", errno); return; }
    if (seed_len > 0 && reseed(seed, seed_len) != 0) { send_error("%s: %s", "reseed", errno); return; }
    if (name_len > 0 && sethostname((const char *)name, name_len) != 0) {
        send_error("%s: %s", "sethostname", errno);
        return;
    }
    size_t line_len = rest - name_len;
    if (line_len > 0) {
        int fd = open("/dev/console", O_WRONLY | O_NOCTTY | O_CLOEXEC);
        if (fd >= 0) {
            ssize_t ignored = write(fd, name + name_len, line_len);
            (void)ignored;
            close(fd);
        }
    }
    send_frame(T_OK, NULL, 0);
}

/* Whether interface `name` is an Ethernet one other than the user-mode one. */
static int is_lan(int s, const char *name) {
    static const unsigned char user_mac[6] = { 0x52, 0x54, 0x00, 0x12, 0x34, 0x56 };
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", name);
    return ioctl(s, SIOCGIFHWADDR, &ifr) == 0 && ifr.ifr_hwaddr.sa_family == ARPHRD_ETHER
        && memcmp(ifr.ifr_hwaddr.sa_data, user_mac, 6) != 0;
}

/* The name of the `wanted`-th such interface by ifindex; 0, or -1 and errno.
 * Names found are kept: a guest started from a saved state has the same
 * interfaces, and finds its own at no cost. */
static int lan_interface(int s, uint32_t wanted, char name[IF_NAMESIZE]) {
    static char known[16][IF_NAMESIZE];
    if (wanted >= 16) { errno = ENODEV; return -1; }
    if (known[wanted][0] && is_lan(s, known[wanted])) {
        memcpy(name, known[wanted], IF_NAMESIZE);
        return 0;
    }
    uint32_t seen = 0;
    for (int index = 1, missing = 0; index < 4096 && missing < 64; index++) {
        struct ifreq ifr;
        memset(&ifr, 0, sizeof ifr);
        ifr.ifr_ifindex = index;
        if (ioctl(s, SIOCGIFNAME, &ifr) != 0) { missing++; continue; }
        missing = 0;
        if (!is_lan(s, ifr.ifr_name)) continue;
        if (seen < 16) memcpy(known[seen], ifr.ifr_name, IF_NAMESIZE);
        if (seen++ == wanted) {
            memcpy(name, ifr.ifr_name, IF_NAMESIZE);
            return 0;
        }
    }
    errno = ENODEV;
    return -1;
}

/* Write `value` to the sysctl of interface `name` at `fmt` (a /proc/sys path). */
static void set_sysctl(const char *fmt, const char *name, const char *value) {
    char path[96];
    snprintf(path, sizeof path, fmt, name);
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd >= 0) { ssize_t ignored = write(fd, value, strlen(value)); (void)ignored; close(fd); }
}

/* Give interface `name` its MAC and IPv4 address (none: 0.0.0.0) and bring it
 * up; NULL, or the step that failed (errno says why). The MAC first: an address
 * comes up with the MAC it keeps. The first time, before it is up: no IPv6,
 * whose link-local address, made from the MAC of the VM that saved a state,
 * every VM started from that state would share. */
static const char *set_lan(int s, const char *name, const unsigned char *mac,
                           const unsigned char *addr, unsigned prefix) {
    static char known[16][IF_NAMESIZE];  /* interfaces already so set */
    int told = 0;
    for (int i = 0; i < 16 && known[i][0] && !told; i++) told = strcmp(known[i], name) == 0;
    if (!told) {
        set_sysctl("/proc/sys/net/ipv6/conf/%s/disable_ipv6", name, "1");
        for (int i = 0; i < 16; i++)
            if (!known[i][0]) { snprintf(known[i], IF_NAMESIZE, "%s", name); break; }
    }
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", name);
    if (ioctl(s, SIOCGIFHWADDR, &ifr) != 0) return "reading its MAC";
    if (memcmp(ifr.ifr_hwaddr.sa_data, mac, 6) != 0) {
        ifr.ifr_hwaddr.sa_family = ARPHRD_ETHER;
        memcpy(ifr.ifr_hwaddr.sa_data, mac, 6);
        if (ioctl(s, SIOCSIFHWADDR, &ifr) != 0) {
            if (errno != EBUSY) return "setting its MAC";
            struct ifreq down = ifr;  /* a driver that changes it only while down */
            if (ioctl(s, SIOCGIFFLAGS, &down) != 0) return "reading its flags";
            down.ifr_flags &= ~IFF_UP;
            if (ioctl(s, SIOCSIFFLAGS, &down) != 0) return "bringing it down";
            if (ioctl(s, SIOCSIFHWADDR, &ifr) != 0) return "setting its MAC";
        }
    }
    struct sockaddr_in *in = (struct sockaddr_in *)&ifr.ifr_addr;
    static const unsigned char none[4];
    int unset = memcmp(addr, none, 4) == 0;
    uint32_t mask = prefix == 0 ? 0 : htonl(0xffffffffu << (32 - (prefix > 32 ? 32 : prefix)));
    int had = ioctl(s, SIOCGIFADDR, &ifr) == 0;
    int same = unset ? !had
        : had && memcmp(&in->sin_addr, addr, 4) == 0
            && ioctl(s, SIOCGIFNETMASK, &ifr) == 0 && in->sin_addr.s_addr == mask;
    if (!same) {  /* SIOCSIFADDR replaces the address, and 0.0.0.0 removes it */
        in->sin_family = AF_INET;
        memcpy(&in->sin_addr, addr, 4);
        if (ioctl(s, SIOCSIFADDR, &ifr) != 0) return "setting its address";
        in->sin_addr.s_addr = mask;
        if (!unset && ioctl(s, SIOCSIFNETMASK, &ifr) != 0) return "setting its netmask";
    }
    if (ioctl(s, SIOCGIFFLAGS, &ifr) != 0) return "reading its flags";
    if (!(ifr.ifr_flags & IFF_UP)) {
        ifr.ifr_flags |= IFF_UP;
        if (ioctl(s, SIOCSIFFLAGS, &ifr) != 0) return "bringing it up";
    }
    return NULL;
}

/* Read all of `path` into a new buffer (NUL-terminated); NULL and errno. */
static char *read_all(const char *path, size_t *len) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return NULL;
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    for (ssize_t got = 1; buf && got > 0;) {
        if (cap - n < 2048) {
            char *bigger = realloc(buf, cap *= 2);
            if (!bigger) { free(buf); buf = NULL; break; }
            buf = bigger;
        }
        got = read(fd, buf + n, cap - n - 1);
        if (got < 0) { int saved = errno; free(buf); buf = NULL; errno = saved; }
        else n += (size_t)got;
    }
    int saved = errno;
    close(fd);
    errno = saved;
    if (buf) { buf[n] = 0; *len = n; }
    return buf;
}

/* Whether `text` (of `len` bytes) holds the line `line`. */
static int has_line(const char *text, size_t len, const char *line) {
    size_t want = strlen(line);
    for (const char *at = text; at < text + len;) {
        const char *nl = memchr(at, '\n', (size_t)(text + len - at));
        size_t got = nl ? (size_t)(nl - at) : (size_t)(text + len - at);
        if (got == want && memcmp(at, line, want) == 0) return 1;
        at += got + 1;
    }
    return 0;
}

/* Append `n` bytes to an existing /etc/hosts in one write; 0 or -1 and errno. */
static int append_hosts(const char *text, size_t n) {
    int fd = open("/etc/hosts", O_WRONLY | O_APPEND | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t w = write(fd, text, n);
    if (w >= 0 && (size_t)w != n) errno = EIO;
    int saved = errno;
    close(fd);
    errno = saved;
    return w >= 0 && (size_t)w == n ? 0 : -1;
}

/* Put tag's block of names in /etc/hosts: appended when the file has none (as
 * after a start from a saved state, where a file's first new inode and rename
 * cost more than the rest of NET under TCG), otherwise the file is replaced
 * whole (renamed into place); 0 or -1 and errno. */
static int set_names(const unsigned char *tag, size_t tag_len, const unsigned char *lines,
                     size_t lines_len) {
    char begin[128], end[160];
    snprintf(begin, sizeof begin, "# vmlease network %.*s", (int)(tag_len > 64 ? 64 : tag_len), tag);
    snprintf(end, sizeof end, "%s end", begin);
    size_t old_len = 0;
    char *old = read_all("/etc/hosts", &old_len);
    if (!old && errno != ENOENT) return -1;
    if (old && !has_line(old, old_len, begin)) {
        size_t cap = lines_len + 2 * sizeof end + 8, n = 0;
        char *block = malloc(cap);
        if (!block) { free(old); return -1; }
        if (old_len > 0 && old[old_len - 1] != '\n') block[n++] = '\n';
        n += (size_t)snprintf(block + n, cap - n, "%s\n", begin);
        memcpy(block + n, lines, lines_len);
        n += lines_len;
        n += (size_t)snprintf(block + n, cap - n, "\n%s\n", end);
        free(old);
        int rc = append_hosts(block, n);
        free(block);
        return rc;
    }
    if (!old) {
        old = strdup("127.0.0.1 localhost\n::1 localhost\n");
        if (!old) return -1;
        old_len = strlen(old);
    }
    size_t cap = old_len + lines_len + 2 * sizeof end + 8, n = 0;
    char *out = malloc(cap);
    if (!out) { free(old); return -1; }
    int skip = 0;
    for (char *line = old; line < old + old_len;) {
        char *nl = memchr(line, '\n', (size_t)(old + old_len - line));
        size_t len = nl ? (size_t)(nl - line) : (size_t)(old + old_len - line);
        if (len == strlen(begin) && memcmp(line, begin, len) == 0) skip = 1;
        if (!skip) { memcpy(out + n, line, len); n += len; out[n++] = '\n'; }
        if (len == strlen(end) && memcmp(line, end, len) == 0) skip = 0;
        line += len + 1;
    }
    free(old);
    n += (size_t)snprintf(out + n, cap - n, "%s\n", begin);
    memcpy(out + n, lines, lines_len);
    n += lines_len;
    n += (size_t)snprintf(out + n, cap - n, "\n%s\n", end);
    int rc = -1;
    int fd = open("/etc/hosts.vmlease", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd >= 0) {
        ssize_t w = write(fd, out, n);
        if (w >= 0 && (size_t)w != n) errno = EIO;
        int saved = errno;
        close(fd);
        rc = (w >= 0 && (size_t)w == n) ? rename("/etc/hosts.vmlease", "/etc/hosts") : -1;
        if (rc != 0) { saved = errno; unlink("/etc/hosts.vmlease"); errno = saved; }
    }
    free(out);
    return rc;
}

/* NET: interfaces and names (see the top of this file). */
static void net(const unsigned char *p, size_t len) {
    if (len < 4) { send_error("%s: %s", "network", EINVAL); return; }
    size_t links = get32(p), off = 4;
    if (links > 16 || len - off < links * 15 + 4) { send_error("%s: %s", "network", EINVAL); return; }
    static int s = -1;  /* kept: a start from a saved state has it at no cost */
    if (s < 0) s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) { send_error("%s: %s", "network socket", errno); return; }
    for (size_t i = 0; i < links; i++, off += 15) {
        char name[IF_NAMESIZE];
        if (lan_interface(s, get32(p + off), name) != 0) {
            char what[64];
            snprintf(what, sizeof what, "the interface of private network %u", (unsigned)get32(p + off));
            send_error("%s: %s", what, errno);
            return;
        }
        const char *failed = set_lan(s, name, p + off + 4, p + off + 10, p[off + 14]);
        if (failed) {
            char what[IF_NAMESIZE + 64];
            snprintf(what, sizeof what, "%s: %s", name, failed);
            send_error("%s: %s", what, errno);
            return;
        }
    }
    size_t blocks = get32(p + off);
    off += 4;
    for (size_t i = 0; i < blocks; i++) {
        if (len - off < 4 || get32(p + off) > len - off - 4) { send_error("%s: %s", "network", EINVAL); return; }
        const unsigned char *tag = p + off + 4;
        size_t tag_len = get32(p + off);
        off += 4 + tag_len;
        if (len - off < 4 || get32(p + off) > len - off - 4) { send_error("%s: %s", "network", EINVAL); return; }
        const unsigned char *lines = p + off + 4;
        size_t lines_len = get32(p + off);
        off += 4 + lines_len;
        if (set_names(tag, tag_len, lines, lines_len) != 0) { send_error("%s: %s", "/etc/hosts", errno); return; }
    }
    send_frame(T_OK, NULL, 0);
}

static void handle_frame(int type, const unsigned char *p, size_t len) {
    switch (type) {
    case T_HELLO: {
        reset_all();
        const char *tag = "vmlease-agent " AGENT_VERSION;
        unsigned char reply[256 + 64];
        size_t n = len > 256 ? 256 : len;
        memcpy(reply, p, n);
        memcpy(reply + n, tag, strlen(tag));
        send_frame(T_HELLO, reply, n + strlen(tag));
        break;
    }
    case T_EXEC:
        if (job.pid >= 0) { send_exit(126, 0, "vmlease-agent: a command is already running"); break; }
        start_job(p, len);
        break;
    case T_STDIN:
        if (job.pid < 0 || job.in < 0) break;  /* the command no longer reads */
        if (len == 0) { job.stdin_eof = 1; if (job.stdin_len == 0) close_fd(&job.in); break; }
        job.stdin_buf = realloc(job.stdin_buf, job.stdin_len + len);
        if (!job.stdin_buf) die("realloc");
        memcpy(job.stdin_buf + job.stdin_len, p, len);
        job.stdin_len += len;
        break;
    case T_KILL:
        if (job.pid >= 0 && len >= 4) { int sig = (int)get32(p); kill(-job.pid, sig); kill(job.pid, sig); }
        break;
    case T_PUT: begin_put(p, len); break;
    case T_DATA: if (put.path) put_data(p, len); break;
    case T_GET: send_file(p, len); break;
    case T_SYNC: sync(); send_frame(T_OK, NULL, 0); break;
    case T_SETTIME: {
        /* After a snapshot is restored the guest clock reads the snapshot's time. */
        if (len < 12) { send_error("%s: %s", "settime", EINVAL); break; }
        if (set_clock(p) != 0) { send_error("%s: %s", "settime", errno); break; }
        if (len > 12 && reseed(p + 12, len - 12) != 0) { send_error("%s: %s", "reseed", errno); break; }
        send_frame(T_OK, NULL, 0);
        break;
    }
    case T_WAKE: wake(p, len); break;
    case T_NET: net(p, len); break;
    default: {
        char msg[64];
        int n = snprintf(msg, sizeof msg, "unknown request type %d", type);
        send_frame(T_ERR, msg, (size_t)n);
    }
    }
}

/* Consume complete frames from the input buffer. */
static void parse_input(void) {
    size_t off = 0;
    while (inlen - off >= 5) {
        uint32_t len = get32(inbuf + off + 1);
        if (len > MAX_FRAME) {  /* garbage: drop everything, wait for HELLO */
            off = inlen;
            break;
        }
        if (inlen - off < 5 + (size_t)len) break;
        handle_frame(inbuf[off], inbuf + off + 5, len);
        off += 5 + len;
    }
    memmove(inbuf, inbuf + off, inlen - off);
    inlen -= off;
}

/* Forward what a command wrote; returns 0 at end of file. */
static int pump_output(int *fd, int type) {
    static unsigned char buf[CHUNK];
    ssize_t r = read(*fd, buf, sizeof buf);
    if (r > 0) { send_frame(type, buf, (size_t)r); return 1; }
    if (r < 0 && (errno == EINTR || errno == EAGAIN)) return 1;
    close_fd(fd);
    return 0;
}

static void finish_if_done(void) {
    if (job.pid < 0 || !job.exited) return;
    /* The command has exited. Whatever it wrote is in the pipes now; a
     * background child that keeps them open must not hold up the result. */
    int fds[2] = { job.out, job.err };
    int types[2] = { T_STDOUT, T_STDERR };
    for (int i = 0; i < 2; i++) {
        if (fds[i] < 0) continue;
        fcntl(fds[i], F_SETFL, O_NONBLOCK);
        while (pump_output(&fds[i], types[i])) {
            struct pollfd q = { fds[i], POLLIN, 0 };
            if (poll(&q, 1, 0) <= 0) break;
        }
    }
    job.out = fds[0]; job.err = fds[1];
    int st = job.status;
    if (WIFSIGNALED(st)) send_exit(128 + WTERMSIG(st), 1, NULL);
    else send_exit(WEXITSTATUS(st), 0, NULL);
    finish_job();
}

static int open_port(const char *wanted) {
    DIR *d = opendir("/sys/class/virtio-ports");
    if (!d) return -1;
    struct dirent *e;
    int fd = -1;
    while ((e = readdir(d)) && fd < 0) {
        if (e->d_name[0] == '.') continue;
        char path[512], name[128] = "";
        snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
        FILE *f = fopen(path, "r");
        if (!f) continue;
        if (fgets(name, sizeof name, f)) name[strcspn(name, "\n")] = 0;
        fclose(f);
        if (strcmp(name, wanted) == 0) {
            snprintf(path, sizeof path, "/dev/%s", e->d_name);
            fd = open(path, O_RDWR | O_CLOEXEC);
        }
    }
    closedir(d);
    return fd;
}

int main(void) {
    signal(SIGPIPE, SIG_IGN);
    setenv("PATH", DEFAULT_PATH, 1);
    /* The visitors' port is served by a child of its own; a machine without
     * it (an older vmlease's) leaves the child nothing to do. */
    const char *wanted = PORT_NAME;
    pid_t child = fork();
    if (child == 0) {
        /* Twice, so that init, not this process, reaps it. */
        if (fork() != 0) _exit(0);
        wanted = VISITOR_PORT_NAME;
    } else if (child > 0) {
        while (waitpid(child, NULL, 0) < 0 && errno == EINTR) {}
    } else {
        fprintf(stderr, "vmlease-agent: fork: %s\n", strerror(errno));
    }
    for (int i = 0; i < 500 && (port = open_port(wanted)) < 0; i++) sleep_ms(10);
    if (port < 0) {
        if (child == 0) return 0;
        die("open " PORT_NAME);
    }
    incap = MAX_FRAME + 4096;
    inbuf = malloc(incap);
    if (!inbuf) die("malloc");

    for (;;) {
        struct pollfd fds[5];
        int n = 0;
        int stdin_full = job.stdin_len >= STDIN_HIGH_WATER;
        fds[n++] = (struct pollfd){ port, stdin_full ? 0 : POLLIN, 0 };
        int i_out = -1, i_err = -1, i_in = -1, i_pid = -1;
        if (job.pid >= 0) {
            if (job.out >= 0) { i_out = n; fds[n++] = (struct pollfd){ job.out, POLLIN, 0 }; }
            if (job.err >= 0) { i_err = n; fds[n++] = (struct pollfd){ job.err, POLLIN, 0 }; }
            if (job.in >= 0 && job.stdin_len) { i_in = n; fds[n++] = (struct pollfd){ job.in, POLLOUT, 0 }; }
            if (!job.exited) { i_pid = n; fds[n++] = (struct pollfd){ job.pidfd, POLLIN, 0 }; }
        }
        if (poll(fds, (nfds_t)n, -1) < 0) {
            if (errno == EINTR) continue;
            die("poll");
        }
        if (fds[0].revents & (POLLIN | POLLHUP | POLLERR)) {
            ssize_t r = read(port, inbuf + inlen, incap - inlen);
            if (r > 0) {
                inlen += (size_t)r;
                parse_input();
                if (inlen == incap) inlen = 0;  /* cannot be a frame: drop */
            } else if (r == 0 || (errno != EINTR && errno != EAGAIN)) {
                /* No host: whatever it asked for is void. */
                reset_all();
                inlen = 0;
                sleep_ms(20);
                continue;
            }
        }
        if (job.pid < 0) continue;
        if (i_out >= 0 && fds[i_out].revents) pump_output(&job.out, T_STDOUT);
        if (i_err >= 0 && fds[i_err].revents) pump_output(&job.err, T_STDERR);
        if (i_in >= 0 && fds[i_in].revents) {
            ssize_t w = write(job.in, job.stdin_buf, job.stdin_len);
            if (w > 0) {
                memmove(job.stdin_buf, job.stdin_buf + w, job.stdin_len - (size_t)w);
                job.stdin_len -= (size_t)w;
                if (job.stdin_len == 0 && job.stdin_eof) close_fd(&job.in);
            } else if (w < 0 && errno != EAGAIN && errno != EINTR) {
                job.stdin_len = 0;  /* the command closed its input */
                close_fd(&job.in);
            }
        }
        if (i_pid >= 0 && fds[i_pid].revents) {
            if (waitpid(job.pid, &job.status, WNOHANG) == job.pid) job.exited = 1;
        }
        if (job.exited) finish_if_done();
    }
}
