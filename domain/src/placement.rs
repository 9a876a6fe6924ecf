//! Where instances run: the scheduler's placement rule. The store loads the pending instances and the live nodes
//! under its lock, asks [`place`] and writes the answer; the rule itself is here so it can be checked on any input.

use uuid::Uuid;

/// An instance waiting for a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    /// Instance id.
    pub id: Uuid,
    /// The memory it reserves on its node, MiB.
    pub memory_mb: u32,
}

/// A live node and what is left of its memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Node {
    /// Node id.
    pub id: Uuid,
    /// Its memory less what its instances reserve, MiB; negative when a node came back smaller than what it
    /// still holds.
    pub free_mb: i64,
}

/// Places instances in the order given (the queue order, oldest first) on the node with the most free memory
/// that still fits each one, taking its memory off that node before the next. Ties go to the node with the
/// greatest id, so the answer depends only on the nodes, not on their order. Returns one entry per pending
/// instance, in order: its node, or `None` when no node has room for it now.
pub fn place(pending: &[Pending], nodes: &[Node]) -> Vec<Option<Uuid>> {
    let mut free: Vec<Node> = nodes.to_vec();
    pending
        .iter()
        .map(|p| {
            let need = i64::from(p.memory_mb);
            let best = free.iter_mut().filter(|n| n.free_mb >= need).max_by_key(|n| (n.free_mb, n.id))?;
            best.free_mb -= need;
            Some(best.id)
        })
        .collect()
}

/// Why an instance is still unscheduled, as its `state_reason` says.
pub fn waiting_reason(memory_mb: u32) -> String {
    format!("waiting for a node with {memory_mb} MiB free")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    fn pending(memory: &[u32]) -> Vec<Pending> {
        memory.iter().enumerate().map(|(i, m)| Pending { id: id(1000 + i as u128), memory_mb: *m }).collect()
    }

    fn nodes(free: &[i64]) -> Vec<Node> {
        free.iter().enumerate().map(|(i, f)| Node { id: id(i as u128 + 1), free_mb: *f }).collect()
    }

    #[test]
    fn each_instance_goes_to_the_node_with_the_most_free_memory_left() {
        let cases: &[(&[u32], &[i64], &[Option<u128>])] = &[
            (&[], &[1024], &[]),
            (&[256], &[], &[None]),
            (&[256], &[512, 1024], &[Some(2)]),
            // Each placement takes its memory off the node before the next instance is placed.
            (&[600, 600], &[1024, 1000], &[Some(1), Some(2)]),
            // Exactly full fits.
            (&[512, 512], &[1024], &[Some(1), Some(1)]),
            // Too big for every node waits; smaller ones behind it are still placed.
            (&[2048, 128], &[1024, 512], &[None, Some(1)]),
            // Ties go to the greatest id.
            (&[100, 100, 100], &[500, 500, 500], &[Some(3), Some(2), Some(1)]),
            // A node holding more than it has takes nothing.
            (&[1], &[-10], &[None]),
        ];
        for (memory, free, want) in cases {
            let want: Vec<Option<Uuid>> = want.iter().map(|n| n.map(id)).collect();
            assert_eq!(place(&pending(memory), &nodes(free)), want, "{memory:?} on {free:?}");
        }
    }

    #[test]
    fn the_order_of_the_nodes_does_not_matter() {
        let p = pending(&[100, 300, 100, 700]);
        let mut n = nodes(&[500, 500, 800]);
        let first = place(&p, &n);
        n.reverse();
        assert_eq!(place(&p, &n), first);
        assert_eq!(first, [Some(id(3)), Some(id(3)), Some(id(2)), None]);
    }

    #[test]
    fn the_waiting_reason_names_the_memory() {
        assert_eq!(waiting_reason(256), "waiting for a node with 256 MiB free");
    }
}
