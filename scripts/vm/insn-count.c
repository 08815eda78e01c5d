/* scripts/vm/insn-count.c: a QEMU TCG plugin (plugin API version 1, QEMU 7.2) that counts the
 * guest instructions executed, per translation block start address, and writes
 * "vaddr n_insns executions" lines (hex, decimal, decimal) to out=FILE when QEMU exits.
 * Used by scripts/vm-insn-profile. The declarations below are the few entry points of QEMU's
 * plugin API it calls (QEMU exports them to plugins; see QEMU's docs/devel/tcg-plugins.rst).
 * Counts are per TB execution, added inline (not atomically: with several vCPUs busy at once a
 * few increments may be lost; the profiled program runs on one). */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define EXPORT __attribute__((visibility("default")))
typedef uint64_t qemu_plugin_id_t;
struct qemu_plugin_tb;
struct qemu_info_t;
void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t,
                                           void (*)(qemu_plugin_id_t, struct qemu_plugin_tb *));
void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *, int op, void *ptr,
                                              uint64_t imm);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *);
uint64_t qemu_plugin_tb_vaddr(const struct qemu_plugin_tb *);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t, void (*)(qemu_plugin_id_t, void *),
                                    void *);
enum { INLINE_ADD_U64 = 0 };
EXPORT int qemu_plugin_version = 1;

struct block {
    uint64_t vaddr, insns, count;
};
static struct block **blocks;
static size_t nblocks, cap;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static const char *out_path = "insn-count.txt";

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb) {
    (void)id;
    struct block *b = calloc(1, sizeof *b);
    if (!b) return;
    b->vaddr = qemu_plugin_tb_vaddr(tb);
    b->insns = qemu_plugin_tb_n_insns(tb);
    pthread_mutex_lock(&lock);
    if (nblocks == cap) {
        size_t ncap = cap ? cap * 2 : 65536;
        struct block **nb = realloc(blocks, ncap * sizeof *nb);
        if (!nb) { pthread_mutex_unlock(&lock); free(b); return; }
        blocks = nb, cap = ncap;
    }
    blocks[nblocks++] = b;
    pthread_mutex_unlock(&lock);
    qemu_plugin_register_vcpu_tb_exec_inline(tb, INLINE_ADD_U64, &b->count, 1);
}

static void on_qemu_exit(qemu_plugin_id_t id, void *p) {
    (void)id, (void)p;
    FILE *f = fopen(out_path, "w");
    if (!f) { perror(out_path); return; }
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < nblocks; i++)
        if (blocks[i]->count)
            fprintf(f, "%llx %llu %llu\n", (unsigned long long)blocks[i]->vaddr,
                    (unsigned long long)blocks[i]->insns, (unsigned long long)blocks[i]->count);
    pthread_mutex_unlock(&lock);
    fclose(f);
}

EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const struct qemu_info_t *info, int argc,
                               char **argv) {
    (void)info;
    for (int i = 0; i < argc; i++)
        if (!strncmp(argv[i], "out=", 4)) out_path = argv[i] + 4;
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    qemu_plugin_register_atexit_cb(id, on_qemu_exit, NULL);
    return 0;
}
