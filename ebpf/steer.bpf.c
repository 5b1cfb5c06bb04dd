// SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0)
/*
 * corral's connection steering: an sk_reuseport program attached to an app's SO_REUSEPORT
 * group (one listening socket per worker slot).
 *
 *   - A connection from a probe source port reaches exactly the slot it names, ready or not.
 *   - Any other connection goes to a ready ("eligible") slot: least-loaded takes the slot with
 *     the fewest open connections (counted live by the tracker below, plus those picked and still
 *     in their handshake, so a burst does not herd onto one slot) of all ready slots, up to
 *     CORRAL_FULL_SCAN of them, ties to the one picked least since the agent's last publish; of a
 *     larger set, the less loaded of two random ones. Or round-robin.
 *   - The shared policy sends every connection to entry 0: one socket, one accept queue, which
 *     every worker accepts from (workers that serve one request at a time).
 *   - A select that fails tries the other candidate, then the next slots; if nothing works the
 *     program returns SK_PASS without a selection and the kernel hashes. It never drops: a
 *     dropped SYN is a reset for the client.
 *   - The migrate variant (kernel 5.14+) also runs when a listener closes with connections in
 *     its queue, and moves each of them to an eligible slot instead of resetting it.
 *   - The connection tracker (a raw tracepoint on inet_sock_set_state) counts each slot's
 *     connections from handshake to the server's close: queued plus being served. This is the
 *     load that sees a worker that accepts everything at once (an asyncio loop, a gthread
 *     acceptor) and is busy, which its accept queue, always empty, does not show.
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "steer.h"

struct {
	__uint(type, BPF_MAP_TYPE_REUSEPORT_SOCKARRAY);
	__uint(max_entries, CORRAL_MAX_SLOTS);
	__type(key, __u32);
	__type(value, __u32);
} socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct corral_config);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, struct corral_eligible);
} eligible SEC(".maps");

/* Per slot: the load the agent published (its listener's accept-queue length). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, CORRAL_MAX_SLOTS);
	__type(key, __u32);
	__type(value, __u32);
} load SEC(".maps");

/* Per slot: the picks of the current window (struct corral_window, see epoch_at); a window of
 * an older epoch counts as empty and the first pick of a new one resets it, so nobody has to
 * zero them. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, CORRAL_MAX_SLOTS);
	__type(key, __u32);
	__type(value, struct corral_window);
} window SEC(".maps");

/* Connections steered by this program, from the SYN until the server closes them. Each counted
 * entry is uncounted exactly once, when it closes, also after a worker died or its queue
 * migrated (the count stays with the slot that first took it). An LRU map, so a SYN flood
 * cannot fill it: only an eviction of a counted entry (more than max_entries connections
 * open at once) leaves its slot's count one high. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct corral_conn_key);
	__type(value, struct corral_conn);
} conns SEC(".maps");

/* Per slot: established connections not yet closed by the server (in the accept queue or
 * accepted and open). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, CORRAL_MAX_SLOTS);
	__type(key, __u32);
	__type(value, __u32);
} inflight SEC(".maps");

/* Per slot: the sum of the `established` times of its counted connections, so the program can
 * tell how long its open connections have been open altogether: of two slots with as many, the
 * one whose connections are younger is more likely to be through them soon (a worker whose one
 * connection has been open for 10 ms is likely in a long request; one opened 0.2 ms ago, in a
 * short one). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, CORRAL_MAX_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} since SEC(".maps");

/* Per slot: the previous agent's connections, still open (see struct corral_carried). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, CORRAL_MAX_SLOTS);
	__type(key, __u32);
	__type(value, struct corral_carried);
} carried SEC(".maps");

/* Round-robin position, per CPU: each CPU rotates through the set on its own. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} rr SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct corral_stats);
} stats SEC(".maps");

/* Per slot, per CPU: connections steered to it (probes excluded). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, CORRAL_MAX_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} slot_picks SEC(".maps");

/* barrier_var (bpf_helpers.h) keeps clang from folding the bound into address arithmetic the
 * verifier cannot follow. */
static __always_inline __u32 slot_at(const struct corral_eligible *set, __u32 i)
{
	i &= CORRAL_MAX_SLOTS - 1;
	barrier_var(i);
	if (i >= CORRAL_MAX_SLOTS)
		return 0;
	return set->slots[i];
}

static __always_inline int try_slot(struct sk_reuseport_md *ctx, __u32 slot)
{
	__u32 key = slot & (CORRAL_MAX_SLOTS - 1);

	return bpf_sk_select_reuseport(ctx, &socks, &key, 0);
}

/* A counter that wrapped below zero (a decrement racing the agent's reset) counts as 0, so its
 * slot never looks saturated. */
static __always_inline __u32 counter(void *map, __u32 key)
{
	__u32 *v = bpf_map_lookup_elem(map, &key);

	return v && *v < 0x80000000u ? *v : 0;
}

/* The previous agent's open connections on `slot` (0 when there are none). */
static __always_inline __u32 carried_count(__u32 key)
{
	struct corral_carried *c = bpf_map_lookup_elem(&carried, &key);

	return c && c->inflight < 0x80000000u ? c->inflight : 0;
}

/* The window of picks at `now`. With the tracker, 2^22 ns (4.2 ms) of the kernel's monotonic
 * clock: a pick leaves its window when its connection is established, so only a SYN that never
 * completes stays, and for at most one window; the agent need not publish anything for windows
 * to turn, and ticks slowly. Without the tracker, the agent's publish epoch: the picks then
 * complete the accept-queue load it published. */
static __always_inline __u32 epoch_at(const struct corral_config *cfg, __u64 now)
{
	return cfg->tracking ? (__u32)(now >> 22) : cfg->epoch;
}

/* `slot`'s window if it is `epoch`'s, else NULL (no picks in this window yet). */
static __always_inline struct corral_window *current_window(__u32 epoch, __u32 key)
{
	struct corral_window *w = bpf_map_lookup_elem(&window, &key);

	return w && w->epoch == epoch ? w : NULL;
}

/* A window's count; one that wrapped below zero (a decrement racing a window's start on
 * another CPU) counts as 0, so its slot never looks saturated. */
static __always_inline __u32 window_count(__u32 v)
{
	return v < 0x80000000u ? v : 0;
}

/* Picks of `slot` in this window not yet established (with the tracker) or all of them. */
static __always_inline __u32 pending_picks(__u32 epoch, __u32 key)
{
	struct corral_window *w = current_window(epoch, key);

	return w ? window_count(w->picks) : 0;
}

static __always_inline __u32 score(const struct corral_config *cfg, __u32 epoch, __u32 slot)
{
	__u32 key = slot & (CORRAL_MAX_SLOTS - 1);

	if (cfg->tracking)
		return counter(&inflight, key) + carried_count(key) + pending_picks(epoch, key);
	return counter(&load, key) + pending_picks(epoch, key);
}

/* How long `slot`'s counted connections (the previous agent's too) have been open, summed, at
 * `now`; 0 without the tracker. */
static __always_inline __u64 open_age(const struct corral_config *cfg, __u32 slot, __u64 now)
{
	__u32 key = slot & (CORRAL_MAX_SLOTS - 1);
	__u64 *sum = bpf_map_lookup_elem(&since, &key);
	struct corral_carried *c = bpf_map_lookup_elem(&carried, &key);
	__u64 n = counter(&inflight, key), total, opened;

	if (!cfg->tracking || !sum)
		return 0;
	opened = *sum;
	if (c && c->inflight < 0x80000000u) {
		n += c->inflight;
		opened += c->since;
	}
	total = n * now;
	if (opened > total)
		return 0;
	return total - opened;
}

/* Connections sent to `slot` in this window (never taken back). */
static __always_inline __u32 recent_picks(__u32 epoch, __u32 slot)
{
	struct corral_window *w = current_window(epoch, slot & (CORRAL_MAX_SLOTS - 1));

	return w ? window_count(w->recent) : 0;
}

static __always_inline void count_pick(__u32 epoch, __u32 slot)
{
	__u32 key = slot & (CORRAL_MAX_SLOTS - 1);
	struct corral_window *w = bpf_map_lookup_elem(&window, &key);
	__u64 *s = bpf_map_lookup_elem(&slot_picks, &key);

	if (w) {
		/* The first pick of an epoch starts its window. Two CPUs starting it at once may
		 * lose one pick's count for that window: a tie-break that much off. */
		if (w->epoch != epoch) {
			w->picks = 0;
			w->recent = 0;
			w->epoch = epoch;
		}
		__sync_fetch_and_add(&w->picks, 1);
		__sync_fetch_and_add(&w->recent, 1);
	}
	if (s)
		*s += 1;
}

/* Remember which slot this SYN went to, for the connection tracker. */
static __always_inline void track(struct sk_reuseport_md *ctx, __u32 epoch, __u32 slot)
{
	struct corral_conn_key key = {};
	struct corral_conn conn = { .slot = slot, .counted = 0, .epoch = epoch };
	__u16 ports[2];

	if (bpf_skb_load_bytes(ctx, 0, ports, sizeof(ports)))
		return;
	key.remote_port = ports[0];
	key.local_port = bpf_ntohs(ports[1]);
	/* IPv4: the source address is at offset 12 of the network header. */
	if (ctx->eth_protocol == bpf_htons(0x0800) &&
	    bpf_skb_load_bytes_relative(ctx, 12, &key.remote_addr, 4, BPF_HDR_START_NET))
		return;
	bpf_map_update_elem(&conns, &key, &conn, BPF_ANY);
}

static __always_inline int steer(struct sk_reuseport_md *ctx, int migrating)
{
	__u32 zero = 0;
	struct corral_config *cfg = bpf_map_lookup_elem(&config, &zero);
	struct corral_stats *st = bpf_map_lookup_elem(&stats, &zero);
	struct corral_eligible *set;
	__u32 n, first, second, start, i, active, epoch, the_pick = 0;
	__u64 now = bpf_ktime_get_ns();

	if (!cfg || !st)
		return SK_PASS;
	epoch = epoch_at(cfg, now);

	if (cfg->policy == CORRAL_POLICY_SHARED) {
		/* Ready or not, every worker accepts from this one queue; a starting worker takes
		 * nothing until it accepts. */
		if (try_slot(ctx, 0) != 0) {
			st->select_errors++;
			st->fallbacks++;
			return SK_PASS;
		}
		the_pick = 0;
		goto selected;
	}

	if (!migrating) {
		__u16 sport_be;

		/* ctx->data is the TCP header: the source port is its first two bytes. */
		if (bpf_skb_load_bytes(ctx, 0, &sport_be, sizeof(sport_be)) == 0) {
			__u32 port = bpf_ntohs(sport_be);

			if (port >= cfg->probe_base && port - cfg->probe_base < cfg->probe_count &&
			    try_slot(ctx, port - cfg->probe_base) == 0) {
				st->probes++;
				return SK_PASS;
			}
		}
	}

	active = cfg->active & 1;
	set = bpf_map_lookup_elem(&eligible, &active);
	if (!set)
		return SK_PASS;
	n = set->count;
	if (n == 0) {
		st->no_eligible++;
		return SK_PASS;
	}
	if (n > CORRAL_MAX_SLOTS)
		n = CORRAL_MAX_SLOTS;

	if (cfg->policy == CORRAL_POLICY_ROUND_ROBIN) {
		__u32 *counter = bpf_map_lookup_elem(&rr, &zero);

		start = 0;
		if (counter) {
			start = *counter % n;
			*counter = start + 1;
		}
		first = slot_at(set, start);
		second = slot_at(set, (start + 1) % n);
	} else if (n <= CORRAL_FULL_SCAN) {
		/* Every ready slot, from a random one on, so equal slots take turns. Of slots with as
		 * many connections, the one whose open connections are younger (more likely through
		 * them soon); on a full tie (common when workers keep up: all 0), the slot sent fewer
		 * connections in this window of picks: even within a few ms, without a long memory
		 * that would make a slow worker catch up later. */
		__u64 best_age, age;
		__u32 best_score, best_recent;

		start = bpf_get_prandom_u32() % n;
		first = slot_at(set, start);
		second = first;
		best_score = score(cfg, epoch, first);
		best_age = open_age(cfg, first, now);
		best_recent = recent_picks(epoch, first);
		for (i = 1; i < CORRAL_FULL_SCAN; i++) {
			__u32 slot, sc, rc;

			if (i >= n)
				break;
			slot = slot_at(set, (start + i) % n);
			sc = score(cfg, epoch, slot);
			if (sc > best_score)
				continue;
			age = open_age(cfg, slot, now);
			rc = recent_picks(epoch, slot);
			if (sc == best_score &&
			    (age > best_age || (age == best_age && rc >= best_recent)))
				continue;
			second = first;
			first = slot;
			best_score = sc;
			best_age = age;
			best_recent = rc;
		}
	} else {
		__u32 a = bpf_get_prandom_u32() % n;
		__u32 b = n > 1 ? (a + 1 + bpf_get_prandom_u32() % (n - 1)) % n : a;
		__u32 sa = slot_at(set, a);
		__u32 sb = slot_at(set, b);

		__u32 score_a = score(cfg, epoch, sa), score_b = score(cfg, epoch, sb);

		if (score_b < score_a ||
		    (score_b == score_a && recent_picks(epoch, sb) < recent_picks(epoch, sa))) {
			first = sb;
			second = sa;
		} else {
			first = sa;
			second = sb;
		}
		start = a;
	}

	if (try_slot(ctx, first) == 0) {
		the_pick = first;
		goto selected;
	}
	st->select_errors++;
	if (second != first && try_slot(ctx, second) == 0) {
		the_pick = second;
		goto selected;
	}
	/* Both candidates failed (a worker just died, its socket is gone): walk the set. */
	for (i = 0; i < 16 && i < n; i++) {
		__u32 slot = slot_at(set, (start + i) % n);

		if (slot == first || slot == second)
			continue;
		if (try_slot(ctx, slot) == 0) {
			the_pick = slot;
			goto selected;
		}
		st->select_errors++;
	}
	st->fallbacks++;
	return SK_PASS;

selected:
	count_pick(epoch, the_pick);
	st->selected++;
	if (migrating)
		st->migrations++;
	else
		track(ctx, epoch, the_pick);
	return SK_PASS;
}

SEC("sk_reuseport")
int corral_select(struct sk_reuseport_md *ctx)
{
	return steer(ctx, 0);
}

SEC("sk_reuseport/migrate")
int corral_select_or_migrate(struct sk_reuseport_md *ctx)
{
	return steer(ctx, ctx->migrating_sk != 0);
}

/* The head of struct sock_common (include/net/sock.h), unchanged since Linux 2.6: the
 * addresses and ports of the connection and its family. */
struct sock_common_head {
	__u32 daddr;     /* skc_daddr: remote IPv4 address */
	__u32 rcv_saddr; /* skc_rcv_saddr */
	__u32 hash;      /* skc_hash */
	__u16 dport;     /* skc_dport: remote port, network order */
	__u16 num;       /* skc_num: local port, host order */
	__u16 family;    /* skc_family */
};

#define CORRAL_AF_INET 2
#define CORRAL_TCP_ESTABLISHED 1
#define CORRAL_TCP_SYN_RECV 3
#define CORRAL_TCP_FIN_WAIT1 4
#define CORRAL_TCP_CLOSE 7
#define CORRAL_TCP_CLOSE_WAIT 8
#define CORRAL_TCP_LAST_ACK 9

/* TP_PROTO(const struct sock *sk, const int oldstate, const int newstate) */
SEC("raw_tracepoint/inet_sock_set_state")
int corral_conn_state(struct bpf_raw_tracepoint_args *ctx)
{
	__u32 zero = 0;
	struct corral_config *cfg = bpf_map_lookup_elem(&config, &zero);
	struct corral_stats *st = bpf_map_lookup_elem(&stats, &zero);
	struct sock_common_head h;
	struct corral_conn_key key = {};
	struct corral_conn *conn;
	int oldstate = (int)ctx->args[1];
	int newstate = (int)ctx->args[2];
	__u32 slot;
	__u32 *n;
	__u64 *sum;

	/* Tracking off (the agent could not attach the tracker everywhere, or was told so): count
	 * nothing, so a window's picks keep their meaning of picks since the last publish. */
	if (!cfg || !st || !cfg->tracking)
		return 0;
	if (newstate != CORRAL_TCP_ESTABLISHED && newstate != CORRAL_TCP_FIN_WAIT1 &&
	    newstate != CORRAL_TCP_LAST_ACK && newstate != CORRAL_TCP_CLOSE)
		return 0;
	/* A close after FIN_WAIT1 or LAST_ACK (through FIN_WAIT2, CLOSING, TIME_WAIT) was
	 * uncounted then: only a close straight from a live state (a reset, a connection never
	 * accepted) is looked up, which spares every connection's last run its hash lookup. */
	if (newstate == CORRAL_TCP_CLOSE && oldstate != CORRAL_TCP_ESTABLISHED &&
	    oldstate != CORRAL_TCP_SYN_RECV && oldstate != CORRAL_TCP_CLOSE_WAIT)
		return 0;
	if (bpf_probe_read_kernel(&h, sizeof(h), (void *)ctx->args[0]))
		return 0;
	/* A close straight from a live state (a reset, a child its listener dropped) comes after
	 * tcp_set_state has released the local port (inet_put_port zeroes skc_num): the
	 * connection is then looked up as one to this port from its remote end. Another socket
	 * of the same remote address and port closing likewise (a NAT mapping one external port
	 * to two of this host's ports) would uncount one of ours early: a count one low for a
	 * while, against a count that never came down. */
	if (h.num != cfg->port && !(h.num == 0 && newstate == CORRAL_TCP_CLOSE))
		return 0;
	key.remote_port = h.dport;
	key.local_port = cfg->port;
	if (h.family == CORRAL_AF_INET)
		key.remote_addr = h.daddr;
	conn = bpf_map_lookup_elem(&conns, &key);
	if (newstate == CORRAL_TCP_ESTABLISHED) {
		if (!conn) {
			st->untracked++;
			return 0;
		}
		if (conn->counted)
			return 0;
		conn->counted = 1;
		conn->established = bpf_ktime_get_ns();
		slot = conn->slot & (CORRAL_MAX_SLOTS - 1);
		n = bpf_map_lookup_elem(&inflight, &slot);
		if (n)
			__sync_fetch_and_add(n, 1);
		sum = bpf_map_lookup_elem(&since, &slot);
		if (sum)
			__sync_fetch_and_add(sum, conn->established);
		/* Its pick is now in `inflight`: take it back from its window (same window only). */
		if (conn->epoch == epoch_at(cfg, conn->established)) {
			struct corral_window *w = current_window(conn->epoch, slot);

			if (w)
				__sync_fetch_and_add(&w->picks, (__u32)-1);
		}
		st->tracked++;
		return 0;
	}
	/* The server closed it (FIN_WAIT1, LAST_ACK) or it ended (CLOSE: reset, or never accepted). */
	if (!conn)
		return 0;
	if (conn->counted) {
		slot = conn->slot & (CORRAL_MAX_SLOTS - 1);
		n = bpf_map_lookup_elem(&inflight, &slot);
		if (n)
			__sync_fetch_and_add(n, (__u32)-1); /* clang 14 has no BPF atomic sub */
		sum = bpf_map_lookup_elem(&since, &slot);
		if (sum)
			__sync_fetch_and_add(sum, -conn->established);
	}
	bpf_map_delete_elem(&conns, &key);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
