// SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0)
/*
 * corral's connection steering: an sk_reuseport program attached to an app's SO_REUSEPORT
 * group (one listening socket per worker slot).
 *
 *   - A connection from a probe source port reaches exactly the slot it names, ready or not.
 *   - Any other connection goes to a ready ("eligible") slot: the less loaded of two random
 *     ones (power of two choices) on the load the agent publishes plus the picks made since, so
 *     a stale load does not make every CPU herd onto one slot; or round-robin.
 *   - A select that fails tries the other candidate, then the next slots; if nothing works the
 *     program returns SK_PASS without a selection and the kernel hashes. It never drops: a
 *     dropped SYN is a reset for the client.
 *   - The migrate variant (kernel 5.14+) also runs when a listener closes with connections in
 *     its queue, and moves each of them to an eligible slot instead of resetting it.
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

/* Per slot: picks since the agent last published `load` (it zeroes them when it does). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, CORRAL_MAX_SLOTS);
	__type(key, __u32);
	__type(value, __u32);
} picks SEC(".maps");

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

static __always_inline __u32 score(__u32 slot)
{
	__u32 key = slot & (CORRAL_MAX_SLOTS - 1);
	__u32 *l = bpf_map_lookup_elem(&load, &key);
	__u32 *p = bpf_map_lookup_elem(&picks, &key);

	return (l ? *l : 0) + (p ? *p : 0);
}

static __always_inline void count_pick(__u32 slot)
{
	__u32 key = slot & (CORRAL_MAX_SLOTS - 1);
	__u32 *p = bpf_map_lookup_elem(&picks, &key);
	__u64 *s = bpf_map_lookup_elem(&slot_picks, &key);

	if (p)
		__sync_fetch_and_add(p, 1);
	if (s)
		*s += 1;
}

static __always_inline int steer(struct sk_reuseport_md *ctx, int migrating)
{
	__u32 zero = 0;
	struct corral_config *cfg = bpf_map_lookup_elem(&config, &zero);
	struct corral_stats *st = bpf_map_lookup_elem(&stats, &zero);
	struct corral_eligible *set;
	__u32 n, first, second, start, i, active;

	if (!cfg || !st)
		return SK_PASS;

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
	} else {
		__u32 a = bpf_get_prandom_u32() % n;
		__u32 b = n > 1 ? (a + 1 + bpf_get_prandom_u32() % (n - 1)) % n : a;
		__u32 sa = slot_at(set, a);
		__u32 sb = slot_at(set, b);

		if (score(sb) < score(sa)) {
			first = sb;
			second = sa;
		} else {
			first = sa;
			second = sb;
		}
		start = a;
	}

	if (try_slot(ctx, first) == 0) {
		count_pick(first);
		goto selected;
	}
	st->select_errors++;
	if (second != first && try_slot(ctx, second) == 0) {
		count_pick(second);
		goto selected;
	}
	/* Both candidates failed (a worker just died, its socket is gone): walk the set. */
	for (i = 0; i < 16 && i < n; i++) {
		__u32 slot = slot_at(set, (start + i) % n);

		if (slot == first || slot == second)
			continue;
		if (try_slot(ctx, slot) == 0) {
			count_pick(slot);
			goto selected;
		}
		st->select_errors++;
	}
	st->fallbacks++;
	return SK_PASS;

selected:
	st->selected++;
	if (migrating)
		st->migrations++;
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

char LICENSE[] SEC("license") = "Dual BSD/GPL";
