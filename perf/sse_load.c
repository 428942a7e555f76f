/*
 * SSE load client in C (epoll, OpenSSL): the same command line, semantics and one-line JSON
 * output as perf/sse_load.py, whose docstring describes the modes.
 *
 * Why C: over TLS the Python client's own work (asyncio's SSL protocol, the handshake in
 * Python) lands in every stream's time to first event and competes with the proxies for the
 * machine's cores, so a TLS row measured the client as much as the proxy. One thread, one
 * epoll loop, non-blocking sockets and non-blocking OpenSSL keep the client's share small.
 *
 * Timestamps are CLOCK_MONOTONIC, the clock of Python's time.perf_counter on Linux, so that
 * the stamps perf/backend.py writes into its first event compare with ours.
 *
 *   cc -O2 -Wall -Wextra perf/sse_load.c -o sse_load -lssl -lcrypto
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define TAIL 256 /* as sse_load.py: markers are looked for in the last 256 bytes seen */
#define READ_SIZE 65536
#define NEVER 1e300

static const char PROMPT[] =
    "{\"model\": \"bench\", \"prompt\": \"Hello, streaming world\", \"max_tokens\": 20, "
    "\"stream\": true}";

enum state { IDLE, CONNECTING, HANDSHAKE, WRITING, READING, FINISHED };

struct slot {
    enum state state;
    double wake;    /* IDLE: when its next stream starts */
    double timeout; /* a stream under way: when it fails (0: never) */
    int fd;
    SSL *ssl;
    uint32_t events; /* the epoll interest now registered */
    size_t sent;
    double start, ttfb;
    char tail[TAIL];
    size_t tail_len;
    int has_split;
    double split[3];
};

struct values {
    double *v;
    size_t n, cap;
};

static struct {
    int stream_mode;
    int port;
    const char *path;
    int conc, count;
    double duration, stagger, ramp, deadline;
    int tls, resume;
} opt = {.conc = 100, .duration = 10, .count = 1000, .ramp = 2, .deadline = 25};

static int epfd;
static SSL_CTX *ctx;
static SSL_SESSION *last_session; /* --resume: the session of the last stream that ended */
static char request[4096];
static size_t request_len;
static struct sockaddr_in target;
static double stop_at; /* stream mode: no new stream after this */

static struct values ttfbs, totals, splits[3];
static long errors, completed, first_within_1s, tls_streams, resumed;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* No libm: the build line links only OpenSSL. */
static double earlier(double a, double b)
{
    return a < b ? a : b;
}

static void push(struct values *values, double value)
{
    if (values->n == values->cap) {
        values->cap = values->cap ? values->cap * 2 : 1024;
        values->v = realloc(values->v, values->cap * sizeof(double));
        if (!values->v) {
            perror("sse_load: realloc");
            exit(1);
        }
    }
    values->v[values->n++] = value;
}

static int compare(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* sse_load.py's pct(): sorted, index min(n - 1, int(n * p / 100)); -1 when empty. */
static double pct(struct values *values, double p)
{
    if (!values->n)
        return -1.0;
    qsort(values->v, values->n, sizeof(double), compare);
    size_t index = (size_t)((double)values->n * p / 100);
    return values->v[index < values->n - 1 ? index : values->n - 1];
}

static void watch(struct slot *s, uint32_t events)
{
    if (s->events == events)
        return;
    struct epoll_event ev = {.events = events, .data.ptr = s};
    if (epoll_ctl(epfd, s->events ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, s->fd, &ev) < 0) {
        perror("sse_load: epoll_ctl");
        exit(1);
    }
    s->events = events;
}

static void close_stream(struct slot *s)
{
    if (s->ssl) {
        /* A close_notify, as Python's writer.close() sends: OpenSSL marks the session of a
         * connection freed without one as not resumable. */
        if (SSL_is_init_finished(s->ssl))
            SSL_shutdown(s->ssl);
        SSL_free(s->ssl);
        s->ssl = NULL;
    }
    if (s->fd >= 0)
        close(s->fd); /* also drops it from the epoll set */
    s->fd = -1;
    s->events = 0;
}

static void next_stream(struct slot *s, double delay)
{
    if (opt.stream_mode) {
        s->state = IDLE;
        s->wake = now() + delay;
    } else {
        s->state = FINISHED;
    }
}

/* A stream that raised in Python (OSError, timeout): an error; a worker goes on in 10 ms. */
static void failed(struct slot *s)
{
    close_stream(s);
    errors++;
    next_stream(s, 0.01);
}

/* A stream that returned in Python: recorded as sse_load.py's worker or holder does. */
static void ended(struct slot *s)
{
    double total = now() - s->start;
    int done = memmem(s->tail, s->tail_len, "[DONE]", 6) != NULL;
    if (opt.resume && s->ssl) {
        SSL_SESSION *session = SSL_get1_session(s->ssl);
        if (session) {
            SSL_SESSION_free(last_session);
            last_session = session;
        }
    }
    close_stream(s);
    if (opt.stream_mode) {
        if (done && s->ttfb >= 0) {
            push(&ttfbs, s->ttfb);
            push(&totals, total);
            if (s->has_split)
                for (int i = 0; i < 3; i++)
                    push(&splits[i], s->split[i]);
        } else {
            errors++;
        }
    } else {
        completed += done;
        first_within_1s += s->ttfb >= 0 && s->ttfb < 1.0;
    }
    next_stream(s, 0);
}

/* The backend's stamps: "t": [rendered, written], as sse_load.py's STAMPS regex. */
static int stamps(const char *tail, size_t len, double *rendered, double *written)
{
    static const char mark[] = "\"t\": [";
    const char *end = tail + len, *at = tail;
    while ((at = memmem(at, end - at, mark, sizeof mark - 1))) {
        const char *p = at + sizeof mark - 1, *a = p;
        while (p < end && (*p == '.' || (*p >= '0' && *p <= '9')))
            p++;
        const char *a_end = p;
        if (a_end > a && end - p >= 2 && p[0] == ',' && p[1] == ' ') {
            const char *b = p += 2;
            while (p < end && (*p == '.' || (*p >= '0' && *p <= '9')))
                p++;
            if (p > b && p < end && *p == ']') {
                char text[64];
                size_t n = a_end - a < 63 ? (size_t)(a_end - a) : 63;
                memcpy(text, a, n), text[n] = 0;
                *rendered = strtod(text, NULL);
                n = p - b < 63 ? (size_t)(p - b) : 63;
                memcpy(text, b, n), text[n] = 0;
                *written = strtod(text, NULL);
                return 1;
            }
        }
        at++;
    }
    return 0;
}

/* One read's data: the TTFB at the first read whose tail holds "data:", then the split. */
static void received(struct slot *s, const char *data, size_t n, double when)
{
    if (n >= TAIL) {
        memcpy(s->tail, data + n - TAIL, TAIL);
        s->tail_len = TAIL;
    } else {
        size_t keep = s->tail_len + n > TAIL ? TAIL - n : s->tail_len;
        memmove(s->tail, s->tail + s->tail_len - keep, keep);
        memcpy(s->tail + keep, data, n);
        s->tail_len = keep + n;
    }
    if (s->ttfb < 0 && memmem(s->tail, s->tail_len, "data:", 5))
        s->ttfb = when - s->start;
    double rendered, written;
    if (!s->has_split && s->ttfb >= 0 && stamps(s->tail, s->tail_len, &rendered, &written)) {
        s->split[0] = rendered - s->start;
        s->split[1] = written - rendered;
        s->split[2] = s->start + s->ttfb - written;
        s->has_split = 1;
    }
}

static void start_stream(struct slot *s)
{
    s->start = now();
    s->ttfb = -1;
    s->tail_len = 0;
    s->has_split = 0;
    s->sent = 0;
    s->timeout = opt.stream_mode ? s->start + opt.duration + 10 : 0;
    s->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (s->fd < 0) {
        failed(s);
        return;
    }
    /* asyncio sets TCP_NODELAY on its TCP transports: the same small writes, unbatched. */
    int one = 1;
    setsockopt(s->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(s->fd, (struct sockaddr *)&target, sizeof target) < 0 && errno != EINPROGRESS) {
        failed(s);
        return;
    }
    s->state = CONNECTING;
    watch(s, EPOLLOUT);
}

/* A plain socket's send or recv that took nothing: wait until it is ready again (EAGAIN),
   or count the stream as failed. */
static void plain_wait(struct slot *s, uint32_t events)
{
    if (errno == EAGAIN || errno == EINTR)
        watch(s, events);
    else
        failed(s);
}

/* OpenSSL's "try again": wait for the direction it names; anything else fails the stream. */
static int ssl_wait(struct slot *s, int result)
{
    switch (SSL_get_error(s->ssl, result)) {
    case SSL_ERROR_WANT_READ:
        watch(s, EPOLLIN);
        return 1;
    case SSL_ERROR_WANT_WRITE:
        watch(s, EPOLLOUT);
        return 1;
    default:
        ERR_clear_error();
        return 0;
    }
}

static void advance(struct slot *s)
{
    static char buffer[READ_SIZE];
    if (s->state == IDLE || s->state == FINISHED)
        return;
    if (s->state == CONNECTING) {
        int error = 0;
        socklen_t len = sizeof error;
        if (getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &error, &len) < 0 || error) {
            failed(s);
            return;
        }
        if (opt.tls) {
            s->ssl = SSL_new(ctx);
            if (!s->ssl) {
                fprintf(stderr, "sse_load: SSL_new failed\n");
                exit(1);
            }
            SSL_set_fd(s->ssl, s->fd);
            if (opt.resume && last_session)
                SSL_set_session(s->ssl, last_session);
            s->state = HANDSHAKE;
        } else {
            s->state = WRITING;
        }
    }
    if (s->state == HANDSHAKE) {
        int result = SSL_connect(s->ssl);
        if (result != 1) {
            if (!ssl_wait(s, result))
                failed(s);
            return;
        }
        tls_streams++;
        resumed += SSL_session_reused(s->ssl);
        s->state = WRITING;
    }
    if (s->state == WRITING) {
        while (s->sent < request_len) {
            const char *data = request + s->sent;
            int left = (int)(request_len - s->sent);
            if (s->ssl) {
                int n = SSL_write(s->ssl, data, left);
                if (n <= 0) {
                    if (!ssl_wait(s, n))
                        failed(s);
                    return;
                }
                s->sent += n;
            } else {
                ssize_t n = send(s->fd, data, left, MSG_NOSIGNAL);
                if (n < 0) {
                    plain_wait(s, EPOLLOUT);
                    return;
                }
                s->sent += n;
            }
        }
        s->state = READING;
    }
    /* READING: until "[DONE]", the end of the connection, or nothing more to read now. */
    for (;;) {
        ssize_t n;
        if (s->ssl) {
            int result = SSL_read(s->ssl, buffer, sizeof buffer);
            if (result <= 0) {
                int error = SSL_get_error(s->ssl, result);
                if (error == SSL_ERROR_ZERO_RETURN) {
                    ended(s);
                    return;
                }
                if (!ssl_wait(s, result))
                    failed(s);
                return;
            }
            n = result;
        } else {
            n = recv(s->fd, buffer, sizeof buffer, 0);
            if (n == 0) {
                ended(s);
                return;
            }
            if (n < 0) {
                plain_wait(s, EPOLLIN);
                return;
            }
        }
        received(s, buffer, n, now());
        if (memmem(s->tail, s->tail_len, "[DONE]", 6)) {
            ended(s);
            return;
        }
    }
}

static double option_number(const char *name, const char *text)
{
    char *end;
    double value = strtod(text, &end);
    if (!*text || *end || !(value > -NEVER && value < NEVER)) {
        fprintf(stderr, "sse_load: --%s: not a number: %s\n", name, text);
        exit(2);
    }
    return value;
}

static void parse(int argc, char **argv)
{
    static const struct option options[] = {
        {"port", required_argument, 0, 'p'},     {"path", required_argument, 0, 'P'},
        {"conc", required_argument, 0, 'c'},     {"duration", required_argument, 0, 'd'},
        {"stagger", required_argument, 0, 's'},  {"count", required_argument, 0, 'n'},
        {"ramp", required_argument, 0, 'r'},     {"deadline", required_argument, 0, 'D'},
        {"tls", no_argument, 0, 't'},            {"resume", no_argument, 0, 'R'},
        {0, 0, 0, 0},
    };
    int c;
    while ((c = getopt_long(argc, argv, "", options, NULL)) != -1) {
        const char *name = "";
        for (const struct option *o = options; o->name; o++)
            if (o->val == c)
                name = o->name;
        switch (c) {
        case 'p': opt.port = (int)option_number(name, optarg); break;
        case 'P': opt.path = optarg; break;
        case 'c': opt.conc = (int)option_number(name, optarg); break;
        case 'd': opt.duration = option_number(name, optarg); break;
        case 's': opt.stagger = option_number(name, optarg); break;
        case 'n': opt.count = (int)option_number(name, optarg); break;
        case 'r': opt.ramp = option_number(name, optarg); break;
        case 'D': opt.deadline = option_number(name, optarg); break;
        case 't': opt.tls = 1; break;
        case 'R': opt.resume = 1; break;
        default: exit(2);
        }
    }
    if (optind != argc - 1 || (strcmp(argv[optind], "stream") && strcmp(argv[optind], "hold"))) {
        fprintf(stderr, "usage: sse_load {stream,hold} --port PORT --path PATH [--conc N] "
                        "[--duration S] [--stagger S] [--count N] [--ramp S] [--deadline S] "
                        "[--tls] [--resume]\n");
        exit(2);
    }
    opt.stream_mode = !strcmp(argv[optind], "stream");
    if (!opt.port || !opt.path || opt.conc < 1 || opt.count < 1) {
        fprintf(stderr, "sse_load: --port and --path are required; --conc, --count >= 1\n");
        exit(2);
    }
    opt.resume = opt.resume && opt.tls;
}

static void setup(void)
{
    signal(SIGPIPE, SIG_IGN);
    /* hold mode keeps --count connections open at once: as many descriptors as allowed. */
    struct rlimit limit;
    if (!getrlimit(RLIMIT_NOFILE, &limit) && limit.rlim_cur < limit.rlim_max) {
        limit.rlim_cur = limit.rlim_max;
        setrlimit(RLIMIT_NOFILE, &limit);
    }
    request_len = snprintf(request, sizeof request,
                           "POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                           "application/json\r\nAccept: text/event-stream\r\nContent-Length: "
                           "%zu\r\n\r\n%s",
                           opt.path, sizeof PROMPT - 1, PROMPT);
    if (request_len >= sizeof request) {
        fprintf(stderr, "sse_load: --path too long\n");
        exit(2);
    }
    target.sin_family = AF_INET;
    target.sin_port = htons(opt.port);
    target.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (opt.tls) {
        /* Python's PROTOCOL_TLS_CLIENT without verification: TLS 1.2 and up, no SNI (an IP). */
        ctx = SSL_CTX_new(TLS_client_method());
        if (!ctx) {
            fprintf(stderr, "sse_load: SSL_CTX_new failed\n");
            exit(1);
        }
        SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
        SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
#ifdef SSL_OP_IGNORE_UNEXPECTED_EOF
        /* An end without close_notify ends the stream (asyncio reads it as EOF too). */
        SSL_CTX_set_options(ctx, SSL_OP_IGNORE_UNEXPECTED_EOF);
#endif
    }
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) {
        perror("sse_load: epoll_create1");
        exit(1);
    }
}

int main(int argc, char **argv)
{
    parse(argc, argv);
    setup();
    int slots_n = opt.stream_mode ? opt.conc : opt.count;
    struct slot *slots = calloc(slots_n, sizeof *slots);
    if (!slots) {
        perror("sse_load: calloc");
        return 1;
    }
    double begin = now();
    stop_at = begin + opt.duration;
    double hold_end = begin + opt.deadline;
    for (int i = 0; i < slots_n; i++) {
        slots[i].fd = -1;
        slots[i].wake = begin + (opt.stream_mode ? opt.stagger * i / opt.conc
                                                 : opt.ramp * i / opt.count);
    }
    struct epoll_event events[256];
    long unfinished = 0;
    for (;;) {
        /* Timers: worker starts and pauses, per-stream timeouts, hold mode's deadline. */
        double t = now(), next = NEVER;
        int running = 0;
        if (!opt.stream_mode && t >= hold_end) {
            for (int i = 0; i < slots_n; i++)
                if (slots[i].state != FINISHED) {
                    close_stream(&slots[i]);
                    unfinished++;
                }
            break;
        }
        for (int i = 0; i < slots_n; i++) {
            struct slot *s = &slots[i];
            if (s->state == IDLE && s->wake <= t) {
                if (opt.stream_mode && t >= stop_at)
                    s->state = FINISHED;
                else
                    start_stream(s);
            } else if (s->state != IDLE && s->state != FINISHED && s->timeout && s->timeout <= t) {
                failed(s);
            }
            if (s->state == IDLE)
                next = earlier(next, s->wake);
            else if (s->state != FINISHED && s->timeout)
                next = earlier(next, s->timeout);
            running += s->state != FINISHED;
        }
        if (!running)
            break;
        if (!opt.stream_mode)
            next = earlier(next, hold_end);
        /* Rounded up to whole ms, as asyncio's selector does. */
        double left = next - now();
        int wait = next == NEVER ? -1 : left <= 0 ? 0 : (int)(left * 1000) + 1;
        int n = epoll_wait(epfd, events, 256, wait);
        if (n < 0 && errno != EINTR) {
            perror("sse_load: epoll_wait");
            return 1;
        }
        for (int i = 0; i < n; i++)
            advance(events[i].data.ptr);
    }
    if (opt.stream_mode) {
        printf("{\"streams\": %zu, \"errors\": %ld, \"ttfb_p50_ms\": %.6f, \"ttfb_p90_ms\": %.6f, "
               "\"ttfb_p99_ms\": %.6f, \"total_p50_ms\": %.6f, \"to_backend_p50_ms\": %.6f, "
               "\"backend_p50_ms\": %.6f, \"from_backend_p50_ms\": %.6f",
               ttfbs.n, errors, pct(&ttfbs, 50) * 1000, pct(&ttfbs, 90) * 1000,
               pct(&ttfbs, 99) * 1000, pct(&totals, 50) * 1000, pct(&splits[0], 50) * 1000,
               pct(&splits[1], 50) * 1000, pct(&splits[2], 50) * 1000);
    } else {
        printf("{\"opened\": %d, \"completed\": %ld, \"first_event_within_1s\": %ld, "
               "\"errors\": %ld, \"unfinished_at_deadline\": %ld",
               opt.count, completed, first_within_1s, errors, unfinished);
    }
    /* With TLS, whether sessions were really resumed: a server that stops resuming them
       shows here, not only as a slower time to first event. */
    if (opt.tls)
        printf(", \"tls_handshakes\": %ld, \"tls_resumed\": %ld", tls_streams, resumed);
    printf("}\n");
    fflush(stdout);
    return 0;
}
