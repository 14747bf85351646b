/*
 * Open-loop HTTP/1.1 load generator for latency at a fixed request rate.
 *
 * Request k is due at t0 + k / rate, whether or not earlier requests have finished; it goes
 * out on the first idle keep-alive connection, and its latency runs from its due time to the
 * last byte of its response. A server that falls behind therefore shows up as latency (the
 * wait for a free connection counts) instead of as a quietly lower send rate, which is the
 * coordinated-omission error that a closed-loop tool such as wrk makes.
 *
 *   loadgen --port P --path /v1/chat/completions --body FILE --rate R --duration S
 *           [--host 127.0.0.1] [--connections 64] [--threads 1] [--warmup S] [--timeout S]
 *
 * --rate 0 runs closed-loop instead (each connection sends as soon as its last response ends),
 * which is handy as a cross-check against wrk. Prints one line, LOADGEN_SUMMARY {json}, with
 * latencies in microseconds. Requests due during --warmup are sent but not recorded.
 *
 * Build: cc -O2 -pthread -o loadgen loadgen.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define MAX_EVENTS 256
#define HDR_CAP 16384
#define NS 1000000000LL

typedef enum { CS_DOWN, CS_CONNECTING, CS_IDLE, CS_BUSY } conn_state_t;

/* Response parser states; the chunked body is walked byte by byte only at chunk framing. */
typedef enum {
    RP_HEADERS,
    RP_BODY_LENGTH,
    RP_CHUNK_SIZE,
    RP_CHUNK_EXT,
    RP_CHUNK_SIZE_LF,
    RP_CHUNK_DATA,
    RP_CHUNK_DATA_CR,
    RP_CHUNK_DATA_LF,
    RP_TRAILER_START,
    RP_TRAILER_LINE,
    RP_TRAILER_END_LF,
    RP_BODY_UNTIL_CLOSE,
} parse_state_t;

typedef struct {
    int fd;
    conn_state_t state;
    int64_t retry_at;
    int64_t due_ns; /* schedule time of the request in flight */
    int recorded;   /* whether that request falls in the measured window */
    size_t woff;    /* bytes of the request written so far */
    parse_state_t ps;
    char hdr[HDR_CAP];
    size_t hlen;
    uint64_t remaining; /* Content-Length bytes or current chunk bytes left */
    int status;
    int close_after;
} conn_t;

typedef struct {
    uint64_t sent, completed, recorded, non2xx, connect_errors, read_errors, write_errors,
        timeouts, parse_errors, idle_closes, unsent, max_backlog;
} counters_t;

typedef struct {
    int index;
    int nconns;
    conn_t *conns;
    int *idle; /* stack of idle connection indices */
    int nidle;
    int epfd, tfd;
    int64_t interval_ns; /* 0: closed loop */
    int64_t t0, warmup_end, send_end;
    uint64_t total_due;  /* requests this thread schedules */
    uint64_t next_due;   /* next request index not yet due */
    uint64_t next_send;  /* next due request index not yet sent */
    int64_t *lat_ns;
    uint64_t lat_cap, lat_len;
    counters_t c;
    pthread_t tid;
} worker_t;

static struct sockaddr_in g_addr;
static char *g_request;
static size_t g_request_len;
static double g_rate = 0, g_duration = 10, g_warmup = 0, g_timeout = 10;
static int g_connections = 64, g_threads = 1;

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(1);
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * NS + ts.tv_nsec;
}

/* ---------------------------------------------------------------- connections */

static void conn_close(worker_t *w, conn_t *c) {
    if (c->fd >= 0) {
        epoll_ctl(w->epfd, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
    }
    if (c->state == CS_IDLE) {
        for (int i = 0; i < w->nidle; i++) {
            if (&w->conns[w->idle[i]] == c) {
                w->idle[i] = w->idle[--w->nidle];
                break;
            }
        }
    }
    c->fd = -1;
    c->state = CS_DOWN;
}

static void conn_open(worker_t *w, conn_t *c) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) die("loadgen: socket: %s", strerror(errno));
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->fd = fd;
    c->state = CS_CONNECTING;
    int r = connect(fd, (struct sockaddr *)&g_addr, sizeof g_addr);
    if (r < 0 && errno != EINPROGRESS) {
        w->c.connect_errors++;
        close(fd);
        c->fd = -1;
        c->state = CS_DOWN;
        c->retry_at = now_ns() + NS / 20;
        return;
    }
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.u32 = (uint32_t)(c - w->conns)};
    epoll_ctl(w->epfd, EPOLL_CTL_ADD, fd, &ev);
}

static void make_idle(worker_t *w, conn_t *c) {
    c->state = CS_IDLE;
    w->idle[w->nidle++] = (int)(c - w->conns);
}

static void want_write(worker_t *w, conn_t *c, int on) {
    struct epoll_event ev = {.events = EPOLLIN | (on ? EPOLLOUT : 0),
                             .data.u32 = (uint32_t)(c - w->conns)};
    epoll_ctl(w->epfd, EPOLL_CTL_MOD, c->fd, &ev);
}

/* Replaces a closed connection at once while requests are still being sent. */
static void reopen(worker_t *w, conn_t *c) {
    conn_close(w, c);
    c->retry_at = 0;
    if (now_ns() < w->send_end) conn_open(w, c);
}

static void fail_request(worker_t *w, conn_t *c, uint64_t *counter) {
    (*counter)++;
    reopen(w, c);
}

static void write_request(worker_t *w, conn_t *c) {
    while (c->woff < g_request_len) {
        ssize_t n = send(c->fd, g_request + c->woff, g_request_len - c->woff, MSG_NOSIGNAL);
        if (n > 0) {
            c->woff += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            want_write(w, c, 1);
            return;
        }
        fail_request(w, c, &w->c.write_errors);
        return;
    }
    want_write(w, c, 0);
}

static void send_on(worker_t *w, conn_t *c, int64_t due, int recorded) {
    c->state = CS_BUSY;
    c->due_ns = due;
    c->recorded = recorded;
    c->woff = 0;
    c->ps = RP_HEADERS;
    c->hlen = 0;
    c->status = 0;
    c->close_after = 0;
    w->c.sent++;
    write_request(w, c);
}

/* ---------------------------------------------------------------- response parsing */

static void record(worker_t *w, int64_t latency) {
    if (w->lat_len == w->lat_cap) {
        w->lat_cap = w->lat_cap ? w->lat_cap * 2 : 65536;
        w->lat_ns = realloc(w->lat_ns, sizeof(int64_t) * w->lat_cap);
        if (!w->lat_ns) die("loadgen: out of memory");
    }
    w->lat_ns[w->lat_len++] = latency;
}

static void finish_response(worker_t *w, conn_t *c) {
    int64_t t = now_ns();
    w->c.completed++;
    if (c->status < 200 || c->status > 299) w->c.non2xx++;
    if (c->recorded) {
        w->c.recorded++;
        record(w, t - c->due_ns);
    }
    if (c->close_after) {
        reopen(w, c);
    } else {
        make_idle(w, c);
    }
}

static int parse_headers(conn_t *c, size_t hend) {
    /* hend: length of the header block including the blank line. */
    c->hdr[hend - 1] = 0;
    if (hend < 12 || strncmp(c->hdr, "HTTP/1.", 7) != 0) return -1;
    c->status = atoi(c->hdr + 9);
    if (c->status < 100 || c->status > 999) return -1;
    int http10 = c->hdr[7] == '0';
    long long content_length = -1;
    int chunked = 0, conn_close_hdr = 0, keep_alive_hdr = 0;
    char *line = strstr(c->hdr, "\r\n");
    while (line && line[2] != '\r' && line[2] != 0) {
        line += 2;
        char *eol = strstr(line, "\r\n");
        if (!eol) break;
        char *colon = memchr(line, ':', (size_t)(eol - line));
        if (colon) {
            size_t nlen = (size_t)(colon - line);
            char *v = colon + 1;
            while (*v == ' ' || *v == '\t') v++;
            size_t vlen = (size_t)(eol - v);
            if (nlen == 14 && !strncasecmp(line, "content-length", 14)) {
                content_length = atoll(v);
            } else if (nlen == 17 && !strncasecmp(line, "transfer-encoding", 17)) {
                chunked = memmem(v, vlen, "chunked", 7) != NULL;
            } else if (nlen == 10 && !strncasecmp(line, "connection", 10)) {
                if (memmem(v, vlen, "close", 5)) conn_close_hdr = 1;
                if (memmem(v, vlen, "eep-alive", 9)) keep_alive_hdr = 1;
            }
        }
        line = eol;
    }
    c->close_after = conn_close_hdr || (http10 && !keep_alive_hdr);
    if (c->status == 204 || c->status == 304 || (c->status >= 100 && c->status < 200)) {
        c->ps = RP_BODY_LENGTH;
        c->remaining = 0;
    } else if (chunked) {
        c->ps = RP_CHUNK_SIZE;
        c->remaining = 0;
    } else if (content_length >= 0) {
        c->ps = RP_BODY_LENGTH;
        c->remaining = (uint64_t)content_length;
    } else {
        c->ps = RP_BODY_UNTIL_CLOSE;
        c->close_after = 1;
    }
    return 0;
}

static int hexval(char ch) {
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    return -1;
}

/* Feeds bytes to the parser; returns bytes used, or -1 on a malformed response. Sets *done. */
static ssize_t feed(conn_t *c, const char *p, size_t n, int *done) {
    size_t i = 0;
    *done = 0;
    while (i < n && !*done) {
        switch (c->ps) {
        case RP_HEADERS: {
            size_t take = n - i;
            if (take > HDR_CAP - 1 - c->hlen) take = HDR_CAP - 1 - c->hlen;
            if (take == 0) return -1;
            size_t start = c->hlen >= 3 ? c->hlen - 3 : 0;
            memcpy(c->hdr + c->hlen, p + i, take);
            c->hlen += take;
            char *end = memmem(c->hdr + start, c->hlen - start, "\r\n\r\n", 4);
            if (!end) {
                i += take;
                break;
            }
            size_t hend = (size_t)(end - c->hdr) + 4;
            i += take - (c->hlen - hend); /* give back bytes past the header block */
            c->hlen = hend;
            if (parse_headers(c, hend) < 0) return -1;
            if (c->ps == RP_BODY_LENGTH && c->remaining == 0) *done = 1;
            break;
        }
        case RP_BODY_LENGTH: {
            size_t take = n - i;
            if (take > c->remaining) take = (size_t)c->remaining;
            c->remaining -= take;
            i += take;
            if (c->remaining == 0) *done = 1;
            break;
        }
        case RP_BODY_UNTIL_CLOSE:
            i = n;
            break;
        case RP_CHUNK_SIZE: {
            int h = hexval(p[i]);
            if (h >= 0) {
                if (c->remaining > (1ULL << 40)) return -1;
                c->remaining = c->remaining * 16 + (uint64_t)h;
            } else if (p[i] == ';' || p[i] == ' ' || p[i] == '\t') {
                c->ps = RP_CHUNK_EXT;
            } else if (p[i] == '\r') {
                c->ps = RP_CHUNK_SIZE_LF;
            } else {
                return -1;
            }
            i++;
            break;
        }
        case RP_CHUNK_EXT:
            if (p[i] == '\r') c->ps = RP_CHUNK_SIZE_LF;
            i++;
            break;
        case RP_CHUNK_SIZE_LF:
            if (p[i] != '\n') return -1;
            i++;
            c->ps = c->remaining ? RP_CHUNK_DATA : RP_TRAILER_START;
            break;
        case RP_CHUNK_DATA: {
            size_t take = n - i;
            if (take > c->remaining) take = (size_t)c->remaining;
            c->remaining -= take;
            i += take;
            if (c->remaining == 0) c->ps = RP_CHUNK_DATA_CR;
            break;
        }
        case RP_CHUNK_DATA_CR:
            if (p[i] != '\r') return -1;
            i++;
            c->ps = RP_CHUNK_DATA_LF;
            break;
        case RP_CHUNK_DATA_LF:
            if (p[i] != '\n') return -1;
            i++;
            c->remaining = 0;
            c->ps = RP_CHUNK_SIZE;
            break;
        case RP_TRAILER_START:
            /* Either the final CRLF or a trailer header line. */
            c->ps = p[i] == '\r' ? RP_TRAILER_END_LF : RP_TRAILER_LINE;
            i++;
            break;
        case RP_TRAILER_LINE:
            if (p[i] == '\n') c->ps = RP_TRAILER_START;
            i++;
            break;
        case RP_TRAILER_END_LF:
            if (p[i] != '\n') return -1;
            i++;
            *done = 1;
            break;
        }
    }
    return (ssize_t)i;
}

static void on_readable(worker_t *w, conn_t *c) {
    char buf[65536];
    for (;;) {
        ssize_t n = recv(c->fd, buf, sizeof buf, 0);
        if (n == 0) {
            if (c->state == CS_BUSY && c->ps == RP_BODY_UNTIL_CLOSE) {
                finish_response(w, c); /* close_after is set, so this reopens */
            } else if (c->state == CS_BUSY) {
                fail_request(w, c, &w->c.read_errors);
            } else {
                w->c.idle_closes++;
                reopen(w, c);
            }
            return;
        }
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;
            fail_request(w, c, &w->c.read_errors);
            return;
        }
        if (c->state != CS_BUSY) {
            /* Bytes nobody asked for: the connection's framing is lost. */
            fail_request(w, c, &w->c.parse_errors);
            return;
        }
        size_t off = 0;
        while (off < (size_t)n) {
            int done;
            ssize_t used = feed(c, buf + off, (size_t)n - off, &done);
            if (used < 0) {
                fail_request(w, c, &w->c.parse_errors);
                return;
            }
            off += (size_t)used;
            if (done) {
                finish_response(w, c);
                if (off < (size_t)n) {
                    fail_request(w, c, &w->c.parse_errors);
                    return;
                }
                if (c->state != CS_BUSY) return;
            }
        }
    }
}

/* ---------------------------------------------------------------- scheduling */

static int64_t due_time(worker_t *w, uint64_t k) {
    return w->t0 + (int64_t)k * w->interval_ns;
}

static void arm_timer(worker_t *w, int64_t at) {
    struct itimerspec its = {0};
    int64_t rt_now = now_ns();
    if (at <= rt_now) at = rt_now + 1000;
    its.it_value.tv_sec = at / NS;
    its.it_value.tv_nsec = at % NS;
    timerfd_settime(w->tfd, TFD_TIMER_ABSTIME, &its, NULL);
}

static void dispatch(worker_t *w, int64_t now) {
    if (w->interval_ns == 0) {
        /* Closed loop: every idle connection sends at once while the window is open. */
        while (w->nidle > 0 && now < w->send_end) {
            conn_t *c = &w->conns[w->idle[--w->nidle]];
            send_on(w, c, now, now >= w->warmup_end);
        }
        return;
    }
    while (w->next_due < w->total_due && due_time(w, w->next_due) <= now) w->next_due++;
    while (w->next_send < w->next_due && w->nidle > 0) {
        conn_t *c = &w->conns[w->idle[--w->nidle]];
        int64_t due = due_time(w, w->next_send);
        send_on(w, c, due, due >= w->warmup_end);
        w->next_send++;
    }
    /* Due requests still waiting for a free connection. */
    uint64_t backlog = w->next_due - w->next_send;
    if (backlog > w->c.max_backlog) w->c.max_backlog = backlog;
}

static int busy_count(worker_t *w) {
    int n = 0;
    for (int i = 0; i < w->nconns; i++) n += w->conns[i].state == CS_BUSY;
    return n;
}

static void expire(worker_t *w, int64_t now) {
    int64_t limit = (int64_t)(g_timeout * NS);
    for (int i = 0; i < w->nconns; i++) {
        conn_t *c = &w->conns[i];
        if (c->state == CS_BUSY && now - c->due_ns > limit) fail_request(w, c, &w->c.timeouts);
        if (c->state == CS_DOWN && now >= c->retry_at && now < w->send_end) conn_open(w, c);
    }
}

static void *worker_main(void *arg) {
    worker_t *w = arg;
    struct epoll_event events[MAX_EVENTS];
    int64_t last_expire = 0;
    for (;;) {
        int64_t now = now_ns();
        if (now - last_expire > NS / 20) {
            expire(w, now);
            last_expire = now;
        }
        dispatch(w, now);
        int sending = w->interval_ns ? w->next_send < w->total_due : now < w->send_end;
        int busy = busy_count(w);
        if (!sending && busy == 0) break;
        if (now > w->send_end + (int64_t)(g_timeout * NS)) {
            /* Hard stop: whatever is still in flight or never went out is a failure. */
            for (int i = 0; i < w->nconns; i++)
                if (w->conns[i].state == CS_BUSY) fail_request(w, &w->conns[i], &w->c.timeouts);
            if (w->interval_ns) w->c.unsent += w->total_due - w->next_send;
            break;
        }
        if (w->interval_ns && w->next_due < w->total_due)
            arm_timer(w, due_time(w, w->next_due));
        else
            arm_timer(w, now + NS / 20);
        int n = epoll_wait(w->epfd, events, MAX_EVENTS, 100);
        if (n < 0 && errno != EINTR) die("loadgen: epoll_wait: %s", strerror(errno));
        for (int i = 0; i < n; i++) {
            uint32_t tag = events[i].data.u32;
            if (tag == UINT32_MAX) {
                uint64_t ticks;
                if (read(w->tfd, &ticks, sizeof ticks) < 0) { /* spurious wake */ }
                continue;
            }
            conn_t *c = &w->conns[tag];
            if (c->fd < 0) continue;
            uint32_t e = events[i].events;
            if (c->state == CS_CONNECTING) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err || (e & (EPOLLERR | EPOLLHUP))) {
                    w->c.connect_errors++;
                    conn_close(w, c);
                    c->retry_at = now_ns() + NS / 20;
                    continue;
                }
                want_write(w, c, 0);
                make_idle(w, c);
                continue;
            }
            if (e & EPOLLOUT && c->state == CS_BUSY && c->woff < g_request_len)
                write_request(w, c);
            if (c->fd >= 0 && e & (EPOLLIN | EPOLLERR | EPOLLHUP)) on_readable(w, c);
        }
    }
    for (int i = 0; i < w->nconns; i++) conn_close(w, &w->conns[i]);
    return NULL;
}

/* ---------------------------------------------------------------- main */

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static double pct(const int64_t *v, uint64_t n, double p) {
    if (n == 0) return 0;
    /* Nearest rank: the smallest sample with at least p% of samples at or below it. */
    uint64_t rank = (uint64_t)((p / 100.0) * (double)n + 0.999999);
    if (rank < 1) rank = 1;
    if (rank > n) rank = n;
    return (double)v[rank - 1] / 1000.0;
}

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) die("loadgen: cannot open %s: %s", path, strerror(errno));
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *p = malloc((size_t)n + 1);
    if (!p || fread(p, 1, (size_t)n, f) != (size_t)n) die("loadgen: cannot read %s", path);
    fclose(f);
    p[n] = 0;
    *len = (size_t)n;
    return p;
}

static void usage(void) {
    fprintf(stderr,
            "usage: loadgen --port P --path PATH --body FILE [--rate R] [--duration S]\n"
            "               [--host ADDR] [--connections C] [--threads T] [--warmup S]"
            " [--timeout S]\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1", *path = NULL, *body_file = NULL;
    int port = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc) usage();
        if (!strcmp(a, "--host")) host = argv[++i];
        else if (!strcmp(a, "--port")) port = atoi(argv[++i]);
        else if (!strcmp(a, "--path")) path = argv[++i];
        else if (!strcmp(a, "--body")) body_file = argv[++i];
        else if (!strcmp(a, "--rate")) g_rate = atof(argv[++i]);
        else if (!strcmp(a, "--duration")) g_duration = atof(argv[++i]);
        else if (!strcmp(a, "--warmup")) g_warmup = atof(argv[++i]);
        else if (!strcmp(a, "--timeout")) g_timeout = atof(argv[++i]);
        else if (!strcmp(a, "--connections")) g_connections = atoi(argv[++i]);
        else if (!strcmp(a, "--threads")) g_threads = atoi(argv[++i]);
        else usage();
    }
    if (!path || !body_file || port <= 0 || port > 65535 || g_rate < 0 || g_duration <= 0 ||
        g_warmup < 0 || g_timeout <= 0 || g_threads < 1 || g_connections < g_threads)
        usage();
    signal(SIGPIPE, SIG_IGN);

    g_addr.sin_family = AF_INET;
    g_addr.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &g_addr.sin_addr) != 1) die("loadgen: bad --host %s", host);

    size_t body_len;
    char *body = read_file(body_file, &body_len);
    char head[1024];
    int hl = snprintf(head, sizeof head,
                      "POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                      "Accept: application/json, text/event-stream\r\nContent-Length: %zu\r\n\r\n",
                      path, host, port, body_len);
    g_request_len = (size_t)hl + body_len;
    g_request = malloc(g_request_len);
    memcpy(g_request, head, (size_t)hl);
    memcpy(g_request + hl, body, body_len);

    worker_t *ws = calloc((size_t)g_threads, sizeof *ws);
    double per_thread_rate = g_rate / g_threads;
    for (int t = 0; t < g_threads; t++) {
        worker_t *w = &ws[t];
        w->index = t;
        w->nconns = g_connections / g_threads + (t < g_connections % g_threads);
        w->conns = calloc((size_t)w->nconns, sizeof *w->conns);
        w->idle = calloc((size_t)w->nconns, sizeof *w->idle);
        w->epfd = epoll_create1(EPOLL_CLOEXEC);
        w->tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
        if (w->epfd < 0 || w->tfd < 0) die("loadgen: epoll/timerfd: %s", strerror(errno));
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = UINT32_MAX};
        epoll_ctl(w->epfd, EPOLL_CTL_ADD, w->tfd, &ev);
        for (int i = 0; i < w->nconns; i++) {
            w->conns[i].fd = -1;
            conn_open(w, &w->conns[i]);
        }
        if (g_rate > 0) {
            w->interval_ns = (int64_t)((double)NS / per_thread_rate);
            if (w->interval_ns < 1) w->interval_ns = 1;
            w->total_due = (uint64_t)(per_thread_rate * (g_warmup + g_duration));
        }
    }

    /* Connect everything first, so the schedule does not start with a handshake storm. */
    int64_t connect_deadline = now_ns() + 5 * NS;
    for (;;) {
        int pending = 0;
        for (int t = 0; t < g_threads; t++) {
            struct epoll_event events[MAX_EVENTS];
            worker_t *w = &ws[t];
            int n = epoll_wait(w->epfd, events, MAX_EVENTS, 10);
            for (int i = 0; i < n; i++) {
                if (events[i].data.u32 == UINT32_MAX) continue;
                conn_t *c = &w->conns[events[i].data.u32];
                if (c->state != CS_CONNECTING) continue;
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err) {
                    w->c.connect_errors++;
                    conn_close(w, c);
                    c->retry_at = 0;
                    conn_open(w, c);
                    continue;
                }
                want_write(w, c, 0);
                make_idle(w, c);
            }
            for (int i = 0; i < w->nconns; i++) pending += w->conns[i].state != CS_IDLE;
        }
        if (pending == 0) break;
        if (now_ns() > connect_deadline) die("loadgen: could not connect to %s:%d", host, port);
    }

    int64_t start = now_ns() + NS / 100;
    for (int t = 0; t < g_threads; t++) {
        worker_t *w = &ws[t];
        /* Threads interleave their schedules so the merged stream is evenly spaced. */
        w->t0 = start + (g_rate > 0 ? (int64_t)((double)NS / g_rate * t) : 0);
        w->warmup_end = start + (int64_t)(g_warmup * NS);
        w->send_end = start + (int64_t)((g_warmup + g_duration) * NS);
        if (pthread_create(&w->tid, NULL, worker_main, w) != 0) die("loadgen: pthread_create");
    }
    counters_t sum = {0};
    uint64_t total_lat = 0;
    for (int t = 0; t < g_threads; t++) {
        pthread_join(ws[t].tid, NULL);
        counters_t *c = &ws[t].c;
        sum.sent += c->sent;
        sum.completed += c->completed;
        sum.recorded += c->recorded;
        sum.non2xx += c->non2xx;
        sum.connect_errors += c->connect_errors;
        sum.read_errors += c->read_errors;
        sum.write_errors += c->write_errors;
        sum.timeouts += c->timeouts;
        sum.parse_errors += c->parse_errors;
        sum.idle_closes += c->idle_closes;
        sum.unsent += c->unsent;
        if (c->max_backlog > sum.max_backlog) sum.max_backlog = c->max_backlog;
        total_lat += ws[t].lat_len;
    }
    int64_t *all = malloc(sizeof(int64_t) * (total_lat + 1));
    uint64_t k = 0;
    double mean = 0;
    for (int t = 0; t < g_threads; t++)
        for (uint64_t i = 0; i < ws[t].lat_len; i++) {
            all[k++] = ws[t].lat_ns[i];
            mean += (double)ws[t].lat_ns[i];
        }
    qsort(all, k, sizeof *all, cmp_i64);
    mean = k ? mean / (double)k / 1000.0 : 0;
    printf("LOADGEN_SUMMARY {\"mode\":\"%s\",\"target_rate\":%.1f,\"duration_s\":%.3f,"
           "\"warmup_s\":%.3f,\"connections\":%d,\"threads\":%d,"
           "\"sent\":%llu,\"completed\":%llu,\"recorded\":%llu,\"achieved_rate\":%.1f,"
           "\"non2xx\":%llu,\"connect_errors\":%llu,\"read_errors\":%llu,\"write_errors\":%llu,"
           "\"timeouts\":%llu,\"parse_errors\":%llu,\"idle_closes\":%llu,\"unsent\":%llu,"
           "\"max_backlog\":%llu,"
           "\"latency_us\":{\"mean\":%.1f,\"p50\":%.1f,\"p90\":%.1f,\"p99\":%.1f,\"p99_9\":%.1f,"
           "\"max\":%.1f}}\n",
           g_rate > 0 ? "open" : "closed", g_rate, g_duration, g_warmup, g_connections, g_threads,
           (unsigned long long)sum.sent, (unsigned long long)sum.completed,
           (unsigned long long)sum.recorded, (double)sum.recorded / g_duration,
           (unsigned long long)sum.non2xx, (unsigned long long)sum.connect_errors,
           (unsigned long long)sum.read_errors, (unsigned long long)sum.write_errors,
           (unsigned long long)sum.timeouts, (unsigned long long)sum.parse_errors,
           (unsigned long long)sum.idle_closes, (unsigned long long)sum.unsent,
           (unsigned long long)sum.max_backlog, mean,
           pct(all, k, 50), pct(all, k, 90), pct(all, k, 99), pct(all, k, 99.9),
           k ? (double)all[k - 1] / 1000.0 : 0.0);
    return 0;
}
