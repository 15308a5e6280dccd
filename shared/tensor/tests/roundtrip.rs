//! Property tests: the codec round-trips every tensor and rejects every
//! tampered stream with the right error.

use proptest::prelude::*;
use vlm_tensor::{
    collect_chunks, TensorAssembler, TensorChunk, TensorChunker, TensorError, TensorLimits,
    TensorValue, WireDType,
};

/// f32 bit patterns with the interesting ones over-represented: NaNs with
/// payloads (both signs, quiet and signalling), infinities, signed zeros,
/// subnormals.
fn f32_bits() -> impl Strategy<Value = f32> {
    prop_oneof![
        4 => any::<u32>().prop_map(f32::from_bits),
        1 => (any::<bool>(), 1u32..0x80_0000).prop_map(|(neg, payload)| {
            f32::from_bits(((neg as u32) << 31) | 0x7f80_0000 | payload)
        }),
        1 => prop_oneof![
            Just(0.0f32),
            Just(-0.0f32),
            Just(f32::INFINITY),
            Just(f32::NEG_INFINITY),
            Just(f32::from_bits(1)),
            Just(f32::MAX),
            Just(f32::MIN_POSITIVE),
        ],
        2 => -70000.0f32..70000.0,
    ]
}

/// A shape of rank 1..=3 (possibly with zero rows) and matching values.
fn tensor() -> impl Strategy<Value = (Vec<usize>, Vec<f32>)> {
    (prop::collection::vec(0usize..7, 0..3), 1usize..48).prop_flat_map(|(lead, row_len)| {
        let mut shape = lead;
        shape.push(row_len);
        let n: usize = shape.iter().product();
        (Just(shape), prop::collection::vec(f32_bits(), n))
    })
}

/// Like `tensor`, but with at least `min_rows` rows, as a [rows, row_len] matrix.
fn matrix(min_rows: usize) -> impl Strategy<Value = (Vec<usize>, Vec<f32>)> {
    (min_rows..min_rows + 12, 1usize..24).prop_flat_map(|(rows, row_len)| {
        (
            Just(vec![rows, row_len]),
            prop::collection::vec(f32_bits(), rows * row_len),
        )
    })
}

fn dtype() -> impl Strategy<Value = WireDType> {
    prop_oneof![
        Just(WireDType::F32),
        Just(WireDType::F16),
        Just(WireDType::BF16)
    ]
}

fn chunks(
    shape: &[usize],
    values: &[f32],
    dtype: WireDType,
    chunk_bytes: usize,
) -> Vec<TensorChunk> {
    TensorChunker::new(values, shape, dtype, chunk_bytes)
        .unwrap()
        .collect()
}

/// Pushes every chunk, then finishes; returns the first error.
fn run(chunks: &[TensorChunk], limits: TensorLimits) -> Result<(), TensorError> {
    let mut a = TensorAssembler::new(limits);
    for c in chunks {
        a.push(c)?;
    }
    a.finish().map(|_| ())
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn expected_after(dtype: WireDType, v: &[f32]) -> Vec<u32> {
    v.iter()
        .map(|&x| match dtype {
            WireDType::F32 => x.to_bits(),
            WireDType::F16 => half::f16::from_f32(x).to_f32().to_bits(),
            WireDType::BF16 => half::bf16::from_f32(x).to_f32().to_bits(),
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

    #[test]
    fn f32_round_trips_bit_exactly((shape, values) in tensor(), chunk_bytes in 0usize..3000) {
        let cs = chunks(&shape, &values, WireDType::F32, chunk_bytes);
        let row_bytes = shape.last().unwrap() * 4;
        let budget = if chunk_bytes == 0 { vlm_tensor::DEFAULT_CHUNK_BYTES } else { chunk_bytes };
        for (i, c) in cs.iter().enumerate() {
            prop_assert_eq!(c.seq, i as u64);
            prop_assert_eq!(c.header.is_some(), i == 0, "header must be on seq 0 only");
            prop_assert_eq!(c.data.len() % row_bytes, 0, "chunk is not row-aligned");
            prop_assert!(c.data.len() <= budget.max(row_bytes), "chunk {} bytes over budget {}", c.data.len(), budget);
            prop_assert!(!c.data.is_empty() || cs.len() == 1);
            prop_assert_eq!(c.crc32c, crc32c::crc32c(&c.data));
        }
        let got = collect_chunks(&cs, &TensorLimits::default()).unwrap();
        prop_assert_eq!(&got.shape, &shape);
        prop_assert_eq!(bits(&got.values), bits(&values));
    }

    #[test]
    fn half_types_round_trip_like_half((shape, values) in tensor(), dt in dtype(), chunk_bytes in 1usize..2000) {
        let cs = chunks(&shape, &values, dt, chunk_bytes);
        let got = collect_chunks(&cs, &TensorLimits::default()).unwrap();
        prop_assert_eq!(bits(&got.values), expected_after(dt, &values));
    }

    #[test]
    fn rows_arrive_in_order_and_cover_the_tensor((shape, values) in matrix(1), dt in dtype(), chunk_bytes in 1usize..400) {
        let cs = chunks(&shape, &values, dt, chunk_bytes);
        let mut a = TensorAssembler::new(TensorLimits::default());
        let mut next_row = 0;
        for c in &cs {
            let block = a.push(c).unwrap();
            prop_assert_eq!(block.first_row, next_row);
            prop_assert_eq!(block.values.len(), block.rows * shape[1]);
            let want = &values[next_row * shape[1]..(next_row + block.rows) * shape[1]];
            prop_assert_eq!(bits(&block.values), expected_after(dt, want));
            next_row += block.rows;
        }
        prop_assert_eq!(next_row, shape[0]);
        prop_assert!(a.is_complete());
    }

    #[test]
    fn stored_value_round_trips((shape, values) in tensor(), dt in dtype(), chunk_bytes in 1usize..2000) {
        let cs = chunks(&shape, &values, dt, chunk_bytes);
        let v = TensorValue::from_chunks(&cs, &TensorLimits::default()).unwrap();
        let back = TensorValue::decode(v.encode().into(), &TensorLimits::default()).unwrap();
        prop_assert_eq!(&back, &v);
        prop_assert_eq!(bits(&back.to_f32().values), expected_after(dt, &values));
        // Replaying the stored value must give a stream any receiver accepts.
        let replay: Vec<_> = back.chunks(chunk_bytes).collect();
        let again = collect_chunks(&replay, &TensorLimits::default()).unwrap();
        prop_assert_eq!(bits(&again.values), expected_after(dt, &values));
    }

    #[test]
    fn flipped_bit_is_caught((shape, values) in matrix(1), dt in dtype(), chunk_bytes in 1usize..300,
                             pick in any::<prop::sample::Index>(), byte in any::<prop::sample::Index>(), bit in 0u8..8) {
        let mut cs = chunks(&shape, &values, dt, chunk_bytes);
        let i = pick.index(cs.len());
        let mut data = cs[i].data.to_vec();
        let j = byte.index(data.len());
        data[j] ^= 1 << bit;
        cs[i].data = data.into();
        let err = run(&cs, TensorLimits::default()).unwrap_err();
        prop_assert!(matches!(err, TensorError::ChecksumMismatch { seq, .. } if seq == i as u64), "{err}");
        prop_assert_eq!(tonic::Status::from(err).code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn missing_chunk_is_caught((shape, values) in matrix(2), dt in dtype(), pick in any::<prop::sample::Index>()) {
        // One row per chunk guarantees at least two chunks.
        let mut cs = chunks(&shape, &values, dt, 1);
        let i = pick.index(cs.len());
        let n = cs.len();
        cs.remove(i);
        let err = run(&cs, TensorLimits::default()).unwrap_err();
        let ok = match err {
            TensorError::OutOfOrder { expected: 0, got: 1 } => i == 0,
            TensorError::OutOfOrder { expected, got } => expected == i as u64 && got == i as u64 + 1,
            TensorError::Incomplete { .. } => i == n - 1,
            _ => false,
        };
        prop_assert!(ok, "removing chunk {} of {} gave: {}", i, n, err);
    }

    #[test]
    fn reordered_chunks_are_caught((shape, values) in matrix(2), dt in dtype(),
                                   a in any::<prop::sample::Index>(), b in any::<prop::sample::Index>()) {
        let mut cs = chunks(&shape, &values, dt, 1);
        let (i, j) = (a.index(cs.len()), b.index(cs.len()));
        prop_assume!(i != j);
        let (i, j) = (i.min(j), i.max(j));
        cs.swap(i, j);
        let err = run(&cs, TensorLimits::default()).unwrap_err();
        prop_assert_eq!(err, TensorError::OutOfOrder { expected: i as u64, got: j as u64 });
    }

    #[test]
    fn header_total_bytes_lie_is_caught((shape, values) in tensor(), dt in dtype(), delta in -10_000i64..10_000) {
        prop_assume!(delta != 0);
        let mut cs = chunks(&shape, &values, dt, 512);
        let h = cs[0].header.as_mut().unwrap();
        let real = h.total_bytes;
        prop_assume!(real as i64 + delta >= 0);
        let lie = (real as i64 + delta) as u64;
        h.total_bytes = lie;
        let err = run(&cs, TensorLimits::default()).unwrap_err();
        prop_assert!(matches!(err, TensorError::TotalBytesMismatch { claimed, expected, .. }
            if expected == real && claimed == lie), "{err}");
        prop_assert_eq!(tonic::Status::from(err).code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn header_shape_lie_is_caught((shape, values) in matrix(2), dt in dtype(), chunk_bytes in 1usize..300, more in any::<bool>()) {
        // A self-consistent header that announces one row more or less than is sent.
        let mut cs = chunks(&shape, &values, dt, chunk_bytes);
        let h = cs[0].header.as_mut().unwrap();
        let rows = if more { shape[0] + 1 } else { shape[0] - 1 };
        h.shape[0] = rows as u64;
        h.total_bytes = (rows * shape[1] * dt.size_bytes()) as u64;
        let err = run(&cs, TensorLimits::default()).unwrap_err();
        if more {
            prop_assert!(matches!(err, TensorError::Incomplete { .. }), "{err}");
        } else {
            prop_assert!(matches!(err, TensorError::TooManyBytes { .. }), "{err}");
        }
    }

    #[test]
    fn over_limit_total_is_resource_exhausted((shape, values) in matrix(1), dt in dtype()) {
        let cs = chunks(&shape, &values, dt, 256);
        let total = cs[0].header.as_ref().unwrap().total_bytes;
        let limits = TensorLimits { max_total_bytes: total - 1, ..TensorLimits::default() };
        let mut a = TensorAssembler::new(limits);
        let err = a.push(&cs[0]).unwrap_err();
        prop_assert_eq!(&err, &TensorError::TensorTooLarge { total_bytes: total, max: total - 1 });
        prop_assert_eq!(tonic::Status::from(err).code(), tonic::Code::ResourceExhausted);
        // At exactly the limit it is accepted.
        let limits = TensorLimits { max_total_bytes: total, ..TensorLimits::default() };
        prop_assert!(run(&cs, limits).is_ok());
    }

    #[test]
    fn oversized_chunk_is_resource_exhausted((shape, values) in matrix(1), dt in dtype(), chunk_bytes in 1usize..300) {
        let cs = chunks(&shape, &values, dt, chunk_bytes);
        let (big, biggest) = cs.iter().enumerate().max_by_key(|(_, c)| c.data.len()).unwrap();
        let max = biggest.data.len() as u64 - 1;
        let err = run(&cs, TensorLimits { max_chunk_bytes: max, ..TensorLimits::default() }).unwrap_err();
        // The first chunk of maximal size trips the limit.
        let first_big = cs.iter().position(|c| c.data.len() as u64 > max).unwrap();
        prop_assert!(first_big <= big);
        prop_assert_eq!(&err, &TensorError::ChunkTooLarge { seq: first_big as u64, len: max + 1, max });
        prop_assert_eq!(tonic::Status::from(err).code(), tonic::Code::ResourceExhausted);
    }
}

/// An image layout in the header survives the chunk stream, the stored encoding and a split into
/// views; stacking drops it until the caller names the stack's own.
#[test]
fn the_image_layout_travels_with_streams_stored_values_and_views() {
    let layout = vlm_proto::ImageLayout {
        height: 90,
        width: 36,
        grid_rows: 3,
        grid_cols: 1,
        token_rows: 0,
        token_cols: 0,
    };
    let values: Vec<f32> = (0..4 * 6 * 8).map(|i| i as f32).collect();
    let v = TensorValue::from_f32(&values, &[4, 6, 8], WireDType::F16)
        .unwrap()
        .with_layout(Some(layout));
    let limits = TensorLimits::default();
    let streamed = TensorValue::from_chunks(v.chunks(64), &limits).unwrap();
    assert_eq!(streamed.meta().layout(), Some(layout));
    let stored = TensorValue::decode(v.encode().into(), &limits).unwrap();
    assert_eq!(stored, v);
    let views = stored.unstack().unwrap();
    assert_eq!(views.len(), 4);
    assert!(views.iter().all(|p| p.meta().layout() == Some(layout)));
    assert_eq!(views[2].meta().shape(), &[6, 8]);
    let stacked = TensorValue::stack(&views).unwrap();
    assert_eq!(stacked.meta().layout(), None);
    assert_eq!(stacked.data(), v.data());
    // A stored value whose header was rewritten to another grid is another value.
    let other = v.clone().with_layout(Some(vlm_proto::ImageLayout {
        grid_rows: 1,
        grid_cols: 3,
        ..layout
    }));
    assert_ne!(other.encode(), v.encode());
    // So is one with another token grid (GLM-4.1V), and the token grid survives storage.
    let tokens = v.clone().with_layout(Some(vlm_proto::ImageLayout {
        token_rows: 2,
        token_cols: 12,
        ..layout
    }));
    assert_ne!(tokens.encode(), v.encode());
    let back = TensorValue::decode(tokens.encode().into(), &limits).unwrap();
    assert_eq!(
        back.meta().layout().map(|l| (l.token_rows, l.token_cols)),
        Some((2, 12))
    );
}
