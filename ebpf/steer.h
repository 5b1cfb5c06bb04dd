/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/*
 * corral steering ABI: the maps shared by ebpf/steer.bpf.c and the agent. Mirrored in
 * agent/src/sys/bpf/abi.rs with compile-time size asserts: change both together and bump
 * CORRAL_ABI_VERSION.
 */
#ifndef CORRAL_STEER_H
#define CORRAL_STEER_H

#define CORRAL_ABI_VERSION 1

/* Slots per app; a power of two so `slot & (CORRAL_MAX_SLOTS - 1)` bounds array indices. */
#define CORRAL_MAX_SLOTS 1024

/* config.policy */
#define CORRAL_POLICY_LEAST_LOADED 0
#define CORRAL_POLICY_ROUND_ROBIN 1

/* The one entry of the `config` map. */
struct corral_config {
	__u32 policy;
	/* Which `eligible` entry (0 or 1) the program reads; the agent fills the other and flips. */
	__u32 active;
	/* Connections from source port probe_base + n go to slot n (readiness and health probes). */
	__u32 probe_base;
	__u32 probe_count;
};

/* An entry of the double-buffered `eligible` map: the slots whose worker is ready. */
struct corral_eligible {
	__u32 count;
	__u32 slots[CORRAL_MAX_SLOTS];
};

/* The one entry of the per-CPU `stats` map. */
struct corral_stats {
	__u64 selected;      /* connections steered to an eligible slot */
	__u64 probes;        /* probe connections steered to their slot */
	__u64 migrations;    /* requests moved off a closing listener */
	__u64 select_errors; /* bpf_sk_select_reuseport failures (slot had no socket) */
	__u64 fallbacks;     /* nothing selectable: left to the kernel's hash */
	__u64 no_eligible;   /* no ready worker at all: left to the kernel's hash */
};

#endif
