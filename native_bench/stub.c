/*
 * Upstream stub for the gateway benchmark: an HTTP/1.1 server that looks enough like an
 * SGLang/OpenAI worker for a gateway to register it, and answers inference routes with fixed
 * bodies at a cost far below any gateway's, so the gateway under test is the bottleneck.
 *
 * epoll, non-blocking, level-triggered; keep-alive and pipelining (every complete request in
 * the read buffer is answered in order); one listener shared by N threads (EPOLLEXCLUSIVE).
 *
 *   stub [--host 127.0.0.1] [--port 0] [--threads 1] [--model stub-model] [--log-probes]
 *
 * Prints "LISTENING <host> <port>" on stdout once bound. GET /stub/stats answers the per-route
 * request counters so a harness can check that a gateway really forwarded what it answered.
 * --log-probes writes "PROBE <unix-seconds> <method> <target>" on stderr for every request
 * that is not an inference route, and "BAD <unix-seconds> <first line>" for every request that
 * did not parse, which is how the gateways' probes were discovered.
 *
 * Build: cc -O2 -pthread -o stub stub.c
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
#include <sys/time.h>
#include <unistd.h>

#define READ_CHUNK 65536
#define MAX_HEADER_BYTES 65536
#define MAX_BODY_BYTES (16u << 20)
#define STREAM_CHUNKS 16
#define MAX_EVENTS 256

/* Counters are per thread and cache-line padded so the hot path never shares a line. */
enum counter {
    C_CHAT,
    C_CHAT_STREAM,
    C_COMPLETION,
    C_COMPLETION_STREAM,
    C_PROBE,
    C_NOT_FOUND,
    C_BAD_REQUEST,
    C_CONNECTIONS,
    C_COUNT
};
static const char *counter_names[C_COUNT] = {
    "chat", "chat_stream", "completion", "completion_stream",
    "probe", "not_found", "bad_request", "connections",
};

typedef struct {
    uint64_t c[C_COUNT];
    char pad[64];
} thread_stats_t;

typedef struct {
    char *keep_alive;
    size_t keep_alive_len;
    char *closing;
    size_t closing_len;
} canned_t;

/* Every fixed answer, built once at start-up in both keep-alive and closing variants. */
enum canned_id {
    R_CHAT,
    R_CHAT_STREAM,
    R_COMPLETION,
    R_COMPLETION_STREAM,
    R_HEALTH,
    R_MODELS,
    R_SERVER_INFO,
    R_MODEL_INFO,
    R_LOADS,
    R_GET_LOAD,
    R_METRICS,
    R_NOT_FOUND,
    R_METHOD_NOT_ALLOWED,
    R_BAD_REQUEST,
    R_TOO_LARGE,
    R_COUNT
};
static canned_t canned[R_COUNT];

typedef struct {
    int fd;
    char *rbuf;
    size_t rlen, rcap;
    char *wbuf;
    size_t wlen, woff, wcap;
    int close_after_write;
    int writing; /* EPOLLOUT armed instead of EPOLLIN */
} conn_t;

typedef struct {
    int index;
    int epfd;
    int listen_fd;
    thread_stats_t *stats;
    char *scratch; /* decoded chunked request bodies */
    size_t scratch_cap;
} worker_t;

static const char *g_model = "stub-model";
static int g_log_probes = 0;
static int g_threads = 1;
static thread_stats_t *g_stats;
static int g_listen_marker; /* address used as the listener's epoll tag */

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(1);
}

static void *xmalloc(size_t n) {
    void *p = malloc(n);
    if (!p) die("stub: out of memory");
    return p;
}

static void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n);
    if (!q) die("stub: out of memory");
    return q;
}

/* ---------------------------------------------------------------- canned responses */

typedef struct {
    char *p;
    size_t len, cap;
} sbuf_t;

static void sb_put(sbuf_t *b, const char *s, size_t n) {
    if (b->len + n + 1 > b->cap) {
        b->cap = (b->len + n + 1) * 2;
        b->p = xrealloc(b->p, b->cap);
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = 0;
}

static void sb_printf(sbuf_t *b, const char *fmt, ...) {
    char tmp[8192];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof tmp) die("stub: canned text too long");
    sb_put(b, tmp, (size_t)n);
}

static void make_fixed(enum canned_id id, const char *status, const char *ctype, const char *body) {
    for (int closing = 0; closing < 2; closing++) {
        sbuf_t b = {0};
        sb_printf(&b, "HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n%s\r\n", status,
                  ctype, strlen(body), closing ? "Connection: close\r\n" : "");
        sb_put(&b, body, strlen(body));
        if (closing) {
            canned[id].closing = b.p;
            canned[id].closing_len = b.len;
        } else {
            canned[id].keep_alive = b.p;
            canned[id].keep_alive_len = b.len;
        }
    }
}

static void put_sse_chunk(sbuf_t *b, const char *event) {
    /* One SSE event per HTTP chunk, as an inference server flushes them. */
    sb_printf(b, "%zx\r\n", strlen(event));
    sb_put(b, event, strlen(event));
    sb_put(b, "\r\n", 2);
}

static void make_stream(enum canned_id id, int chat) {
    for (int closing = 0; closing < 2; closing++) {
        sbuf_t b = {0};
        sb_printf(&b,
                  "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                  "Transfer-Encoding: chunked\r\n%s\r\n",
                  closing ? "Connection: close\r\n" : "");
        for (int i = 0; i < STREAM_CHUNKS; i++) {
            char ev[1024];
            int last = i == STREAM_CHUNKS - 1;
            if (chat) {
                char delta[128];
                if (i == 0)
                    snprintf(delta, sizeof delta, "{\"role\":\"assistant\",\"content\":\"tok%02d \"}", i);
                else if (last)
                    snprintf(delta, sizeof delta, "{}");
                else
                    snprintf(delta, sizeof delta, "{\"content\":\"tok%02d \"}", i);
                snprintf(ev, sizeof ev,
                         "data: {\"id\":\"chatcmpl-stub\",\"object\":\"chat.completion.chunk\","
                         "\"created\":1700000000,\"model\":\"%s\",\"choices\":[{\"index\":0,"
                         "\"delta\":%s,\"logprobs\":null,\"finish_reason\":%s}]}\n\n",
                         g_model, delta, last ? "\"stop\"" : "null");
            } else {
                snprintf(ev, sizeof ev,
                         "data: {\"id\":\"cmpl-stub\",\"object\":\"text_completion\","
                         "\"created\":1700000000,\"model\":\"%s\",\"choices\":[{\"index\":0,"
                         "\"text\":\"%s\",\"logprobs\":null,\"finish_reason\":%s}]}\n\n",
                         g_model, last ? "" : "tok ", last ? "\"stop\"" : "null");
            }
            put_sse_chunk(&b, ev);
        }
        put_sse_chunk(&b, "data: [DONE]\n\n");
        sb_put(&b, "0\r\n\r\n", 5);
        if (closing) {
            canned[id].closing = b.p;
            canned[id].closing_len = b.len;
        } else {
            canned[id].keep_alive = b.p;
            canned[id].keep_alive_len = b.len;
        }
    }
}

static void build_canned(void) {
    const char *json = "application/json";
    char body[4096];

    snprintf(body, sizeof body,
             "{\"id\":\"chatcmpl-stub\",\"object\":\"chat.completion\",\"created\":1700000000,"
             "\"model\":\"%s\",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\","
             "\"content\":\"Hello from the stub.\"},\"logprobs\":null,\"finish_reason\":\"stop\"}],"
             "\"usage\":{\"prompt_tokens\":8,\"completion_tokens\":5,\"total_tokens\":13}}",
             g_model);
    make_fixed(R_CHAT, "200 OK", json, body);

    snprintf(body, sizeof body,
             "{\"id\":\"cmpl-stub\",\"object\":\"text_completion\",\"created\":1700000000,"
             "\"model\":\"%s\",\"choices\":[{\"index\":0,\"text\":\"Hello from the stub.\","
             "\"logprobs\":null,\"finish_reason\":\"stop\"}],"
             "\"usage\":{\"prompt_tokens\":8,\"completion_tokens\":5,\"total_tokens\":13}}",
             g_model);
    make_fixed(R_COMPLETION, "200 OK", json, body);

    make_stream(R_CHAT_STREAM, 1);
    make_stream(R_COMPLETION_STREAM, 0);

    make_fixed(R_HEALTH, "200 OK", "text/plain", "");

    /* owned_by "sglang" is what the Rust SMG's backend detection keys on. */
    snprintf(body, sizeof body,
             "{\"object\":\"list\",\"data\":[{\"id\":\"%s\",\"object\":\"model\","
             "\"created\":1700000000,\"owned_by\":\"sglang\",\"root\":\"%s\","
             "\"max_model_len\":4096}]}",
             g_model, g_model);
    make_fixed(R_MODELS, "200 OK", json, body);

    snprintf(body, sizeof body,
             "{\"model_path\":\"%s\",\"served_model_name\":\"%s\",\"tokenizer_path\":\"%s\","
             "\"tp_size\":1,\"dp_size\":1,\"pp_size\":1,\"load_balance_method\":\"round_robin\","
             "\"disaggregation_mode\":\"null\",\"version\":\"0.0.0-stub\",\"is_embedding\":false,"
             "\"context_length\":4096,\"max_total_tokens\":65536,\"max_running_requests\":4096}",
             g_model, g_model, g_model);
    make_fixed(R_SERVER_INFO, "200 OK", json, body);

    snprintf(body, sizeof body,
             "{\"model_path\":\"%s\",\"tokenizer_path\":\"%s\",\"is_generation\":true,"
             "\"has_image_understanding\":false,\"has_audio_understanding\":false,"
             "\"model_type\":\"llama\",\"architectures\":[\"LlamaForCausalLM\"]}",
             g_model, g_model);
    make_fixed(R_MODEL_INFO, "200 OK", json, body);

    /* The stub answers at once, so an idle load snapshot is the truth. */
    make_fixed(R_LOADS, "200 OK", json,
               "{\"timestamp\":\"2024-01-01T00:00:00Z\",\"dp_rank_count\":1,\"loads\":[{"
               "\"dp_rank\":0,\"num_running_reqs\":0,\"num_waiting_reqs\":0,"
               "\"num_waiting_uncached_tokens\":0,\"num_total_reqs\":0,\"num_used_tokens\":0,"
               "\"max_total_num_tokens\":65536,\"token_usage\":0.0,\"gen_throughput\":0.0,"
               "\"cache_hit_rate\":0.0,\"utilization\":0.0,\"max_running_requests\":4096}]}");
    make_fixed(R_GET_LOAD, "200 OK", json,
               "[{\"dp_rank\":0,\"num_reqs\":0,\"num_waiting_reqs\":0,\"num_tokens\":0}]");

    snprintf(body, sizeof body,
             "# HELP sglang:num_running_reqs The number of running requests.\n"
             "# TYPE sglang:num_running_reqs gauge\n"
             "sglang:num_running_reqs{model_name=\"%s\"} 0.0\n"
             "# HELP sglang:num_queue_reqs The number of requests in the waiting queue.\n"
             "# TYPE sglang:num_queue_reqs gauge\n"
             "sglang:num_queue_reqs{model_name=\"%s\"} 0.0\n"
             "# HELP sglang:token_usage The token usage.\n"
             "# TYPE sglang:token_usage gauge\n"
             "sglang:token_usage{model_name=\"%s\"} 0.0\n"
             "# HELP sglang:gen_throughput The generation throughput (token/s).\n"
             "# TYPE sglang:gen_throughput gauge\n"
             "sglang:gen_throughput{model_name=\"%s\"} 0.0\n"
             "# HELP sglang:cache_hit_rate The prefix cache hit rate.\n"
             "# TYPE sglang:cache_hit_rate gauge\n"
             "sglang:cache_hit_rate{model_name=\"%s\"} 0.0\n",
             g_model, g_model, g_model, g_model, g_model);
    make_fixed(R_METRICS, "200 OK", "text/plain; version=0.0.4", body);

    make_fixed(R_NOT_FOUND, "404 Not Found", json,
               "{\"error\":{\"message\":\"Not found\",\"type\":\"not_found_error\",\"code\":404}}");
    make_fixed(R_METHOD_NOT_ALLOWED, "405 Method Not Allowed", json,
               "{\"error\":{\"message\":\"Method not allowed\",\"type\":\"invalid_request_error\","
               "\"code\":405}}");
    make_fixed(R_BAD_REQUEST, "400 Bad Request", json,
               "{\"error\":{\"message\":\"Malformed HTTP request\",\"type\":"
               "\"invalid_request_error\",\"code\":400}}");
    make_fixed(R_TOO_LARGE, "413 Payload Too Large", json,
               "{\"error\":{\"message\":\"Request too large\",\"type\":\"invalid_request_error\","
               "\"code\":413}}");
}

/* ---------------------------------------------------------------- connections */

static void conn_append(conn_t *c, const char *p, size_t n) {
    if (c->wlen + n > c->wcap) {
        size_t cap = c->wcap ? c->wcap : 16384;
        while (cap < c->wlen + n) cap *= 2;
        c->wbuf = xrealloc(c->wbuf, cap);
        c->wcap = cap;
    }
    memcpy(c->wbuf + c->wlen, p, n);
    c->wlen += n;
}

static void conn_free(worker_t *w, conn_t *c) {
    epoll_ctl(w->epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->rbuf);
    free(c->wbuf);
    free(c);
}

static void arm(worker_t *w, conn_t *c, int writing) {
    if (c->writing == writing) return;
    struct epoll_event ev = {.events = writing ? EPOLLOUT : EPOLLIN, .data.ptr = c};
    epoll_ctl(w->epfd, EPOLL_CTL_MOD, c->fd, &ev);
    c->writing = writing;
}

/* Returns 0 when the connection should stay, -1 when it was freed. */
static int conn_flush(worker_t *w, conn_t *c) {
    while (c->woff < c->wlen) {
        ssize_t n = send(c->fd, c->wbuf + c->woff, c->wlen - c->woff, MSG_NOSIGNAL);
        if (n > 0) {
            c->woff += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            arm(w, c, 1);
            return 0;
        }
        conn_free(w, c);
        return -1;
    }
    c->woff = c->wlen = 0;
    if (c->close_after_write) {
        conn_free(w, c);
        return -1;
    }
    arm(w, c, 0);
    return 0;
}

/* ---------------------------------------------------------------- request parsing */

typedef struct {
    const char *method;
    size_t method_len;
    const char *target;
    size_t target_len;
    const char *body;
    size_t body_len;
    int keep_alive;
} request_t;

enum parse_result { P_INCOMPLETE = 0, P_ERROR = -1, P_TOO_LARGE = -2 };

static int header_is(const char *name, size_t len, const char *want) {
    return strlen(want) == len && strncasecmp(name, want, len) == 0;
}

static int value_has_token(const char *v, size_t len, const char *token) {
    size_t tl = strlen(token);
    for (size_t i = 0; i + tl <= len; i++)
        if (strncasecmp(v + i, token, tl) == 0) return 1;
    return 0;
}

/* Decodes a chunked body starting at p; returns bytes consumed, 0 if incomplete, <0 on error. */
static long parse_chunked(worker_t *w, const char *p, size_t avail, size_t *out_len) {
    size_t pos = 0, out = 0;
    for (;;) {
        const char *eol = memmem(p + pos, avail - pos, "\r\n", 2);
        if (!eol) return avail - pos > 32 ? P_ERROR : P_INCOMPLETE;
        char *end;
        unsigned long size = strtoul(p + pos, &end, 16);
        if (end == p + pos) return P_ERROR;
        pos = (size_t)(eol - p) + 2;
        if (size == 0) {
            /* Trailers end at an empty line. */
            for (;;) {
                const char *tl = memmem(p + pos, avail - pos, "\r\n", 2);
                if (!tl) return P_INCOMPLETE;
                size_t line_len = (size_t)(tl - (p + pos));
                pos += line_len + 2;
                if (line_len == 0) break;
            }
            *out_len = out;
            return (long)pos;
        }
        if (out + size > MAX_BODY_BYTES) return P_TOO_LARGE;
        if (avail - pos < size + 2) return P_INCOMPLETE;
        if (out + size > w->scratch_cap) {
            w->scratch_cap = (out + size) * 2;
            w->scratch = xrealloc(w->scratch, w->scratch_cap);
        }
        memcpy(w->scratch + out, p + pos, size);
        out += size;
        pos += size;
        if (p[pos] != '\r' || p[pos + 1] != '\n') return P_ERROR;
        pos += 2;
    }
}

/* Parses one request at buf; returns bytes consumed, or a parse_result. */
static long parse_request(worker_t *w, const char *buf, size_t len, request_t *r) {
    const char *hend = memmem(buf, len, "\r\n\r\n", 4);
    if (!hend) return len > MAX_HEADER_BYTES ? P_TOO_LARGE : P_INCOMPLETE;
    size_t hlen = (size_t)(hend - buf) + 4;

    const char *line_end = memmem(buf, hlen, "\r\n", 2);
    const char *sp1 = memchr(buf, ' ', (size_t)(line_end - buf));
    if (!sp1) return P_ERROR;
    const char *sp2 = memchr(sp1 + 1, ' ', (size_t)(line_end - sp1 - 1));
    if (!sp2) return P_ERROR;
    const char *version = sp2 + 1;
    size_t version_len = (size_t)(line_end - version);
    if (version_len != 8 || strncmp(version, "HTTP/1.", 7) != 0) return P_ERROR;
    r->method = buf;
    r->method_len = (size_t)(sp1 - buf);
    r->target = sp1 + 1;
    r->target_len = (size_t)(sp2 - sp1 - 1);
    r->keep_alive = version[7] == '1';

    long content_length = -1;
    int chunked = 0;
    const char *line = line_end + 2;
    while (line < hend) {
        const char *eol = memmem(line, (size_t)(hend + 2 - line), "\r\n", 2);
        const char *colon = memchr(line, ':', (size_t)(eol - line));
        if (!colon) return P_ERROR;
        size_t nlen = (size_t)(colon - line);
        const char *v = colon + 1;
        while (v < eol && (*v == ' ' || *v == '\t')) v++;
        size_t vlen = (size_t)(eol - v);
        if (header_is(line, nlen, "content-length")) {
            char *end;
            content_length = strtol(v, &end, 10);
            if (end == v || content_length < 0) return P_ERROR;
        } else if (header_is(line, nlen, "transfer-encoding")) {
            chunked = value_has_token(v, vlen, "chunked");
        } else if (header_is(line, nlen, "connection")) {
            if (value_has_token(v, vlen, "close")) r->keep_alive = 0;
            else if (value_has_token(v, vlen, "keep-alive")) r->keep_alive = 1;
        }
        line = eol + 2;
    }

    if (chunked) {
        size_t body_len = 0;
        long used = parse_chunked(w, buf + hlen, len - hlen, &body_len);
        if (used <= 0) return used;
        r->body = w->scratch;
        r->body_len = body_len;
        return (long)hlen + used;
    }
    if (content_length < 0) content_length = 0;
    if ((size_t)content_length > MAX_BODY_BYTES) return P_TOO_LARGE;
    if (len - hlen < (size_t)content_length) return P_INCOMPLETE;
    r->body = buf + hlen;
    r->body_len = (size_t)content_length;
    return (long)(hlen + (size_t)content_length);
}

/* True when the JSON body sets "stream" to true, with any spacing around the colon. */
static int wants_stream(const char *body, size_t len) {
    const char *p = body, *end = body + len;
    while (p < end) {
        const char *k = memmem(p, (size_t)(end - p), "\"stream\"", 8);
        if (!k) return 0;
        const char *q = k + 8;
        while (q < end && (*q == ' ' || *q == '\t' || *q == '\r' || *q == '\n')) q++;
        if (q < end && *q == ':') {
            q++;
            while (q < end && (*q == ' ' || *q == '\t' || *q == '\r' || *q == '\n')) q++;
            return (size_t)(end - q) >= 4 && memcmp(q, "true", 4) == 0;
        }
        p = k + 8;
    }
    return 0;
}

static int path_is(const request_t *r, const char *path) {
    size_t plen = r->target_len;
    const char *q = memchr(r->target, '?', r->target_len);
    if (q) plen = (size_t)(q - r->target);
    return strlen(path) == plen && memcmp(r->target, path, plen) == 0;
}

static int method_is(const request_t *r, const char *m) {
    return strlen(m) == r->method_len && memcmp(r->method, m, r->method_len) == 0;
}

static void send_canned(conn_t *c, enum canned_id id, int keep_alive, int head_only) {
    const canned_t *k = &canned[id];
    const char *p = keep_alive ? k->keep_alive : k->closing;
    size_t n = keep_alive ? k->keep_alive_len : k->closing_len;
    if (head_only) n = (size_t)((const char *)memmem(p, n, "\r\n\r\n", 4) - p) + 4;
    conn_append(c, p, n);
}

static void send_stats(worker_t *w, conn_t *c, int keep_alive) {
    uint64_t total[C_COUNT] = {0};
    for (int t = 0; t < g_threads; t++)
        for (int i = 0; i < C_COUNT; i++)
            total[i] += __atomic_load_n(&g_stats[t].c[i], __ATOMIC_RELAXED);
    (void)w;
    sbuf_t body = {0};
    sb_put(&body, "{", 1);
    for (int i = 0; i < C_COUNT; i++)
        sb_printf(&body, "%s\"%s\":%llu", i ? "," : "", counter_names[i],
                  (unsigned long long)total[i]);
    sb_printf(&body, ",\"threads\":%d}", g_threads);
    sbuf_t head = {0};
    sb_printf(&head, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n%s\r\n",
              body.len, keep_alive ? "" : "Connection: close\r\n");
    conn_append(c, head.p, head.len);
    conn_append(c, body.p, body.len);
    free(head.p);
    free(body.p);
}

static void count(worker_t *w, enum counter k) {
    /* Relaxed atomics: only this thread writes, /stub/stats reads from any thread. */
    __atomic_store_n(&w->stats->c[k], w->stats->c[k] + 1, __ATOMIC_RELAXED);
}

static void log_probe(const request_t *r) {
    struct timeval tv;
    gettimeofday(&tv, NULL);
    fprintf(stderr, "PROBE %ld.%03ld %.*s %.*s\n", (long)tv.tv_sec, (long)(tv.tv_usec / 1000),
            (int)r->method_len, r->method, (int)r->target_len, r->target);
}

/* First line of a request that did not parse, printable bytes only. */
static void log_bad(const char *p, size_t n) {
    char line[81];
    size_t k = 0;
    for (size_t i = 0; i < n && k < sizeof line - 1 && p[i] != '\r' && p[i] != '\n'; i++)
        line[k++] = (p[i] >= 32 && p[i] < 127) ? p[i] : '?';
    line[k] = 0;
    struct timeval tv;
    gettimeofday(&tv, NULL);
    fprintf(stderr, "BAD %ld.%03ld %s\n", (long)tv.tv_sec, (long)(tv.tv_usec / 1000), line);
}

static void route(worker_t *w, conn_t *c, const request_t *r) {
    int ka = r->keep_alive;
    if (method_is(r, "POST")) {
        if (path_is(r, "/v1/chat/completions")) {
            int s = wants_stream(r->body, r->body_len);
            count(w, s ? C_CHAT_STREAM : C_CHAT);
            send_canned(c, s ? R_CHAT_STREAM : R_CHAT, ka, 0);
            return;
        }
        if (path_is(r, "/v1/completions")) {
            int s = wants_stream(r->body, r->body_len);
            count(w, s ? C_COMPLETION_STREAM : C_COMPLETION);
            send_canned(c, s ? R_COMPLETION_STREAM : R_COMPLETION, ka, 0);
            return;
        }
    }
    if (g_log_probes) log_probe(r);
    int head = method_is(r, "HEAD");
    if (method_is(r, "GET") || head) {
        static const struct {
            const char *path;
            enum canned_id id;
        } probes[] = {
            {"/health", R_HEALTH},
            {"/health_generate", R_HEALTH},
            {"/v1/models", R_MODELS},
            {"/server_info", R_SERVER_INFO},
            {"/get_server_info", R_SERVER_INFO},
            {"/model_info", R_MODEL_INFO},
            {"/get_model_info", R_MODEL_INFO},
            {"/v1/loads", R_LOADS},
            {"/get_load", R_GET_LOAD},
            {"/metrics", R_METRICS},
        };
        for (size_t i = 0; i < sizeof probes / sizeof probes[0]; i++) {
            if (path_is(r, probes[i].path)) {
                count(w, C_PROBE);
                send_canned(c, probes[i].id, ka, head);
                return;
            }
        }
        if (path_is(r, "/stub/stats")) {
            send_stats(w, c, ka);
            return;
        }
    }
    int known = path_is(r, "/v1/chat/completions") || path_is(r, "/v1/completions");
    count(w, C_NOT_FOUND);
    send_canned(c, known ? R_METHOD_NOT_ALLOWED : R_NOT_FOUND, ka, head);
}

/* Answers every complete request in the read buffer, in order (pipelining). */
static void process(worker_t *w, conn_t *c) {
    size_t off = 0;
    while (off < c->rlen && !c->close_after_write) {
        request_t r;
        long used = parse_request(w, c->rbuf + off, c->rlen - off, &r);
        if (used == P_INCOMPLETE) break;
        if (used < 0) {
            count(w, C_BAD_REQUEST);
            if (g_log_probes) log_bad(c->rbuf + off, c->rlen - off);
            send_canned(c, used == P_TOO_LARGE ? R_TOO_LARGE : R_BAD_REQUEST, 0, 0);
            c->close_after_write = 1;
            off = c->rlen;
            break;
        }
        route(w, c, &r);
        if (!r.keep_alive) c->close_after_write = 1;
        off += (size_t)used;
    }
    if (c->close_after_write) off = c->rlen;
    if (off) {
        memmove(c->rbuf, c->rbuf + off, c->rlen - off);
        c->rlen -= off;
    }
}

static void on_readable(worker_t *w, conn_t *c) {
    if (c->rcap - c->rlen < READ_CHUNK) {
        size_t cap = c->rcap ? c->rcap * 2 : READ_CHUNK * 2;
        if (cap > MAX_BODY_BYTES + MAX_HEADER_BYTES + READ_CHUNK * 2) {
            conn_free(w, c);
            return;
        }
        c->rbuf = xrealloc(c->rbuf, cap);
        c->rcap = cap;
    }
    ssize_t n = recv(c->fd, c->rbuf + c->rlen, c->rcap - c->rlen, 0);
    if (n == 0) {
        conn_free(w, c);
        return;
    }
    if (n < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) conn_free(w, c);
        return;
    }
    c->rlen += (size_t)n;
    process(w, c);
    if (c->wlen) conn_flush(w, c);
}

static void on_accept(worker_t *w) {
    for (;;) {
        int fd = accept4(w->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) return; /* EAGAIN, or another thread took it */
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        conn_t *c = calloc(1, sizeof *c);
        if (!c) die("stub: out of memory");
        c->fd = fd;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
            close(fd);
            free(c);
            continue;
        }
        count(w, C_CONNECTIONS);
    }
}

static void *worker_main(void *arg) {
    worker_t *w = arg;
    struct epoll_event events[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(w->epfd, events, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("stub: epoll_wait: %s", strerror(errno));
        }
        for (int i = 0; i < n; i++) {
            void *tag = events[i].data.ptr;
            if (tag == &g_listen_marker) {
                on_accept(w);
                continue;
            }
            conn_t *c = tag;
            if (events[i].events & (EPOLLERR | EPOLLHUP) && !(events[i].events & EPOLLIN)) {
                conn_free(w, c);
            } else if (c->writing) {
                if (events[i].events & EPOLLOUT && conn_flush(w, c) == 0 && !c->writing &&
                    c->rlen) {
                    /* Requests that arrived behind the blocked write. */
                    process(w, c);
                    if (c->wlen) conn_flush(w, c);
                }
            } else {
                on_readable(w, c);
            }
        }
    }
    return NULL;
}

static void usage(void) {
    fprintf(stderr,
            "usage: stub [--host ADDR] [--port N] [--threads N] [--model NAME] [--log-probes]\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1";
    int port = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--host") && i + 1 < argc) host = argv[++i];
        else if (!strcmp(argv[i], "--port") && i + 1 < argc) port = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc) g_threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--model") && i + 1 < argc) g_model = argv[++i];
        else if (!strcmp(argv[i], "--log-probes")) g_log_probes = 1;
        else usage();
    }
    if (g_threads < 1 || g_threads > 256 || port < 0 || port > 65535) usage();
    signal(SIGPIPE, SIG_IGN);
    build_canned();

    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (lfd < 0) die("stub: socket: %s", strerror(errno));
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) die("stub: bad --host %s", host);
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0)
        die("stub: bind %s:%d: %s", host, port, strerror(errno));
    if (listen(lfd, 4096) < 0) die("stub: listen: %s", strerror(errno));
    socklen_t alen = sizeof addr;
    getsockname(lfd, (struct sockaddr *)&addr, &alen);

    g_stats = aligned_alloc(64, sizeof(thread_stats_t) * (size_t)g_threads);
    if (!g_stats) die("stub: out of memory");
    memset(g_stats, 0, sizeof(thread_stats_t) * (size_t)g_threads);

    pthread_t *tids = xmalloc(sizeof(pthread_t) * (size_t)g_threads);
    for (int t = 0; t < g_threads; t++) {
        worker_t *w = calloc(1, sizeof *w);
        if (!w) die("stub: out of memory");
        w->index = t;
        w->listen_fd = lfd;
        w->stats = &g_stats[t];
        w->epfd = epoll_create1(EPOLL_CLOEXEC);
        if (w->epfd < 0) die("stub: epoll_create1: %s", strerror(errno));
        /* EPOLLEXCLUSIVE: one thread wakes per new connection instead of all of them. */
        struct epoll_event ev = {.events = EPOLLIN | EPOLLEXCLUSIVE, .data.ptr = &g_listen_marker};
        if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, lfd, &ev) < 0) {
            ev.events = EPOLLIN;
            if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, lfd, &ev) < 0)
                die("stub: epoll_ctl listener: %s", strerror(errno));
        }
        if (pthread_create(&tids[t], NULL, worker_main, w) != 0) die("stub: pthread_create");
    }
    printf("LISTENING %s %d\n", host, ntohs(addr.sin_port));
    fflush(stdout);
    for (int t = 0; t < g_threads; t++) pthread_join(tids[t], NULL);
    return 0;
}
