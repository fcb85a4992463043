/*
 * holdbuf: a guest helper for the live-migration test (guest-init.sh's `migrate` scenario).
 *
 * It keeps a buffer that only the disk's DMA writes: the buffer is filled with a filler byte
 * by the CPU, then, on the host's word, read into with O_DIRECT (the device, and so the
 * vhost-user backend's io_uring, writes those pages of guest RAM), and then left untouched
 * while the VM migrates. On the host's second word it hashes the buffer. Only a migration
 * that carried the pages the device wrote (for a vhost-user backend: only a backend that
 * logged them in the dirty log) gives the hash of the disk's content.
 *
 * For that the read must come after the migration sent the buffer's pages once (the host says
 * `read` after QEMU's second dirty-bitmap pass) and before the switchover. So that the
 * migration cannot converge before the read has landed, a second thread dirties one byte of
 * every page of another SWEEP_MIB MiB every 10 ms from FILLED until the read has completed:
 * with the host's bandwidth limit below that dirty rate, QEMU keeps iterating until then.
 *
 *   holdbuf hold DEV OFFSET LENGTH CTL SWEEP_MIB   the sequence below (SWEEP_MIB may be 0)
 *   holdbuf hash FILE                    print the hash of FILE's bytes (the expected value)
 *
 * `hold` prints on stdout (the guest's console):
 *   RINGFENCE-HOLDBUF-FILLED len=LENGTH sweep=B  the buffer exists, filled with 0xa5
 *   (waits for a line "read" on CTL, a serial port the host writes to)
 *   RINGFENCE-HOLDBUF-HOLDING hash=H            it read [OFFSET, OFFSET+LENGTH) of DEV into it
 *   (waits for a line "check" on CTL)
 *   RINGFENCE-HOLDBUF-HASH hash=H               the hash of the buffer now
 * The hash is 64-bit FNV-1a, in hex. Exit status 0 unless something failed (message on stderr).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

static uint64_t fnv1a(const unsigned char *p, size_t n, uint64_t h)
{
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

#define FNV_INIT 0xcbf29ce484222325ULL

static int die(const char *what)
{
    fprintf(stderr, "holdbuf: %s: %s\n", what, strerror(errno));
    return 1;
}

/* Read CTL until a line equal to `word` arrives; other lines are ignored. */
static int wait_word(int fd, const char *word)
{
    char line[64];
    size_t n = 0;
    for (;;) {
        char c;
        ssize_t r = read(fd, &c, 1);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            if (r == 0)
                errno = EPIPE;
            return -1;
        }
        if (c == '\r' || c == '\n') {
            line[n] = 0;
            if (strcmp(line, word) == 0)
                return 0;
            n = 0;
            continue;
        }
        if (n < sizeof(line) - 1)
            line[n++] = c;
    }
}

static atomic_int sweeping = 1;

struct sweep {
    volatile unsigned char *p;
    size_t len;
};

static void *sweeper(void *arg)
{
    struct sweep *s = arg;
    unsigned char v = 0;
    while (atomic_load(&sweeping)) {
        v++;
        for (size_t i = 0; i < s->len; i += 4096)
            s->p[i] = v;
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    return NULL;
}

static int hold(const char *dev, long long off, size_t len, const char *ctl, size_t sweep_len)
{
    int cfd = open(ctl, O_RDWR | O_NOCTTY);
    if (cfd < 0)
        return die(ctl);
    /* Raw: no echo back to the host, every byte as it comes. */
    struct termios t;
    if (tcgetattr(cfd, &t) == 0) {
        cfmakeraw(&t);
        t.c_cc[VMIN] = 1;
        t.c_cc[VTIME] = 0;
        tcsetattr(cfd, TCSANOW, &t);
    }
    int dfd = open(dev, O_RDONLY | O_DIRECT);
    if (dfd < 0)
        return die(dev);
    unsigned char *buf = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED)
        return die("mmap");
    /* Small pages only (a huge page would make the test coarser, not wrong), kept in RAM. */
    madvise(buf, len, MADV_NOHUGEPAGE);
    memset(buf, 0xa5, len);
    if (mlock(buf, len) != 0)
        return die("mlock");
    pthread_t th;
    struct sweep sw = {NULL, sweep_len};
    if (sweep_len) {
        sw.p = mmap(NULL, sweep_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (sw.p == MAP_FAILED)
            return die("mmap");
        madvise((void *)sw.p, sweep_len, MADV_NOHUGEPAGE);
        if (pthread_create(&th, NULL, sweeper, &sw) != 0)
            return die("pthread_create");
    }
    printf("RINGFENCE-HOLDBUF-FILLED len=%zu sweep=%zu\n", len, sweep_len);
    fflush(stdout);

    if (wait_word(cfd, "read") != 0)
        return die("waiting for 'read'");
    size_t done = 0;
    while (done < len) {
        ssize_t r = pread(dfd, buf + done, len - done, off + (long long)done);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            if (r == 0)
                errno = EIO;
            return die("O_DIRECT read");
        }
        done += (size_t)r;
    }
    printf("RINGFENCE-HOLDBUF-HOLDING hash=%016" PRIx64 "\n", fnv1a(buf, len, FNV_INIT));
    fflush(stdout);
    if (sweep_len) {
        atomic_store(&sweeping, 0);
        pthread_join(th, NULL);
    }

    if (wait_word(cfd, "check") != 0)
        return die("waiting for 'check'");
    printf("RINGFENCE-HOLDBUF-HASH hash=%016" PRIx64 "\n", fnv1a(buf, len, FNV_INIT));
    fflush(stdout);
    return 0;
}

static int hash_file(const char *path)
{
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return die(path);
    unsigned char b[65536];
    uint64_t h = FNV_INIT;
    for (;;) {
        ssize_t r = read(fd, b, sizeof(b));
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return die("read");
        if (r == 0)
            break;
        h = fnv1a(b, (size_t)r, h);
    }
    printf("%016" PRIx64 "\n", h);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 7 && strcmp(argv[1], "hold") == 0) {
        char *end;
        long long off = strtoll(argv[3], &end, 0);
        unsigned long long len = strtoull(argv[4], &end, 0);
        if (off < 0 || len == 0 || len % 4096 != 0 || off % 512 != 0) {
            fprintf(stderr, "holdbuf: OFFSET must be sector-, LENGTH page-aligned\n");
            return 2;
        }
        unsigned long long sweep = strtoull(argv[6], &end, 0);
        return hold(argv[2], off, (size_t)len, argv[5], (size_t)(sweep << 20));
    }
    if (argc == 3 && strcmp(argv[1], "hash") == 0)
        return hash_file(argv[2]);
    fprintf(stderr, "usage: holdbuf hold DEV OFFSET LENGTH CTL SWEEP_MIB | holdbuf hash FILE\n");
    return 2;
}
