//! The fixed reduction tree that makes a step's gradient independent of who computes it.
//!
//! Each global batch is cut into micro-batches ("leaves"). Their gradients are summed along
//! one fixed binary tree over the leaves (a node `[lo, hi)` is the sum of `[lo, mid)` and
//! `[mid, hi)`, `mid = (lo + hi) / 2`). A worker given a contiguous range of leaves returns the
//! sums of the canonical nodes that tile its range ([`decompose`]); the coordinator completes
//! the tree from those with the additions of [`combine`], block by block as its SGD step reads
//! the gradient ([`TreeSum`]). Float addition is commutative, so every addition on the
//! path from leaves to root has the same operands whichever worker ran it: 1, 2 or 3 workers
//! give bit-identical sums.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::ops::Range;

/// A node of the tree: leaves `[lo, hi)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Node {
    pub lo: u32,
    pub hi: u32,
}

impl Node {
    pub const fn new(lo: u32, hi: u32) -> Self {
        Node { lo, hi }
    }

    /// The root of a tree with `leaves` leaves.
    pub const fn root(leaves: u32) -> Self {
        Node { lo: 0, hi: leaves }
    }

    pub fn children(self) -> Option<(Node, Node)> {
        (self.hi - self.lo > 1).then(|| {
            let mid = (self.lo + self.hi) / 2;
            (Node::new(self.lo, mid), Node::new(mid, self.hi))
        })
    }

    pub fn range(self) -> Range<u32> {
        self.lo..self.hi
    }
}

/// The canonical nodes of the tree under `root` that tile `range`, left to right.
pub fn decompose(root: Node, range: Range<u32>) -> Vec<Node> {
    let mut out = Vec::new();
    fn walk(node: Node, range: &Range<u32>, out: &mut Vec<Node>) {
        if range.end <= node.lo || node.hi <= range.start {
            return;
        }
        if range.start <= node.lo && node.hi <= range.end {
            out.push(node);
            return;
        }
        if let Some((l, r)) = node.children() {
            walk(l, range, out);
            walk(r, range, out);
        }
    }
    walk(root, &range, &mut out);
    out
}

/// The sum at `node`, built from the sums in `have` (consumed) along the tree. `None` when some
/// leaf under `node` is covered by nothing in `have`.
pub fn combine(node: Node, have: &mut BTreeMap<Node, Vec<f32>>) -> Option<Vec<f32>> {
    combine_by(node, have, &mut |mut left: Vec<f32>, right: Vec<f32>| {
        for (a, b) in left.iter_mut().zip(&right) {
            *a += b;
        }
        left
    })
}

/// [`combine`] for any kind of value (a device tensor, say), with `add(left, right)`.
pub fn combine_by<T>(
    node: Node,
    have: &mut BTreeMap<Node, T>,
    add: &mut impl FnMut(T, T) -> T,
) -> Option<T> {
    if let Some(v) = have.remove(&node) {
        return Some(v);
    }
    let (l, r) = node.children()?;
    let left = combine_by(l, have, add)?;
    let right = combine_by(r, have, add)?;
    Some(add(left, right))
}

/// The sum at `root` of the node sums that cover it, left unadded: a pass over the gradient reads
/// it block by block ([`crate::sgd::Gradient`]), each block's sum added along the tree as
/// [`combine`] adds it (the same bits) while it is in cache. So the coordinator's step reads
/// each worker's node once and never writes a 13 MB sum to read it again.
#[derive(Debug, Clone, PartialEq)]
pub struct TreeSum {
    root: Node,
    nodes: BTreeMap<Node, Vec<f32>>,
    len: usize,
}

impl TreeSum {
    /// The sum at `root` of `nodes`; `None` when some leaf under `root` is covered by nothing
    /// in `nodes` or their lengths differ.
    pub fn new(root: Node, nodes: BTreeMap<Node, Vec<f32>>) -> Option<Self> {
        fn covered(node: Node, nodes: &BTreeMap<Node, Vec<f32>>) -> bool {
            nodes.contains_key(&node)
                || node
                    .children()
                    .is_some_and(|(l, r)| covered(l, nodes) && covered(r, nodes))
        }
        let len = nodes.values().next()?.len();
        (covered(root, &nodes) && nodes.values().all(|v| v.len() == len)).then_some(TreeSum {
            root,
            nodes,
            len,
        })
    }

    /// The whole sum, as [`combine`] gives it.
    pub fn to_vec(&self) -> Vec<f32> {
        self.at(self.root, 0..self.len).into_owned()
    }

    /// The sum at `node` of `range` of the values.
    fn at(&self, node: Node, range: Range<usize>) -> Cow<'_, [f32]> {
        if let Some(v) = self.nodes.get(&node) {
            return Cow::Borrowed(&v[range]);
        }
        let (l, r) = node.children().expect("covered: checked by TreeSum::new");
        let (left, right) = (self.at(l, range.clone()), self.at(r, range));
        match left {
            // A sum made below: added into in place, as `combine` does.
            Cow::Owned(mut sum) => {
                for (a, b) in sum.iter_mut().zip(right.iter()) {
                    *a += b;
                }
                Cow::Owned(sum)
            }
            // A worker's node: the sum written once, not copied and then added to.
            Cow::Borrowed(node) => {
                Cow::Owned(node.iter().zip(right.iter()).map(|(a, b)| a + b).collect())
            }
        }
    }
}

impl crate::sgd::Gradient for TreeSum {
    fn len(&self) -> usize {
        self.len
    }

    fn blocks(&self, block: usize, each: &mut dyn FnMut(usize, &[f32])) {
        for start in (0..self.len).step_by(block) {
            each(
                start,
                &self.at(self.root, start..(start + block).min(self.len)),
            );
        }
    }
}

/// Cuts `leaves` into at most `parts` contiguous, near-equal ranges.
pub fn partition(leaves: u32, parts: u32) -> Vec<Range<u32>> {
    let parts = parts.clamp(1, leaves.max(1));
    (0..parts)
        .map(|i| (leaves * i / parts)..(leaves * (i + 1) / parts))
        .filter(|r| !r.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_whole_tree_decomposes_into_its_root() {
        assert_eq!(decompose(Node::root(4), 0..4), vec![Node::root(4)]);
    }

    #[test]
    fn an_unaligned_range_decomposes_into_canonical_nodes() {
        assert_eq!(
            decompose(Node::root(8), 1..6),
            vec![Node::new(1, 2), Node::new(2, 4), Node::new(4, 6)]
        );
    }

    #[test]
    fn partitions_cover_every_leaf_once() {
        for leaves in 1..20 {
            for parts in 1..8 {
                let p = partition(leaves, parts);
                let flat: Vec<u32> = p.iter().flat_map(|r| r.clone()).collect();
                assert_eq!(flat, (0..leaves).collect::<Vec<_>>());
            }
        }
    }

    fn leaf_values(n: u32) -> Vec<Vec<f32>> {
        // Values whose float sums depend on the order of addition.
        (0..n)
            .map(|i| {
                (0..5)
                    .map(|j| 1.0 / (1.0 + i as f32 * 7.0 + j as f32))
                    .map(|x| x * 1e3f32.powi(i as i32 % 3))
                    .collect()
            })
            .collect()
    }

    /// The node sums `workers` workers send for `leaves`, as the coordinator holds them.
    fn at_coordinator(workers: u32, leaves: &[Vec<f32>]) -> BTreeMap<Node, Vec<f32>> {
        let root = Node::root(leaves.len() as u32);
        let mut nodes = BTreeMap::new();
        for range in partition(root.hi, workers) {
            for node in decompose(root, range) {
                let mut at_worker: BTreeMap<Node, Vec<f32>> = node
                    .range()
                    .map(|i| (Node::new(i, i + 1), leaves[i as usize].clone()))
                    .collect();
                nodes.insert(node, combine(node, &mut at_worker).unwrap());
            }
        }
        nodes
    }

    fn sum_with(workers: u32, leaves: &[Vec<f32>]) -> Vec<f32> {
        let root = Node::root(leaves.len() as u32);
        combine(root, &mut at_coordinator(workers, leaves)).unwrap()
    }

    #[test]
    fn any_number_of_workers_gives_bit_identical_sums() {
        for n in 1..12 {
            let leaves = leaf_values(n);
            let one = sum_with(1, &leaves);
            for w in 2..6 {
                assert_eq!(one, sum_with(w, &leaves), "{n} leaves, {w} workers");
            }
        }
    }

    #[test]
    fn a_missing_leaf_leaves_the_root_incomplete() {
        let mut have = BTreeMap::from([(Node::new(0, 1), vec![1.0])]);
        assert_eq!(TreeSum::new(Node::root(2), have.clone()), None);
        assert_eq!(combine(Node::root(2), &mut have), None);
    }

    #[test]
    fn a_tree_sum_read_in_blocks_has_the_bits_of_the_combined_sum() {
        use crate::sgd::Gradient;
        // 3 workers over 7 leaves of 5 values, read in blocks of 2 (the last one short).
        let root = Node::root(7);
        let mut nodes = at_coordinator(3, &leaf_values(7));
        let tree = TreeSum::new(root, nodes.clone()).unwrap();
        let combined = combine(root, &mut nodes).unwrap();
        let mut read = Vec::new();
        tree.blocks(2, &mut |start, block| {
            assert_eq!(start, read.len());
            read.extend_from_slice(block);
        });
        assert_eq!(read, combined);
        assert_eq!(tree.to_vec(), combined);
        assert_eq!(tree.len(), 5);
        let uneven = BTreeMap::from([(Node::new(0, 1), vec![1.0]), (Node::new(1, 2), vec![])]);
        assert_eq!(TreeSum::new(Node::root(2), uneven), None);
    }
}
