/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/*
 * corral steering ABI: the maps shared by ebpf/steer.bpf.c and the agent. Mirrored in
 * agent/src/sys/bpf/abi.rs with compile-time size asserts: change both together and bump
 * CORRAL_ABI_VERSION.
 */
#ifndef CORRAL_STEER_H
#define CORRAL_STEER_H

#define CORRAL_ABI_VERSION 7

/* Slots per app; a power of two so `slot & (CORRAL_MAX_SLOTS - 1)` bounds array indices. */
#define CORRAL_MAX_SLOTS 1024

/* config.policy */
#define CORRAL_POLICY_LEAST_LOADED 0
#define CORRAL_POLICY_ROUND_ROBIN 1
/* Every connection, probes too, goes to the socket in entry 0, which every worker shares: one
 * accept queue for workers that serve one request at a time (an idle worker takes the next). */
#define CORRAL_POLICY_SHARED 2

/* Least-loaded scans a ready set of up to this many slots whole; a larger one compares two
 * random slots (power of two choices). */
#define CORRAL_FULL_SCAN 64

/* The one entry of the `config` map. */
struct corral_config {
	__u32 policy;
	/* Which `eligible` entry (0 or 1) the program reads; the agent fills the other and flips. */
	__u32 active;
	/* Connections from source port probe_base + n go to slot n (readiness and health probes). */
	__u32 probe_base;
	__u32 probe_count;
	/* The group's local port (host order): the connection tracker ignores other sockets. */
	__u32 port;
	/* 1 when the connection tracker is attached: the load is `inflight` + `picks`, and a pick
	 * leaves `picks` once its connection is established (and counted in `inflight`). 0: the
	 * load is the published accept queue + `picks`. */
	__u32 tracking;
	/* Bumped by the agent on each publish. Without the tracker it numbers the windows of
	 * picks (struct corral_window); with it, the kernel's clock does (steer.bpf.c, epoch_at). */
	__u32 epoch;
};

/* Per slot, the picks of the window `epoch`: a window whose epoch is not the current one counts
 * as empty, and the first pick of the new one resets it. A connection takes its pick back when
 * it is established in the window it was picked in. */
struct corral_window {
	__u32 epoch;
	/* Picks not yet established (with the tracker; without it, all of them): the connections
	 * still in their handshake, added to the slot's load. */
	__u32 picks;
	/* All picks of the window, never taken back: only for breaking ties. */
	__u32 recent;
	__u32 _pad;
};

/* A connection the program steered, as the tracker finds it again from its socket. Ports and
 * address as on the wire; IPv6 peers are keyed by port only (remote_addr 0). */
struct corral_conn_key {
	__u32 remote_addr;
	__u16 remote_port; /* network order */
	__u16 local_port;  /* host order */
};

struct corral_conn {
	__u32 slot;
	/* Set once the handshake completed and the connection was counted in `inflight`. */
	__u32 counted;
	/* config.epoch when it was picked. */
	__u32 epoch;
	__u32 _pad;
	/* bpf_ktime_get_ns() when it was counted (in its slot's `since` until it closes). */
	__u64 established;
};

/* Per slot, what a previous agent's tracker still counts (its connections opened before this
 * agent adopted the workers, and its tracker kept alive until they close): copied from that
 * tracker's `inflight` and `since` by the agent, the only writer, on each publish. */
struct corral_carried {
	__u32 inflight;
	__u32 _pad;
	__u64 since;
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
	__u64 tracked;       /* connections counted in `inflight` once established */
	__u64 untracked;     /* established connections the tracker found no pick for */
};

#endif
