//! Properties of the scheduler's placement rule over arbitrary queues and nodes.

use std::collections::HashMap;

use cloud_domain::placement::{Node, Pending, place};
use proptest::prelude::*;
use uuid::Uuid;

/// Memory sizes from a few common ones (so that nodes fill up exactly and tie) and anything else.
fn memory() -> impl Strategy<Value = u32> {
    prop_oneof![Just(64u32), Just(128), Just(256), Just(512), Just(1024), 1u32..4096]
}

fn queue() -> impl Strategy<Value = Vec<Pending>> {
    proptest::collection::vec(memory(), 0..40).prop_map(|m| {
        m.into_iter().enumerate().map(|(i, memory_mb)| Pending { id: Uuid::from_u128(i as u128), memory_mb }).collect()
    })
}

/// Nodes with distinct ids (as the table's key makes them), free memory often equal, sometimes negative.
fn nodes() -> impl Strategy<Value = Vec<Node>> {
    let free = prop_oneof![Just(0i64), Just(512), Just(1024), Just(4096), -512i64..8192];
    proptest::collection::btree_map(any::<u128>(), free, 0..8)
        .prop_map(|m| m.into_iter().map(|(id, free_mb)| Node { id: Uuid::from_u128(id), free_mb }).collect())
}

/// The scheduling pass as `Store::schedule_pending` wrote it in its transaction before the rule moved here: the
/// nodes as `ORDER BY n.id` returns them (PostgreSQL compares UUIDs bytewise, as `Uuid`'s `Ord` does), each instance
/// in queue order to the node `max_by_key` picks among those with room (the last of equals), its memory taken off.
fn sql_pass(pending: &[Pending], nodes: &[Node]) -> Vec<Option<Uuid>> {
    let mut nodes: Vec<(Uuid, i64)> = nodes.iter().map(|n| (n.id, n.free_mb)).collect();
    nodes.sort_by_key(|(id, _)| *id);
    let mut out = Vec::new();
    for p in pending {
        let memory = p.memory_mb as i32;
        let best = nodes.iter_mut().filter(|(_, free)| *free >= memory as i64).max_by_key(|(_, free)| *free);
        out.push(match best {
            Some((node, free)) => {
                *free -= memory as i64;
                Some(*node)
            }
            None => None,
        });
    }
    out
}

/// What each node has left after the placements.
fn left(pending: &[Pending], nodes: &[Node], placed: &[Option<Uuid>]) -> HashMap<Uuid, i64> {
    let mut left: HashMap<Uuid, i64> = nodes.iter().map(|n| (n.id, n.free_mb)).collect();
    for (p, node) in pending.iter().zip(placed) {
        if let Some(node) = node {
            *left.get_mut(node).expect("placed on a given node") -= i64::from(p.memory_mb);
        }
    }
    left
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn no_node_gets_more_than_its_free_memory(pending in queue(), nodes in nodes()) {
        let placed = place(&pending, &nodes);
        prop_assert_eq!(placed.len(), pending.len());
        let left = left(&pending, &nodes, &placed);
        for n in &nodes {
            prop_assert!(left[&n.id] >= n.free_mb.min(0), "{:?} left with {}", n, left[&n.id]);
        }
    }

    #[test]
    fn a_waiting_instance_fits_on_no_node(pending in queue(), nodes in nodes()) {
        let placed = place(&pending, &nodes);
        let left = left(&pending, &nodes, &placed);
        for (p, node) in pending.iter().zip(&placed) {
            if node.is_none() {
                prop_assert!(left.values().all(|free| *free < i64::from(p.memory_mb)), "{:?} waits: {:?}", p, left);
            }
        }
    }

    #[test]
    fn every_instance_is_placed_when_one_node_could_hold_them_all(pending in queue(), mut nodes in nodes()) {
        let total: i64 = pending.iter().map(|p| i64::from(p.memory_mb)).sum();
        let roomy = Uuid::from_u128(u128::MAX);
        nodes.retain(|n| n.id != roomy);
        nodes.push(Node { id: roomy, free_mb: total });
        prop_assert!(place(&pending, &nodes).iter().all(Option::is_some));
    }

    #[test]
    fn same_choice_as_the_sql_scheduling_pass(pending in queue(), nodes in nodes()) {
        prop_assert_eq!(place(&pending, &nodes), sql_pass(&pending, &nodes));
    }

    #[test]
    fn deterministic_whatever_the_order_of_the_nodes(
        pending in queue(),
        (nodes, shuffled) in nodes().prop_flat_map(|n| (Just(n.clone()), Just(n).prop_shuffle())),
    ) {
        let first = place(&pending, &nodes);
        prop_assert_eq!(&place(&pending, &nodes), &first);
        prop_assert_eq!(place(&pending, &shuffled), first);
    }
}
