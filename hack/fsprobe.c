/*
 * fsprobe: print what a container sees of a file tree, one sorted line per entry.
 *
 * Built statically into the `fidelity` test image (hack/testimages.py) so that the very same
 * binary runs under runc on containerd's overlayfs snapshotter, fractal host mode and fractal
 * VM mode; tests/integration/test_vm_fidelity.py compares the outputs byte for byte.
 *
 * Usage: fsprobe PATH...   (each PATH is walked recursively without following symlinks)
 *
 * Per entry: path, type, mode, uid, gid, nlink, size, sparse flag (fewer blocks allocated
 * than the size needs), rdev (devices), symlink target, hardlink group (the first path, in
 * sorted order, with the same inode; non-directories with nlink > 1), every xattr as
 * name=hex (llistxattr/lgetxattr), and an FNV-1a 64 hash of the content of regular files.
 * Nothing that depends on the mount itself (st_dev, inode numbers, times) is printed.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <stdarg.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <unistd.h>

struct entry {
    char *path;
    char *line;
    ino_t ino;
    int linkable; /* non-directory with nlink > 1 */
};

static struct entry *entries;
static size_t n_entries, cap_entries;

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) { perror("malloc"); exit(3); }
    return p;
}

struct buf { char *s; size_t len, cap; };

static void bput(struct buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void bput(struct buf *b, const char *fmt, ...) {
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        size_t room = b->cap - b->len;
        int n = vsnprintf(b->s ? b->s + b->len : NULL, b->s ? room : 0, fmt, ap);
        va_end(ap);
        if (n < 0) { perror("vsnprintf"); exit(3); }
        if (b->s && (size_t)n < room) { b->len += (size_t)n; return; }
        size_t want = b->len + (size_t)n + 1;
        b->cap = want > 2 * b->cap ? want : 2 * b->cap;
        char *s = realloc(b->s, b->cap);
        if (!s) { perror("realloc"); exit(3); }
        b->s = s;
    }
}

static char type_of(mode_t m) {
    if (S_ISREG(m)) return 'f';
    if (S_ISDIR(m)) return 'd';
    if (S_ISLNK(m)) return 'l';
    if (S_ISCHR(m)) return 'c';
    if (S_ISBLK(m)) return 'b';
    if (S_ISFIFO(m)) return 'p';
    if (S_ISSOCK(m)) return 's';
    return '?';
}

static int cmp_names(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static void put_xattrs(struct buf *b, const char *path) {
    ssize_t n = llistxattr(path, NULL, 0);
    if (n < 0) {
        if (errno != ENOTSUP) bput(b, " xattrs=ERR:%s", strerror(errno));
        return;
    }
    if (n == 0) return;
    char *names = xmalloc((size_t)n);
    n = llistxattr(path, names, (size_t)n);
    if (n < 0) { bput(b, " xattrs=ERR:%s", strerror(errno)); free(names); return; }
    size_t count = 0;
    for (ssize_t i = 0; i < n; i += (ssize_t)strlen(names + i) + 1) count++;
    char **sorted = xmalloc(count * sizeof *sorted);
    size_t k = 0;
    for (ssize_t i = 0; i < n; i += (ssize_t)strlen(names + i) + 1) sorted[k++] = names + i;
    qsort(sorted, count, sizeof *sorted, cmp_names);
    for (k = 0; k < count; k++) {
        ssize_t vn = lgetxattr(path, sorted[k], NULL, 0);
        if (vn < 0) { bput(b, " x:%s=ERR:%s", sorted[k], strerror(errno)); continue; }
        unsigned char *v = xmalloc((size_t)vn);
        vn = lgetxattr(path, sorted[k], v, (size_t)vn);
        bput(b, " x:%s=", sorted[k]);
        for (ssize_t j = 0; j < vn; j++) bput(b, "%02x", v[j]);
        free(v);
    }
    free(sorted);
    free(names);
}

static void put_hash(struct buf *b, const char *path) {
    int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) { bput(b, " hash=ERR:%s", strerror(errno)); return; }
    uint64_t h = 1469598103934665603ULL;
    static unsigned char chunk[1 << 16];
    ssize_t r;
    while ((r = read(fd, chunk, sizeof chunk)) > 0)
        for (ssize_t i = 0; i < r; i++) { h ^= chunk[i]; h *= 1099511628211ULL; }
    if (r < 0) bput(b, " hash=ERR:%s", strerror(errno));
    else bput(b, " hash=%016llx", (unsigned long long)h);
    close(fd);
}

static void visit(const char *path) {
    struct stat st;
    struct buf b = {0};
    if (lstat(path, &st) != 0) {
        bput(&b, "%s missing:%s", path, strerror(errno));
    } else {
        bput(&b, "%s %c mode=%04o uid=%u gid=%u nlink=%lu size=%lld", path, type_of(st.st_mode),
             (unsigned)(st.st_mode & 07777), (unsigned)st.st_uid, (unsigned)st.st_gid,
             (unsigned long)st.st_nlink, (long long)st.st_size);
        if (S_ISREG(st.st_mode))
            bput(&b, " sparse=%d", (long long)st.st_blocks * 512 < (long long)st.st_size);
        if (S_ISCHR(st.st_mode) || S_ISBLK(st.st_mode))
            bput(&b, " rdev=%u:%u", major(st.st_rdev), minor(st.st_rdev));
        if (S_ISLNK(st.st_mode)) {
            char target[4097];
            ssize_t n = readlink(path, target, sizeof target - 1);
            target[n < 0 ? 0 : n] = 0;
            bput(&b, " target=%s", target);
        }
        put_xattrs(&b, path);
        if (S_ISREG(st.st_mode)) put_hash(&b, path);
    }
    if (n_entries == cap_entries) {
        cap_entries = cap_entries ? 2 * cap_entries : 256;
        entries = realloc(entries, cap_entries * sizeof *entries);
        if (!entries) { perror("realloc"); exit(3); }
    }
    entries[n_entries++] = (struct entry){strdup(path), b.s, st.st_ino,
                                          !S_ISDIR(st.st_mode) && st.st_nlink > 1};
    if (!S_ISDIR(st.st_mode)) return;
    DIR *d = opendir(path);
    if (!d) return;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..")) continue;
        size_t len = strlen(path) + strlen(de->d_name) + 2;
        char *child = xmalloc(len);
        snprintf(child, len, "%s%s%s", path, path[strlen(path) - 1] == '/' ? "" : "/", de->d_name);
        visit(child);
        free(child);
    }
    closedir(d);
}

static int cmp_entries(const void *a, const void *b) {
    return strcmp(((const struct entry *)a)->path, ((const struct entry *)b)->path);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s PATH...\n", argv[0]);
        return 2;
    }
    for (int i = 1; i < argc; i++) visit(argv[i]);
    qsort(entries, n_entries, sizeof *entries, cmp_entries);
    for (size_t i = 0; i < n_entries; i++) {
        fputs(entries[i].line, stdout);
        if (entries[i].linkable)
            for (size_t j = 0; j < n_entries; j++)
                if (entries[j].linkable && entries[j].ino == entries[i].ino) {
                    printf(" hardlink=%s", entries[j].path);
                    break;
                }
        putchar('\n');
    }
    return 0;
}
