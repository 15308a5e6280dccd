//! Paged KV cache: attention keys and values of every running sequence live in fixed-size blocks of
//! one pool sized by a memory budget, so admission can be decided by memory and identical prompt
//! prefixes can share blocks.
//!
//! A block holds `block_size` positions of every layer's keys and values (f32, whatever the model's
//! dtype, so the decode attention kernel reads them in place). A full block may be *published*
//! under a [`BlockHash`]: the hash of everything up to the block's end (token ids, image feature
//! digests), so two sequences whose first `n` blocks hash equal have equal keys and values there.
//! Published blocks are shared read-only (reference counted); a sequence only ever writes to its
//! own last, unpublished block. Blocks nobody references stay cached under their hash until the
//! budget needs them back, least recently used first.

use std::collections::HashMap;

use lru::LruCache;

/// Index of a block in the pool.
pub type BlockId = u32;

/// Identity of a block's contents: blake3 over the previous block's hash and this block's
/// positions.
pub type BlockHash = [u8; 32];

/// What occupies one prompt position, for prefix hashing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PosKey {
    /// A text token.
    Token(u32),
    /// Row `row` of an image whose projected embeddings hash to `digest`.
    Image { digest: [u8; 32], row: u32 },
}

/// Hash of a block whose positions are `keys`, following the block hashed `prev` (all zeros for the
/// first block).
pub fn next_block_hash(prev: &BlockHash, keys: &[PosKey]) -> BlockHash {
    let mut h = blake3::Hasher::new();
    h.update(prev);
    for k in keys {
        match k {
            PosKey::Token(id) => {
                h.update(b"t");
                h.update(&id.to_le_bytes());
            }
            PosKey::Image { digest, row } => {
                h.update(b"i");
                h.update(digest);
                h.update(&row.to_le_bytes());
            }
        }
    }
    *h.finalize().as_bytes()
}

/// Chained hashes of the full blocks of `keys` (`keys.len() / block_size` of them).
pub fn block_hashes(keys: &[PosKey], block_size: usize) -> Vec<BlockHash> {
    let mut prev = [0u8; 32];
    keys.chunks_exact(block_size)
        .map(|block| {
            prev = next_block_hash(&prev, block);
            prev
        })
        .collect()
}

/// Shape of the cached tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
}

impl KvShape {
    /// f32 values of one layer's keys (or values) in one block.
    fn block_elems(&self) -> usize {
        self.kv_heads * self.block_size * self.head_dim
    }

    /// Bytes one block takes over all layers, keys and values.
    pub fn block_bytes(&self) -> usize {
        2 * self.layers * self.block_elems() * std::mem::size_of::<f32>()
    }

    /// Bytes one position takes.
    pub fn bytes_per_token(&self) -> usize {
        self.block_bytes() / self.block_size
    }
}

#[derive(Debug, Clone, Default)]
struct BlockMeta {
    refs: u32,
    hash: Option<BlockHash>,
}

/// Counts for metrics and start-up reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolUsage {
    pub total: usize,
    /// Referenced by a running sequence.
    pub used: usize,
    /// Unreferenced but holding a published prefix (reclaimable).
    pub cached: usize,
    /// Promised to running sequences for positions they have not reached yet.
    pub reserved: usize,
}

impl PoolUsage {
    /// Blocks a new sequence can still claim.
    pub fn available(&self) -> usize {
        self.total - self.used - self.reserved
    }
}

/// The block pool: storage, reference counts, the published-prefix index and the LRU of
/// unreferenced published blocks.
pub struct KvPool {
    shape: KvShape,
    /// Per layer: keys then values, each `[block][kv_head][slot][head_dim]`.
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    meta: Vec<BlockMeta>,
    free: Vec<BlockId>,
    published: HashMap<BlockHash, BlockId>,
    /// Unreferenced published blocks, least recently released first.
    idle: LruCache<BlockId, ()>,
    used: usize,
    reserved: usize,
}

impl KvPool {
    /// A pool of `blocks` blocks. The storage is zeroed lazily by the allocator, so untouched
    /// blocks cost address space, not memory.
    pub fn new(shape: KvShape, blocks: usize) -> Self {
        let elems = blocks * shape.block_elems();
        KvPool {
            shape,
            keys: (0..shape.layers).map(|_| vec![0f32; elems]).collect(),
            values: (0..shape.layers).map(|_| vec![0f32; elems]).collect(),
            meta: vec![BlockMeta::default(); blocks],
            free: (0..blocks as BlockId).rev().collect(),
            published: HashMap::new(),
            idle: LruCache::unbounded(),
            used: 0,
            reserved: 0,
        }
    }

    pub fn shape(&self) -> KvShape {
        self.shape
    }

    pub fn usage(&self) -> PoolUsage {
        PoolUsage {
            total: self.meta.len(),
            used: self.used,
            cached: self.idle.len(),
            reserved: self.reserved,
        }
    }

    /// Takes a reference on the published blocks matching the leading `hashes`, stopping at the
    /// first miss, and returns them.
    pub fn lookup(&mut self, hashes: &[BlockHash]) -> Vec<BlockId> {
        let mut hit = Vec::new();
        for h in hashes {
            let Some(&b) = self.published.get(h) else {
                break;
            };
            self.retain(b);
            hit.push(b);
        }
        hit
    }

    /// How many of the leading `hashes` are published.
    pub fn matched_prefix(&self, hashes: &[BlockHash]) -> usize {
        hashes
            .iter()
            .take_while(|h| self.published.contains_key(*h))
            .count()
    }

    /// How many of the leading `hashes` are published and not referenced by anyone: claiming them
    /// takes them out of the reclaimable set.
    pub fn idle_prefix(&self, hashes: &[BlockHash]) -> usize {
        hashes
            .iter()
            .map_while(|h| self.published.get(h))
            .filter(|&&b| self.meta[b as usize].refs == 0)
            .count()
    }

    fn retain(&mut self, b: BlockId) {
        let m = &mut self.meta[b as usize];
        if m.refs == 0 {
            self.idle.pop(&b);
            self.used += 1;
        }
        m.refs += 1;
    }

    /// Promises `n` future blocks to a sequence; [`Self::allocate`] then draws on the promise.
    /// The caller has checked `n <= usage().available()`.
    pub fn reserve(&mut self, n: usize) {
        debug_assert!(n <= self.usage().available());
        self.reserved += n;
    }

    /// Gives back an unused promise.
    pub fn unreserve(&mut self, n: usize) {
        self.reserved -= n;
    }

    /// A fresh private block against a reservation: a free one, else the least recently used
    /// cached prefix block, whose prefix is forgotten.
    pub fn allocate(&mut self) -> BlockId {
        self.reserved -= 1;
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let (b, ()) = self
                    .idle
                    .pop_lru()
                    .expect("reservations never exceed free + cached blocks");
                let old = self.meta[b as usize].hash.take();
                if let Some(h) = old {
                    self.published.remove(&h);
                }
                b
            }
        };
        self.meta[b as usize] = BlockMeta {
            refs: 1,
            hash: None,
        };
        self.used += 1;
        b
    }

    /// Publishes a full block under `hash` so later sequences with the same prefix can share it.
    /// A hash that is already published keeps its first block; this one stays private.
    pub fn publish(&mut self, b: BlockId, hash: BlockHash) {
        if self.published.contains_key(&hash) || self.meta[b as usize].hash.is_some() {
            return;
        }
        self.published.insert(hash, b);
        self.meta[b as usize].hash = Some(hash);
    }

    /// Drops one reference; an unreferenced block stays cached if published, else is freed.
    pub fn release(&mut self, b: BlockId) {
        let m = &mut self.meta[b as usize];
        m.refs -= 1;
        if m.refs == 0 {
            self.used -= 1;
            if m.hash.is_some() {
                self.idle.put(b, ());
            } else {
                self.free.push(b);
            }
        }
    }

    fn offset(&self, b: BlockId, head: usize, slot: usize) -> usize {
        ((b as usize * self.shape.kv_heads + head) * self.shape.block_size + slot)
            * self.shape.head_dim
    }

    /// Writes one position's keys and values (`[kv_heads * head_dim]` each) of `layer`.
    pub fn write(&mut self, layer: usize, b: BlockId, slot: usize, k: &[f32], v: &[f32]) {
        let d = self.shape.head_dim;
        for head in 0..self.shape.kv_heads {
            let at = self.offset(b, head, slot);
            self.keys[layer][at..at + d].copy_from_slice(&k[head * d..(head + 1) * d]);
            self.values[layer][at..at + d].copy_from_slice(&v[head * d..(head + 1) * d]);
        }
    }

    /// Keys (or values) of `layer` for one head of positions `0..len` of the sequence whose
    /// blocks are `blocks`, as slices of up to `block_size` positions each.
    pub fn head_slices<'p>(
        &'p self,
        values: bool,
        layer: usize,
        blocks: &'p [BlockId],
        head: usize,
        len: usize,
    ) -> impl Iterator<Item = &'p [f32]> + 'p {
        let store = if values {
            &self.values[layer]
        } else {
            &self.keys[layer]
        };
        let (bs, d) = (self.shape.block_size, self.shape.head_dim);
        blocks
            .iter()
            .enumerate()
            .take(len.div_ceil(bs))
            .map(move |(i, &b)| {
                let n = bs.min(len - i * bs);
                let at = self.offset(b, head, 0);
                &store[at..at + n * d]
            })
    }

    /// Keys and values of `layer` for positions `0..len` gathered into `[kv_heads, len, head_dim]`
    /// vectors (for the prefill attention, which runs as dense matrix products).
    pub fn gather(&self, layer: usize, blocks: &[BlockId], len: usize) -> (Vec<f32>, Vec<f32>) {
        let kv = self.shape.kv_heads;
        let mut k = Vec::with_capacity(kv * len * self.shape.head_dim);
        let mut v = Vec::with_capacity(k.capacity());
        for head in 0..kv {
            for s in self.head_slices(false, layer, blocks, head, len) {
                k.extend_from_slice(s);
            }
            for s in self.head_slices(true, layer, blocks, head, len) {
                v.extend_from_slice(s);
            }
        }
        (k, v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> KvShape {
        KvShape {
            layers: 2,
            kv_heads: 2,
            head_dim: 4,
            block_size: 4,
        }
    }

    #[test]
    fn hashes_chain_over_the_whole_prefix() {
        let a: Vec<PosKey> = (0..8).map(PosKey::Token).collect();
        let mut b = a.clone();
        b[1] = PosKey::Token(99);
        let (ha, hb) = (block_hashes(&a, 4), block_hashes(&b, 4));
        assert_eq!(ha.len(), 2);
        // A change in block 0 changes every later block's hash too.
        assert_ne!(ha[0], hb[0]);
        assert_ne!(ha[1], hb[1]);
        let img = |digest: u8, row| PosKey::Image {
            digest: [digest; 32],
            row,
        };
        let c: Vec<PosKey> = (0..4).map(|r| img(1, r)).collect();
        let d: Vec<PosKey> = (0..4).map(|r| img(2, r)).collect();
        assert_ne!(block_hashes(&c, 4), block_hashes(&d, 4));
        assert_eq!(
            block_hashes(&a[..7], 4).len(),
            1,
            "partial blocks have no hash"
        );
    }

    #[test]
    fn published_blocks_are_shared_then_cached_then_reclaimed_lru() {
        let mut pool = KvPool::new(shape(), 3);
        pool.reserve(2);
        let (b0, b1) = (pool.allocate(), pool.allocate());
        pool.publish(b0, [0; 32]);
        pool.publish(b1, [1; 32]);
        // A second sequence shares both.
        assert_eq!(pool.idle_prefix(&[[0; 32], [1; 32]]), 0);
        assert_eq!(pool.lookup(&[[0; 32], [1; 32], [2; 32]]), vec![b0, b1]);
        assert_eq!(pool.usage().used, 2);
        for b in [b0, b1, b0, b1] {
            pool.release(b);
        }
        let u = pool.usage();
        assert_eq!((u.used, u.cached, u.available()), (0, 2, 3));
        assert_eq!(pool.idle_prefix(&[[0; 32], [1; 32]]), 2);
        // Three new blocks: the free one first, then the least recently released cached one.
        pool.reserve(3);
        let fresh = pool.allocate();
        assert!(fresh != b0 && fresh != b1);
        assert_eq!(pool.allocate(), b0);
        assert!(
            pool.lookup(&[[0; 32]]).is_empty(),
            "b0's prefix was evicted"
        );
        assert_eq!(pool.allocate(), b1);
        assert_eq!(pool.usage().available(), 0);
    }

    #[test]
    fn writes_read_back_per_head_across_blocks() {
        let mut pool = KvPool::new(shape(), 2);
        pool.reserve(2);
        let blocks = [pool.allocate(), pool.allocate()];
        for pos in 0..6 {
            let k: Vec<f32> = (0..8).map(|i| (pos * 100 + i) as f32).collect();
            let v: Vec<f32> = k.iter().map(|x| -x).collect();
            pool.write(1, blocks[pos / 4], pos % 4, &k, &v);
        }
        let head1: Vec<f32> = pool
            .head_slices(false, 1, &blocks, 1, 6)
            .flatten()
            .copied()
            .collect();
        let want: Vec<f32> = (0..6)
            .flat_map(|p| (4..8).map(move |i| (p * 100 + i) as f32))
            .collect();
        assert_eq!(head1, want);
        let (k, v) = pool.gather(1, &blocks, 5);
        assert_eq!(k.len(), 2 * 5 * 4);
        assert_eq!(&k[5 * 4..], &want[..5 * 4]);
        assert_eq!(v[0], -0.0);
        assert_eq!(v[4], -100.0);
    }
}
