/*
 * Test harness: parse Xen disk specs with libxlutil, the parser xl itself uses.
 *
 *   xlu_disk_harness SPEC...          parse each argument as one disk spec
 *   xlu_disk_harness --config FILE    read FILE as an xl domain config and
 *                                     parse every item of its `disk` list
 *
 * For each spec it prints a block:
 *   [N]
 *   target=...  format=...  backend=...  vdev=...  readwrite=...  (one a line)
 * and exits 1 as soon as a spec does not parse (libxlutil's message goes to
 * stderr), 2 on a usage or config error.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include <libxl.h>
#include <libxlutil.h>

static int parse_one(XLU_Config *cfg, int n, const char *spec)
{
    libxl_device_disk disk;
    int rc;

    libxl_device_disk_init(&disk);
    rc = xlu_disk_parse(cfg, 1, &spec, &disk);
    if (rc) {
        fprintf(stderr, "spec %d does not parse (errno %d): %s\n", n, rc, spec);
        libxl_device_disk_dispose(&disk);
        return 1;
    }
    printf("[%d]\n", n);
    printf("target=%s\n", disk.pdev_path ? disk.pdev_path : "");
    printf("format=%s\n", libxl_disk_format_to_string(disk.format));
    printf("backend=%s\n", libxl_disk_backend_to_string(disk.backend));
    printf("vdev=%s\n", disk.vdev ? disk.vdev : "");
    printf("readwrite=%d\n", disk.readwrite);
    libxl_device_disk_dispose(&disk);
    return 0;
}

int main(int argc, char **argv)
{
    XLU_Config *cfg = xlu_cfg_init(stderr, "xlu_disk_harness");
    int i, n = 0;

    if (!cfg) {
        perror("xlu_cfg_init");
        return 2;
    }
    if (argc == 3 && !strcmp(argv[1], "--config")) {
        XLU_ConfigList *list;
        const char *item;

        if (xlu_cfg_readfile(cfg, argv[2])) {
            fprintf(stderr, "config %s does not parse\n", argv[2]);
            return 2;
        }
        if (xlu_cfg_get_list(cfg, "disk", &list, &n, 0)) {
            fprintf(stderr, "config %s has no disk list\n", argv[2]);
            return 2;
        }
        for (i = 0; i < n; i++) {
            item = xlu_cfg_get_listitem(list, i);
            if (!item || parse_one(cfg, i, item))
                return 1;
        }
    } else {
        for (i = 1; i < argc; i++)
            if (parse_one(cfg, i - 1, argv[i]))
                return 1;
    }
    fflush(stdout);
    xlu_cfg_destroy(cfg);
    return 0;
}
