/*
 * mcnp-cni: the chained CNI plugin that tells the node's mcnp daemon about each pod
 * sandbox (CNI spec 1.0.0; 0.3.x and 0.4.0 configurations are accepted too).
 *
 * Why C and not Python: real nodes copy this file into the host's CNI binary directory
 * (/opt/cni/bin) and the container runtime executes it on the host, where no Python is
 * assumed. It is built statically when the toolchain allows, so it does not depend on
 * the host's C library either.
 *
 * What it does: VERSION is answered here. ADD, DEL and CHECK read the network
 * configuration from stdin and CNI_* from the environment, send ONE JSON line to the
 * daemon's unix socket (the configuration's "socket", default /run/mcnp/cni.sock)
 *
 *   {"command", "containerID", "netns", "ifname", "args", "path", "config": {...}}
 *
 * and read ONE JSON line back: {"ok": true} or {"ok": false, "code", "msg", "details"}.
 * ADD then prints the configuration's prevResult unchanged (under the configuration's
 * cniVersion): mcnp-cni must come after an interface plugin in the chain. A pod never
 * runs unenforced, so any failure of ADD or CHECK is a CNI error (stdout, exit 1);
 * DEL never fails (exit 0 whatever happens: the daemon reconciles later).
 *
 * Every input is bounded: the configuration (MAX_CONFIG), each environment value
 * (MAX_ENV), the reply (MAX_REPLY), JSON nesting (MAX_DEPTH) and the time spent waiting
 * for stdin and for the daemon (the configuration's "timeout" in seconds, default 10).
 * The JSON scanner validates the whole document; it only extracts "cniVersion",
 * "socket", "timeout" and "prevResult" from the configuration and "ok", "code", "msg",
 * "details" from the reply. The daemon parses the full configuration itself.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONFIG (512 * 1024)
#define MAX_ENV (16 * 1024)
#define MAX_REPLY (64 * 1024)
#define MAX_DEPTH 64
#define DEFAULT_SOCKET "/run/mcnp/cni.sock"
#define DEFAULT_TIMEOUT_S 10
#define MAX_TIMEOUT_S 300

/* CNI spec error codes. */
#define E_INCOMPATIBLE 1
#define E_INVALID_CONFIG 4
#define E_INVALID_ENV 7
#define E_IO 5
#define E_TRY_LATER 11
#define E_OTHER 999

static const char *SUPPORTED[] = {"0.3.0", "0.3.1", "0.4.0", "1.0.0", NULL};

/* ------------------------------------------------------------------ output buffer */

struct buf {
    char *data;
    size_t len, cap;
};

static void die_oom(void)
{
    fputs("{\"cniVersion\":\"1.0.0\",\"code\":999,\"msg\":\"mcnp-cni: out of memory\"}\n", stdout);
    exit(1);
}

static void buf_put(struct buf *b, const char *s, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 1024;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *d = realloc(b->data, cap);
        if (!d)
            die_oom();
        b->data = d;
        b->cap = cap;
    }
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = 0;
}

static void buf_puts(struct buf *b, const char *s) { buf_put(b, s, strlen(s)); }

/* A JSON string literal of s (bytes >= 0x80 are passed as they are). */
static void buf_put_json_string(struct buf *b, const char *s)
{
    static const char hex[] = "0123456789abcdef";
    buf_put(b, "\"", 1);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\') {
            char esc[2] = {'\\', (char)*p};
            buf_put(b, esc, 2);
        } else if (*p < 0x20) {
            char esc[6] = {'\\', 'u', '0', '0', hex[*p >> 4], hex[*p & 15]};
            buf_put(b, esc, 6);
        } else {
            buf_put(b, (const char *)p, 1);
        }
    }
    buf_put(b, "\"", 1);
}

/* ------------------------------------------------------------------ JSON scanner */

struct span {
    const char *p; /* NULL when absent */
    size_t n;
};

struct scan {
    const char *p, *end;
    int depth;
};

static void skip_ws(struct scan *s)
{
    while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' || *s->p == '\r'))
        s->p++;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

static int read_hex4(struct scan *s, unsigned *out)
{
    if (s->end - s->p < 4)
        return -1;
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        int h = hexval(s->p[i]);
        if (h < 0)
            return -1;
        v = v * 16 + (unsigned)h;
    }
    s->p += 4;
    *out = v;
    return 0;
}

static void put_decoded(char *out, size_t cap, size_t *n, int *trunc, const char *bytes, size_t len)
{
    if (!out)
        return;
    if (*n + len >= cap) {
        *trunc = 1;
        return;
    }
    memcpy(out + *n, bytes, len);
    *n += len;
    out[*n] = 0;
}

static size_t utf8_encode(unsigned cp, char *o)
{
    if (cp < 0x80) {
        o[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (char)(0xc0 | (cp >> 6));
        o[1] = (char)(0x80 | (cp & 0x3f));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (char)(0xe0 | (cp >> 12));
        o[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        o[2] = (char)(0x80 | (cp & 0x3f));
        return 3;
    }
    o[0] = (char)(0xf0 | (cp >> 18));
    o[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
    o[3] = (char)(0x80 | (cp & 0x3f));
    return 4;
}

static int scan_escape(struct scan *s, char *out, size_t cap, size_t *n, int *trunc)
{
    char c = *s->p++;
    const char *simple = "\"\"\\\\//b\bf\fn\nr\rt\t";
    for (const char *e = simple; *e; e += 2)
        if (c == e[0]) {
            put_decoded(out, cap, n, trunc, &e[1], 1);
            return 0;
        }
    if (c != 'u')
        return -1;
    unsigned cp, lo;
    if (read_hex4(s, &cp) < 0)
        return -1;
    if (cp >= 0xd800 && cp < 0xdc00) {
        if (s->end - s->p < 6 || s->p[0] != '\\' || s->p[1] != 'u')
            return -1;
        s->p += 2;
        if (read_hex4(s, &lo) < 0 || lo < 0xdc00 || lo >= 0xe000)
            return -1;
        cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
    } else if (cp >= 0xdc00 && cp < 0xe000) {
        return -1;
    }
    char enc[4];
    put_decoded(out, cap, n, trunc, enc, utf8_encode(cp, enc));
    return 0;
}

/*
 * A string at s->p (which is '"'): validated, and decoded into out (cap bytes, NUL
 * terminated) when out is not NULL; *trunc is set when it did not fit.
 */
static int scan_string(struct scan *s, char *out, size_t cap, int *trunc)
{
    size_t n = 0;
    *trunc = 0;
    if (out)
        out[0] = 0;
    if (s->p >= s->end || *s->p != '"')
        return -1;
    s->p++;
    while (s->p < s->end) {
        unsigned char c = (unsigned char)*s->p;
        if (c == '"') {
            s->p++;
            return 0;
        }
        if (c < 0x20)
            return -1;
        if (c == '\\') {
            s->p++;
            if (s->p >= s->end || scan_escape(s, out, cap, &n, trunc) < 0)
                return -1;
            continue;
        }
        put_decoded(out, cap, &n, trunc, s->p, 1);
        s->p++;
    }
    return -1;
}

static int skip_number(struct scan *s)
{
    const char *start = s->p;
    if (s->p < s->end && *s->p == '-')
        s->p++;
    if (s->p >= s->end)
        return -1;
    if (*s->p == '0')
        s->p++;
    else if (*s->p >= '1' && *s->p <= '9')
        while (s->p < s->end && *s->p >= '0' && *s->p <= '9')
            s->p++;
    else
        return -1;
    if (s->p < s->end && *s->p == '.') {
        s->p++;
        if (s->p >= s->end || *s->p < '0' || *s->p > '9')
            return -1;
        while (s->p < s->end && *s->p >= '0' && *s->p <= '9')
            s->p++;
    }
    if (s->p < s->end && (*s->p == 'e' || *s->p == 'E')) {
        s->p++;
        if (s->p < s->end && (*s->p == '+' || *s->p == '-'))
            s->p++;
        if (s->p >= s->end || *s->p < '0' || *s->p > '9')
            return -1;
        while (s->p < s->end && *s->p >= '0' && *s->p <= '9')
            s->p++;
    }
    return s->p > start ? 0 : -1;
}

static int skip_literal(struct scan *s, const char *word)
{
    size_t n = strlen(word);
    if ((size_t)(s->end - s->p) < n || memcmp(s->p, word, n) != 0)
        return -1;
    s->p += n;
    return 0;
}

typedef int (*member_fn)(const char *key, int key_trunc, struct span raw_member, struct span value, void *ctx);

static int skip_value(struct scan *s);

/*
 * An object at s->p: validated, with fn called for each member (key decoded into a
 * small buffer; raw_member spans `"key": value`, value spans the value) when not NULL.
 */
static int scan_object(struct scan *s, member_fn fn, void *ctx)
{
    if (++s->depth > MAX_DEPTH)
        return -1;
    s->p++; /* '{' */
    skip_ws(s);
    if (s->p < s->end && *s->p == '}') {
        s->p++;
        s->depth--;
        return 0;
    }
    for (;;) {
        char key[32];
        int trunc;
        skip_ws(s);
        const char *member = s->p;
        if (scan_string(s, key, sizeof key, &trunc) < 0)
            return -1;
        skip_ws(s);
        if (s->p >= s->end || *s->p != ':')
            return -1;
        s->p++;
        skip_ws(s);
        const char *value = s->p;
        if (skip_value(s) < 0)
            return -1;
        struct span raw = {member, (size_t)(s->p - member)}, val = {value, (size_t)(s->p - value)};
        if (fn && fn(key, trunc, raw, val, ctx) < 0)
            return -1;
        skip_ws(s);
        if (s->p >= s->end)
            return -1;
        if (*s->p == '}') {
            s->p++;
            s->depth--;
            return 0;
        }
        if (*s->p++ != ',')
            return -1;
    }
}

static int skip_array(struct scan *s)
{
    if (++s->depth > MAX_DEPTH)
        return -1;
    s->p++; /* '[' */
    skip_ws(s);
    if (s->p < s->end && *s->p == ']') {
        s->p++;
        s->depth--;
        return 0;
    }
    for (;;) {
        skip_ws(s);
        if (skip_value(s) < 0)
            return -1;
        skip_ws(s);
        if (s->p >= s->end)
            return -1;
        if (*s->p == ']') {
            s->p++;
            s->depth--;
            return 0;
        }
        if (*s->p++ != ',')
            return -1;
    }
}

static int skip_value(struct scan *s)
{
    int trunc;
    if (s->p >= s->end)
        return -1;
    switch (*s->p) {
    case '{':
        return scan_object(s, NULL, NULL);
    case '[':
        return skip_array(s);
    case '"':
        return scan_string(s, NULL, 0, &trunc);
    case 't':
        return skip_literal(s, "true");
    case 'f':
        return skip_literal(s, "false");
    case 'n':
        return skip_literal(s, "null");
    default:
        return skip_number(s);
    }
}

/* A whole document that must be one object: fn sees its top-level members. */
static int scan_document(const char *text, size_t len, member_fn fn, void *ctx)
{
    struct scan s = {text, text + len, 0};
    skip_ws(&s);
    if (s.p >= s.end || *s.p != '{')
        return -1;
    if (scan_object(&s, fn, ctx) < 0)
        return -1;
    skip_ws(&s);
    return s.p == s.end ? 0 : -1;
}

/* The decoded value of a string span (cap bytes); -1 if not a string or too long. */
static int span_string(struct span v, char *out, size_t cap)
{
    struct scan s = {v.p, v.p + v.n, 0};
    int trunc;
    if (scan_string(&s, out, cap, &trunc) < 0 || trunc)
        return -1;
    return 0;
}

/* The value of an integer span; -1 if it is not an integer in [lo, hi]. */
static int span_int(struct span v, long lo, long hi, long *out)
{
    char tmp[24];
    if (v.n == 0 || v.n >= sizeof tmp)
        return -1;
    memcpy(tmp, v.p, v.n);
    tmp[v.n] = 0;
    char *end;
    errno = 0;
    long x = strtol(tmp, &end, 10);
    if (errno || *end || x < lo || x > hi)
        return -1;
    *out = x;
    return 0;
}

/* ------------------------------------------------------------------ results */

static char cni_version[32] = "1.0.0";

static void emit(const char *s, size_t n)
{
    while (n > 0) {
        ssize_t w = write(STDOUT_FILENO, s, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return;
        }
        s += w;
        n -= (size_t)w;
    }
}

/* A CNI error on stdout; msg and details are plain C strings. Exits 1. */
static void fail(int code, const char *msg, const char *fmt, ...)
{
    char details[512] = "";
    if (fmt) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(details, sizeof details, fmt, ap);
        va_end(ap);
    }
    struct buf b = {0};
    char num[16];
    snprintf(num, sizeof num, "%d", code);
    buf_puts(&b, "{\"cniVersion\":");
    buf_put_json_string(&b, cni_version);
    buf_puts(&b, ",\"code\":");
    buf_puts(&b, num);
    buf_puts(&b, ",\"msg\":");
    buf_put_json_string(&b, msg);
    buf_puts(&b, ",\"details\":");
    buf_put_json_string(&b, details);
    buf_puts(&b, "}\n");
    emit(b.data, b.len);
    exit(1);
}

/* ------------------------------------------------------------------ configuration */

struct config {
    struct span prev_result;
    struct span version;
    char socket[sizeof(((struct sockaddr_un *)0)->sun_path)];
    long timeout_s;
    const char *error; /* first problem found, for code 4 */
};

static int config_member(const char *key, int trunc, struct span raw, struct span v, void *ctx)
{
    struct config *c = ctx;
    (void)raw;
    if (trunc)
        return 0;
    if (!strcmp(key, "cniVersion")) {
        c->version = v;
    } else if (!strcmp(key, "prevResult")) {
        c->prev_result = v;
        if (v.n == 0 || v.p[0] != '{')
            c->error = "prevResult is not an object";
    } else if (!strcmp(key, "socket")) {
        if (span_string(v, c->socket, sizeof c->socket) < 0 || c->socket[0] != '/')
            c->error = "socket must be an absolute path of at most 107 bytes";
    } else if (!strcmp(key, "timeout")) {
        if (span_int(v, 1, MAX_TIMEOUT_S, &c->timeout_s) < 0)
            c->error = "timeout must be a whole number of seconds from 1 to 300";
    }
    return 0;
}

static int version_supported(const char *v)
{
    for (const char **s = SUPPORTED; *s; s++)
        if (!strcmp(*s, v))
            return 1;
    return 0;
}

/* Parse the configuration; on a problem, fail() (never returns) unless soft. */
static int parse_config(const char *text, size_t len, struct config *c, const char *command, int soft)
{
    memset(c, 0, sizeof *c);
    strcpy(c->socket, DEFAULT_SOCKET);
    c->timeout_s = DEFAULT_TIMEOUT_S;
    if (scan_document(text, len, config_member, c) < 0)
        c->error = "the network configuration on stdin is not a JSON object";
    if (!c->error && c->version.p) {
        char v[32];
        if (span_string(c->version, v, sizeof v) < 0)
            c->error = "cniVersion is not a string";
        else
            strcpy(cni_version, v);
    } else if (!c->error) {
        c->error = "cniVersion is missing";
    }
    if (soft)
        return c->error ? -1 : 0;
    if (c->error)
        fail(E_INVALID_CONFIG, "invalid network configuration", "%s", c->error);
    if (!version_supported(cni_version)) {
        char v[32];
        strcpy(v, cni_version);
        strcpy(cni_version, "1.0.0");
        fail(E_INCOMPATIBLE, "incompatible CNI version", "cniVersion %s; supported: 0.3.0 0.3.1 0.4.0 1.0.0", v);
    }
    if (!strcmp(command, "CHECK") && !strncmp(cni_version, "0.3.", 4))
        fail(E_INCOMPATIBLE, "incompatible CNI version", "CHECK needs cniVersion 0.4.0 or later, not %s", cni_version);
    if (!strcmp(command, "ADD") && !c->prev_result.p)
        fail(E_INVALID_CONFIG, "invalid network configuration",
             "no prevResult: mcnp-cni must be chained after a plugin that creates the interface");
    return 0;
}

/* ------------------------------------------------------------------ I/O with deadlines */

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Wait until fd is ready for events or the deadline passes: 1 ready, 0 timeout, -1 error. */
static int wait_fd(int fd, short events, double deadline)
{
    for (;;) {
        double left = deadline - now();
        if (left <= 0)
            return 0;
        struct pollfd p = {fd, events, 0};
        int r = poll(&p, 1, (int)(left * 1000) + 1);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return -1;
        if (r == 0)
            continue; /* re-check the deadline */
        return 1;
    }
}

/*
 * Read fd into b until EOF (stop_at_newline: until the first '\n') or max bytes;
 * 0 done, -1 error (errno), -2 too large, -3 timeout.
 */
static int read_bounded(int fd, struct buf *b, size_t max, int stop_at_newline, double deadline)
{
    char chunk[8192];
    for (;;) {
        int r = wait_fd(fd, POLLIN, deadline);
        if (r == 0)
            return -3;
        if (r < 0)
            return -1;
        ssize_t n = read(fd, chunk, sizeof chunk);
        if (n < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (n < 0)
            return -1;
        if (n == 0)
            return 0;
        if (b->len + (size_t)n > max)
            return -2;
        buf_put(b, chunk, (size_t)n);
        if (stop_at_newline && memchr(chunk, '\n', (size_t)n))
            return 0;
    }
}

static int write_all(int fd, const char *p, size_t n, double deadline)
{
    while (n > 0) {
        int r = wait_fd(fd, POLLOUT, deadline);
        if (r <= 0)
            return r == 0 ? -3 : -1;
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (w < 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* ------------------------------------------------------------------ the request */

static const char *env_value(const char *name, int required, int soft)
{
    const char *v = getenv(name);
    if (!v || !*v) {
        if (required && !soft)
            fail(E_INVALID_ENV, "invalid environment", "%s is not set", name);
        return "";
    }
    if (strlen(v) > MAX_ENV) {
        if (!soft)
            fail(E_INVALID_ENV, "invalid environment", "%s is longer than %d bytes", name, MAX_ENV);
        return "";
    }
    return v;
}

static void build_request(struct buf *req, const char *command, const char *config, size_t config_len, int soft)
{
    static const struct {
        const char *key, *env;
        int required;
    } fields[] = {
        {"containerID", "CNI_CONTAINERID", 1}, {"netns", "CNI_NETNS", 0}, {"ifname", "CNI_IFNAME", 1},
        {"args", "CNI_ARGS", 0},               {"path", "CNI_PATH", 0},
    };
    buf_puts(req, "{\"command\":");
    buf_put_json_string(req, command);
    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++) {
        /* CNI_NETNS is required for ADD and CHECK, optional for DEL. */
        int required = fields[i].required || (i == 1 && strcmp(command, "DEL"));
        buf_puts(req, ",\"");
        buf_puts(req, fields[i].key);
        buf_puts(req, "\":");
        buf_put_json_string(req, env_value(fields[i].env, required, soft));
    }
    buf_puts(req, ",\"config\":");
    /* Validated JSON holds no raw newline inside a string: these are whitespace. */
    size_t start = req->len;
    buf_put(req, config, config_len);
    for (size_t i = start; i < req->len; i++)
        if (req->data[i] == '\n' || req->data[i] == '\r')
            req->data[i] = ' ';
    buf_puts(req, "}\n");
}

/* ------------------------------------------------------------------ the reply */

struct reply {
    int ok; /* 1 true, 0 false, -1 absent or not a boolean */
    long code;
    struct span msg, details;
};

static int reply_member(const char *key, int trunc, struct span raw, struct span v, void *ctx)
{
    struct reply *r = ctx;
    (void)raw;
    if (trunc)
        return 0;
    if (!strcmp(key, "ok"))
        r->ok = (v.n == 4 && !memcmp(v.p, "true", 4)) ? 1 : (v.n == 5 && !memcmp(v.p, "false", 5)) ? 0 : -1;
    else if (!strcmp(key, "code") && span_int(v, 1, 999999, &r->code) < 0)
        r->code = E_OTHER;
    else if (!strcmp(key, "msg") && v.n && v.p[0] == '"')
        r->msg = v;
    else if (!strcmp(key, "details") && v.n && v.p[0] == '"')
        r->details = v;
    return 0;
}

/* The daemon's refusal, passed on as it sent it (its strings are already valid JSON). */
static void fail_refused(const struct reply *r)
{
    struct buf b = {0};
    char num[24];
    snprintf(num, sizeof num, "%ld", r->code ? r->code : E_OTHER);
    buf_puts(&b, "{\"cniVersion\":");
    buf_put_json_string(&b, cni_version);
    buf_puts(&b, ",\"code\":");
    buf_puts(&b, num);
    buf_puts(&b, ",\"msg\":");
    if (r->msg.p)
        buf_put(&b, r->msg.p, r->msg.n);
    else
        buf_puts(&b, "\"refused by the mcnp daemon\"");
    buf_puts(&b, ",\"details\":");
    if (r->details.p)
        buf_put(&b, r->details.p, r->details.n);
    else
        buf_puts(&b, "\"\"");
    buf_puts(&b, "}\n");
    emit(b.data, b.len);
    exit(1);
}

/*
 * Send the request and read the reply; on any failure fail() unless soft (DEL), then
 * return -1.
 */
static int ask_daemon(const char *path, const struct buf *req, double deadline, int soft, struct reply *r)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strcpy(addr.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        if (soft)
            return -1;
        fail(E_OTHER, "mcnp-cni: cannot create a socket", "%s", strerror(errno));
    }
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        if (soft)
            return -1;
        fail(E_TRY_LATER, "the mcnp daemon is not reachable", "%s: %s", path, strerror(errno));
    }
    int w = write_all(fd, req->data, req->len, deadline);
    struct buf in = {0};
    int rd = w < 0 ? w : read_bounded(fd, &in, MAX_REPLY, 1, deadline);
    close(fd);
    if (rd == -3 && !soft)
        fail(E_TRY_LATER, "the mcnp daemon did not answer in time", "%s", path);
    if (rd < 0 && !soft)
        fail(E_OTHER, "no reply from the mcnp daemon", "%s: %s", path,
             rd == -2 ? "reply too large" : strerror(errno));
    if (rd < 0)
        return -1;
    char *nl = in.data ? memchr(in.data, '\n', in.len) : NULL;
    memset(r, 0, sizeof *r);
    r->ok = -1;
    if (!nl || scan_document(in.data, (size_t)(nl - in.data), reply_member, r) < 0 || r->ok < 0) {
        if (soft)
            return -1;
        fail(E_OTHER, "malformed reply from the mcnp daemon", "%s", path);
    }
    return 0;
}

/* ------------------------------------------------------------------ commands */

static void print_prev_result_member(struct buf *out, struct span raw)
{
    buf_puts(out, ",");
    buf_put(out, raw.p, raw.n);
}

static int prev_member(const char *key, int trunc, struct span raw, struct span v, void *ctx)
{
    (void)v;
    if (trunc || strcmp(key, "cniVersion"))
        print_prev_result_member(ctx, raw);
    return 0;
}

static void print_prev_result(const struct config *c)
{
    struct buf out = {0};
    buf_puts(&out, "{\"cniVersion\":");
    buf_put_json_string(&out, cni_version);
    scan_document(c->prev_result.p, c->prev_result.n, prev_member, &out);
    buf_puts(&out, "}\n");
    emit(out.data, out.len);
}

static void print_version(void)
{
    struct buf out = {0};
    buf_puts(&out, "{\"cniVersion\":\"1.0.0\",\"supportedVersions\":[");
    for (const char **s = SUPPORTED; *s; s++) {
        if (s != SUPPORTED)
            buf_puts(&out, ",");
        buf_put_json_string(&out, *s);
    }
    buf_puts(&out, "]}\n");
    emit(out.data, out.len);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    const char *command = getenv("CNI_COMMAND");
    if (!command || !*command)
        fail(E_INVALID_ENV, "invalid environment", "CNI_COMMAND is not set");
    if (!strcmp(command, "VERSION")) {
        print_version();
        return 0;
    }
    int del = !strcmp(command, "DEL");
    if (!del && strcmp(command, "ADD") && strcmp(command, "CHECK"))
        fail(E_INVALID_ENV, "invalid environment", "unknown CNI_COMMAND %.64s", command);

    /* The configuration's timeout is not known before it is read: stdin gets the default. */
    struct buf config = {0};
    int rd = read_bounded(STDIN_FILENO, &config, MAX_CONFIG, 0, now() + DEFAULT_TIMEOUT_S);
    if (rd < 0 && del)
        return 0;
    if (rd == -2)
        fail(E_INVALID_CONFIG, "invalid network configuration", "larger than %d bytes", MAX_CONFIG);
    if (rd < 0)
        fail(E_IO, "cannot read the network configuration", "%s", rd == -3 ? "stdin timed out" : strerror(errno));

    struct config c;
    if (parse_config(config.data ? config.data : "", config.len, &c, command, del) < 0)
        return 0; /* DEL with an unreadable configuration: nothing to tell */
    struct buf req = {0};
    build_request(&req, command, config.data, config.len, del);
    struct reply r;
    if (ask_daemon(c.socket, &req, now() + (double)c.timeout_s, del, &r) < 0 || del)
        return 0;
    if (r.ok != 1)
        fail_refused(&r);
    if (!strcmp(command, "ADD"))
        print_prev_result(&c);
    return 0;
}
