/*
 * podnet-cni client: the compiled thin client of the node-local CNI server (`podnet-cni serve`).
 *
 * The container runtime starts one process per CNI call; with 10 ADDs in flight on a small node every millisecond
 * of a client's CPU shows up several times over in each ADD's latency, and even a bare Python interpreter costs
 * ~10 ms. This program speaks exactly the wire protocol of cni/main.py and costs well under a millisecond:
 *
 *   request:  "PODNETCNI1\n" + "KEY=VALUE\0" for every env var named CNI_* or PODNET_* + "\0" + stdin
 *   answer:   "<exit code> <stdout length>\n" + stdout + stderr
 *
 * The socket is $PODNET_CNI_SOCKET, else /run/podnet/cni.sock. If no server accepts the connection, it executes
 * $PODNET_CNI_FALLBACK (default "podnet-cni", looked up on PATH) with the same stdin and PODNET_CNI_SOCKET set to
 * /nonexistent, so the fallback runs the plugin in-process instead of looping back here. If the server accepted
 * the request and then failed, the work may be half done: rather than redo it, answer CNI error 11 (try again
 * later; ADD and DEL are idempotent, the runtime retries) and exit non-zero.
 *
 * Plain C and libc only: it is copied onto hosts as-is.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#define DEFAULT_SOCKET "/run/podnet/cni.sock"
#define DEFAULT_FALLBACK "podnet-cni"
#define MAGIC "PODNETCNI1\n"
#define ANSWER_TIMEOUT_S 120 /* the runtime's own timeout is usually longer */
#define MAX_STDIN (1 << 20)  /* the server reads at most 1 MiB per request */
#define MAX_ANSWER (64 << 20)

extern char **environ;

struct buf {
    char *data;
    size_t len, cap;
};

static void die_oom(void) {
    static const char msg[] = "{\"cniVersion\": \"1.1.0\", \"code\": 999, \"msg\": \"podnet-cni: out of memory\"}\n";
    (void)!write(1, msg, sizeof msg - 1);
    _exit(1);
}

static void buf_add(struct buf *b, const void *p, size_t n) {
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n)
            cap *= 2;
        char *d = realloc(b->data, cap);
        if (!d)
            die_oom();
        b->data = d;
        b->cap = cap;
    }
    memcpy(b->data + b->len, p, n);
    b->len += n;
}

static int write_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Read fd to EOF into b. -1 on a read error (errno set). */
static int read_all(int fd, struct buf *b, size_t limit) {
    char chunk[65536];
    for (;;) {
        ssize_t r = read(fd, chunk, sizeof chunk);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (r == 0)
            return 0;
        if (b->len + (size_t)r > limit) {
            errno = EFBIG;
            return -1;
        }
        buf_add(b, chunk, (size_t)r);
    }
}

/* A CNI error object on stdout and a line on stderr; returns the exit status. */
static int cni_error(int code, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    struct buf out = {0};
    char head[96];
    int n = snprintf(head, sizeof head, "{\"cniVersion\": \"1.1.0\", \"code\": %d, \"msg\": \"", code);
    buf_add(&out, head, (size_t)n);
    for (const unsigned char *c = (const unsigned char *)msg; *c; c++) {
        if (*c == '"' || *c == '\\') {
            char esc[2] = {'\\', (char)*c};
            buf_add(&out, esc, 2);
        } else if (*c < 0x20) {
            char esc[8];
            n = snprintf(esc, sizeof esc, "\\u%04x", *c);
            buf_add(&out, esc, (size_t)n);
        } else {
            buf_add(&out, c, 1);
        }
    }
    buf_add(&out, "\"}\n", 3);
    (void)write_all(1, out.data, out.len);
    dprintf(2, "podnet-cni: %s\n", msg);
    free(out.data);
    return 1;
}

static int forwarded(const char *entry) {
    return strncmp(entry, "CNI_", 4) == 0 || strncmp(entry, "PODNET_", 7) == 0;
}

/* Connect to the server; -1 if nobody accepts (errno set). A blocking connect on a unix socket fails at once when
 * nobody listens and waits (rather than failing with EAGAIN) while a burst of ADDs fills the accept queue. */
static int connect_server(const char *path) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof addr.sun_path) {
        errno = ENAMETOOLONG;
        return -1;
    }
    strcpy(addr.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    /* No signal handlers are installed, so no EINTR: one attempt. */
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}

/* No server: run the fallback plugin with the same stdin (a memfd holds it, so its size does not matter). */
static int fallback(const char *path, int connect_errno, const struct buf *in) {
    const char *target = getenv("PODNET_CNI_FALLBACK");
    if (!target || !*target)
        target = DEFAULT_FALLBACK;
    int fd = memfd_create("podnet-cni-stdin", 0);
    if (fd < 0 || write_all(fd, in->data, in->len) != 0 || lseek(fd, 0, SEEK_SET) != 0 || dup2(fd, 0) != 0)
        return cni_error(50, "no CNI server at %s (%s) and cannot pass stdin on to %s: %s", path,
                         strerror(connect_errno), target, strerror(errno));
    if (fd != 0)
        close(fd);
    if (setenv("PODNET_CNI_SOCKET", "/nonexistent", 1) != 0)
        die_oom();
    signal(SIGPIPE, SIG_DFL); /* an ignored signal would stay ignored across exec */
    char *argv[] = {(char *)target, NULL};
    execvp(target, argv);
    return cni_error(50, "no CNI server at %s (%s) and cannot run %s: %s", path, strerror(connect_errno), target,
                     strerror(errno));
}

int main(void) {
    signal(SIGPIPE, SIG_IGN); /* a server that dies mid-request is an EPIPE, answered below */
    const char *path = getenv("PODNET_CNI_SOCKET");
    if (!path || !*path)
        path = DEFAULT_SOCKET;

    struct buf in = {0};
    if (read_all(0, &in, MAX_STDIN) != 0)
        return cni_error(5, "reading stdin: %s", strerror(errno));

    int fd = connect_server(path);
    if (fd < 0)
        return fallback(path, errno, &in);

    struct buf req = {0};
    buf_add(&req, MAGIC, sizeof MAGIC - 1);
    for (char **e = environ; *e; e++)
        if (forwarded(*e) && strchr(*e, '='))
            buf_add(&req, *e, strlen(*e) + 1); /* with its NUL */
    buf_add(&req, "", 1);
    if (in.len)
        buf_add(&req, in.data, in.len);

    struct timeval tv = {.tv_sec = ANSWER_TIMEOUT_S};
    struct buf ans = {0};
    const char *failed = NULL;
    if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) != 0 ||
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) != 0)
        failed = "setting the timeout";
    else if (write_all(fd, req.data, req.len) != 0)
        failed = "sending the request";
    else if (shutdown(fd, SHUT_WR) != 0)
        failed = "closing the request";
    else if (read_all(fd, &ans, MAX_ANSWER) != 0)
        failed = errno == EAGAIN ? "waiting for the answer (timed out)" : "reading the answer";
    int saved = errno;
    close(fd);
    if (failed)
        return cni_error(11, "podnet CNI server at %s failed: %s: %s", path, failed, strerror(saved));

    /* "<code> <length>\n" */
    buf_add(&ans, "", 1); /* a terminator for the header parse; not part of the answer */
    ans.len--;
    char *nl = memchr(ans.data, '\n', ans.len);
    char *end;
    long code = -1, length = -1;
    if (nl) {
        code = strtol(ans.data, &end, 10);
        if (end == ans.data || *end != ' ')
            code = -1;
        else {
            length = strtol(end + 1, &end, 10);
            if (end != nl)
                length = -1;
        }
    }
    size_t body = nl ? (size_t)(nl + 1 - ans.data) : 0;
    if (code < 0 || code > 255 || length < 0 || (size_t)length > ans.len - body)
        return cni_error(11, "podnet CNI server at %s failed: malformed answer (%zu bytes)", path, ans.len);
    (void)write_all(1, ans.data + body, (size_t)length);
    (void)write_all(2, ans.data + body + length, ans.len - body - (size_t)length);
    return (int)code;
}
