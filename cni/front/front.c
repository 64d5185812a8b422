/*
 * headrace-cni's compiled front: the relayed ADD, DEL, GC and STATUS (protocol version 3 of the agent's
 * plugin socket) without starting an interpreter.
 *
 * install-cni lays the plugin as a launcher script whose `#!` line names this program and the agent
 * socket; the kernel then runs
 *     headrace-cni-front <agent socket> <launcher script> [the runtime's arguments...]
 * For those commands this program sends the runtime's CNI_* environment and the network configuration
 * to the agent, exactly as the Python launcher does (cni/contract/relay.py, cni/plugin/relay_client.py:
 * the same request line byte for byte, the same timeouts and answers). When the agent runs the command,
 * its output is printed and nothing else starts. Otherwise, and for every other command, it runs the
 * launcher script with the bundled interpreter next to it (`python3 -IS <script>`), the configuration
 * back on stdin, and when it tried to relay: `--relayed <standalone|unusable|held> <why>`, so the
 * plugin's own code knows how the relay went and does not ask the same agent again.
 *
 * Static, libc only; no heap allocation (fixed buffers); nothing from the request is interpreted beyond
 * what the framing needs. The constants below mirror the Python modules named beside them
 * (tests/unit/test_cni_front.py compares them).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX_LINE 65536          /* relay.MAX_LINE_BYTES */
#define MAX_HEADER 64           /* relay.MAX_HEADER_BYTES */
#define MAX_OUTPUT (1 << 20)    /* relay.MAX_OUTPUT_BYTES */
#define CONNECT_TIMEOUT_MS 250  /* relay_client.CONNECT_TIMEOUT */
#define FIRST_ANSWER_MS 2000    /* relay_client.FIRST_ANSWER_TIMEOUT */
#define INTERPRETER "python3"   /* next to this program in the runtime's bin/ */
#define INTERNAL_ERROR 199      /* cni.contract.errors.INTERNAL_ERROR */

static const char *const COMMANDS[] = {"ADD", "DEL", "GC", "STATUS"};  /* relay.COMMANDS */

static const char *const ENV_KEYS[] = {
    "CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH",
};

/* The configuration as read from stdin: at most one byte more than a request line can hold is kept in
 * `stdin_buf`; a larger one is kept in the memory file the interpreter gets as its stdin. */
static char stdin_buf[MAX_LINE + 1];
static char line[MAX_LINE + 1];
static char reply[MAX_HEADER + MAX_OUTPUT + 1];

struct relay {
    const char *socket_path;
    const char *command;
    char msg[512];
    int held;
};

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int write_all(int fd, const char *data, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, data, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        data += w;
        n -= (size_t)w;
    }
    return 0;
}

static int is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }

/* relay.request_line: the request, or 0 when this invocation is not relayed as it is. */
static size_t request_line(const char *command, const char *config, size_t config_len) {
    size_t n = 0;
    int first = 1;
    n += (size_t)snprintf(line, sizeof line, "{\"v\":3,\"cmd\":\"%s\",\"env\":{", command);
    for (size_t k = 0; k < sizeof ENV_KEYS / sizeof ENV_KEYS[0]; k++) {
        const char *value = getenv(ENV_KEYS[k]);
        if (value == NULL) continue;
        size_t need = strlen(ENV_KEYS[k]) + 6;
        if (n + need >= MAX_LINE) return 0;
        n += (size_t)snprintf(line + n, sizeof line - n, "%s\"%s\":\"", first ? "" : ",", ENV_KEYS[k]);
        first = 0;
        for (const char *p = value; *p; p++) {
            unsigned char c = (unsigned char)*p;
            if (c < 0x20 || c > 0x7e) return 0;  /* printable ASCII only */
            if (n + 2 >= MAX_LINE) return 0;
            if (c == '\\' || c == '"') line[n++] = '\\';
            line[n++] = (char)c;
        }
        line[n++] = '"';
    }
    while (config_len > 0 && is_space(config[0])) { config++; config_len--; }
    while (config_len > 0 && is_space(config[config_len - 1])) config_len--;
    if (config_len == 0 || config[0] != '{' || config[config_len - 1] != '}') return 0;
    static const char mid[] = "},\"stdin\":";
    if (n + sizeof mid - 1 + config_len + 2 > MAX_LINE) return 0;
    memcpy(line + n, mid, sizeof mid - 1);
    n += sizeof mid - 1;
    for (size_t i = 0; i < config_len; i++) {
        char c = config[i];
        line[n++] = (c == '\n' || c == '\r') ? ' ' : c;
    }
    line[n++] = '}';
    line[n++] = '\n';
    return n;
}

/* Wait until fd is readable or the deadline passes: 1 readable, 0 timed out, -1 error. */
static int wait_readable(int fd, long long deadline) {
    for (;;) {
        long long left = deadline - now_ms();
        if (left <= 0) return 0;
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int r = poll(&p, 1, (int)(left > INT_MAX ? INT_MAX : left));
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return -1;
        if (r == 0) return 0;
        return 1;
    }
}

enum { R_DONE, R_STANDALONE, R_UNUSABLE, R_HELD };
enum { K_NONE, K_DONE, K_WAIT, K_STANDALONE };

static int all_digits(const char *w, size_t n) {
    if (n == 0 || n > 10) return 0;
    for (size_t i = 0; i < n; i++)
        if (w[i] < '0' || w[i] > '9') return 0;
    return 1;
}

/* relay.parse_header over header[0..n): the kind and its numbers, K_NONE for anything else. */
static int parse_header(const char *header, size_t n, long long *a, long long *b) {
    const char *words[8];
    size_t lens[8];
    size_t count = 0;
    size_t i = 0;
    while (i < n) {
        while (i < n && is_space(header[i])) i++;
        if (i >= n) break;
        size_t start = i;
        while (i < n && !is_space(header[i])) i++;
        if (count == 8) return K_NONE;
        words[count] = header + start;
        lens[count++] = i - start;
    }
    if (count < 2 || lens[0] != 3 || memcmp(words[0], "HR3", 3) != 0) return K_NONE;
    long long nums[6];
    for (size_t w = 2; w < count; w++) {
        if (!all_digits(words[w], lens[w])) return K_NONE;
        nums[w - 2] = strtoll(words[w], NULL, 10);
    }
    size_t numbers = count - 2;
    if (lens[1] == 4 && memcmp(words[1], "done", 4) == 0 && numbers == 2 && nums[0] <= 255 && nums[1] <= MAX_OUTPUT) {
        *a = nums[0];
        *b = nums[1];
        return K_DONE;
    }
    if (lens[1] == 4 && memcmp(words[1], "wait", 4) == 0 && numbers == 1) {
        *a = nums[0];
        return K_WAIT;
    }
    if (lens[1] == 10 && memcmp(words[1], "standalone", 10) == 0 && numbers == 0) return K_STANDALONE;
    return K_NONE;
}

/* Read into reply[*have..] once: 1 data, 0 closed, -2 timed out, -1 error. */
static int fill(int fd, size_t *have, long long deadline) {
    int r = wait_readable(fd, deadline);
    if (r <= 0) return r == 0 ? -2 : -1;
    for (;;) {
        ssize_t got = recv(fd, reply + *have, sizeof reply - 1 - *have, 0);
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) return -1;
        *have += (size_t)got;
        return got > 0;
    }
}

static void connect_failed(struct relay *r, int err) {
    const char *path = r->socket_path;
    if (err == ENOENT)
        snprintf(r->msg, sizeof r->msg, "agent socket %s does not exist", path);
    else if (err == ECONNREFUSED)
        snprintf(r->msg, sizeof r->msg, "agent socket %s refused the connection", path);
    else if (err == EAGAIN || err == ETIMEDOUT || err == EINPROGRESS)
        snprintf(r->msg, sizeof r->msg, "connecting to the agent at %s timed out", path);
    else
        snprintf(r->msg, sizeof r->msg, "cannot connect to the agent at %s: %s", path, strerror(err));
}

/* The relay's outcome; on R_DONE the output is reply[*out_at..*out_at + *out_len) and *status is set. */
static int relay(struct relay *r, size_t request_len, int *status, size_t *out_at, size_t *out_len) {
    long long started = now_ms();
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(r->socket_path) >= sizeof addr.sun_path) {
        connect_failed(r, ENAMETOOLONG);
        return R_UNUSABLE;
    }
    strcpy(addr.sun_path, r->socket_path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        connect_failed(r, errno);
        return R_UNUSABLE;
    }
    /* A unix connect waits for room in the listener's backlog at most the send timeout; the send of
     * the request line at most that long per call, as the Python client's socket timeout. */
    struct timeval tv = {.tv_sec = 0, .tv_usec = CONNECT_TIMEOUT_MS * 1000};
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    int rc;
    do rc = connect(fd, (struct sockaddr *)&addr, sizeof addr);
    while (rc < 0 && errno == EINTR);
    if (rc < 0) {
        connect_failed(r, errno);
        close(fd);
        return R_UNUSABLE;
    }
    int outcome = R_UNUSABLE;
    const char *why = "the agent's answer was cut short or not one of protocol version 3";
    int timed_out = 0;
    int io_error = 0;
    if (write_all(fd, line, request_len) < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) timed_out = 1;
        else io_error = errno;
        goto out;
    }
    long long deadline = started + FIRST_ANSWER_MS;
    size_t have = 0;
    for (;;) {
        /* the header: up to a newline; at the end of the stream or past MAX_HEADER bytes without one,
         * the first MAX_HEADER bytes (kept, as relay_client's reader does) */
        char *nl;
        size_t header_len;
        int consumed = 1;
        while ((nl = memchr(reply, '\n', have)) == NULL) {
            if (have > MAX_HEADER) break;
            int f = fill(fd, &have, deadline);
            if (f == -2) { timed_out = 1; goto out; }
            if (f < 0) { io_error = errno; goto out; }
            if (f == 0) break;
        }
        if (nl != NULL) {
            header_len = (size_t)(nl - reply);
        } else {
            header_len = have < MAX_HEADER ? have : MAX_HEADER;
            consumed = 0;
        }
        long long a = 0, b = 0;
        int kind = parse_header(reply, header_len, &a, &b);
        if (consumed) {
            memmove(reply, nl + 1, have - header_len - 1);
            have -= header_len + 1;
        }
        if (kind == K_NONE) break;
        if (kind == K_STANDALONE) {
            snprintf(r->msg, sizeof r->msg, "the agent left the %s to the plugin", r->command);
            outcome = R_STANDALONE;
            goto closed;
        }
        if (kind == K_WAIT && !r->held) {
            r->held = 1;
            deadline = now_ms() + a;
            continue;
        }
        if (kind == K_DONE) {
            while (have < (size_t)b) {
                int f = fill(fd, &have, deadline);
                if (f == -2) { timed_out = 1; goto out; }
                if (f < 0) { io_error = errno; goto out; }
                if (f == 0) break;
            }
            if (have >= (size_t)b) {
                *status = (int)a;
                *out_at = 0;
                *out_len = (size_t)b;
                outcome = R_DONE;
                goto closed;
            }
        }
        break;
    }
out:
    if (io_error)
        snprintf(r->msg, sizeof r->msg, "talking to the agent at %s failed: %s", r->socket_path, strerror(io_error));
    else if (timed_out && r->held)
        snprintf(r->msg, sizeof r->msg, "the agent did not finish the %s in time", r->command);
    else if (timed_out)
        snprintf(r->msg, sizeof r->msg, "the agent did not answer in time");
    else
        snprintf(r->msg, sizeof r->msg, "%s", why);
    outcome = r->held ? R_HELD : R_UNUSABLE;
closed:
    close(fd);
    return outcome;
}

/* A memory file holding data[0..n) (its offset at the end), or -1. */
static int memfd_with(const char *data, size_t n) {
    int fd = memfd_create("headrace-cni-stdin", 0);
    if (fd >= 0 && write_all(fd, data, n) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Read all of stdin; return its length, or -1. Whatever does not fit in stdin_buf is written, with
 * what does, to a memory file `*spill` (-1 when it all fit). */
static ssize_t read_stdin(int *spill) {
    size_t n = 0;
    *spill = -1;
    for (;;) {
        ssize_t got = read(0, stdin_buf + n, sizeof stdin_buf - n);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) return (ssize_t)n;  /* an unreadable stdin is an empty one, as in the launcher */
        n += (size_t)got;
        if (n == sizeof stdin_buf) break;
    }
    int fd = memfd_with(stdin_buf, n);
    if (fd < 0) return -1;
    char chunk[65536];
    for (;;) {
        ssize_t got = read(0, chunk, sizeof chunk);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) break;
        if (write_all(fd, chunk, (size_t)got) < 0) return -1;
        n += (size_t)got;
    }
    *spill = fd;
    return (ssize_t)n;
}

/* Put the configuration back on fd 0 for the interpreter: a memory file holding it. */
static int restore_stdin(size_t n, int spill) {
    int fd = spill >= 0 ? spill : memfd_with(stdin_buf, n);
    if (fd < 0) return -1;
    if (lseek(fd, 0, SEEK_SET) < 0 || dup2(fd, 0) < 0) return -1;
    if (fd != 0) close(fd);
    return 0;
}

static void fail(const char *msg, const char *details) {
    char out[1024];
    int n = snprintf(out, sizeof out,
                     "{\"cniVersion\":\"1.0.0\",\"code\":%d,\"msg\":\"%s\",\"details\":\"%s\"}\n", INTERNAL_ERROR,
                     msg, details);
    if (n > 0) write_all(1, out, (size_t)n < sizeof out ? (size_t)n : sizeof out - 1);
    _exit(1);
}

/* Run the launcher script with the bundled interpreter; extra: the relay's outcome (or none). */
static void run_interpreter(char *self, char *script, int argc, char **argv, const char *kind, const char *msg) {
    char python[PATH_MAX];
    const char *slash = strrchr(self, '/');
    int dir_len = slash ? (int)(slash - self) : 0;
    if (snprintf(python, sizeof python, "%.*s/%s", dir_len, slash ? self : ".", INTERPRETER) >= (int)sizeof python)
        fail("headrace-cni: the runtime's path is too long", "");
    char *args[argc + 8];
    int n = 0;
    args[n++] = python;
    args[n++] = "-IS";
    args[n++] = script;
    if (kind != NULL) {
        args[n++] = "--relayed";
        args[n++] = (char *)kind;
        args[n++] = (char *)msg;
    }
    for (int i = 0; i < argc; i++) args[n++] = argv[i];
    args[n] = NULL;
    execv(python, args);
    fail("headrace-cni: cannot start the plugin's interpreter", strerror(errno));
}

static int relayed_command(const char *command) {
    if (command == NULL) return 0;
    for (size_t k = 0; k < sizeof COMMANDS / sizeof COMMANDS[0]; k++)
        if (strcmp(command, COMMANDS[k]) == 0) return 1;
    return 0;
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);  /* a closed socket or stdout is an error return, as in the interpreter */
    /* argv: this program, the agent socket (the `#!` line's argument), the launcher script, then the
     * runtime's own arguments (none for CNI) */
    if (argc < 3) fail("headrace-cni-front runs only from the launcher install-cni lays", "");
    const char *command = getenv("CNI_COMMAND");
    struct relay r = {.socket_path = argv[1], .command = command};
    if (!relayed_command(command))
        run_interpreter(argv[0], argv[2], argc - 3, argv + 3, NULL, NULL);
    int spill;
    ssize_t n = read_stdin(&spill);
    if (n < 0) fail("headrace-cni: cannot hold the network configuration", strerror(errno));
    size_t request_len = spill < 0 ? request_line(command, stdin_buf, (size_t)n) : 0;
    const char *kind = NULL;
    if (request_len > 0) {
        int status = 0;
        size_t at = 0, len = 0;
        int outcome = relay(&r, request_len, &status, &at, &len);
        if (outcome == R_DONE) {
            write_all(1, reply + at, len);
            _exit(status);
        }
        kind = outcome == R_STANDALONE ? "standalone" : outcome == R_HELD ? "held" : "unusable";
    }
    if (restore_stdin((size_t)n, spill) < 0) fail("headrace-cni: cannot hold the network configuration", strerror(errno));
    run_interpreter(argv[0], argv[2], argc - 3, argv + 3, kind, r.msg);
    return 1;
}
