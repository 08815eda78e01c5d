/* The SPDK headers rio binds to (rio-spdk-sys/build.rs allows only what rio uses through). */
#include <spdk/stdinc.h>
#include <spdk/env.h>
#include <spdk/nvme.h>
#include <spdk/log.h>
